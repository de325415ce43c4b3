"""The benchmark suite at reduced CPU settings: the table is produced, and on glint24-20 (20 labels per
identity) fine-tuning from the SimCLR encoder beats supervised training from scratch on the same split.

This is the one slow test of the suite (about ten minutes on two cores): it runs benchmarks/suite.py,
which runs the real jobs, on the whole glint24 set (10,219 photos)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, SHARED


def test_reduced_suite_table_and_simclr_beats_scratch_on_glint24_20(tmp_path):
    out = tmp_path / "suite"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "suite.py"), "--out", str(out), "--reduced",
                        "--benchmarks", "glint24-20", "--arms", "scratch,simclr-fine-tune", "--device", "cpu"],
                       capture_output=True, text=True, env={**os.environ, "FACESSL_SHARED": str(SHARED)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = (out / "results.md").read_text()
    assert "| glint24-20 | scratch |" in table and "| glint24-20 | SimCLR + fine-tune |" in table
    for name in ("simclr-fine-tune-confusion_matrix.png", "simclr-fine-tune-training_curves.png",
                 "simclr-loss_curve.png"):
        figure = f"figures/glint24-20/{name}"
        assert (out / figure).stat().st_size > 1000 and f"]({figure})" in table
    results = json.loads((out / "results.json").read_text())
    assert results["settings"] == "reduced" and "CPU" in results["hardware"]
    rows = {row["arm"]: row for row in results["rows"]}
    assert set(rows) == {"scratch", "SimCLR + fine-tune"}
    for row in rows.values():
        assert row["labelled_images"] == 24 * 20 - 2  # Lindsay Lohan has 18 train crops, every other identity 20
        assert row["test_images"] > 900 and row["epochs"] == 10
        assert row["pretraining_images"] > 8000  # the whole train split, labels unused
    scratch, simclr = rows["scratch"]["top1"], rows["SimCLR + fine-tune"]["top1"]
    assert simclr > scratch + 0.03, f"SimCLR + fine-tune {simclr:.3f} does not beat scratch {scratch:.3f}"


def test_unknown_arm_is_a_usage_error(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "suite.py"), "--out", str(tmp_path),
                        "--arms", "simclr-finetune"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown arms ['simclr-finetune']" in r.stderr
