"""Faces of many photos: read, decode, detect and crop in worker processes, results in input order.

``enroll`` and the batch ``identify`` both read a collection of photos (a local folder or an ``s3://`` prefix)
and need the face crops of each. Detection (OpenCV Haar cascades, common.faces) is CPU-bound, single-threaded
per photo and the slow stage, so :func:`detect_photos` runs it in one process per core while the caller embeds
the crops of earlier photos. Each worker reads its photos from storage itself (no photo bytes go through the
parent) and returns the crops as small uint8 arrays.

Detection is prepare-data's: :func:`common.faces.detect_faces` (every face the default frontal cascade finds,
largest first, or else the one face of prepare-data's fallback chain, whose first stage is that same frontal
cascade), and the crop is :func:`common.faces.crop_face` with the same margin. The largest face of a photo is
therefore exactly the face prepare-data would crop from it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context

import numpy as np

from facessl.common.errors import BadInputError, PreemptedError, StorageError
from facessl.common.faces import MAX_PHOTO_BYTES, DetectConfig, SkipImage, crop_face, decode_image, detect_faces
from facessl.common.storage import open_storage

# photos per task sent to a worker: fewer round trips, and still a smooth progress bar
PHOTOS_PER_TASK = 4
ALIGNMENTS = ("none", "eyes")
EYE_CASCADE = "haarcascade_eye.xml"
# a tilt beyond this is more likely two wrong eye detections than a tilted head
MAX_TILT_DEGREES = 30.0


@dataclass
class Face:
    """One detected face: ``box`` (x, y, w, h) in the photo's pixels, the cascade that found it, and its crop
    (uint8 array (size, size, 3), RGB) when crops were asked for."""

    box: tuple[int, int, int, int]
    detector: str
    crop: np.ndarray | None = None


@dataclass
class PhotoFaces:
    """What became of one photo: its faces, largest first (maybe none), or ``error`` (why it could not be read
    or decoded; then no faces). ``sha256`` is of the photo's bytes (None when they could not be read)."""

    key: str
    faces: list[Face] = field(default_factory=list)
    error: str | None = None
    sha256: str | None = None


def eye_tilt(img, box: tuple[int, int, int, int], cfg: DetectConfig) -> float | None:
    """The in-plane tilt of a face in degrees (counter-clockwise positive, as PIL's ``rotate`` takes it), from
    the two eyes OpenCV's eye cascade (``haarcascade_eye.xml``) finds in the upper half of the face box: the
    largest detection left of the box centre and the largest right of it. None when either eye is missing or
    the tilt exceeds :data:`MAX_TILT_DEGREES`."""
    import math

    from facessl.common.faces import _cascade, _gray

    x, y, w, h = box
    gray = _gray(img)[max(0, y) : y + h // 2 + h // 8, max(0, x) : x + w]
    if gray.size == 0:
        return None
    side = max(8, w // 8)
    eyes = _cascade(EYE_CASCADE).detectMultiScale(
        gray, scaleFactor=cfg.scale_factor, minNeighbors=3, minSize=(side, side)
    )
    centres = sorted(((ex + ew / 2, ey + eh / 2, ew * eh) for ex, ey, ew, eh in eyes), key=lambda e: -e[2])
    left = next((e for e in centres if e[0] < w / 2), None)
    right = next((e for e in centres if e[0] >= w / 2), None)
    if left is None or right is None:
        return None
    # image y grows downwards: a right eye lower than the left one is a clockwise tilt
    tilt = math.degrees(math.atan2(right[1] - left[1], right[0] - left[0]))
    return tilt if abs(tilt) <= MAX_TILT_DEGREES else None


def aligned_crop(img, box: tuple[int, int, int, int], cfg: DetectConfig, align: str):
    """:func:`common.faces.crop_face` of ``box``; with ``align="eyes"``, of the photo first rotated about the
    box centre so that the eyes lie level (:func:`eye_tilt`; no rotation when the eyes are not found)."""
    from PIL import Image

    if align == "eyes" and (tilt := eye_tilt(img, box, cfg)) is not None:
        x, y, w, h = box
        img = img.rotate(tilt, resample=Image.Resampling.BICUBIC, center=(x + w / 2, y + h / 2))
    return crop_face(img, box, cfg.margin, cfg.image_size)


def faces_of_photo(data: bytes, cfg: DetectConfig, crops: str = "all", align: str = "none") -> PhotoFaces:
    """Decode ``data`` and detect its faces as :func:`common.faces.detect_faces` does, largest first.

    Args:
        data: the photo file's bytes. cfg: detection settings; ``cfg.image_size`` is the crop side in pixels
            and ``cfg.margin`` the margin around each box. crops: ``"all"`` crops every face, ``"largest"``
            only the first (enrolment: the other boxes are kept to judge whether the photo is ambiguous).
            align: ``"none"`` (prepare-data's crop) or ``"eyes"`` (:func:`aligned_crop`).
    Returns:
        PhotoFaces with an empty ``key``; ``error`` set when the bytes are no decodable image (empty, not an
        image, over ``cfg.max_pixels`` pixels, truncated).
    """
    try:
        img = decode_image(data, cfg.max_pixels)
    except SkipImage as exc:
        return PhotoFaces("", error=str(exc))
    faces = []
    for n, (box, detector) in enumerate(detect_faces(img, cfg)):
        crop = None
        if crops == "all" or n == 0:
            crop = np.asarray(aligned_crop(img, box, cfg, align), dtype=np.uint8)
        faces.append(Face(tuple(int(v) for v in box), detector, crop))
    return PhotoFaces("", faces)


_WORKER: dict = {}


def _init_worker(location: str, cfg: DetectConfig, crops: str, align: str, ignore_signals: bool) -> None:
    import cv2

    # one process per core already: OpenCV's own threads would only contend
    cv2.setNumThreads(1)
    if ignore_signals:
        # Ctrl-C and SIGTERM are the parent's to handle: it stops the pool and keeps what is done
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _WORKER.update(storage=open_storage(location), cfg=cfg, crops=crops, align=align)


def _read_and_detect(key: str) -> PhotoFaces:
    """One photo in a worker: read, then :func:`faces_of_photo`. A photo that cannot be read (missing since it
    was listed, over :data:`MAX_PHOTO_BYTES`, not a regular file, a link leaving the location) is an error
    entry; a storage outage raises StorageError, which ends the job with exit 4 (retry), as it is no property
    of the photo."""
    try:
        data = _WORKER["storage"].read_bytes(key, max_bytes=MAX_PHOTO_BYTES)
    except StorageError:
        raise
    except BadInputError as exc:
        return PhotoFaces(key, error=f"cannot read: {exc}")
    try:
        result = faces_of_photo(data, _WORKER["cfg"], _WORKER["crops"], _WORKER["align"])
    # a decoder or detector crash on one photo must not stop a collection of thousands
    except Exception as exc:  # noqa: BLE001
        result = PhotoFaces("", error=f"could not process the image ({type(exc).__name__})")
    result.key, result.sha256 = key, hashlib.sha256(data).hexdigest()
    return result


def _task(keys: list[str]) -> list[PhotoFaces]:
    return [_read_and_detect(key) for key in keys]


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Sigterm(BaseException):
    """SIGTERM, raised where the main thread is (as Ctrl-C raises KeyboardInterrupt) within
    :func:`sigterm_stops`. A BaseException, so no ``except Exception`` on the way swallows it (botocore wraps
    any Exception raised during a request in HTTPClientError and retries the request)."""


# whether SIGTERM arrived within the current sigterm_stops block (a worker pool broken by a SIGTERM to the
# whole process group is then a preemption, not a crash)
_SIGTERM = {"received": False}


def sigterm_received() -> bool:
    """Whether SIGTERM arrived within the current (or last) :func:`sigterm_stops` block."""
    return _SIGTERM["received"]


@contextmanager
def sigterm_stops(message: str):
    """Within the block, SIGTERM raises PreemptedError(``message``) (exit 4) where the main thread is, so that
    the stack unwinds and :func:`detect_photos` shuts its workers down (they ignore SIGTERM: the parent
    handles it). Without it, the default action kills the parent and leaves the workers running. Outside the
    main thread, where signal handlers cannot be set, it does nothing."""
    _SIGTERM["received"] = False
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_sigterm(signum, frame):
        _SIGTERM["received"] = True
        raise Sigterm()

    previous = signal.signal(signal.SIGTERM, raise_sigterm)
    try:
        yield
    except Sigterm:
        raise PreemptedError(message) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def detect_photos(
    location: str, keys: Iterable[str], cfg: DetectConfig, crops: str = "all", workers: int = 0, align: str = "none"
) -> Iterator[PhotoFaces]:
    """The faces of every photo ``keys`` names under ``location``, yielded in the order of ``keys``.

    ``workers`` processes (0: one per usable core; 1: in this process, no pool) read and detect; at most four
    tasks per worker are in flight, so memory stays bounded on a collection of any size and stopping the
    iteration early (SIGTERM, Ctrl-C) loses at most those.

    Raises:
        StorageError: the storage failed (exit 4), or a worker process died (killed for memory...).
    """
    keys = list(keys)
    workers = max(1, min(workers or usable_cores(), usable_cores(), -(-len(keys) // PHOTOS_PER_TASK) or 1))
    tasks = [keys[i : i + PHOTOS_PER_TASK] for i in range(0, len(keys), PHOTOS_PER_TASK)]
    if workers == 1:
        _init_worker(location, cfg, crops, align, ignore_signals=False)
        for task in tasks:
            yield from _task(task)
        return
    pool = ProcessPoolExecutor(
        workers,
        mp_context=get_context("spawn"),
        initializer=_init_worker,
        initargs=(location, cfg, crops, align, True),
    )
    pending: deque = deque()
    try:
        todo = iter(tasks)
        for task in todo:
            pending.append(pool.submit(_task, task))
            if len(pending) >= 4 * workers:
                break
        while pending:
            done = pending.popleft().result()
            # refill first: the workers detect the next photos while the caller embeds these
            for task in todo:
                pending.append(pool.submit(_task, task))
                break
            yield from done
    except BrokenProcessPool:
        raise StorageError("a detection worker process died (out of memory, or killed): run again to go on") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        # pool shutdown leaves no stray output of its own; flush ours before the caller's message
        sys.stderr.flush()
