"""The training input path: a rank's share of the prepared shards as uint8 crops, served in shuffled batches.

Crops are decoded once (JPEG -> uint8 (3, S, S)); augmentation happens later, batched on the device
(common.augment). Three ways to hold the decoded crops, chosen by ``--data-mode``:

    memory   one uint8 tensor in RAM (or in GPU memory when it fits there), decoded at start-up
    mmap     a uint8 ``.npy`` file in the cache folder, memory-mapped; decoded by the first run, reused by
             every later run and by a resumed job (for pools larger than RAM; the OS pages them in)
    stream   no decoded copy at all: each epoch visits the shards in a seeded random order, decodes a
             window of about ``window`` samples ahead in background threads, and shuffles within the window
             (the WebDataset-style shuffle buffer; for pools larger than RAM and the local disk)
    auto     memory when the share takes at most half the available RAM, else mmap when the cache folder's
             disk holds it, else stream

Under torchrun each rank reads only its share of the shards (:func:`rank_share`). Every epoch's order
comes from ``(seed, epoch, rank)`` alone, so a resumed job replays it without saved generator state.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import torch

from facessl.common.data import PreparedDataset, ShardPart, decode_parts
from facessl.common.errors import BadInputError, UsageError

DATA_MODES = ("auto", "memory", "mmap", "stream")


def rank_share(data: PreparedDataset, splits: list[str], rank: int, world: int) -> list[ShardPart]:
    """The parts of ``splits`` that ``rank`` of ``world`` reads.

    Whole shards are dealt round-robin when that gives every rank at least 90% of the largest share (the
    usual case: many full shards); otherwise (fewer shards than ranks, or very uneven shards) every rank
    reads every shard and keeps every ``world``-th sample. The shares are disjoint and cover the splits.
    """
    parts = []
    for split in splits:
        keys, sizes = data.shards(split), data.shard_sizes(split)
        whole = list(zip(keys, sizes))
        totals = [sum(n for _, n in whole[r::world]) for r in range(world)]
        if world == 1 or (len(whole) >= world and min(totals) >= 0.9 * max(totals)):
            parts += [ShardPart(split, key, n) for key, n in whole[rank::world]]
        else:
            # rotated, so no rank always gets the extra
            offsets = [(rank + j) % world for j in range(len(whole))]
            parts += [ShardPart(split, key, len(range(o, n, world)), o, world) for (key, n), o in zip(whole, offsets)]
    return parts


def epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The data-order generator of one epoch on one rank, from NumPy's SeedSequence mixing of the three."""
    state = np.random.SeedSequence([seed % 2**63, epoch, rank]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


class MemoryPool:
    """Samples held as one tensor (crops uint8 (N, 3, S, S), or any (N, ...) features) with int64 (N,) labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()

    def to(self, device: torch.device) -> MemoryPool:
        self.images = self.images.to(device)
        return self

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self.images[idx.to(self.images.device)]

    def batches(
        self,
        generator: torch.Generator,
        batch_size: int,
        steps: int,
        start: int = 0,
        weights: torch.Tensor | None = None,
    ):
        """Yield ``(images, labels)`` for steps ``start .. steps-1`` of the epoch whose order ``generator``
        draws: one permutation of all samples, or with float (N,) ``weights`` N draws with replacement in
        proportion to them. The last batch may be short when ``steps * batch_size > N``."""
        if weights is None:
            order = torch.randperm(len(self), generator=generator)
        else:
            order = torch.multinomial(weights, len(self), replacement=True, generator=generator)
        # one copy
        on_device = order.to(self.images.device) if isinstance(self.images, torch.Tensor) else order
        for step in range(start, steps):
            rows = slice(step * batch_size, (step + 1) * batch_size)
            yield self._rows(on_device[rows]), self.labels[order[rows]]

    def labelled(self, split_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``split_rows`` samples (the train split's, which come first) in memory."""
        return self.images[:split_rows], self.labels[:split_rows]


class MmapPool(MemoryPool):
    """Crops in a uint8 (N, 3, S, S) ``.npy`` file opened with ``numpy.load(mmap_mode='r')``."""

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.images[idx.numpy()])

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes)

    def to(self, device):
        return self

    def labelled(self, split_rows: int):
        return torch.from_numpy(np.array(self.images[:split_rows])), self.labels[:split_rows]


class StreamPool:
    """Crops decoded from the shards on the fly; nothing decoded is kept between windows."""

    def __init__(self, data: PreparedDataset, parts: list[ShardPart], size: int, window: int = 10000):
        self.data, self.parts, self.size, self.window = data, parts, size, max(1, window)
        self.nbytes = 0

    def __len__(self) -> int:
        return sum(p.size for p in self.parts)

    def to(self, device):
        return self

    def _windows(self, order: list[int]) -> list[list[ShardPart]]:
        windows, current, held = [], [], 0
        for i in order:
            current.append(self.parts[i])
            held += self.parts[i].size
            if held >= self.window:
                windows.append(current)
                current, held = [], 0
        return windows + ([current] if current else [])

    def batches(self, generator: torch.Generator, batch_size: int, steps: int, start: int = 0):
        """Like :meth:`MemoryPool.batches`, in shuffle-buffer order: shards in a random order, samples shuffled
        within each window (plus what the previous window left over). Resuming at ``start`` decodes and
        discards the epoch's first ``start`` batches."""
        order = torch.randperm(len(self.parts), generator=generator).tolist()
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        windows = self._windows(order)
        step = 0
        carry_x = torch.empty(0, 3, self.size, self.size, dtype=torch.uint8)
        carry_y = torch.empty(0, dtype=torch.long)
        with ThreadPoolExecutor(max_workers=1) as ahead:
            decode = lambda w: list(decode_parts(self.data, w, self.size, stream=True))  # noqa: E731
            pending = ahead.submit(decode, windows[0]) if windows else None
            for w in range(len(windows)):
                decoded = pending.result()
                pending = ahead.submit(decode, windows[w + 1]) if w + 1 < len(windows) else None
                x = torch.cat([carry_x, *(d[0] for d in decoded)])
                y = torch.cat([carry_y, *(d[1] for d in decoded)])
                perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + w))
                x, y = x[perm], y[perm]
                full = len(y) // batch_size
                for i in range(full):
                    if step >= steps:
                        if pending is not None:
                            pending.cancel()
                        return
                    if step >= start:
                        yield x[i * batch_size : (i + 1) * batch_size], y[i * batch_size : (i + 1) * batch_size]
                    step += 1
                carry_x, carry_y = x[full * batch_size :], y[full * batch_size :]

    def labelled(self, split_rows: int):
        """The train split's part of the share (the parts that come first), decoded into memory."""
        train = [p for p in self.parts if p.split == self.parts[0].split]
        decoded = list(decode_parts(self.data, train, self.size, stream=True))
        return torch.cat([d[0] for d in decoded]), torch.cat([d[1] for d in decoded])


def _available_bytes(path) -> tuple[int, int]:
    """(available RAM, free disk at ``path``) in bytes; the disk counts as full when ``path`` cannot be created
    (nothing is created here: a run that picks memory leaves no empty cache folder)."""
    import shutil

    ram = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        # MemAvailable counts reclaimable page cache, unlike SC_AVPHYS_PAGES
        with open("/proc/meminfo") as f:
            ram = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    existing = os.path.abspath(path)
    # the folder mmap would create: its nearest existing parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not (os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK)):
        return ram, 0
    return ram, shutil.disk_usage(existing).free


def choose_mode(mode: str, nbytes: int, cache, available: tuple[int, int] | None = None) -> str:
    """Resolve ``auto`` for ``nbytes`` of decoded crops (see the module docstring); other modes are returned
    as they are. ``available``: (RAM, disk) bytes, measured when not given.

    Raises:
        UsageError: an unknown mode.
    """
    if mode not in DATA_MODES:
        raise UsageError(f"unknown data mode {mode!r}: use one of {', '.join(DATA_MODES)}")
    if mode != "auto":
        return mode
    ram, disk = available or _available_bytes(cache)
    if nbytes <= ram // 2:
        return "memory"
    return "mmap" if nbytes * 1.1 <= disk else "stream"


def _open_mmap(path, labels_path, n: int, size: int) -> MmapPool | None:
    """The cached pool if both files are whole and of the expected shape, else None."""
    try:
        images, labels = np.load(path, mmap_mode="r"), np.load(labels_path)
    except (OSError, ValueError, EOFError):
        return None
    if (
        images.dtype != np.uint8
        or images.shape != (n, 3, size, size)
        or labels.shape != (n,)
        or labels.dtype != np.int64
    ):
        return None
    return MmapPool(images, torch.from_numpy(labels))


def _build_mmap(data: PreparedDataset, parts: list[ShardPart], size: int) -> MmapPool:
    """Decode the parts into ``<cache>/pool-<digest>.npy`` (written under a temporary name, then renamed),
    or reuse that file when an earlier run wrote it (a damaged one is rebuilt: the cache is disposable).

    Raises:
        BadInputError: the cache folder cannot be written.
    """
    digest = hashlib.sha256(
        json.dumps([data.manifest.get("dataset_id"), size, [asdict(p) for p in parts]]).encode()
    ).hexdigest()[:16]
    path = data.cache / f"pool-{digest}.npy"
    labels_path = data.cache / f"pool-{digest}.labels.npy"
    n = sum(p.size for p in parts)
    pool = _open_mmap(path, labels_path, n, size)
    if pool is not None:
        return pool
    tmp = data.cache / f".pool-{digest}.{os.getpid()}.npy"
    try:
        data.cache.mkdir(parents=True, exist_ok=True)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
        labels = np.empty(n, dtype=np.int64)
        row = 0
        for images, part_labels in decode_parts(data, parts, size):
            out[row : row + len(images)] = images.numpy()
            labels[row : row + len(images)] = part_labels.numpy()
            row += len(images)
        out.flush()
        del out
        np.save(labels_path, labels)
        os.replace(tmp, path)
    except OSError as exc:
        raise BadInputError(
            f"cannot write the decoded-crop cache in {data.cache} ({exc.strerror or exc}): set "
            "FACESSL_CACHE to a writable folder with room, or use --data-mode memory or stream"
        ) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return MmapPool(np.load(path, mmap_mode="r"), torch.from_numpy(np.load(labels_path)))


def open_pool(data: PreparedDataset, splits: list[str], rank: int, world: int, mode: str = "auto", window: int = 10000):
    """This rank's share of ``splits`` (samples of ``splits[0]`` first) as a pool; returns
    ``(pool, resolved mode, per-split sample counts of the share)``.

    Raises:
        BadInputError: a split is empty or a shard is unreadable. UsageError: unknown ``mode``.
    """
    for split in splits:
        if not data.has(split):
            raise BadInputError(f"split {split!r} of {data.storage.uri} is empty: the dataset has no {split} images")
    parts = rank_share(data, splits, rank, world)
    counts = {s: sum(p.size for p in parts if p.split == s) for s in splits}
    size = data.decoded_size
    mode = choose_mode(mode, sum(counts.values()) * 3 * size * size, data.cache)
    if mode == "stream":
        return StreamPool(data, parts, size, window), mode, counts
    if mode == "mmap":
        return _build_mmap(data, parts, size), mode, counts
    return MemoryPool(*data.decode(parts)), mode, counts
