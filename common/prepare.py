"""prepare-data: raw photo folders (one per identity) -> face crops -> stratified split -> shards + manifest.

Stages, in order (``prepare_dataset`` runs them):
    1. list_raw_files       every file under the input, hidden/system files ignored, sizes checked
    2. detect (workers)     decode + Haar detection + crop, one worker per core, progress bar
    3. deduplicate          byte-identical files kept once (the first by path), before splitting
    4. select_classes       ``--classes`` and/or ``--min-images`` on the number of usable crops
    5. stratified_split     per identity, per source photo, seeded: 80/10/10 by default
    6. write                tar shards per split (an earlier run's extra shards removed), then ``manifest.json``
                            last (its presence marks completion)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import sys
import time
import unicodedata
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context

from facessl.common.data import MANIFEST, SPLITS, UNLABELED, ShardWriter, dataset_id, remove_stale_shards
from facessl.common.errors import BadInputError, PreemptedError, StorageError, UsageError
from facessl.common.faces import MAX_PHOTO_BYTES, DetectConfig, process_photo
from facessl.common.photos import Sigterm, sigterm_received, sigterm_stops
from facessl.common.storage import Storage, UnsafeKeyError, claim_output, join_location, location_within, open_storage

PREEMPTED = (
    "stopped by SIGTERM before a new manifest.json was written (it comes last; an earlier dataset "
    "there is kept until the first shard is rewritten): run again to start over"
)
OUTSIDE_LINK = "a symlink points outside the input (use a hard link or a copy)"
BACKSLASH_NAME = "a backslash in the folder or file name (refused as a path separator: rename it)"
FOLDER_LINK = (
    "a symlink to a folder, not followed: it can loop, leave the input, or show a folder's photos "
    "under a second identity (link the photos themselves, or copy the folder)"
)
IGNORED_NAMES = {".ds_store", "thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r"}


@dataclass
class PrepareConfig:
    """Parameters of prepare-data (recorded in the manifest).

    Attributes:
        classes: identities to keep (empty: all that pass ``min_images``).
        min_images: keep identities with at least this many usable (cropped, de-duplicated) photos.
        ratios: train/val/test fractions, summing to 1.
        seed: seed of the split.
        unlabeled_pool: also write crops of the identities not selected as an ``unlabeled`` split.
        max_file_bytes: raw files larger than this are skipped without being read.
        shard_size: samples per tar shard.
        workers: detection processes (0: one per core).
    """

    detect: DetectConfig = field(default_factory=DetectConfig)
    classes: tuple[str, ...] = ()
    min_images: int = 10
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 1337
    unlabeled_pool: bool = False
    max_file_bytes: int = MAX_PHOTO_BYTES
    shard_size: int = 5000
    workers: int = 0


def is_ignored(rel: str) -> bool:
    """Hidden files/folders (a segment starting with '.'), AppleDouble ``._*`` and OS thumbnails."""
    parts = rel.split("/")
    return any(p.startswith(".") for p in parts) or parts[-1].lower() in IGNORED_NAMES


def shown_name(name: str) -> str:
    """A file name as messages print it: bytes that are not UTF-8 (kept by Python as surrogate escapes, which
    cannot be printed) become U+FFFD, as the skip records show them."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def list_raw_files(storage: Storage) -> tuple[list[tuple[str, int]], list[dict]]:
    """Files of the raw input as ``(relative path, size)``, and records for files that are not in an
    identity folder (skipped). Raises BadInputError when the input holds nothing."""
    listing = storage.list()
    links = [rel for rel in storage.folder_links() if not is_ignored(rel)]
    if not listing and not links:
        raise BadInputError(f"the input {storage.uri} is empty or does not exist")
    files = []
    skipped = [{"source": rel, "status": "skipped", "reason": FOLDER_LINK} for rel in links]
    for rel, size in listing.items():
        if is_ignored(rel):
            continue
        try:
            rel.encode("utf-8")
        # undecodable bytes in a local file name
        except UnicodeEncodeError:
            skipped.append({"source": shown_name(rel), "status": "skipped", "reason": "file name is not valid UTF-8"})
            continue
        if "/" not in rel:
            skipped.append({"source": rel, "status": "skipped", "reason": "not inside an identity folder"})
            continue
        files.append((rel, size))
    return files, skipped


# --- stage 2: workers -------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(location: str, cfg: DetectConfig, max_file_bytes: int):
    import cv2

    cv2.setNumThreads(1)
    _WORKER.update(storage=open_storage(location), cfg=cfg, max_file_bytes=max_file_bytes)


def _init_pool_worker(*args):
    """A pool worker leaves Ctrl-C to the main process, which stops the pool (``detect_all``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(*args)


def _process_one(item: tuple[str, int]) -> dict:
    rel, size = item
    record = {"source": rel, "identity": rel.split("/", 1)[0]}
    if size > _WORKER["max_file_bytes"]:
        return {**record, "status": "skipped", "reason": f"file too large ({size} bytes)"}
    try:
        data = _WORKER["storage"].read_bytes(rel)
    except StorageError:
        # a storage outage is not a property of the file: fail the job (exit 4) instead of skipping
        raise
    # one reason for all such files, so the manifest's skip counts group them
    except UnsafeKeyError:
        return {**record, "status": "skipped", "reason": BACKSLASH_NAME if "\\" in rel else OUTSIDE_LINK}
    except Exception as exc:  # noqa: BLE001 - one unreadable file must not stop the job
        return {**record, "status": "skipped", "reason": f"could not read file: {exc}"}
    record["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        result = process_photo(data, _WORKER["cfg"])
    except Exception as exc:  # noqa: BLE001 - a decoder crash on one file is a skip, not a failed job
        return {**record, "status": "skipped", "reason": f"could not process image ({type(exc).__name__})"}
    if result.crop_jpeg is None:
        return {**record, "status": "skipped", "reason": result.reason}
    return {
        **record,
        "status": "ok",
        "box": list(result.box) if result.box else None,
        "detector": result.detector,
        "crop": result.crop_jpeg,
    }


def detect_all(location: str, files: list[tuple[str, int]], cfg: PrepareConfig) -> list[dict]:
    """Run decode + detection + crop over ``files`` with a worker per core; records in input order.

    Raises:
        Sigterm: SIGTERM arrived (:func:`prepare_dataset` reports it as PreemptedError); the workers are
            ended first, as on Ctrl-C. PreemptedError: SIGTERM to the whole process group ended the workers.
        StorageError: a worker died, or storage failed.
    """
    from tqdm import tqdm

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # detection is CPU-bound: more processes only cost memory (~60 MB each)
    if cfg.workers > cores:
        print(f"note: --workers {cfg.workers} lowered to the {cores} CPU cores this process may use", file=sys.stderr)
    # and no idle 16-photo chunk takers
    workers = max(1, min(cfg.workers or cores, cores, -(-len(files) // 16)))
    # a log file gets a progress line every 30 s, not hundreds
    interval = 0.5 if sys.stderr.isatty() else 30
    initargs = (location, cfg.detect, cfg.max_file_bytes)

    def progress(records):
        return tqdm(records, total=len(files), desc="detect faces", unit="img", mininterval=interval)

    if workers == 1:
        _init_worker(*initargs)
        return list(progress(map(_process_one, files)))
    with ProcessPoolExecutor(
        workers, mp_context=get_context("spawn"), initializer=_init_pool_worker, initargs=initargs
    ) as pool:
        try:
            return list(progress(pool.map(_process_one, files, chunksize=16)))
        except (KeyboardInterrupt, Sigterm):
            # Stop now: leaving the with-block would first detect every queued photo. The workers are
            # taken before shutdown(), which drops _processes (Python 3.14 has terminate_workers()).
            procs = list((pool._processes or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in procs:
                proc.terminate()
            raise
        except BrokenProcessPool:
            # SIGTERM to the whole process group ended the workers too
            if sigterm_received():
                raise PreemptedError(PREEMPTED) from None
            raise StorageError(
                "a face-detection worker process died (out of memory?); nothing was written, "
                "run again (fewer --workers needs less memory)"
            ) from None


# --- stages 3-5 -------------------------------------------------------------------------------------


def deduplicate(records: list[dict]) -> None:
    """Mark byte-identical repeats as skipped (in place); the first by path is kept."""
    first_of: dict[str, str] = {}
    for rec in sorted(records, key=lambda r: r["source"]):
        digest = rec.get("sha256")
        if digest is None:
            continue
        if digest in first_of:
            rec.update(status="skipped", reason=f"duplicate of {first_of[digest]}")
            rec.pop("crop", None)
        else:
            first_of[digest] = rec["source"]


def folder_names(classes: tuple[str, ...], folders: set[str]) -> tuple[str, ...]:
    """``classes`` as spelled by the identity folders: a name typed in another Unicode normalization form
    than its folder's (``Zoë`` composed, NFC, as typed; decomposed, NFD, as macOS writes file names) is
    matched to the folder. Names with no folder are returned as given."""
    by_form = {unicodedata.normalize("NFC", f): f for f in folders}
    return tuple(c if c in folders else by_form.get(unicodedata.normalize("NFC", c), c) for c in classes)


def check_unicode_forms(folders: set[str]) -> None:
    """Raises BadInputError when two identity folders are one name in two Unicode normalization forms: they
    would be two classes that print the same."""
    by_form: dict[str, list[str]] = {}
    for f in folders:
        by_form.setdefault(unicodedata.normalize("NFC", f), []).append(f)
    if clash := next((sorted(names) for names in by_form.values() if len(names) > 1), None):
        raise BadInputError(
            f"identity folders {clash} are one name written in two Unicode forms (composed and "
            "decomposed accents): merge them into one folder, or rename one"
        )


def select_classes(records: list[dict], classes: tuple[str, ...], min_images: int) -> list[str]:
    """Identities kept as classes, sorted: in ``classes`` (when given) and with >= ``min_images`` crops.

    Raises:
        BadInputError: a requested class has no folder, or no identity qualifies.
    """
    counts: dict[str, int] = {}
    for rec in records:
        counts.setdefault(rec["identity"], 0)
        counts[rec["identity"]] += rec["status"] == "ok"
    if classes:
        missing = [c for c in classes if c not in counts]
        if missing:
            raise BadInputError(f"--classes names identities with no folder in the input: {missing}")
    wanted = set(classes) if classes else set(counts)
    kept = sorted(c for c in wanted if counts[c] >= min_images)
    if classes and len(kept) < len(wanted):
        dropped = {c: counts[c] for c in sorted(wanted - set(kept))}
        print(
            f"warning: requested classes with fewer than --min-images {min_images} usable photos are left out: "
            f"{dropped}",
            file=sys.stderr,
        )
    if not kept:
        skipped = [rec["reason"] for rec in records if rec["status"] == "skipped"]
        # "could not read file: <details>"
        kinds = Counter(reason.split(":")[0] for reason in skipped)
        example = {reason.split(":")[0]: reason for reason in reversed(skipped)}
        why = "; ".join(
            f"{n} x {kind} (e.g. {example[kind]})" if example[kind] != kind else f"{n} x {kind}"
            for kind, n in kinds.most_common(3)
        )
        raise BadInputError(
            f"no identity has at least {min_images} usable images "
            f"(best: {max(counts.values(), default=0)}); lower --min-images"
            + (f". Photos skipped, most common reasons: {why}" if why else "")
        )
    return kept


def split_counts(n: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """Train/val/test sizes for ``n`` photos: val and test get ``round(n * ratio)``, at least one each
    when the ratio is positive and ``n >= 3``; train gets the rest."""
    _, r_val, r_test = ratios
    n_val = round(n * r_val)
    n_test = round(n * r_test)
    if n >= 3:
        n_val = max(n_val, 1 if r_val > 0 else 0)
        n_test = max(n_test, 1 if r_test > 0 else 0)
    n_val = min(n_val, n)
    n_test = min(n_test, n - n_val)
    return n - n_val - n_test, n_val, n_test


def stratified_split(records: list[dict], classes: list[str], ratios, seed: int) -> None:
    """Assign ``record["split"]`` (in place) per identity, per source photo, reproducibly from ``seed``."""
    by_class: dict[str, list[dict]] = {c: [] for c in classes}
    for rec in records:
        if rec["status"] == "ok" and rec["identity"] in by_class:
            by_class[rec["identity"]].append(rec)
    for name, recs in by_class.items():
        recs.sort(key=lambda r: r["source"])
        random.Random(f"{seed}/{name}").shuffle(recs)
        n_train, n_val, _ = split_counts(len(recs), ratios)
        for i, rec in enumerate(recs):
            rec["split"] = "train" if i < n_train else "val" if i < n_train + n_val else "test"


def detection_counts(records: list[dict], splits: list[str]) -> dict:
    """Face-detection outcomes: photos decoded, photos with no face found (skipped, or kept whole with
    ``--on-no-face keep-full``), the miss rate, and overall and per split which detector found the face
    (``none``: no face, kept whole; misses that were skipped have no split)."""
    decoded = [r for r in records if r.get("detector") or r.get("reason") == "no face detected"]
    misses = sum(r.get("reason") == "no face detected" or r.get("detector") == "none" for r in decoded)
    by_split: dict[str, dict[str, int]] = {s: {} for s in splits}
    overall: dict[str, int] = {}
    for r in decoded:
        if r.get("detector"):
            overall[r["detector"]] = overall.get(r["detector"], 0) + 1
            if r.get("split") in by_split:
                by_split[r["split"]][r["detector"]] = by_split[r["split"]].get(r["detector"], 0) + 1
    return {
        "photos": len(decoded),
        "no_face": misses,
        "miss_rate": misses / max(1, len(decoded)),
        "skipped_no_face": sum(r.get("reason") == "no face detected" for r in decoded),
        "by_detector": overall,
        "per_split": by_split,
    }


# --- orchestration ----------------------------------------------------------------------------------


def prepare_dataset(input_location: str, output_location: str, cfg: PrepareConfig, log=print) -> dict:
    """Run all stages; returns the manifest (also written to ``<output>/manifest.json``).

    A rerun into an earlier dataset keeps it whole until the new crops are ready: a run refused for its
    input or options (no usable photos, too few per identity...) leaves the earlier manifest and shards as
    they were, and the manifest is removed just before the first shard is rewritten, so a run stopped
    after that never leaves an old manifest describing new shards.

    Raises:
        PreemptedError: SIGTERM arrived (exit 4; a retry starts over).
        UsageError: bad split ratios, or an output at or inside the input. BadInputError: an unusable input
        or output (see the stages). StorageError: S3 unreachable.
    """
    # a wait for the detection workers or an S3 request is cut short; exit 4, which the Argo workflow retries
    with sigterm_stops(PREEMPTED):
        return _prepare_dataset(input_location, output_location, cfg, log)


def _prepare_dataset(input_location: str, output_location: str, cfg: PrepareConfig, log) -> dict:
    if not all(math.isfinite(r) and r >= 0 for r in cfg.ratios) or abs(sum(cfg.ratios) - 1.0) > 1e-6:
        raise UsageError(f"split ratios must be finite, >= 0 and sum to 1, got {cfg.ratios}")
    started = time.time()
    # (a malformed URI is refused here)
    src, dst = open_storage(input_location), open_storage(output_location)
    # the next run would read the shards as photos
    if location_within(output_location, input_location):
        raise UsageError(
            f"the output {output_location} lies inside the input {input_location}: give a folder outside it"
        )
    if inside := [
        split
        for split in [*SPLITS, UNLABELED]
        if location_within(input_location, join_location(output_location, split))
    ]:
        raise UsageError(
            f"the input {input_location} lies in the output's {inside[0]}/ folder, where the shards go: "
            "give an output folder that does not hold the input"
        )
    # before detection
    claim_output(dst, "prepare-data", *SPLITS, *([UNLABELED] if cfg.unlabeled_pool else []))
    files, records_outside = list_raw_files(src)
    present = {rel.split("/", 1)[0] for rel, _ in files}
    wanted = folder_names(cfg.classes, present)
    if cfg.classes:
        if missing := sorted(set(wanted) - present):
            raise BadInputError(f"--classes names identities with no folder in the input: {missing}")
        # nothing outside --classes can be used: do not decode it
        if not cfg.unlabeled_pool:
            files = [(rel, size) for rel, size in files if rel.split("/", 1)[0] in set(wanted)]
    check_unicode_forms({rel.split("/", 1)[0] for rel, _ in files})
    log(f"{len(files)} raw files in {len({f.split('/', 1)[0] for f, _ in files})} identity folders")
    records = detect_all(src.uri, files, cfg)
    deduplicate(records)
    classes = select_classes(records, wanted, cfg.min_images)
    stratified_split(records, classes, cfg.ratios, cfg.seed)
    class_index = {c: i for i, c in enumerate(classes)}
    if cfg.unlabeled_pool:
        for rec in records:
            if rec["status"] == "ok" and rec["identity"] not in class_index:
                rec["split"] = UNLABELED

    counts: dict[str, dict[str, int]] = {}
    splits = [*SPLITS, UNLABELED] if cfg.unlabeled_pool else list(SPLITS)
    # before the first shard changes: a run stopped from here on leaves no stale manifest
    dst.delete(MANIFEST)
    shards, shard_sizes, digests = {}, {}, {}
    for split in splits:
        members = [r for r in records if r.get("split") == split]
        with ShardWriter(dst, split, cfg.shard_size) as writer:
            for i, rec in enumerate(members):
                rec["key"] = f"{split}-{i:07d}"
                writer.write(rec["key"], rec["crop"], class_index.get(rec["identity"]) if split != UNLABELED else None)
        shards[split], shard_sizes[split], digests[split] = writer.shards, writer.sizes, writer.digests
        per_class = counts.setdefault(split, {})
        for rec in members:
            per_class[rec["identity"]] = per_class.get(rec["identity"], 0) + 1

    if stale := remove_stale_shards(dst, shards):
        log(f"removed {len(stale)} shards of an earlier run that this one does not use")

    for rec in records:
        rec.pop("crop", None)
        if rec["status"] == "ok" and "split" not in rec:
            rec["status"], rec["reason"] = "skipped", "identity not selected (not in --classes, or below --min-images)"
    reasons: dict[str, int] = {}
    for rec in records + records_outside:
        if rec["status"] == "skipped":
            reason = "duplicate" if rec["reason"].startswith("duplicate of") else rec["reason"]
            reasons[reason] = reasons.get(reason, 0) + 1
    params = asdict(cfg)
    detection = detection_counts(records, splits)
    manifest = {
        "format": "facessl-prepared/1",
        "dataset_id": dataset_id(classes, shards, digests),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input": src.uri,
        "classes": classes,
        "image_size": cfg.detect.image_size,
        "params": params,
        "shards": shards,
        "shard_sizes": shard_sizes,
        "counts": {
            "raw_files": len(files) + len(records_outside),
            "ok": sum(r.get("split") is not None for r in records),
            "skipped": sum(reasons.values()),
            "skip_reasons": reasons,
            "splits": {s: sum(c.values()) for s, c in counts.items()},
            "per_class": counts,
            "detection": detection,
        },
        "records": sorted(records + records_outside, key=lambda r: r["source"]),
        "seconds": round(time.time() - started, 1),
    }
    dst.write_text(MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest
