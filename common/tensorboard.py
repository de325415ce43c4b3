"""TensorBoard event files of a training run, next to its ``metrics.jsonl``.

Each epoch record a job logs (:meth:`facessl.common.training.RunWriter.log_epoch`) becomes one point per numeric
field, at step ``epoch``: for pretrain-simclr the loss, learning rate, images/s and kNN-monitor top-1; for
train-classifier the train and val losses and top-1/top-3. The events are written with TensorBoard's own event
file writer into a local temporary folder, and the file is copied to the run's output (a local folder or S3)
after every epoch, so an S3 run has them in its bucket as it goes.

Every process writes a file of its own (``events.out.tfevents.<time>.<host>.<pid>...``) that opens with a
session-start event at the first step it logs. TensorBoard reads a folder's files in order and drops, at such an
event, the points it has from that step on: a resumed run's file continues the earlier one (an epoch logged
twice, by a run killed before its checkpoint, is shown once), and a run started again in the same folder
replaces the earlier run's curves from step 1.

``tensorboard`` is an optional dependency (``pip install 'facessl[tensorboard]'``): the events are written when it
imports, and a job runs the same without it.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import weakref

from facessl.common.errors import BadInputError, UsageError
from facessl.common.storage import Storage


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
    """One process's TensorBoard event file of a run, kept in ``storage`` (its root, beside ``metrics.jsonl``).

    Raises (on creation):
        UsageError: ``tensorboard`` does not import (asked for explicitly without the extra installed).
    """

    def __init__(self, storage: Storage):
        if not tensorboard_available():
            raise UsageError("TensorBoard event files need the tensorboard extra: pip install 'facessl[tensorboard]'")
        self.storage = storage
        self._folder = tempfile.mkdtemp(prefix="facessl-tensorboard-")
        # the temporary folder goes with this object, or at exit
        weakref.finalize(self, shutil.rmtree, self._folder, True)
        self._writer = None

    def add_epoch(self, record: dict, step: int) -> None:
        """Write ``record``'s numeric fields at ``step`` and copy the event file to the run's storage.

        Raises:
            BadInputError: the temporary folder cannot be written. NotFoundError / BadInputError /
            StorageError: from the storage, as for any output file.
        """
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        now = time.time()
        try:
            if self._writer is None:
                self._writer = EventFileWriter(self._folder)
                # TensorBoard drops its earlier points from this step on (a restart, or an epoch logged twice)
                self._writer.add_event(Event(wall_time=now, step=step, session_log=SessionLog(status=SessionLog.START)))
            values = [Summary.Value(tag=tag, simple_value=value) for tag, value in scalars(record).items()]
            self._writer.add_event(Event(wall_time=now, step=step, summary=Summary(value=values)))
            self._writer.flush()
        except OSError as exc:
            raise BadInputError(
                f"cannot write the TensorBoard events in {self._folder}: {exc.strerror or exc}"
            ) from None
        for name in sorted(os.listdir(self._folder)):
            if name.startswith("events.out.tfevents."):
                self.storage.upload_file(os.path.join(self._folder, name), name)

    def close(self) -> None:
        """Close the event file (written already; nothing more is copied)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
