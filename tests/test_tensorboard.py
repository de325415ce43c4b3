"""TensorBoard event files next to metrics.jsonl, read back with TensorBoard's own event reader: from RunWriter,
and from both training jobs after a tiny real run, locally and on the real S3 server."""

import json
import sys

import pytest
from click.testing import CliRunner

from facessl.common.errors import UsageError
from facessl.common.storage import open_storage
from facessl.common.training import RunWriter
from facessl.jobs.pretrain_simclr import main as pretrain_main
from facessl.jobs.train_classifier import main as classifier_main


def read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the event files of ``folder``, as TensorBoard reads it: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def event_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("events.out.tfevents."))


def test_epoch_records_become_scalars_beside_metrics_jsonl(tmp_path):
    writer = RunWriter(open_storage(str(tmp_path)))
    writer.log_epoch({"epoch": 1, "loss": 4.5, "lr": 0.1, "images_per_s": 120.0, "mode": "knn", "resumed": False})
    writer.log_epoch({"epoch": 2, "loss": 4.25, "lr": 0.05, "images_per_s": 130.5, "knn_top1": 0.5})
    assert len(event_files(tmp_path)) == 1 and (tmp_path / "metrics.jsonl").is_file()
    assert read_scalars(tmp_path) == {
        "loss": [(1, 4.5), (2, 4.25)],
        "lr": [(1, pytest.approx(0.1)), (2, pytest.approx(0.05))],
        "images_per_s": [(1, 120.0), (2, 130.5)],
        "knn_top1": [(2, 0.5)],
    }


def test_a_resumed_run_adds_a_file_and_a_restart_replaces_the_points(tmp_path):
    """A second process (a resume) writes a file of its own; steps that start over (a new run in the same folder)
    replace the older points in TensorBoard's reading."""
    store = open_storage(str(tmp_path))
    first = RunWriter(store)
    first.log_epoch({"epoch": 1, "loss": 3.0})
    first.events.close()
    second = RunWriter(store)
    second.log_epoch({"epoch": 2, "loss": 2.0})
    second.events.close()
    assert len(event_files(tmp_path)) == 2
    assert read_scalars(tmp_path) == {"loss": [(1, 3.0), (2, 2.0)]}
    restart = RunWriter(store)
    restart.log_epoch({"epoch": 1, "loss": 5.0})
    assert read_scalars(tmp_path) == {"loss": [(1, 5.0)]}


def test_no_event_files_when_turned_off_or_not_installed(tmp_path, monkeypatch):
    RunWriter(open_storage(str(tmp_path / "off")), tensorboard=False).log_epoch({"epoch": 1, "loss": 1.0})
    assert sorted(p.name for p in (tmp_path / "off").iterdir()) == ["metrics.jsonl"]
    # as if the optional extra were not installed
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    RunWriter(open_storage(str(tmp_path / "missing"))).log_epoch({"epoch": 1, "loss": 1.0})
    assert sorted(p.name for p in (tmp_path / "missing").iterdir()) == ["metrics.jsonl"]
    with pytest.raises(UsageError, match=r"pip install 'facessl\[tensorboard\]'"):
        RunWriter(open_storage(str(tmp_path / "asked")), tensorboard=True)


def history(store) -> list[dict]:
    return [json.loads(line) for line in store.read_text("metrics.jsonl").splitlines()]


@pytest.mark.slow
@pytest.mark.real_s3
def test_both_training_jobs_write_their_metrics_as_tensorboard_events(prepared_subset, s3_env, tmp_path):
    """pretrain-simclr into a local folder: loss, LR, images/s and the kNN monitor per epoch; train-classifier
    into S3: losses and top-1/top-3 per epoch, uploaded beside its metrics.jsonl. The values are the epoch
    records' (float32 in the event file)."""
    runner = CliRunner()
    simclr = tmp_path / "simclr"
    r = runner.invoke(
        pretrain_main,
        ["--data", str(prepared_subset), "--output", str(simclr), "--epochs", "2", "--image-size", "32",
         "--batch-size", "64", "--knn-every", "1", "--warmup-epochs", "0", "--device", "cpu"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    scalars = read_scalars(simclr)
    assert {"loss", "lr", "images_per_s", "knn_top1"} <= set(scalars)
    for key in ("loss", "lr", "images_per_s", "knn_top1"):
        assert scalars[key] == [(h["epoch"], pytest.approx(h[key], rel=1e-6)) for h in history(open_storage(simclr))]

    output = f"s3://{s3_env}/classifier"
    r = runner.invoke(
        classifier_main,
        ["--data", str(prepared_subset), "--output", output, "--encoder", str(simclr), "--epochs", "2",
         "--image-size", "32", "--device", "cpu"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    store = open_storage(output)
    names = [key for key in store.list() if key.startswith("events.out.tfevents.")]
    assert len(names) == 1 and "metrics.jsonl" in store.list()
    store.download_file(names[0], tmp_path / "from-s3" / names[0])
    scalars = read_scalars(tmp_path / "from-s3")
    for key in ("train_loss", "val_loss", "train_top1", "val_top1", "val_top3"):
        assert scalars[key] == [(h["epoch"], pytest.approx(h[key], rel=1e-6)) for h in history(store)], key
