"""Preemption: SIGTERM mid-epoch writes a checkpoint and exits with the retry code; a rerun resumes and
ends with exactly the weights of an uninterrupted run (CPU, same seed), locally and on S3."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from facessl.common.checkpoints import load_latest_checkpoint, load_torch
from facessl.common.storage import open_storage

ARGS = [
    "--epochs",
    "3",
    "--batch-size",
    "32",
    "--image-size",
    "32",
    "--warmup-epochs",
    "2",
    "--knn-every",
    "0",
    "--log-every",
    "1",
    "--checkpoint-every",
    "1",
    "--device",
    "cpu",
    # bitwise equality: a CPU property
]
SCRIPT = str(Path(sys.executable).parent / "pretrain-simclr")


def pretrain(data, out, extra=(), env=None):
    return subprocess.run(
        [SCRIPT, "--data", str(data), "--output", out, *ARGS, *extra],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **(env or {})},
    )


def interrupt_mid_epoch(data, out, env, when="epoch 2 step 2/", extra=()):
    """Start pretraining, send SIGTERM once it logs ``when``, return the finished process."""
    proc = subprocess.Popen(
        [SCRIPT, "--data", str(data), "--output", out, *ARGS, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    for line in proc.stdout:
        if line.startswith(when):
            proc.send_signal(signal.SIGTERM)
            break
    stdout, stderr = proc.communicate(timeout=900)
    return proc.returncode, stdout, stderr


@pytest.fixture(scope="module")
def uninterrupted(prepared_subset, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    r = pretrain(prepared_subset, str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    return load_torch(str(out / "encoder.pt")), [
        json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_sigterm_then_resume_matches_uninterrupted_run(where, prepared_subset, uninterrupted, tmp_path, request):
    out = str(tmp_path / "run") if where == "local" else f"s3://{request.getfixturevalue('s3_env')}/run"
    env = {"FACESSL_CACHE": str(tmp_path / "cache")}
    code, stdout, stderr = interrupt_mid_epoch(prepared_subset, out, env)
    assert code == 4, stdout + stderr
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    state = load_latest_checkpoint(open_storage(out))
    assert state["epoch"] == 1 and 2 <= state["step"] < 6, "checkpoint taken inside epoch 2"
    assert not open_storage(out).exists("encoder.pt")

    resumed = pretrain(prepared_subset, out, env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming at epoch 2, step {state['step']}" in resumed.stdout
    encoder, history = uninterrupted
    final = load_torch(f"{out}/encoder.pt")
    for key, value in encoder.items():
        assert torch.equal(final[key], value), key
    resumed_history = [json.loads(x) for x in open_storage(out).read_text("metrics.jsonl").splitlines()]
    assert [h["lr"] for h in resumed_history] == [h["lr"] for h in history], "LR schedule continues, no new warm-up"
    assert [h["loss"] for h in resumed_history] == pytest.approx([h["loss"] for h in history], rel=1e-6)

    again = pretrain(prepared_subset, out, env=env)
    assert again.returncode == 0 and "already finished" in again.stdout
    # local shards decoded into memory: no cache folder made (an empty one was left by every run)
    assert where == "s3" or not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_a_finished_run_rewrites_its_weights_and_a_restart_leaves_none_of_its_results(
    prepared_subset, uninterrupted, tmp_path
):
    """A finished run whose encoder.pt was deleted printed "wrote encoder.pt" and wrote nothing. A restart
    (--resume never) over a finished run, stopped mid-way, left the new config beside the old encoder.pt,
    which train-classifier then used without a word."""
    out = tmp_path / "run"
    assert pretrain(prepared_subset, str(out)).returncode == 0
    summary = (out / "summary.json").read_text()
    for name in ("encoder.pt", "summary.json", "loss_curve.png"):
        (out / name).unlink()
    again = pretrain(prepared_subset, str(out))
    assert again.returncode == 0 and "written again" in again.stdout, again.stdout + again.stderr
    rewritten, (encoder, _) = load_torch(str(out / "encoder.pt")), uninterrupted
    assert all(torch.equal(rewritten[k], v) for k, v in encoder.items())
    assert (out / "summary.json").read_text() == summary and (out / "loss_curve.png").stat().st_size > 1000
    # a new run there would delete the weights it starts from (and a resume would need them again)
    r = pretrain(prepared_subset, str(out), extra=["--init", str(out / "encoder.pt"), "--resume", "never"])
    assert r.returncode == 2 and "lies inside --output" in r.stderr and (out / "encoder.pt").is_file(), r.stderr
    code, stdout, stderr = interrupt_mid_epoch(prepared_subset, str(out), {}, extra=["--resume", "never"])
    assert code == 4, stdout + stderr
    assert not [k for k in ("encoder.pt", "projection_head.pt", "summary.json") if (out / k).exists()]
    state = load_latest_checkpoint(open_storage(str(out)))
    assert not state["finished"] and state["epoch"] == 1, "the restart's own checkpoint, not the finished run's"


@pytest.mark.slow
def test_resume_of_a_checkpoint_from_another_device_kind_reseeds_instead_of_crashing(prepared_subset, tmp_path):
    """A preempted GPU run resumed on a CPU node (or the reverse): the augmentation generator's saved state
    belongs to the other device kind and cannot be loaded; the run goes on from the checkpoint, reseeded."""
    out = tmp_path / "run"
    code, stdout, stderr = interrupt_mid_epoch(prepared_subset, str(out), {})
    assert code == 4, stdout + stderr
    path = out / json.loads((out / "checkpoints" / "latest.json").read_text())["key"]
    state = torch.load(path, weights_only=True)
    # a CUDA generator's state
    state["aug_rng"], state["aug_rng_device"] = torch.zeros(16, dtype=torch.uint8), "cuda"
    torch.save(state, path)
    resumed = pretrain(prepared_subset, str(out))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "augmentation stream reseeded on resume" in resumed.stdout and "resuming at epoch 2" in resumed.stdout
    assert (out / "encoder.pt").is_file()


@pytest.mark.slow
def test_nan_loss_stops_with_exit_code_5_and_keeps_checkpoint(prepared_subset, tmp_path):
    out = tmp_path / "run"
    r = pretrain(prepared_subset, str(out), extra=["--lr", "1e30", "--warmup-epochs", "0"])
    assert r.returncode == 5, r.stdout + r.stderr
    assert "loss became" in r.stderr and "Traceback" not in r.stderr
    assert not (out / "encoder.pt").exists()


@pytest.mark.slow
def test_a_last_step_that_breaks_the_weights_is_divergence_not_a_finished_run(prepared_subset, tmp_path):
    """The loss is checked before each step, so a one-step run never saw the update of --lr 1e30: it ended
    with exit 0 and an encoder whose embeddings overflow."""
    out = tmp_path / "run"
    r = subprocess.run(
        [
            SCRIPT,
            "--data",
            str(prepared_subset),
            "--output",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "100000",
            "--image-size",
            "32",
            "--lr",
            "1e30",
            "--optimizer",
            "sgd",
            "--warmup-epochs",
            "0",
            "--knn-every",
            "0",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 5 and "after the last step" in r.stderr, r.stdout + r.stderr
    assert not (out / "encoder.pt").exists()


@pytest.mark.slow
def test_sigterm_stops_train_classifier_with_the_retry_code(prepared_subset, tmp_path):
    """train-classifier keeps no checkpoint (minutes of work): SIGTERM still ends it with code 4, which the
    job specs retry, rather than with the signal's default status."""
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "train-classifier"),
            "--data",
            str(prepared_subset),
            "--output",
            str(tmp_path / "cls"),
            "--epochs",
            "50",
            "--image-size",
            "32",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith("epoch=1 "):
            proc.send_signal(signal.SIGTERM)
            break
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 4, stdout + stderr
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr


def test_logged_lr_is_the_last_steps_whatever_step_a_run_resumed_at():
    """Each epoch's logged LR comes from the schedule (the LR its last step ran with), so a run resumed on an
    epoch's last step logs what an uninterrupted run logs."""
    from facessl.common.training import last_step_lr, warmup_cosine

    steps, epochs = 3, 4
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps * epochs, steps))
    ran = []
    for _ in range(steps * epochs):
        ran.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert [last_step_lr(scheduler, e, steps) for e in range(epochs)] == [
        ran[(e + 1) * steps - 1] for e in range(epochs)
    ]
    assert ran[steps - 1] == 0.5 and 0 < last_step_lr(scheduler, epochs - 1, steps) < 0.1


@pytest.mark.slow
def test_resume_refuses_other_data_and_damaged_checkpoints(prepared_subset, tmp_path):
    """Another --data or other data at the same location, a checkpoint without its optimizer or RNG state, with NaN
    weights or optimizer moments, or
    a negative epoch: exit 2 / 3 naming the cause, and
    the checkpoint is left as it was. A damaged history.json never deletes the run's other files."""
    import shutil

    out, data, other = tmp_path / "run", tmp_path / "data", tmp_path / "other-data"
    shutil.copytree(prepared_subset, data)
    code, stdout, stderr = interrupt_mid_epoch(data, str(out), {})
    assert code == 4, stdout + stderr
    shutil.copytree(data, other)
    r = pretrain(other, str(out))
    assert r.returncode == 2 and "data:" in r.stderr and "other options" in r.stderr, r.stdout + r.stderr
    # a prepare-data rerun at the same location: other crops
    manifest = (data / "manifest.json").read_text()
    (data / "manifest.json").write_text(json.dumps({**json.loads(manifest), "dataset_id": "0" * 32}))
    r = pretrain(data, str(out))
    assert r.returncode == 2 and "dataset_id:" in r.stderr, r.stdout + r.stderr
    (data / "manifest.json").write_text(manifest)
    path = out / json.loads((out / "checkpoints" / "latest.json").read_text())["key"]
    good = torch.load(path, weights_only=True)
    nan_like = lambda t: torch.full_like(t, float("nan"))  # noqa: E731
    first_moments = next(iter(good["optimizer"]["state"]))
    # name: (changed entries, message)
    damages = {
        "no optimizer": ({"optimizer": None}, "damaged"),
        "nan": (
            {"model": {**good["model"], "encoder.conv1.weight": nan_like(good["model"]["encoder.conv1.weight"])}},
            "NaN or infinite",
        ),
        "nan optimizer state": (
            {
                "optimizer": {
                    **good["optimizer"],
                    "state": {
                        **good["optimizer"]["state"],
                        first_moments: {
                            k: nan_like(v) if torch.is_tensor(v) and v.is_floating_point() else v
                            for k, v in good["optimizer"]["state"][first_moments].items()
                        },
                    },
                }
            },
            "optimizer state",
        ),
        "no rng": ({"rng": None}, "damaged"),
        "negative epoch": ({"epoch": -3}, "damaged"),
    }
    for damage, (change, message) in damages.items():
        state = {k: v for k, v in {**good, **change}.items() if v is not None}
        torch.save(state, path)
        r = pretrain(data, str(out))
        assert r.returncode == 3 and "Traceback" not in r.stderr, (damage, r.stdout + r.stderr)
        assert message in r.stderr, (damage, r.stderr)
    torch.save(good, path)
    (out / "keep.txt").write_text("the user's file")
    (out / "checkpoints" / "history.json").write_text(json.dumps(["keep.txt", "../keep.txt", 3]))
    r = pretrain(data, str(out))
    assert r.returncode == 0 and (out / "keep.txt").read_text() == "the user's file", r.stdout + r.stderr
