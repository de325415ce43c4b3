"""Batch identification of a photo collection against a gallery (``identify --gallery --photos --output``).

Every file under ``--photos`` (a local folder or an ``s3://`` prefix, recursive; hidden and system files
ignored as prepare-data ignores them) is read, every face in it detected and cropped as at enrolment
(the gallery's detection settings), the crops embedded in batches on the chosen device, and each face named
with :meth:`common.gallery.Gallery.match`.

Results layout under ``--output``::

    identify.json                      the gallery (location, sha256), threshold and photos location of this
                                       results folder; a rerun with another gallery is refused
    parts/<I>-of-<N>/<seq>-<id>.jsonl  the results of shard I of N, one JSON object per photo, written every
                                       ``chunk`` photos (a rerun skips the photos in any part: resume)
    shards/<I>-of-<N>.json             that shard's counts; ``"complete": true`` once it has every photo
    results.jsonl, summary.json        all parts merged (sorted by photo) and the counts, written by the shard
                                       that finds every shard of N complete

A result line: ``{"photo": key relative to --photos, "faces": [{"box": [x, y, w, h], "identity": name or null,
"score": best person score, "top3": [[name, score], ...]}, ...]}``, faces largest first; a photo that cannot be
read has ``"error": reason`` and no faces.

Sharding: a photo belongs to shard ``int(sha256(key)[:16], 16) % N``, a function of its key alone, so N
independent jobs (an Indexed Job's pods) cover a collection exactly once without coordination, whatever order
their listings come in.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
import uuid

import torch

from facessl.common.errors import BadInputError, PreemptedError, UsageError
from facessl.common.gallery import Gallery, embedder_for_gallery, load_gallery, progress
from facessl.common.storage import Storage, claim_output, location_within, open_storage

CONFIG = "identify.json"
RESULTS = "results.jsonl"
SUMMARY = "summary.json"


def shard_of(key: str, num_shards: int) -> int:
    """The shard (0 .. num_shards - 1) of a photo key: a hash of the key alone."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], 16) % num_shards


def list_photos(storage: Storage, log=print) -> list[str]:
    """Every file under the location, sorted, hidden and system files left out, and local files whose names are
    not valid UTF-8 (no results line can name them) left out with a warning naming them.

    Raises:
        BadInputError: the location holds no file.
    """
    from facessl.common.prepare import is_ignored

    keys, unnamed = [], []
    for key in sorted(storage.list()):
        if is_ignored(key):
            continue
        try:
            key.encode("utf-8")
            keys.append(key)
        except UnicodeEncodeError:
            unnamed.append(key.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
    if unnamed:
        log(f"warning: left out {len(unnamed)} files whose names are not valid UTF-8 (rename them): {unnamed[:5]}")
    # (walking a link can loop or reach a folder twice; prepare-data and enroll skip them the same way)
    links = [key for key in storage.folder_links() if not is_ignored(key)]
    if links:
        log(f"warning: left out {len(links)} links to folders (not followed; copy or move the photos in): {links[:5]}")
    if not keys:
        raise BadInputError(f"no photos under {storage.uri} (empty, or not there)")
    return keys


def is_result_line(row) -> bool:
    """Whether a decoded part line has what the results and the summary are built from: a ``photo`` key
    (str) and a list of ``faces``, each a dict with a 4-number ``box`` and an ``identity`` (str or null)."""
    if not isinstance(row, dict) or not isinstance(row.get("photo"), str) or not isinstance(row.get("faces"), list):
        return False
    return all(
        isinstance(face, dict)
        and (face.get("identity") is None or isinstance(face.get("identity"), str))
        and "identity" in face
        and isinstance(face.get("box"), list)
        and len(face["box"]) == 4
        for face in row["faces"]
    )


def read_parts(out: Storage) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """Every result line in ``parts/`` (the first line of a photo wins), and the part keys of each shard folder.

    Raises:
        BadInputError: a part that is not JSON lines of results (edited or damaged: move it away).
    """
    results: dict[str, dict] = {}
    by_shard: dict[str, list[str]] = {}
    for key in sorted(out.list("parts")):
        if not key.endswith(".jsonl"):
            continue
        by_shard.setdefault(key.split("/")[1], []).append(key)
        for n, line in enumerate(out.read_text(key).splitlines(), start=1):
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not is_result_line(row):
                raise BadInputError(
                    f"{out.url(key)} line {n} is not a result line: move the file away to redo its photos"
                )
            results.setdefault(row["photo"], row)
    return results, by_shard


def summarise(rows, seconds: float) -> dict:
    """Counts of result lines: ``photos``, ``faces``, ``named``, ``unknown``, ``errors``, ``seconds`` and
    ``photos_per_second``."""
    rows = list(rows)
    faces = [f for r in rows for f in r.get("faces", [])]
    named = sum(f["identity"] is not None for f in faces)
    return {
        "photos": len(rows),
        "faces": len(faces),
        "named": named,
        "unknown": len(faces) - named,
        "errors": sum("error" in r for r in rows),
        "seconds": round(seconds, 1),
        "photos_per_second": round(len(rows) / seconds, 2) if seconds > 0 else None,
    }


def claim_results(out: Storage, config: dict) -> None:
    """Write ``identify.json`` for a new results location, or check that an earlier run's is the same.

    Raises:
        UsageError: the results location holds the results of another gallery, threshold or photo location
            (mixing them would name faces by two standards): give another --output, or empty it to start over.
    """
    try:
        earlier = json.loads(out.read_text(CONFIG))
    except BadInputError:
        out.write_text(CONFIG, json.dumps(config, indent=1, ensure_ascii=False))
        return
    except (ValueError, UnicodeDecodeError):
        raise BadInputError(f"{out.url(CONFIG)} is not JSON: move the results folder away") from None
    for name, what in (
        ("gallery_sha256", "another gallery"),
        ("threshold", "another threshold"),
        ("photos", "another --photos"),
    ):
        if not isinstance(earlier, dict) or earlier.get(name) != config[name]:
            shown = "?"
            if isinstance(earlier, dict):
                shown = earlier.get("gallery") if name == "gallery_sha256" else earlier.get(name)
            raise UsageError(
                f"{out.uri} holds results made with {what} ({shown}): "
                "a rerun only resumes the same gallery, threshold and photos; give another --output, or "
                "delete that folder to start over"
            )


class _Stop:
    """SIGTERM (preemption) and Ctrl-C request a stop at the next photo: the results so far are written first."""

    def __init__(self):
        self.signal = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.signal = signum

    def restore(self):
        for s, old in self._old.items():
            signal.signal(s, old)


class _ResultParts:
    """This shard's result rows on their way out: faces are embedded in batches of ``batch_size`` crops and the
    rows written as ``parts/<shard>/<seq>-<id>.jsonl``, so a stop loses at most the rows of one unwritten part."""

    def __init__(self, out: Storage, shard: str, seq: int, gallery: Gallery, embedder, threshold: float, batch_size):
        self.out, self.shard, self.seq = out, shard, seq
        self.gallery, self.embedder, self.threshold, self.batch_size = gallery, embedder, threshold, batch_size
        self.rows: list[dict] = []
        self.pending: list[tuple[dict, list]] = []

    def __len__(self) -> int:
        return len(self.rows) + len(self.pending)

    def add(self, row: dict, crops: list) -> None:
        """Queue one photo's row and its face crops (each a CHW float tensor), embedding once a batch is full."""
        self.pending.append((row, crops))
        if sum(len(cs) for _, cs in self.pending) >= self.batch_size:
            self.embed_pending()

    def embed_pending(self) -> None:
        crops = [c for _, cs in self.pending for c in cs]
        if crops:
            matches = iter(self.gallery.match(self.embedder(torch.stack(crops), self.batch_size), self.threshold))
        else:
            matches = iter(())
        for row, _ in self.pending:
            for face in row["faces"]:
                face.update(next(matches))
            self.rows.append(row)
        self.pending.clear()

    def flush(self) -> None:
        self.embed_pending()
        if self.rows:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows)
            self.out.write_text(f"parts/{self.shard}/{self.seq:05d}-{uuid.uuid4().hex[:8]}.jsonl", text)
            self.seq += 1
            self.rows.clear()


def _open_results(
    gallery_location: str,
    photos_location: str,
    output_location: str,
    encoder_location,
    threshold,
    device_name,
    photos_uri: str,
) -> tuple[Gallery, object, float, Storage]:
    """Check the locations, load the gallery and its encoder, and claim the output for this gallery, threshold
    and photos (``photos_uri``: the location as storage spells it, a local one absolute, so that ``ph``, ``ph/``
    and ``./ph`` are one folder, and ``ph`` from another directory is not). Returns ``(gallery, embedder,
    threshold, out)``; raises as :func:`identify_collection`."""
    if location_within(output_location, photos_location):
        raise UsageError(
            f"--output {output_location} lies inside --photos {photos_location}: its results would be read as photos; "
            "give a location outside it"
        )
    if location_within(photos_location, output_location):
        # the results' parts/ and shards/ would land among the photos, and a later run would read them as photos
        raise UsageError(
            f"--output {output_location} contains --photos {photos_location}: give the results a folder of their own"
        )
    gallery: Gallery = load_gallery(gallery_location)
    embedder = embedder_for_gallery(gallery, encoder_location, device_name)
    value = gallery.threshold["value"] if threshold is None else float(threshold)
    out = open_storage(output_location)
    if out.exists("gallery.pt"):
        raise UsageError(
            f"--output {output_location} holds a gallery (gallery.pt): give the results a folder of their own"
        )
    claim_output(out, "identify")
    claim_results(
        out,
        {
            "gallery": gallery_location,
            "gallery_sha256": gallery.sha256,
            "threshold": value,
            "photos": photos_uri,
            "encoder": embedder.info["location"],
        },
    )
    return gallery, embedder, value, out


def _seconds_spent(out: Storage, status_key: str) -> float:
    """The seconds an earlier run of this shard recorded in its status file (0 when there is none)."""
    try:
        earlier = json.loads(out.read_text(status_key))
        return float(earlier.get("seconds", 0)) if isinstance(earlier, dict) else 0.0
    except (BadInputError, ValueError, TypeError, UnicodeDecodeError):
        return 0.0


def identify_collection(
    gallery_location: str,
    photos_location: str,
    output_location: str,
    *,
    encoder_location: str | None = None,
    threshold: float | None = None,
    num_shards: int = 1,
    shard_index: int = 0,
    chunk: int = 500,
    batch_size: int = 64,
    workers: int = 0,
    device_name: str = "auto",
    log=print,
) -> dict:
    """Identify every face of every photo under ``photos_location`` (module docstring for the outputs).

    Returns:
        This shard's counts (``shards/I-of-N.json``), with ``merged`` True when this run also wrote
        ``results.jsonl`` and ``summary.json``.
    Raises:
        UsageError: shard options out of range, results inside the photos, results of another gallery there.
        BadInputError: an unusable gallery or encoder, no photos. StorageError: S3 failures (exit 4).
        PreemptedError: stopped by SIGTERM after writing the results so far (exit 4: rerun to resume).
        KeyboardInterrupt: Ctrl-C, after writing the results so far.
    """
    from facessl.common.data import image_to_chw
    from facessl.common.photos import detect_photos

    started = time.time()
    if not 0 <= shard_index < num_shards:
        raise UsageError(f"--shard-index {shard_index} is not in 0..{num_shards - 1} (--num-shards {num_shards})")
    photos = open_storage(photos_location)
    # listed before the output is claimed: a --photos that holds nothing must not tie the output to it
    listed = list_photos(photos, log)
    gallery, embedder, value, out = _open_results(
        gallery_location, photos_location, output_location, encoder_location, threshold, device_name, photos.uri
    )
    shard = f"{shard_index}-of-{num_shards}"
    keys = [k for k in listed if shard_of(k, num_shards) == shard_index]
    done, parts = read_parts(out)
    todo = [k for k in keys if k not in done]
    status_key = f"shards/{shard}.json"
    spent = _seconds_spent(out, status_key)
    log(
        f"shard {shard}: {len(keys)} photos, {len(keys) - len(todo)} already done; {len(gallery.people)} people, "
        f"threshold {value:.4f}, {gallery.image_size} px on {embedder.device}"
    )
    results = _ResultParts(out, shard, len(parts.get(shard, [])), gallery, embedder, value, batch_size)
    stop = _Stop()
    try:
        stream = detect_photos(
            photos_location, todo, gallery.detect_config, crops="all", workers=workers, align=gallery.align
        )
        for photo in progress(stream, len(todo), "identify"):
            row = {"photo": photo.key, "faces": [{"box": list(f.box)} for f in photo.faces]}
            if photo.error:
                row["error"] = photo.error
            results.add(row, [image_to_chw(f.crop) for f in photo.faces])
            if len(results) >= chunk:
                results.flush()
            if stop.signal is not None:
                break
        stream.close()
        results.flush()
    except BaseException:
        # keep what is done (an S3 outage may have passed by now); the original error is the one to report
        try:
            results.flush()
        except Exception:  # noqa: BLE001
            pass
        raise
    finally:
        stop.restore()
    done, _ = read_parts(out)
    complete = all(k in done for k in keys)
    mine = [done[k] for k in keys if k in done]
    status = {
        **summarise(mine, spent + time.time() - started),
        "shard": shard_index,
        "num_shards": num_shards,
        "complete": complete,
    }
    out.write_text(status_key, json.dumps(status, indent=1))
    if stop.signal == signal.SIGINT:
        raise KeyboardInterrupt
    if stop.signal is not None:
        raise PreemptedError(f"stopped by SIGTERM; the results so far are in {out.uri}: run again to resume")
    status["merged"] = complete and merge_if_complete(out, num_shards, done, listed, log)
    return status


def merge_if_complete(out: Storage, num_shards: int, done: dict[str, dict], listed: list[str], log=print) -> bool:
    """When every shard of ``num_shards`` is complete and every photo of ``listed`` (the collection as this run
    found it) has a result, write ``results.jsonl`` (the result lines of ``listed``, sorted by photo) and
    ``summary.json`` (counts; ``seconds`` summed over the shards). Returns whether it wrote them."""
    statuses = []
    for i in range(num_shards):
        try:
            statuses.append(json.loads(out.read_text(f"shards/{i}-of-{num_shards}.json")))
        except (BadInputError, ValueError, UnicodeDecodeError):
            return False
    if not all(isinstance(s, dict) and s.get("complete") is True for s in statuses):
        complete = sum(isinstance(s, dict) and s.get("complete") is True for s in statuses)
        log(f"{complete} of {num_shards} shards complete: the last one to finish writes {RESULTS}")
        return False
    # another shard's status predates photos added since: its results would be silently short
    missing = [k for k in listed if k not in done]
    if missing:
        shards = sorted({shard_of(k, num_shards) for k in missing})
        log(
            f"warning: {len(missing)} photos (e.g. {missing[0]}) have no result although their shards {shards} "
            f"finished: added since those ran? run those shards again; {RESULTS} is written then"
        )
        # an earlier merge describes the collection as it was
        for key in (RESULTS, SUMMARY):
            out.delete(key)
        return False
    seconds = sum(float(s.get("seconds", 0)) for s in statuses)
    # (a photo deleted since it was identified is left out)
    rows = [done[k] for k in sorted(listed)]
    out.write_text(RESULTS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out.write_text(SUMMARY, json.dumps({**summarise(rows, seconds), "shards": num_shards}, indent=1))
    return True
