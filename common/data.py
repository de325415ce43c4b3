"""The prepared dataset: WebDataset-layout tar shards plus ``manifest.json``.

Layout under a prepared-dataset location::

    manifest.json                  classes, parameters, counts, one record per raw file (written last)
    train/shard-000000.tar         samples ``<key>.jpg`` (RGB JPEG crop) + ``<key>.cls`` (class index, ASCII)
    val/shard-000000.tar
    test/shard-000000.tar
    unlabeled/shard-000000.tar     optional, ``<key>.jpg`` only (identities not selected as classes)

The tar layout is WebDataset's (https://github.com/webdataset/webdataset): files of one sample share a
key and sit next to each other, so a split is read with one GET per shard however many images it holds.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from facessl.common.config import is_crop_margin
from facessl.common.errors import BadInputError
from facessl.common.storage import NotFoundError, Storage, open_storage

if TYPE_CHECKING:
    import torch

SPLITS = ("train", "val", "test")
UNLABELED = "unlabeled"
MANIFEST = "manifest.json"
# a crop is a few hundred pixels a side; more is a damaged or hostile shard
MAX_SAMPLE_PIXELS = 4096 * 4096
# a tar member is a 512-byte header plus at least one 512-byte block
MIN_SAMPLE_BYTES = 1024
# <split>/shard-000000.tar, as ShardWriter names them
SHARD_NAME = re.compile(r"shard-\d{6}\.tar")


class ShardWriter:
    """Writes samples of one split into tar shards of at most ``max_samples`` samples each.

    Each shard is built in a local temporary file and uploaded whole, so a shard in storage is always
    complete. Use as a context manager.
    """

    def __init__(self, storage: Storage, split: str, max_samples: int = 5000):
        if max_samples < 1:
            raise ValueError("max_samples must be >= 1")
        self.storage, self.split, self.max_samples = storage, split, max_samples
        self.shards: list[str] = []
        self.sizes: list[int] = []
        # sha256 of each shard's bytes (the tar members carry no time or owner)
        self.digests: list[str] = []
        self._tar = None
        self._tmp = None
        self._count = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._close_shard()

    def _close_shard(self):
        if self._tar is None:
            return
        self._tar.close()
        # matches SHARD_NAME
        key = f"{self.split}/shard-{len(self.shards):06d}.tar"
        with open(self._tmp, "rb") as f:
            self.digests.append(hashlib.file_digest(f, "sha256").hexdigest())
        try:
            self.storage.upload_file(self._tmp, key)
        finally:
            os.unlink(self._tmp)
        self.shards.append(key)
        self.sizes.append(self._count)
        self._tar, self._tmp, self._count = None, None, 0

    def write(self, key: str, jpeg: bytes, label: int | None) -> None:
        """Add one sample: ``key`` (no dots or slashes), JPEG bytes, class index (None: unlabelled)."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if self._tar is None:
            fd, self._tmp = tempfile.mkstemp(suffix=".tar")
            os.close(fd)
            self._tar = tarfile.open(self._tmp, "w")
        members = [(f"{key}.jpg", jpeg)]
        if label is not None:
            members.append((f"{key}.cls", str(int(label)).encode()))
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(payload))
        self._count += 1
        if self._count >= self.max_samples:
            self._close_shard()


def dataset_id(classes: list[str], shards: dict[str, list[str]], digests: dict[str, list[str]]) -> str:
    """A prepared dataset's identity, 32 hex digits: the sha256 of its classes, shard keys and shard bytes.
    A prepare-data rerun that writes the same crops keeps it (a finished pretraining run then stays
    resumable); any other crop, split or class list changes it."""
    content = json.dumps([classes, {split: list(zip(shards[split], digests[split])) for split in sorted(shards)}])
    return hashlib.sha256(content.encode()).hexdigest()[:32]


def remove_stale_shards(storage: Storage, shards: dict[str, list[str]]) -> list[str]:
    """Delete the shards of an earlier run that ``shards`` (this run's manifest entry, split -> keys) does
    not list: every ``<split>/shard-NNNNNN.tar`` under the split folders, the unlabelled pool's included.
    A rerun that writes fewer shards would otherwise leave old ones beside the new manifest. Other files
    in those folders are left alone. Returns the deleted keys."""
    keep = {key for keys in shards.values() for key in keys}
    stale = [
        key
        for split in (*SPLITS, UNLABELED)
        for key in storage.list(split)
        if key not in keep and SHARD_NAME.fullmatch(key.split("/", 1)[1])
    ]
    for key in stale:
        storage.delete(key)
    return stale


def read_manifest(storage: Storage) -> dict:
    """The prepared dataset's manifest.

    Raises:
        BadInputError: no manifest (not a prepared dataset, or prepare-data did not finish).
    """
    where = storage.url(MANIFEST)
    try:
        manifest = json.loads(storage.read_text(MANIFEST))
    except NotFoundError:
        raise BadInputError(f"{where} not found: --data must be the output of prepare-data") from None
    # (nesting deeper than the parser's stack)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise BadInputError(f"{where} is not valid JSON") from None
    valid = (
        isinstance(manifest, dict)
        and isinstance(manifest.get("classes"), list)
        and manifest["classes"]
        and all(isinstance(c, str) for c in manifest["classes"])
        and isinstance(manifest.get("shards"), dict)
        and all(isinstance(v, list) and all(isinstance(k, str) for k in v) for v in manifest["shards"].values())
        and isinstance(manifest.get("shard_sizes", {}), dict)
        and (manifest.get("image_size") is None or type(manifest["image_size"]) is int and manifest["image_size"] >= 1)
    )
    if not valid:
        raise BadInputError(
            f"{where} is not a facessl manifest (classes and shards are required; image_size, when "
            "given, is a positive integer)"
        )
    if len(set(manifest["classes"])) != len(manifest["classes"]):
        raise BadInputError(f"{where} names a class twice: one identity, one class index")
    # (val//x = val/x)
    keys = [posixpath.normpath(key) for split in manifest["shards"].values() for key in split]
    if len(set(keys)) != len(keys):
        raise BadInputError(f"{where} lists a shard twice: its samples would be trained on, or tested, twice")
    return manifest


def crop_margin(manifest: dict) -> float | None:
    """The margin prepare-data cut the dataset's faces with (``params.detect.margin``: a fraction of the box
    side on each side), or None when the manifest records none (a dataset written by other tools). The
    training jobs write it to ``config.json`` as ``crop_margin``, so that enroll crops people the same way."""
    params = manifest.get("params")
    detect = params.get("detect") if isinstance(params, dict) else None
    margin = detect.get("margin") if isinstance(detect, dict) else None
    return float(margin) if is_crop_margin(margin) else None


def image_to_chw(img) -> torch.Tensor:
    """An RGB PIL image as a uint8 tensor (3, H, W), the layout of every decoded crop in this project."""
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def iter_shard_samples(source: str | os.PathLike | io.BytesIO):
    """Yield ``(key, jpeg_bytes, label_or_None)`` from one tar shard (a local path or a file object), in
    file order."""
    current, jpeg, label = None, None, None
    with tarfile.open(fileobj=source, mode="r") if hasattr(source, "read") else tarfile.open(source, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.rpartition(".")
            if key != current:
                if current is not None and jpeg is not None:
                    yield current, jpeg, label
                current, jpeg, label = key, None, None
            payload = tar.extractfile(member).read()
            if ext == "jpg":
                jpeg = payload
            elif ext == "cls":
                label = int(payload.decode().strip())
        if current is not None and jpeg is not None:
            yield current, jpeg, label


@dataclass(frozen=True)
class ShardPart:
    """Samples ``offset, offset + stride, ...`` (in file order) of one shard of ``split``; ``size`` of them."""

    split: str
    key: str
    size: int
    offset: int = 0
    stride: int = 1


def decode_part(data: PreparedDataset, part: ShardPart, size: int, stream: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one part: uint8 (n, 3, size, size) RGB crops and int64 (n,) labels (-1: unlabelled).

    ``stream`` reads the shard's bytes straight from storage; otherwise it goes through the local cache.

    Raises:
        BadInputError: the shard cannot be read, holds a corrupt JPEG, a class index outside the manifest's
        classes, or fewer samples than the manifest says.
    """
    import torch
    from PIL import Image

    # grown as samples are read: the manifest's count is checked, not trusted
    images, labels = [], []
    # the storages turn their own failures into facessl errors: an OSError here is the local cache's
    try:
        source = (
            io.BytesIO(data.storage.read_bytes(part.key)) if stream else data.storage.local_copy(part.key, data.cache)
        )
    except OSError as exc:
        raise BadInputError(
            f"cannot copy shard {part.key} into the cache {data.cache} ({exc.strerror or exc}): "
            "set FACESSL_CACHE to a writable folder with room"
        ) from None
    try:
        for i, (key, jpeg, label) in enumerate(iter_shard_samples(source)):
            if i % part.stride != part.offset:
                continue
            if len(labels) == part.size:
                raise BadInputError(f"shard {part.key} holds more samples than the manifest says: re-run prepare-data")
            # reads the header only
            img = Image.open(io.BytesIO(jpeg))
            # (Pillow's own limit is off: common.faces)
            if img.width * img.height > MAX_SAMPLE_PIXELS:
                raise BadInputError(
                    f"shard {part.key} sample {key} is {img.width}x{img.height} pixels, not a face "
                    "crop: re-run prepare-data"
                )
            img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
            images.append(image_to_chw(img))
            # it would train as class -1
            if label is None and part.split != UNLABELED:
                raise BadInputError(f"shard {part.key} sample {key} has no class label (.cls): re-run prepare-data")
            if label is not None and not 0 <= label < len(data.classes):
                raise BadInputError(
                    f"shard {part.key} has class index {label} but the manifest lists {len(data.classes)} classes"
                )
            labels.append(-1 if label is None else label)
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise BadInputError(f"cannot read shard {part.key}: {exc}") from None
    if len(labels) != part.size:
        raise BadInputError(
            f"shard {part.key} holds {len(labels)} of the {part.size} samples the manifest lists: re-run prepare-data"
        )
    if not labels:
        return torch.empty(0, 3, size, size, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def decode_parts(
    data: PreparedDataset, parts: list[ShardPart], size: int, stream: bool = False, threads: int | None = None
):
    """Decode parts in parallel threads (PIL releases the GIL while decoding); yields each part's
    ``(images, labels)`` in ``parts`` order."""
    threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        yield from pool.map(lambda p: decode_part(data, p, size, stream), parts)


class PreparedDataset:
    """A prepared dataset opened for training: its manifest, shard lists and sizes, and decoding of shards
    into uint8 crops at ``decoded_size`` = min(``image_size``, the stored crop size) pixels (crops stored
    larger are downscaled once; smaller ones are kept as stored). S3 shards are cached under ``cache``.

    Raises:
        BadInputError: not a prepared dataset (see :func:`read_manifest`).
    """

    def __init__(self, location: str, image_size: int):
        self.storage = open_storage(location)
        self.manifest = read_manifest(self.storage)
        self.classes: list[str] = self.manifest["classes"]
        self.cache = default_cache_dir(f"{self.storage.uri}#{self.manifest.get('dataset_id', '')}")
        self.decoded_size = min(image_size, self.manifest.get("image_size") or image_size)
        self._stored: dict[str, int] | None = None

    @property
    def crop_margin(self) -> float | None:
        """The margin prepare-data cut these crops with, or None (see :func:`crop_margin`)."""
        return crop_margin(self.manifest)

    def has(self, split: str) -> bool:
        return bool(self.shards(split))

    def shards(self, split: str) -> list[str]:
        return self.manifest.get("shards", {}).get(split) or []

    def shard_sizes(self, split: str) -> list[int]:
        """Samples per shard of ``split``: from the manifest, or (manifests written before it recorded
        them) counted by reading the shards once.

        Raises:
            BadInputError: a listed count cannot fit in its shard's bytes (a damaged manifest), or a shard
            cannot be read while counting.
        """
        sizes = self.manifest.get("shard_sizes", {}).get(split)
        keys = self.shards(split)
        if isinstance(sizes, list) and len(sizes) == len(keys) and all(type(n) is int and n >= 0 for n in sizes):
            # so a damaged count fails before anything is allocated for it
            stored = self.stored_bytes()
            for key, n in zip(keys, sizes):
                size = stored.get(posixpath.normpath(key))
                if size is None:
                    raise BadInputError(
                        f"shard {key} that {self.storage.url(MANIFEST)} lists is not there: re-run prepare-data"
                    )
                if n > size // MIN_SAMPLE_BYTES:
                    raise BadInputError(
                        f"{self.storage.url(MANIFEST)} says shard {key} holds {n} samples, but its "
                        f"{size} bytes hold at most {size // MIN_SAMPLE_BYTES}: "
                        "the manifest is damaged, re-run prepare-data"
                    )
            return sizes
        try:
            return [sum(1 for _ in iter_shard_samples(self.storage.local_copy(k, self.cache))) for k in keys]
        except (tarfile.TarError, OSError, ValueError) as exc:
            raise BadInputError(f"cannot read a shard of split {split!r}: {exc}") from None

    def stored_bytes(self) -> dict[str, int]:
        """Bytes per stored key under the dataset's location (one listing, kept)."""
        if self._stored is None:
            self._stored = self.storage.list()
        return self._stored

    def decode(self, parts: list[ShardPart], stream: bool = False):
        """Decode ``parts`` into one uint8 (N, 3, S, S) tensor and int64 (N,) labels, in ``parts`` order.

        Raises:
            BadInputError: the tensor does not fit in memory, or a part cannot be decoded.
        """
        import torch

        size = self.decoded_size
        n = sum(p.size for p in parts)
        try:
            images = torch.empty(n, 3, size, size, dtype=torch.uint8)
        # (torch's allocator: "can't allocate memory")
        except RuntimeError:
            raise BadInputError(
                f"{n} crops of {size} px ({n * 3 * size * size / 2**30:.1f} GiB) do not fit in memory: "
                "use --data-mode mmap or stream"
            ) from None
        labels = torch.empty(len(images), dtype=torch.long)
        row = 0
        for part_images, part_labels in decode_parts(self, parts, size, stream):
            images[row : row + len(part_images)] = part_images
            labels[row : row + len(part_labels)] = part_labels
            row += len(part_labels)
        return images, labels

    def load(self, split: str):
        """A whole split in memory: uint8 (N, 3, S, S) images and int64 (N,) labels (-1: unlabelled).

        Raises:
            BadInputError: the split is empty, or a shard cannot be read.
        """
        if not self.has(split):
            raise BadInputError(f"split {split!r} of {self.storage.uri} is empty: the dataset has no {split} images")
        parts = [ShardPart(split, k, n) for k, n in zip(self.shards(split), self.shard_sizes(split))]
        images, labels = self.decode(parts)
        if not len(labels):
            raise BadInputError(f"split {split!r} under {self.storage.url(split)} is empty")
        return images, labels


def refuse_output_inside(data_location: str, output_location: str) -> None:
    """Raises UsageError when a job's ``output_location`` lies inside the prepared dataset at ``data_location``
    (a prepare-data rerun replaces that folder). The same location, or a folder that holds no manifest, is
    left to the job's own checks (claim_output; PreparedDataset's "not found")."""
    from facessl.common.errors import UsageError
    from facessl.common.storage import location_within, open_storage

    if (
        location_within(output_location, data_location)
        and not location_within(data_location, output_location)
        and open_storage(data_location).exists(MANIFEST)
    ):
        raise UsageError(
            f"--output {output_location} lies inside the prepared dataset {data_location}, which a "
            "prepare-data rerun replaces: give a folder outside it"
        )


def default_cache_dir(location: str) -> Path:
    """Per-location cache folder under ``$FACESSL_CACHE`` (default ``~/.cache/facessl``)."""
    import hashlib

    base = Path(os.environ.get("FACESSL_CACHE", Path.home() / ".cache" / "facessl"))
    return base / hashlib.sha256(location.encode()).hexdigest()[:16]
