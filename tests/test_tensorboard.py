"""TensorBoard event files next to metrics.jsonl, read back with TensorBoard's own event reader: from RunWriter,
and from both training jobs after a tiny real run, locally and on the real S3 server."""

import json
import sys

import pytest
from click.testing import CliRunner

from facessl.common.errors import UsageError
from facessl.common.storage import open_storage
from facessl.common.tensorboard import EVENTS_KEY
from facessl.common.training import RunWriter
from facessl.jobs.pretrain_simclr import main as pretrain_main
from facessl.jobs.train_classifier import main as classifier_main


def _accumulator(folder):
    """TensorBoard's reader of the event files in ``folder``, loaded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return events


def read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the event files of ``folder``, as TensorBoard reads it: tag -> [(step, value)]."""
    events = _accumulator(folder)
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def event_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "tfevents" in p.name)


def test_epoch_records_become_scalars_beside_metrics_jsonl(tmp_path):
    writer = RunWriter(open_storage(str(tmp_path)))
    writer.log_epoch({"epoch": 1, "loss": 4.5, "lr": 0.1, "images_per_s": 120.0, "mode": "knn", "resumed": False})
    writer.log_epoch({"epoch": 2, "loss": 4.25, "lr": 0.05, "images_per_s": 130.5, "knn_top1": 0.5})
    assert event_files(tmp_path) == [EVENTS_KEY] and (tmp_path / "metrics.jsonl").is_file()
    assert read_scalars(tmp_path) == {
        "loss": [(1, 4.5), (2, 4.25)],
        "lr": [(1, pytest.approx(0.1)), (2, pytest.approx(0.05))],
        "images_per_s": [(1, 120.0), (2, 130.5)],
        "knn_top1": [(2, 0.5)],
    }


def test_a_resumed_run_continues_the_curves_and_a_restart_replaces_them(tmp_path):
    """Each RunWriter stands for one process of the job. A resume keeps the earlier points (and their times)
    before its first step and drops the later ones (an epoch logged by a run stopped before its checkpoint); a run
    started again at step 1 replaces them all. One file throughout."""
    store = open_storage(str(tmp_path))
    first = RunWriter(store)
    for epoch, loss in ((1, 3.0), (2, 2.5), (3, 2.25)):
        first.log_epoch({"epoch": epoch, "loss": loss})
    times = [e.wall_time for e in _accumulator(tmp_path).Scalars("loss")]
    # stopped during epoch 4 with the checkpoint of epoch 2: the resume logs epoch 3 again
    RunWriter(store).log_epoch({"epoch": 3, "loss": 2.0})
    assert event_files(tmp_path) == [EVENTS_KEY]
    assert read_scalars(tmp_path) == {"loss": [(1, 3.0), (2, 2.5), (3, 2.0)]}
    assert [e.wall_time for e in _accumulator(tmp_path).Scalars("loss")][:2] == times[:2]
    RunWriter(store).log_epoch({"epoch": 1, "loss": 5.0})
    assert read_scalars(tmp_path) == {"loss": [(1, 5.0)]}


def test_a_damaged_event_file_is_replaced(tmp_path):
    (tmp_path / EVENTS_KEY).write_bytes(b"not an event file at all")
    RunWriter(open_storage(str(tmp_path))).log_epoch({"epoch": 2, "loss": 1.5})
    assert read_scalars(tmp_path) == {"loss": [(2, 1.5)]}


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
    assert {EVENTS_KEY, "metrics.jsonl"} <= set(store.list())
    store.download_file(EVENTS_KEY, tmp_path / "from-s3" / EVENTS_KEY)
    scalars = read_scalars(tmp_path / "from-s3")
    for key in ("train_loss", "val_loss", "train_top1", "val_top1", "val_top3"):
        assert scalars[key] == [(h["epoch"], pytest.approx(h[key], rel=1e-6)) for h in history(store)], key
