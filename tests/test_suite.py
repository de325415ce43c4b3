"""The benchmark suite at reduced CPU settings: the table is produced, and on glint24-20 (20 labels per
identity) fine-tuning from the SimCLR encoder beats supervised training from scratch on the same split.

This is the one slow test of the suite (about ten minutes on two cores): it runs benchmarks/suite.py,
which runs the real jobs, on the whole glint24 set (10,219 photos)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SHARED

# the suite imports its sibling benchmarks/checkout.py, as it does when run as a script
sys.path.insert(0, str(REPO / "benchmarks"))
_spec = importlib.util.spec_from_file_location("suite", REPO / "benchmarks" / "suite.py")
suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(suite)


@pytest.mark.suite
def test_reduced_suite_table_and_simclr_beats_scratch_on_glint24_20(tmp_path):
    out = tmp_path / "suite"
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "suite.py"),
        "--out",
        str(out),
        "--reduced",
        "--benchmarks",
        "glint24-20",
        "--arms",
        "scratch,simclr-fine-tune",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "FACESSL_SHARED": str(SHARED), "OMP_NUM_THREADS": "2"}
    # the two stages apart, as on a GPU machine that receives only the prepared data (benchmarks/gpu/)
    r = subprocess.run(cmd + ["--stage", "prepare"], capture_output=True, text=True, timeout=3600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (out / "glint24-20" / "prepared" / "manifest.json").is_file() and not (out / "results.md").exists()
    r = subprocess.run(
        cmd + ["--stage", "train"],
        capture_output=True,
        text=True,
        timeout=3600,
        env={**env, "FACESSL_SHARED": str(tmp_path / "no-raw-data-needed")},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = (out / "results.md").read_text()
    assert "| glint24-20 | scratch |" in table and "| glint24-20 | SimCLR + fine-tune |" in table
    for name in (
        "simclr-fine-tune-confusion_matrix.png",
        "simclr-fine-tune-training_curves.png",
        "simclr-loss_curve.png",
    ):
        figure = f"figures/glint24-20/{name}"
        assert (out / figure).stat().st_size > 1000 and f"]({figure})" in table
    results = json.loads((out / "results.json").read_text())
    assert results["settings"] == "reduced" and "CPU" in results["hardware"]
    rows = {row["arm"]: row for row in results["rows"]}
    manifest = json.loads((out / "glint24-20" / "prepared" / "manifest.json").read_text())
    train_split = manifest["counts"]["splits"]["train"]
    assert set(rows) == {"scratch", "SimCLR + fine-tune"}
    for row in rows.values():
        # Lindsay Lohan has 18 train crops, every other identity 20
        assert row["labelled_images"] == 24 * 20 - 2
        assert row["test_images"] > 900 and row["epochs"] == 10
        # the whole train split (labels unused), no val/test
        assert row["pretraining_images"] == train_split > 8000
        assert row["commit"] != "unknown" and "--reduced" in row["command"]
    scratch, simclr = rows["scratch"]["top1"], rows["SimCLR + fine-tune"]["top1"]
    assert simclr > scratch + 0.02, f"SimCLR + fine-tune {simclr:.3f} does not beat scratch {scratch:.3f}"


def test_unknown_arm_is_a_usage_error(tmp_path):
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "suite.py"), "--out", str(tmp_path), "--arms", "simclr-finetune"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "unknown arms ['simclr-finetune']" in r.stderr


def test_unknown_or_empty_benchmarks_and_missing_data_are_usage_errors(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "suite.py"), "--out", str(tmp_path)]
    for extra in (["--benchmarks", ","], ["--benchmarks", "glint7"], ["--arms", "imagenet-fine-tune"]):
        r = subprocess.run(cmd + extra, capture_output=True, text=True)
        assert r.returncode == 2, (extra, r.stderr)
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "FACESSL_SHARED": str(tmp_path)})
    assert r.returncode == 2 and "benchmark data not found" in r.stderr and "celeba-wild" in r.stderr
    # a run would merge into it: refused before any work
    (tmp_path / "results.json").write_text("not json")
    # a clone need not sit beside ../shared
    real_data = {**os.environ, "FACESSL_SHARED": str(SHARED)}
    r = subprocess.run(cmd + ["--benchmarks", "glint6"], capture_output=True, text=True, env=real_data)
    assert r.returncode == 2 and "is not a results.json of this suite" in r.stderr
    for rows in (
        [{"benchmark": "glint24-20", "arm": "scratch", "top1": 0.2}],
        [{"benchmark": "glint24-50"}],
        ["benchmark"],
        # each used to fail with a traceback after all the training, while merging
    ):
        (tmp_path / "results.json").write_text(json.dumps({"settings": "reduced", "rows": rows}))
        r = subprocess.run(cmd + ["--benchmarks", "glint6", "--reduced"], capture_output=True, text=True, env=real_data)
        assert r.returncode == 2 and "is not a results.json of this suite (row 1 " in r.stderr, r.stderr
    r = subprocess.run(
        [*cmd[:-1], str(tmp_path / "results.json"), "--benchmarks", "glint6"],
        capture_output=True,
        text=True,
        env=real_data,
    )
    assert r.returncode == 2 and "--out" in r.stderr


def test_bad_stage_device_weights_or_pairs_file_stop_the_suite_before_any_work(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "suite.py"), "--out", str(tmp_path / "out"), "--reduced"]
    real_data = {**os.environ, "FACESSL_SHARED": str(SHARED)}
    r = subprocess.run(cmd + ["--benchmarks", "glint6", "--stage", "train"], capture_output=True, text=True)
    assert r.returncode == 2 and "needs an earlier --stage prepare" in r.stderr and "glint6" in r.stderr
    r = subprocess.run(
        cmd + ["--benchmarks", "glint6", "--device", "tpu"], capture_output=True, text=True, env=real_data
    )
    assert r.returncode == 2 and "unknown device 'tpu'" in r.stderr
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"not a checkpoint")
    r = subprocess.run(
        cmd + ["--benchmarks", "glint6", "--imagenet-weights", str(weights), "--device", "cpu"],
        capture_output=True,
        text=True,
        env=real_data,
    )
    assert r.returncode == 3 and "resnet18.pth" in r.stderr and "Traceback" not in r.stderr
    # refused before prepare-data
    assert not (tmp_path / "out" / "glint6").exists()
    faces = tmp_path / "shared" / "data" / "faces" / "celeba-wild"
    (faces / "1").mkdir(parents=True)
    (faces / "pairs.csv").write_text("left,right,same_identity\n1/a.jpg,1/b.jpg,1\n")
    fake = {**os.environ, "FACESSL_SHARED": str(tmp_path / "shared")}
    (faces.parent / "glint24" / "Someone").mkdir(parents=True)
    r = subprocess.run(
        cmd + ["--benchmarks", "glint24-20,celeba-pairs", "--stage", "prepare"],
        capture_output=True,
        text=True,
        env=fake,
    )
    assert r.returncode == 3 and "must have the columns image_a,image_b,same_identity" in r.stderr
    # before any benchmark
    assert "Traceback" not in r.stderr and not (tmp_path / "out" / "glint24-20").exists()
    (faces / "pairs.csv").write_text(
        "image_a,image_b,same_identity\n" + "".join(f"1/{i}.jpg,1/{i + 1}.jpg,{i % 2}\n" for i in range(30))
    )
    r = subprocess.run(
        cmd + ["--benchmarks", "celeba-pairs", "--stage", "prepare"], capture_output=True, text=True, env=fake
    )
    assert r.returncode == 3 and "names 31 photos missing" in r.stderr


def test_pairs_pretraining_folder_holds_no_pair_photo_and_is_rebuilt(tmp_path, monkeypatch):
    faces = tmp_path / "faces"
    for rel in ("1/a.jpg", "1/b.jpg", "2/c.jpg", "2/d.jpg"):
        (faces / "celeba-wild" / rel).parent.mkdir(parents=True, exist_ok=True)
        (faces / "celeba-wild" / rel).write_bytes(rel.encode())
    (faces / "celeba-wild" / "pairs.csv").write_text("image_a,image_b,same_identity\n1/a.jpg,2/c.jpg,0\n")
    monkeypatch.setattr(suite, "FACES", faces)
    stale = tmp_path / "out" / "celeba-pairs-pretrain-raw" / "1" / "a.jpg"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left over from an older pairs.csv")
    dst = suite.pairs_raw_folder(tmp_path / "out")
    files = sorted(str(p.relative_to(dst)) for p in dst.rglob("*.jpg"))
    assert files == ["1/b.jpg", "2/d.jpg"]
    assert not any(p.is_symlink() for p in dst.rglob("*")) and (dst / "2" / "d.jpg").read_bytes() == b"2/d.jpg"


def test_a_subset_run_updates_the_table_and_keeps_the_other_benchmarks(tmp_path):
    old = [{"benchmark": b, "arm": "scratch", "top1": 0.1} for b in ("glint6", "glint24-20")]
    (tmp_path / "results.json").write_text(json.dumps({"settings": "reduced", "rows": old}))
    merged = suite.merge_rows(tmp_path, [{"benchmark": "glint6", "arm": "scratch", "top1": 0.5}], "reduced")
    assert [(r["benchmark"], r["top1"]) for r in merged] == [("glint6", 0.5), ("glint24-20", 0.1)]
    # other settings: not mixed
    assert suite.merge_rows(tmp_path, old[:1], "full") == old[:1]


@pytest.mark.parametrize("signame,code,delay", [("SIGTERM", 4, 0), ("SIGTERM", 4, 2), ("SIGINT", 130, 2)])
def test_sigterm_or_ctrl_c_stop_the_running_job_and_the_suite(signame, code, delay, tmp_path):
    """SIGTERM used to kill the suite alone (exit 143), its pretrain-simclr child running on, orphaned and
    writing into --out; Ctrl-C gave a KeyboardInterrupt traceback. Now the running job gets the signal, stops
    at its own safe point, and the suite exits with the job's retry code (4) or 130. With no delay, the job is
    still importing and dies of the signal itself (-15): that is the retry code 4 too."""
    import signal
    import time

    glint24 = tmp_path / "shared" / "data" / "faces" / "glint24"
    for name in suite.GLINT6.split(","):
        (glint24 / name).mkdir(parents=True)
        for src in sorted((SHARED / "data" / "faces" / "glint24" / name).iterdir())[:12]:
            shutil.copyfile(src, glint24 / name / src.name)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "benchmarks" / "suite.py"),
            "--out",
            str(tmp_path / "out"),
            "--reduced",
            "--benchmarks",
            "glint6",
            "--arms",
            "scratch",
            "--device",
            "cpu",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "FACESSL_SHARED": str(tmp_path / "shared")},
    )
    try:
        deadline, jobs = time.time() + 120, []
        while not jobs and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            jobs = subprocess.run(
                ["pgrep", "-f", "-P", str(proc.pid), "jobs.pretrain_simclr"], capture_output=True, text=True
            ).stdout.split()
        assert jobs, "pretrain-simclr never started"
        time.sleep(delay)
        proc.send_signal(getattr(signal, signame))
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == code and "Traceback" not in err, err
    assert not any(Path(f"/proc/{pid}").exists() for pid in jobs), "the job outlived the suite"
