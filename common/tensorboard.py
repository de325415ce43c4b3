"""TensorBoard event file of a training run, next to its ``metrics.jsonl``.

Each epoch record a job logs (:meth:`facessl.common.training.RunWriter.log_epoch`) becomes one point per numeric
field, at step ``epoch``: for pretrain-simclr the loss, learning rate, images/s and kNN-monitor top-1; for
train-classifier the train and val losses and top-1/top-3. ``tensorboard --logdir`` on the output (or on a folder
of outputs) shows them.

One file, :data:`EVENTS_KEY`, per run, written again whole after every epoch, like ``metrics.jsonl``: to a local
temporary file with TensorBoard's own record format, then copied to the output (a local folder or S3), so an S3
run has it in its bucket as it goes. A process that logs step ``n`` first keeps the points of the file already
there before step ``n``, with their times, and drops the rest: a resumed run continues the curves of the run it
resumes (an epoch logged twice, by a run stopped before its checkpoint, appears once), and a run started again in
the same folder replaces them. The name is the same for every run, so two runs of one configuration leave the same
files.

``tensorboard`` is an optional dependency (``pip install 'facessl[tensorboard]'``): the events are written when it
imports, and a job runs the same without it.
"""

from __future__ import annotations

import math
import os
import tempfile
import time

from facessl.common.errors import BadInputError, UsageError
from facessl.common.storage import NotFoundError, Storage

# TensorBoard reads every file whose name holds "tfevents"
EVENTS_KEY = "events.out.tfevents.facessl"


def tensorboard_available() -> bool:
    """True when ``tensorboard`` (the optional extra) imports."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def scalars(record: dict) -> dict[str, float]:
    """The fields of an epoch record that TensorBoard can plot: finite ints and floats (not bools), less
    ``epoch`` itself, which is the step."""
    return {
        key: float(value)
        for key, value in record.items()
        if key != "epoch"
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    }


class EventLog:
    """The TensorBoard event file of the run in ``storage`` (at its root, beside ``metrics.jsonl``).

    Raises (on creation):
        UsageError: ``tensorboard`` does not import (asked for explicitly without the extra installed).
    """

    def __init__(self, storage: Storage):
        if not tensorboard_available():
            raise UsageError("TensorBoard event files need the tensorboard extra: pip install 'facessl[tensorboard]'")
        self.storage = storage
        # the scalar events of the file, oldest first; None until this process logs its first epoch
        self._events: list | None = None

    def add_epoch(self, record: dict, step: int) -> None:
        """Add ``record``'s numeric fields at ``step`` and write the event file to the run's storage again.

        Raises:
            BadInputError: no temporary file can be written. NotFoundError / BadInputError / StorageError: from the
            storage, as for any output file.
        """
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        if self._events is None:
            self._events = [e for e in self._earlier_events() if e.step < step]
        values = [Summary.Value(tag=tag, simple_value=value) for tag, value in scalars(record).items()]
        self._events.append(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
        self._write()

    def _earlier_events(self) -> list:
        """The scalar events of the event file already in the storage; none when it is missing or unreadable
        (the curves then start at this process's first epoch)."""
        from google.protobuf.message import DecodeError
        from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
        from tensorboard.compat.proto.event_pb2 import Event

        fd, tmp = tempfile.mkstemp(prefix="facessl-", suffix=".tfevents")
        os.close(fd)
        try:
            self.storage.download_file(EVENTS_KEY, tmp)
            # the records as written (the other loaders turn simple values into tensors on the way)
            events = [Event.FromString(data) for data in RawEventFileLoader(tmp).Load()]
            return [event for event in events if event.HasField("summary")]
        # a first run, or a damaged file: nothing worth keeping
        except (NotFoundError, BadInputError, OSError, ValueError, DecodeError):
            return []
        finally:
            os.unlink(tmp)

    def _write(self) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter

        fd, tmp = tempfile.mkstemp(prefix="facessl-", suffix=".tfevents")
        try:
            with os.fdopen(fd, "wb") as fh:
                records = RecordWriter(fh)
                # the header TensorBoard expects first, dated like the first point so the bytes of a file are a
                # prefix of the next epoch's
                records.write(
                    Event(wall_time=self._events[0].wall_time, file_version="brain.Event:2").SerializeToString()
                )
                for event in self._events:
                    records.write(event.SerializeToString())
            self.storage.upload_file(tmp, EVENTS_KEY)
        except OSError as exc:
            raise BadInputError(f"cannot write the TensorBoard events to {tmp}: {exc.strerror or exc}") from None
        finally:
            os.unlink(tmp)
