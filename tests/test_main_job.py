"""The main job's comparison (infra/local/run-pipeline.sh): its table and comparison.json, made by the script's own
print_comparison from the metrics.json files of a tiny real run of its three arms (SimCLR 1 epoch, 1 fine-tuning
epoch for scratch and for SimCLR, 1 distillation epoch, 32 px, three identities)."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from facessl.jobs.pretrain_simclr import main as pretrain_main
from facessl.jobs.train_classifier import main as classifier_main

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "infra" / "local" / "run-pipeline.sh"


def invoke(cmd, *args):
    result = CliRunner().invoke(cmd, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def tiny_run(prepared_subset, tmp_path_factory) -> Path:
    """A run folder laid out as the main job leaves it: simclr/, scratch/, simclr-fine-tune/ and simclr-distill/,
    every arm on 20 labelled crops per identity."""
    out = tmp_path_factory.mktemp("main-job") / "run"
    invoke(
        pretrain_main,
        *("--data", prepared_subset, "--output", out / "simclr", "--epochs", 1, "--image-size", 32),
        *("--batch-size", 64, "--warmup-epochs", 0, "--knn-every", 0, "--checkpoint-every", 0, "--device", "cpu"),
    )
    arm = ("--labels-per-class", 20, "--epochs", 1, "--image-size", 32, "--device", "cpu")
    invoke(classifier_main, "--data", prepared_subset, "--output", out / "scratch", *arm)
    invoke(
        classifier_main,
        "--data",
        prepared_subset,
        "--output",
        out / "simclr-fine-tune",
        "--encoder",
        out / "simclr",
        *arm,
    )
    invoke(
        classifier_main,
        *("--data", prepared_subset, "--output", out / "simclr-distill", "--mode", "distill"),
        *("--teacher", out / "simclr-fine-tune", "--encoder", out / "simclr", *arm),
    )
    return out


def print_comparison(out: Path, *args: str) -> subprocess.CompletedProcess:
    """The script sourced (which defines its functions and runs nothing), then its print_comparison, with this
    interpreter's environment first on PATH as the script puts the venv's."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", "-c", 'source "$1" && shift && print_comparison "$@"', "bash", str(SCRIPT), str(out), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


ARMS = ("scratch", "simclr-fine-tune", "simclr-distill")
LABELS = ("scratch", "SimCLR + fine-tune", "SimCLR + distillation")


def test_comparison_json_and_table_hold_every_arms_metrics(tiny_run):
    seconds = {"venv": 1, "prepare": 2, "simclr": 3, "scratch": 4, "simclr_fine_tune": 5, "total": 75}
    r = print_comparison(tiny_run, "glint24-20", "20", json.dumps(seconds), *ARMS)
    assert r.returncode == 0, r.stdout + r.stderr
    # sourced, the script ran no stage
    assert "== " not in r.stdout
    written = json.loads((tiny_run / "comparison.json").read_text())
    metrics = {arm: json.loads((tiny_run / arm / "metrics.json").read_text()) for arm in ARMS}
    n = metrics["scratch"]["test"]["n"]
    assert {k: written[k] for k in ("benchmark", "labels_per_class", "test_images")} == {
        "benchmark": "glint24-20",
        "labels_per_class": 20,
        "test_images": n,
    }
    assert [row["arm"] for row in written["rows"]] == list(ARMS)
    for row in written["rows"]:
        test = metrics[row["arm"]]["test"]
        assert (row["top1"], row["top3"], row["macro_f1"]) == (test["top1"], test["top3"], test["macro_f1"])
        # three identities, 20 labels each: the same labelled images in every arm (distillation's other train
        # crops carry no label)
        assert (row["labelled_images"], row["test_images"]) == (60, n)
    assert written["seconds"] == seconds
    # the table: a header, then one line per arm with its figures as printed to 3 decimals
    lines = r.stdout.splitlines()
    assert f"glint24-20 test ({n} images), 20 labels per identity:" in lines
    for label, arm in zip(LABELS, ARMS):
        test = metrics[arm]["test"]
        row = next(line.split() for line in lines if line.strip().startswith(label))
        assert row[-5:] == [f"{test['top1']:.3f}", f"{test['top3']:.3f}", f"{test['macro_f1']:.3f}", "60", str(n)]
    assert "pipeline time 1 min 15 s" in r.stdout
    # each SimCLR arm's lead over scratch image by image, from the arms' test_predictions.csv
    assert "lead_top1" not in written["rows"][0]
    correct = {arm: [int(r["correct"]) for r in read_predictions(tiny_run / arm)] for arm in ARMS}
    for label, row in zip(LABELS[1:], written["rows"][1:]):
        gain = 100 * (metrics[row["arm"]]["test"]["top1"] - metrics["scratch"]["test"]["top1"])
        assert f"{label} - scratch: {gain:+.1f} points of top-1" in r.stdout
        pairs = list(zip(correct["scratch"], correct[row["arm"]]))
        lead = row["lead_top1"]
        assert lead["over"] == "scratch"
        assert (lead["base_only_correct"], lead["arm_only_correct"]) == (
            sum(a and not b for a, b in pairs),
            sum(b and not a for a, b in pairs),
        )
        assert lead["points"] == pytest.approx(gain, abs=0.01)
        low, high = lead["ci95_points"]
        assert low <= lead["points"] <= high and 0 <= lead["mcnemar_p"] <= 1
        assert f"95% interval over the test images: {low:+.1f} to {high:+.1f} points" in r.stdout


def test_without_arms_named_the_comparison_holds_scratch_and_fine_tune(tiny_run, tmp_path):
    out = copy_arms(tiny_run, tmp_path)
    r = print_comparison(out, "glint24-20", "20", "{}")
    assert r.returncode == 0, r.stderr
    written = json.loads((out / "comparison.json").read_text())
    assert [row["arm"] for row in written["rows"]] == ["scratch", "simclr-fine-tune"]
    assert "SimCLR + distillation" not in r.stdout


def read_predictions(arm: Path) -> list[dict]:
    with (arm / "test_predictions.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def write_predictions(arm: Path, rows: list[dict]) -> None:
    with (arm / "test_predictions.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def copy_arms(tiny_run: Path, tmp_path: Path) -> Path:
    """A copy of the tiny run's two arms, to damage without touching the module's run."""
    out = tmp_path / "run"
    for arm in ("scratch", "simclr-fine-tune"):
        shutil.copytree(tiny_run / arm, out / arm)
    return out


def test_arms_that_list_different_test_images_are_refused(tiny_run, tmp_path):
    out = copy_arms(tiny_run, tmp_path)
    rows = read_predictions(out / "scratch")
    # the same count, another identity for the first image: another test set
    rows[0]["true"] = next(r["true"] for r in rows if r["true"] != rows[0]["true"])
    write_predictions(out / "scratch", rows)
    r = print_comparison(out, "glint24-20", "20", "{}")
    assert r.returncode != 0
    assert "list different test images" in r.stderr
    assert not (out / "comparison.json").exists()


def test_an_arm_without_predictions_still_gets_its_table(tiny_run, tmp_path):
    out = copy_arms(tiny_run, tmp_path)
    (out / "scratch" / "test_predictions.csv").unlink()
    r = print_comparison(out, "glint24-20", "20", "{}")
    assert r.returncode == 0, r.stderr
    assert "no test_predictions.csv for scratch: rerun it for the paired interval of the lead" in r.stdout
    assert not any("lead_top1" in row for row in json.loads((out / "comparison.json").read_text())["rows"])


def test_arms_scored_on_different_test_sets_are_refused(tiny_run, tmp_path):
    out = copy_arms(tiny_run, tmp_path)
    metrics = json.loads((out / "scratch" / "metrics.json").read_text())
    metrics["test"]["n"] += 1
    (out / "scratch" / "metrics.json").write_text(json.dumps(metrics))
    r = print_comparison(out, "glint24-20", "20", "{}")
    assert r.returncode != 0
    assert "the arms differ in test_images" in r.stderr
    assert not (out / "comparison.json").exists()


def test_unknown_benchmark_is_refused_before_any_work(tmp_path):
    r = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={**os.environ, "BENCHMARK": "glint7"},
        timeout=60,
    )
    assert r.returncode == 2
    assert "BENCHMARK=glint7" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("metrics.json", '{"test": ', "is not a train-classifier metrics.json (JSONDecodeError"),
        ("metrics.json", '{"test": {}}', "is not a train-classifier metrics.json (KeyError"),
        ("metrics.json", None, "metrics.json not found: run that arm's train-classifier first"),
        ("test_predictions.csv", "", "does not hold one row with a 0/1 'correct' for each of the"),
        ("test_predictions.csv", "index,true,predicted,correct\n", "does not hold one row with a 0/1 'correct'"),
        ("test_predictions.csv", b"index,true\n\xff\xfe,\n", "cannot be read (UnicodeDecodeError"),
        ("test_predictions.csv", "yes", "does not hold one row with a 0/1 'correct'"),
    ],
)
def test_a_damaged_arm_file_stops_the_comparison_with_one_line(tiny_run, tmp_path, name, content, says):
    out = copy_arms(tiny_run, tmp_path)
    path = out / "scratch" / name
    if content is None:
        path.unlink()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    r = print_comparison(out, "glint24-20", "20", "{}")
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # nothing half-done: no table and no comparison.json
    assert "labels per identity" not in r.stdout
    assert not (out / "comparison.json").exists()


def test_predictions_whose_correct_column_is_not_0_or_1_are_refused(tiny_run, tmp_path):
    out = copy_arms(tiny_run, tmp_path)
    rows = read_predictions(out / "scratch")
    rows[0]["correct"] = "yes"
    write_predictions(out / "scratch", rows)
    r = print_comparison(out, "glint24-20", "20", "{}")
    assert r.returncode == 1 and "a 0/1 'correct' for each of the" in r.stderr
