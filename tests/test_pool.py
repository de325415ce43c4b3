"""The training input path: per-rank shares of the shards, and the memory / mmap / stream pools."""

import json

import numpy as np
import pytest
import torch

from facessl.common.data import PreparedDataset
from facessl.common.errors import BadInputError, UsageError
from facessl.common.pool import MemoryPool, choose_mode, epoch_generator, open_pool, rank_share


def sample_ids(data, parts):
    """Identify samples by (shard, index in shard), so shares can be compared without decoding."""
    sizes = dict(zip(data.shards("train"), data.shard_sizes("train")))
    return [(p.key, i) for p in parts for i in range(p.offset, sizes[p.key], p.stride)]


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_rank_shares_are_disjoint_and_cover_the_split(prepared_sharded, world):
    data = PreparedDataset(str(prepared_sharded), 32)
    n = sum(data.shard_sizes("train"))
    shares = [rank_share(data, ["train"], r, world) for r in range(world)]
    ids = [sample_ids(data, parts) for parts in shares]
    flat = [i for share in ids for i in share]
    assert len(flat) == len(set(flat)) == n
    assert [sum(p.size for p in parts) for parts in shares] == [len(share) for share in ids]
    sizes = [sum(p.size for p in parts) for parts in shares]
    assert min(sizes) >= 0.9 * max(sizes) - 1
    # whole shards: no rank opens another's shard
    if all(p.stride == 1 for parts in shares for p in parts):
        keys = [{p.key for p in parts} for parts in shares]
        assert all(not (keys[a] & keys[b]) for a in range(world) for b in range(a + 1, world))
    # too few or too uneven shards: every rank keeps every world-th sample of each shard
    else:
        assert all(len(parts) == len(data.shards("train")) and parts[0].stride == world for parts in shares)
    if world == 2:
        assert all(p.stride == 1 for parts in shares for p in parts), "17 shards split evenly enough"
    if world == 8:
        assert shares[0][0].stride == 8, "17 shards of 10 cannot be dealt to 8 ranks within 10%"


def test_shard_sizes_are_in_the_manifest_and_match_the_shards(prepared_sharded):
    manifest = json.loads((prepared_sharded / "manifest.json").read_text())
    data = PreparedDataset(str(prepared_sharded), 32)
    assert manifest["shard_sizes"]["train"] == data.shard_sizes("train")
    assert sum(manifest["shard_sizes"]["train"]) == len(data.load("train")[1]) == manifest["counts"]["splits"]["train"]
    # a manifest from before shard_sizes: counted from the shards
    del data.manifest["shard_sizes"]
    assert data.shard_sizes("train") == manifest["shard_sizes"]["train"]


def test_memory_and_mmap_pools_serve_identical_batches(prepared_sharded, tmp_path, monkeypatch):
    monkeypatch.setenv("FACESSL_CACHE", str(tmp_path))
    data = PreparedDataset(str(prepared_sharded), 32)
    memory, mode_m, counts = open_pool(data, ["train"], 0, 1, "memory")
    mmap, mode_f, _ = open_pool(data, ["train"], 0, 1, "mmap")
    assert (mode_m, mode_f) == ("memory", "mmap") and counts["train"] == len(memory) == len(mmap)
    steps = len(memory) // 16
    for (xm, ym), (xf, yf) in zip(
        memory.batches(epoch_generator(1, 0), 16, steps), mmap.batches(epoch_generator(1, 0), 16, steps)
    ):
        assert torch.equal(xm, xf) and torch.equal(ym, yf) and xm.dtype == torch.uint8 and xm.shape == (16, 3, 32, 32)
    files = sorted(tmp_path.rglob("pool-*.npy"))
    # crops and labels
    assert len(files) == 2
    stamp = [f.stat().st_mtime_ns for f in files]
    # a later run (or a resumed one) reuses the file
    again, _, _ = open_pool(data, ["train"], 0, 1, "mmap")
    assert [f.stat().st_mtime_ns for f in files] == stamp and len(again) == len(mmap)


def test_stream_pool_visits_every_sample_once_per_epoch_and_resumes_exactly(prepared_sharded):
    data = PreparedDataset(str(prepared_sharded), 32)
    memory, _, _ = open_pool(data, ["train"], 0, 1, "memory")
    stream, mode, _ = open_pool(data, ["train"], 0, 1, "stream", window=40)
    assert mode == "stream" and len(stream) == len(memory)
    n, b = len(memory), 8
    steps = n // b
    full = list(stream.batches(epoch_generator(3, 0), b, steps))
    assert len(full) == steps
    seen = torch.cat([x for x, _ in full]).flatten(1)
    everything = memory.images.flatten(1)
    # every streamed crop is a pool crop, none twice, and only the n % b left over are missing
    match = (seen[:, None, :] == everything[None, :, :]).all(-1)
    assert match.any(1).all() and match.sum(0).max() == 1 and len(seen) == n - n % b
    labels = torch.cat([y for _, y in full])
    assert torch.equal(labels, memory.labels[match.float().argmax(1)])
    resumed = list(stream.batches(epoch_generator(3, 0), b, steps, start=5))
    assert all(torch.equal(x, fx) for (x, _), (fx, _) in zip(resumed, full[5:])) and len(resumed) == steps - 5
    other_epoch = torch.cat([x for x, _ in stream.batches(epoch_generator(3, 1), b, steps)])
    assert not torch.equal(other_epoch, torch.cat([x for x, _ in full]))


def test_memory_pool_batches_follow_the_epoch_generator():
    pool = MemoryPool(torch.arange(10).view(10, 1), torch.arange(10))
    first = [y.tolist() for _, y in pool.batches(epoch_generator(0, 0), 4, 3)]
    assert sorted(sum(first, [])) == list(range(10)) and [len(b) for b in first] == [4, 4, 2]
    assert first == [y.tolist() for _, y in pool.batches(epoch_generator(0, 0), 4, 3)]
    assert first != [y.tolist() for _, y in pool.batches(epoch_generator(0, 0, rank=1), 4, 3)]


def test_auto_mode_picks_by_free_memory_and_disk(tmp_path):
    gib = 2**30
    assert choose_mode("auto", 1 * gib, tmp_path, available=(8 * gib, 100 * gib)) == "memory"
    assert choose_mode("auto", 6 * gib, tmp_path, available=(8 * gib, 100 * gib)) == "mmap"
    assert choose_mode("auto", 95 * gib, tmp_path, available=(8 * gib, 100 * gib)) == "stream"
    assert choose_mode("mmap", 1, tmp_path) == "mmap"
    with pytest.raises(UsageError):
        choose_mode("ramdisk", 1, tmp_path)


def test_damaged_mmap_cache_is_rebuilt(prepared_sharded, tmp_path, monkeypatch):
    monkeypatch.setenv("FACESSL_CACHE", str(tmp_path))
    data = PreparedDataset(str(prepared_sharded), 32)
    first, _, _ = open_pool(data, ["train"], 0, 1, "mmap")
    # a copy: the file is about to be cut short
    reference = torch.from_numpy(np.array(first.images))
    del first
    crops = next(p for p in tmp_path.rglob("pool-*.npy") if not p.name.endswith(".labels.npy"))
    with open(crops, "r+b") as f:
        f.truncate(5000)
    again, _, _ = open_pool(data, ["train"], 0, 1, "mmap")
    assert torch.equal(torch.from_numpy(np.array(again.images)), reference)


def test_unwritable_cache(prepared_sharded, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FACESSL_CACHE", str(blocker / "cache"))
    data = PreparedDataset(str(prepared_sharded), 32)
    # local shards need no cache: RAM it is
    pool, mode, _ = open_pool(data, ["train"], 0, 1, "auto")
    assert mode == "memory" and len(pool) > 0
    with pytest.raises(BadInputError, match="cannot write the decoded-crop cache"):
        open_pool(data, ["train"], 0, 1, "mmap")


def test_unwritable_cache_for_s3_shards_is_named(prepared_sharded, s3_env, tmp_path, monkeypatch):
    """S3 shards are copied into the cache first: a cache path through a file blamed the shard."""
    from facessl.common.storage import open_storage

    remote = open_storage(f"s3://{s3_env}/prepared")
    for path in prepared_sharded.rglob("*"):
        if path.is_file():
            remote.upload_file(path, str(path.relative_to(prepared_sharded)))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FACESSL_CACHE", str(blocker / "cache"))
    data = PreparedDataset(remote.uri, 32)
    with pytest.raises(BadInputError, match=r"cannot copy shard val/.* into the cache .*a-file/cache.*FACESSL_CACHE"):
        data.load("val")
