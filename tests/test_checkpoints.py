"""Checkpoints: atomic pointer protocol, and weights_only loading that refuses pickled code."""

import collections

import pytest
import torch

from facessl.common.checkpoints import load_latest_checkpoint, load_torch, save_checkpoint, save_torch
from facessl.common.errors import BadInputError
from facessl.common.storage import open_storage


class Payload:
    """Any class: unpickling it would run attacker-chosen code paths."""

    def __init__(self):
        self.x = 1


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(2), "extra": Payload()}, path)
    with pytest.raises(BadInputError, match="refused to load"):
        load_torch(str(path))


def test_plain_state_dict_loads(tmp_path):
    store = open_storage(str(tmp_path))
    state = collections.OrderedDict(w=torch.arange(4.0), meta=torch.tensor([1]))
    save_torch(store, "enc.pt", state)
    back = load_torch(str(tmp_path / "enc.pt"))
    assert torch.equal(back["w"], state["w"])


@pytest.mark.parametrize(
    "data",
    [
        b"definitely not a checkpoint",
        # damaged legacy pickles: a pop from an empty stack, a memo never written, nesting past the recursion limit
        b"\x80\x02.",
        b"\x80\x02h\x05.",
        b"\x80\x02" + b"(" * 100_000 + b".",
    ],
)
def test_not_a_torch_file_is_a_clear_error(tmp_path, data):
    (tmp_path / "x.pt").write_bytes(data)
    with pytest.raises(BadInputError, match="not a readable torch file"):
        load_torch(str(tmp_path / "x.pt"))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_latest_pointer_follows_complete_checkpoints(where, tmp_path, request):
    location = str(tmp_path) if where == "local" else f"s3://{request.getfixturevalue('s3_env')}/run"
    store = open_storage(location)
    assert load_latest_checkpoint(store) is None
    first = save_checkpoint(store, {"epoch": 1, "w": torch.ones(3)}, 1)
    # a crash after uploading a new checkpoint but before moving the pointer leaves the old one current
    store.write_bytes("checkpoints/ckpt-e0002-crashed.pt", b"half-writ")
    assert load_latest_checkpoint(store)["epoch"] == 1
    second = save_checkpoint(store, {"epoch": 2, "w": torch.full((3,), 2.0)}, 2)
    assert first != second
    loaded = load_latest_checkpoint(store)
    assert loaded["epoch"] == 2 and torch.equal(loaded["w"], torch.full((3,), 2.0))
    if where == "s3":
        remote = load_torch(f"{location}/{second}")
        assert remote["epoch"] == 2
