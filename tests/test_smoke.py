"""The fast tier's end-to-end smoke run: the three jobs as console scripts, in order, on real faces.

Tiny settings (one epoch each at 32 px) so that it takes seconds: it checks that every stage runs, hands its
output to the next and writes what the README promises, not how well the model learns (the slow tier does).
"""

import csv
import json

import pytest

from conftest import run_script

run = run_script


def test_three_jobs_run_end_to_end_on_real_faces(glint_subset, tmp_path):
    prepared, simclr, classifier = tmp_path / "prepared", tmp_path / "simclr", tmp_path / "classifier"
    r = run("prepare-data", "--input", glint_subset, "--output", prepared, "--image-size", 32)
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert len(manifest["classes"]) == 3 and manifest["counts"]["splits"]["test"] > 0

    r = run(
        "pretrain-simclr",
        "--data",
        prepared,
        "--output",
        simclr,
        "--epochs",
        1,
        "--image-size",
        32,
        "--batch-size",
        64,
        "--knn-every",
        1,
        "--warmup-epochs",
        0,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    history = [json.loads(line) for line in (simclr / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["loss"] > 0 and "knn_top1" in history[0]
    assert (simclr / "encoder.pt").is_file()

    r = run(
        "train-classifier",
        "--data",
        prepared,
        "--output",
        classifier,
        "--encoder",
        simclr,
        "--epochs",
        1,
        "--image-size",
        32,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    metrics = json.loads((classifier / "metrics.json").read_text())
    assert metrics["test"]["n"] == manifest["counts"]["splits"]["test"]
    assert 0.0 <= metrics["test"]["top1"] <= metrics["test"]["top3"] == 1.0
    for name in ("model.pt", "confusion_matrix.png", "classification_report.txt"):
        assert (classifier / name).is_file(), name
    # one row per test image, its correct column agreeing with top-1
    rows = list(csv.DictReader((classifier / "test_predictions.csv").open()))
    assert len(rows) == metrics["test"]["n"]
    assert all(r["true"] in metrics["classes"] and r["predicted"] in metrics["classes"] for r in rows)
    assert [int(r["index"]) for r in rows] == list(range(len(rows)))
    correct = [int(r["correct"]) for r in rows]
    assert correct == [int(r["true"] == r["predicted"]) for r in rows]
    assert sum(correct) / len(rows) == pytest.approx(metrics["test"]["top1"], abs=1e-6)
