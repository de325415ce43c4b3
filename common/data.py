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

import io
import json
import os
import tarfile
import tempfile
from pathlib import Path

from common.errors import BadInputError
from common.storage import NotFoundError, Storage, open_storage

SPLITS = ("train", "val", "test")
UNLABELED = "unlabeled"
MANIFEST = "manifest.json"


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
        key = f"{self.split}/shard-{len(self.shards):06d}.tar"
        try:
            self.storage.upload_file(self._tmp, key)
        finally:
            os.unlink(self._tmp)
        self.shards.append(key)
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
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadInputError(f"{where} is not valid JSON") from None
    valid = (isinstance(manifest, dict) and isinstance(manifest.get("classes"), list) and manifest["classes"]
             and all(isinstance(c, str) for c in manifest["classes"])
             and isinstance(manifest.get("shards"), dict)
             and all(isinstance(v, list) and all(isinstance(k, str) for k in v) for v in manifest["shards"].values())
             and isinstance(manifest.get("image_size", 0), int))
    if not valid:
        raise BadInputError(f"{where} is not a facessl manifest (classes, shards and image_size are required)")
    return manifest


def iter_shard_samples(path: str | os.PathLike):
    """Yield ``(key, jpeg_bytes, label_or_None)`` from one local tar shard, in file order."""
    current, jpeg, label = None, None, None
    with tarfile.open(path, "r") as tar:
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


def load_split(storage: Storage, manifest: dict, split: str, cache_dir: str | os.PathLike,
               image_size: int | None = None):
    """Decode a whole split into memory.

    The shards the manifest lists are copied to ``cache_dir`` first (S3) or read in place (local
    folders); files the manifest does not list (left over from an earlier run) are ignored.

    Returns:
        images: uint8 tensor of shape (N, 3, H, W) (RGB), resized to ``image_size`` when given.
        labels: int64 tensor of shape (N,), -1 for unlabelled samples.

    Raises:
        BadInputError: the split has no shards, or a shard cannot be read.
    """
    import numpy as np
    import torch
    from PIL import Image

    keys = manifest.get("shards", {}).get(split) or []
    if not keys:
        raise BadInputError(f"split {split!r} of {storage.uri} is empty: the dataset has no {split} images")
    shards = [storage.local_copy(key, cache_dir) for key in keys]
    images, labels = [], []
    for shard in shards:
        try:
            samples = list(iter_shard_samples(shard))
        except (tarfile.TarError, OSError, ValueError) as exc:
            raise BadInputError(f"cannot read shard {shard.name} of split {split!r}: {exc}") from None
        if not samples:
            continue
        for _, jpeg, _ in samples:
            try:
                img = Image.open(io.BytesIO(jpeg)).convert("RGB")
                if image_size is not None and img.size != (image_size, image_size):
                    img = img.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=None)
            except OSError as exc:
                raise BadInputError(f"corrupt image in shard {shard.name} of split {split!r}: {exc}") from None
            images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
        labels.extend(-1 if lab is None else lab for _, _, lab in samples)
    bad = [lab for lab in labels if lab >= len(manifest["classes"]) or lab < -1]
    if bad:
        raise BadInputError(f"split {split!r} has class index {bad[0]} but the manifest lists "
                            f"{len(manifest['classes'])} classes")
    if not images:
        raise BadInputError(f"split {split!r} under {storage.url(split)} is empty")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


class PreparedDataset:
    """A prepared dataset opened for training: its manifest, and ``load(split)`` decoding a split into
    memory at ``image_size`` (crops stored larger are downscaled once; smaller ones are kept as stored).

    Raises:
        BadInputError: not a prepared dataset (see :func:`read_manifest`).
    """

    def __init__(self, location: str, image_size: int):
        self.storage = open_storage(location)
        self.manifest = read_manifest(self.storage)
        self.classes: list[str] = self.manifest["classes"]
        self.cache = default_cache_dir(f"{self.storage.uri}#{self.manifest.get('dataset_id', '')}")
        self.size = image_size if self.manifest.get("image_size", image_size) > image_size else None

    def has(self, split: str) -> bool:
        return bool(self.manifest.get("shards", {}).get(split))

    def load(self, split: str):
        """``load_split`` of this dataset: uint8 (N, 3, H, W) images and int64 (N,) labels."""
        return load_split(self.storage, self.manifest, split, self.cache, self.size)


def default_cache_dir(location: str) -> Path:
    """Per-location cache folder under ``$FACESSL_CACHE`` (default ``~/.cache/facessl``)."""
    import hashlib

    base = Path(os.environ.get("FACESSL_CACHE", Path.home() / ".cache" / "facessl"))
    return base / hashlib.sha256(location.encode()).hexdigest()[:16]
