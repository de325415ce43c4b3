"""evaluate-pairs: the LFW-style threshold protocol on known scores, and the job on real celeba-wild pairs."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import BadInputError
from common.models import build_encoder
from common.verify import best_threshold, fold_accuracy, read_pairs
from conftest import SHARED

CELEBA = SHARED / "data" / "faces" / "celeba-wild"


def test_best_threshold_separates_separable_scores():
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    same = np.array([0, 0, 0, 1, 1, 1])
    t = best_threshold(scores, same)
    assert 0.3 < t < 0.7
    assert best_threshold(scores, 1 - same) < 0.1 or best_threshold(scores, 1 - same) > 0.9  # best: all one kind


def test_fold_accuracy_is_perfect_on_separable_and_near_chance_on_noise():
    rng = np.random.default_rng(0)
    same = np.repeat([0, 1], 200)
    separable = fold_accuracy(np.where(same == 1, 0.8, 0.2) + rng.normal(0, 0.05, 400), same)
    assert separable["accuracy"] == 1.0 and len(separable["thresholds"]) == 10
    noise = fold_accuracy(rng.normal(0, 1, 400), same)
    assert 0.35 < noise["accuracy"] < 0.65  # the threshold is chosen on other folds, so no fitting to noise


def test_fold_accuracy_needs_enough_pairs_of_each_kind():
    with pytest.raises(BadInputError):
        fold_accuracy(np.zeros(12), np.array([1] * 11 + [0]))


def test_read_pairs_rejects_bad_files():
    assert read_pairs("image_a,image_b,same_identity\na.jpg,b.jpg,1\n", "p.csv") == [("a.jpg", "b.jpg", 1)]
    for text in ("a,b,c\n1,2,3\n", "image_a,image_b,same_identity\na.jpg,b.jpg,yes\n", "image_a,image_b,same_identity\n"):
        with pytest.raises(BadInputError):
            read_pairs(text, "p.csv")


def test_evaluate_pairs_job_on_real_photos(tmp_path):
    """40 real celeba-wild pairs (20 same, 20 different), a random-init encoder: the job runs end to end,
    writes its three outputs, and an untrained network scores near chance."""
    rows = list(csv.DictReader((CELEBA / "pairs.csv").open()))
    chosen = [r for r in rows if r["same_identity"] == "1"][:20] + [r for r in rows if r["same_identity"] == "0"][:20]
    pairs = tmp_path / "pairs.csv"
    with pairs.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image_a", "image_b", "same_identity"])
        writer.writeheader()
        writer.writerows(chosen)
        writer.writerow({"image_a": "missing/x.jpg", "image_b": chosen[0]["image_b"], "same_identity": "1"})
    torch.manual_seed(0)
    torch.save(build_encoder().state_dict(), tmp_path / "encoder.pt")
    out = tmp_path / "out"
    r = subprocess.run([str(Path(sys.executable).parent / "evaluate-pairs"), "--pairs", str(pairs), "--images", str(CELEBA),
                        "--encoder", str(tmp_path / "encoder.pt"), "--output", str(out), "--image-size", "48",
                        "--folds", "5"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pairs"] == 41 and metrics["pairs_evaluated"] == 40
    assert list(metrics["unreadable_photos"]) == ["missing/x.jpg"]
    assert 0.0 <= metrics["roc_auc"] <= 1.0 and 0.3 <= metrics["accuracy"] <= 0.9 and metrics["folds"] == 5
    assert (out / "roc.png").stat().st_size > 0
    assert len((out / "scores.csv").read_text().splitlines()) == 41
    assert "ROC AUC" in r.stdout
