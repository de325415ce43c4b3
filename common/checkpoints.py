"""Saving and loading model files and training checkpoints through the storage layer.

Atomic protocol (a crash never leaves a half-written file that a later run would load):
serialise to a local temporary file, upload it under a unique key
(``checkpoints/ckpt-e0005-<uuid>.pt``), then write the small pointer ``checkpoints/latest.json`` last.
A reader follows the pointer, so it sees either the previous complete checkpoint or the new one.

Everything is read back with ``torch.load(..., weights_only=True)``: only tensors and plain Python
containers are accepted, so a checkpoint taken from a bucket cannot run code.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
import uuid
from dataclasses import dataclass

from facessl.common.errors import BadInputError
from facessl.common.storage import NotFoundError, Storage, open_file_location

LATEST = "checkpoints/latest.json"


def save_torch(storage: Storage, key: str, obj) -> None:
    """``torch.save(obj)`` to a local temporary file, then upload it to ``key`` (atomic per key)."""
    import torch

    fd, tmp = tempfile.mkstemp(suffix=".pt")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        storage.upload_file(tmp, key)
    finally:
        os.unlink(tmp)


def load_torch_bytes(data: bytes, where: str, map_location="cpu"):
    """Load a torch file from bytes with ``weights_only=True``.

    Raises:
        BadInputError: the file is not a torch file, or it holds pickled objects other than tensors and
            plain containers (refused: loading them could execute code).
    """
    import pickle

    import torch

    # torch.save's zip archive, or its legacy pickle format
    if not data.startswith((b"PK\x03\x04", b"\x80")):
        raise BadInputError(f"{where} is not a readable torch file (not a torch.save archive)")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise BadInputError(
            f"refused to load {where}: it holds pickled objects{what} that weights_only loading does not "
            "allow; only tensors and plain containers are accepted from checkpoints"
        ) from None
    # a damaged legacy pickle fails inside the unpickler with whatever it tripped on (IndexError on an empty
    # stack, KeyError on a bad memo, RecursionError on deep nesting): all of them mean an unreadable file
    except Exception as exc:
        raise BadInputError(f"{where} is not a readable torch file ({type(exc).__name__})") from None


def load_torch(location: str, map_location="cpu"):
    """Load the torch file at ``location`` (a local path or ``s3://bucket/key``) with weights_only=True.

    Raises:
        BadInputError: missing file, unreadable file, or a file holding arbitrary pickled objects.
    """
    storage, key = open_file_location(location)
    return load_torch_bytes(storage.read_bytes(key), str(location), map_location)


def save_checkpoint(storage: Storage, state: dict, epoch: int, keep: int = 2) -> str:
    """Upload ``state`` under a unique key, then point ``checkpoints/latest.json`` at it, then delete
    all but the ``keep`` newest checkpoints (the pointer never names a deleted one).

    Returns:
        The key of the new checkpoint.
    """
    key = f"checkpoints/ckpt-e{epoch:04d}-{uuid.uuid4().hex[:12]}.pt"
    save_torch(storage, key, state)
    storage.write_text(LATEST, json.dumps({"key": key, "epoch": epoch}))
    history_key = "checkpoints/history.json"
    try:
        history = json.loads(storage.read_text(history_key))
    except (NotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        history = []
    # only keys this function wrote: a damaged history must never delete the run's other files
    history = (
        [k for k in history if isinstance(k, str) and k.startswith("checkpoints/ckpt-")]
        if isinstance(history, list)
        else []
    )
    history.append(key)
    for old in history[:-keep]:
        storage.delete(old)
    storage.write_text(history_key, json.dumps(history[-keep:]))
    return key


def load_latest_checkpoint(storage: Storage, map_location="cpu") -> dict | None:
    """The checkpoint ``checkpoints/latest.json`` points at, or None when there is none."""
    try:
        pointer = json.loads(storage.read_text(LATEST))
    except NotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadInputError(f"{storage.url(LATEST)} is not valid JSON") from None
    key = pointer.get("key") if isinstance(pointer, dict) else None
    if not isinstance(key, str) or not key.startswith("checkpoints/"):
        raise BadInputError(f"{storage.url(LATEST)} does not point at a checkpoint under checkpoints/")
    state = load_torch_bytes(storage.read_bytes(key), storage.url(key), map_location)
    if not isinstance(state, dict) or "epoch" not in state:
        raise BadInputError(f"{storage.url(key)} is not a training checkpoint")
    return state


def check_weight_values(state: dict, where: str) -> None:
    """Refuse a state dict whose values no trained network holds: NaN or infinite floats, complex tensors
    (``load_state_dict`` would keep their real part), integer or bool weights (batch-norm's
    ``num_batches_tracked`` and optimizer ``step`` counters excepted), negative batch-norm ``running_var``.
    A diverged or
    damaged file is refused at load, not after hours of training on NaN features.

    Raises:
        ValueError: naming the first tensor at fault.
    """
    import torch

    for key, v in state.items():
        if not torch.is_tensor(v):
            continue
        if v.is_complex():
            raise ValueError(f"{where} holds a complex tensor at {key}: weights are real numbers")
        # (counters)
        if not v.is_floating_point() and not key.endswith(("num_batches_tracked", "step")):
            raise ValueError(
                f"{where} holds {v.dtype} values at {key}: weights are floating point (a cast "
                "to integers or booleans loses them)"
            )
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{where} holds NaN or infinite weights, e.g. in {key}")
        if key.endswith("running_var") and (v < 0).any():
            raise ValueError(f"{where} holds a negative batch-norm variance in {key}")


def load_error_summary(exc: Exception) -> str:
    """The first two non-blank lines of a ``load_state_dict`` error, joined (at most 300 characters): torch's
    first line names no tensor, its second does. The exception's type name when it has no message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:2])[:300] or type(exc).__name__


@dataclass
class ResumePoint:
    """Where a restored run continues: 0-based ``epoch`` and ``step`` within it, the per-epoch ``history`` so far,
    the ``partial_losses`` of the interrupted epoch, and whether the augmentation stream was reseeded (not
    restored), so that the run continues but not bitwise equal to an uninterrupted one."""

    epoch: int
    step: int
    history: list[dict]
    partial_losses: list[float]
    aug_reseeded: bool


def restore_checkpoint(
    state: dict,
    where: str,
    model,
    optimizer,
    scheduler,
    aug_gen,
    *,
    same_aug_stream: bool,
    reseed_key: tuple,
    max_epoch: int,
) -> ResumePoint:
    """Load a training checkpoint (:func:`save_checkpoint`'s ``state``) into a freshly built run, checking every
    part first, so that a damaged checkpoint is one clear error and not a traceback mid-setup.

    Restores the weights (refusing NaN/inf and other values no network holds, in the model and the optimizer
    moments), the optimizer and LR-schedule states, the Python/NumPy/torch RNG states, and the augmentation
    generator: its saved state when ``same_aug_stream`` (the same process count and device kind), else a seed
    from ``hash(reseed_key + (epoch, step))``.

    Raises:
        BadInputError: a part is missing or damaged, or epoch/step/history/losses are not what a run writes
            (epoch beyond ``max_epoch``, a negative step, non-finite losses).
    """
    try:
        check_weight_values(state["model"], where)
        # NaN here is NaN weights after one step
        for moments in state["optimizer"]["state"].values():
            check_weight_values(moments, f"{where} (optimizer state)")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_states(state["rng"])
        if same_aug_stream:
            # the same process and device kind: the run continues bitwise
            aug_gen.set_state(state["aug_rng"])
        # another device kind's generator state does not load; and only rank 0's state was saved
        else:
            aug_gen.manual_seed(hash((*reseed_key, int(state["epoch"]), int(state["step"]))) % 2**63)
        history, partial = list(state["history"]), [float(x) for x in state["partial_losses"]]
        epoch, step = state["epoch"], state["step"]
        if not (
            type(epoch) is int
            and type(step) is int
            and 0 <= epoch <= max_epoch
            and 0 <= step
            and all(isinstance(h, dict) for h in history)
            and all(math.isfinite(x) for x in partial)
        ):
            raise ValueError("its epoch, step, history or partial losses are not what a run writes")
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        detail = f"no {exc}" if isinstance(exc, KeyError) else load_error_summary(exc)
        raise BadInputError(
            f"the checkpoint {where} points at is damaged ({detail}): use --resume never to start over"
        ) from None
    return ResumePoint(epoch, step, history, partial, not same_aug_stream)


def capture_rng_states() -> dict:
    """Python, NumPy and torch (CPU and CUDA) RNG states as tensors (loadable with weights_only)."""
    import random

    import numpy as np
    import torch

    py = random.getstate()
    np_state = np.random.get_state()
    states = {
        "python_version": py[0],
        "python": torch.tensor(py[1], dtype=torch.int64),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    """Set the RNG states :func:`capture_rng_states` recorded.

    Raises:
        KeyError, TypeError, ValueError, RuntimeError: a state of the wrong shape or kind.
    """
    import random

    import numpy as np
    import torch

    random.setstate((states["python_version"], tuple(states["python"].tolist()), None))
    np.random.set_state(("MT19937", states["numpy"].numpy().astype(np.uint32), states["numpy_pos"], 0, 0.0))
    torch.set_rng_state(states["torch"])
    # as many GPUs' states as both runs have
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"][: torch.cuda.device_count()])
