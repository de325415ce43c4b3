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
import os
import re
import tempfile
import uuid

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
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
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
