"""Decoding raw photos and finding the face in them (OpenCV Haar cascade).

Stages, each a function:
    decode_image(data)          bytes -> 8-bit RGB PIL image, or SkipImage(reason)
    detect_largest_face(img)    RGB image -> (x, y, w, h) of the largest detection of one Haar cascade, or None
    detect_face(img)            the fallback chain below -> (box, detector name), or None
    crop_face(img, box)         square crop with a margin around the box, resized to ``size`` x ``size``
    process_photo(data, cfg)    decode, detect, crop, plus the no-face policy; returns a FaceResult

Method: Viola & Jones, "Rapid Object Detection using a Boosted Cascade of Simple Features" (CVPR 2001),
with OpenCV's pretrained cascades. The original project ran ``haarcascade_frontalface_default.xml`` alone;
it misses faces that are turned, tilted or small. ``detect_face`` tries, in order and stopping at the first
hit: the default frontal cascade; the ``alt2`` frontal cascade; the profile cascade on the photo and on its
mirror image (OpenCV's profile cascade only finds faces turned one way); and, for photos whose longest side
is under ``upscale_below`` pixels, the same chain on the photo upscaled 2x (Haar's 24x24 base window misses
small faces). The detector that found the face is recorded with every crop.

Photos of more than ``detect_max_pixels`` pixels (a phone's 12 to 48 megapixels) are searched on a copy
scaled down to that many pixels, and the boxes mapped back: the cascade's cost grows with the pixels searched
(docs/jobs.md gives the times), while the crop, cut from the full-size photo, keeps every pixel. The bound
is on pixels, not on a side, so a long panorama keeps its height. Faces under about ``24 * sqrt(pixels /
detect_max_pixels)`` pixels are then too small to find.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Let Pillow itself refuse nothing: our own pixel limit below applies before decoding.
Image.MAX_IMAGE_PIXELS = None


class SkipImage(Exception):
    """A raw file that cannot become a crop; ``str(exc)`` is the recorded reason."""


# larger raw files are skipped (prepare-data) or refused (identify) unread
MAX_PHOTO_BYTES = 100 * 1024 * 1024

# the smallest search copy the jobs accept (about 580x430): smaller copies shrink ordinary faces below the
# cascades' 24x24 window
MIN_DETECT_PIXELS = 250_000


@dataclass(frozen=True)
class DetectConfig:
    """Face detection and crop parameters.

    Attributes:
        scale_factor: Haar pyramid step (>1).
        min_neighbors: detections a candidate needs to be kept (higher: fewer false positives).
        min_face: smallest face side in pixels.
        margin: crop margin around the box, as a fraction of the box side on each side (below 0: inside it).
        image_size: side in pixels of the square output crop.
        on_no_face: "skip" (record a skip) or "keep-full" (use the whole photo, centre-cropped square; a
            photo with a side under ``min_face`` is skipped all the same).
        max_pixels: photos with more pixels are refused before decoding (bounded memory).
        fallback: try the other cascades, the mirror image and upscaling when the default cascade finds
            nothing (``detect_face``); False reproduces the original single-cascade detector.
        upscale_below: photos whose longest side is shorter are also searched at 2x size (fallback only),
            unless the 2x copy would exceed ``max_pixels``.
        detect_max_pixels: photos with more pixels are searched on a copy scaled down to this many (module
            docstring); 0 searches every photo at full size. Below :data:`MIN_DETECT_PIXELS` (other than 0)
            the jobs refuse it.
    """

    scale_factor: float = 1.1
    min_neighbors: int = 5
    min_face: int = 30
    margin: float = 0.2
    image_size: int = 224
    on_no_face: str = "skip"
    max_pixels: int = 50_000_000
    fallback: bool = True
    upscale_below: int = 500
    detect_max_pixels: int = 2_000_000


@dataclass
class FaceResult:
    """One processed photo: a JPEG crop and its box, or a skip reason."""

    crop_jpeg: bytes | None
    box: tuple[int, int, int, int] | None
    reason: str | None = None
    detector: str | None = None


def decode_image(data: bytes, max_pixels: int = DetectConfig.max_pixels) -> Image.Image:
    """Decode ``data`` to an 8-bit RGB image with EXIF orientation applied.

    Handles CMYK, alpha (composited on white), palette, grayscale, 16-bit and float images, and takes the
    first frame of animations.

    Raises:
        SkipImage: empty file, not an image, too many pixels, truncated or corrupt data.
    """
    if not data:
        raise SkipImage("empty file")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise SkipImage("not an image (unrecognised format)") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on garbage
        raise SkipImage(f"unreadable image ({type(exc).__name__})") from None
    width, height = img.size
    if width * height > max_pixels:
        raise SkipImage(f"too large: {width}x{height} pixels exceeds the limit of {max_pixels}")
    if width < 1 or height < 1:
        raise SkipImage("image has no pixels")
    try:
        img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb8(img)
    except SkipImage:
        raise
    except Exception as exc:  # noqa: BLE001
        detail = "truncated" if "truncated" in str(exc).lower() else type(exc).__name__
        raise SkipImage(f"corrupt or truncated image ({detail})") from None


def _to_rgb8(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return img
    rgb = img.convert("RGB")
    if rgb.mode != "RGB":
        raise SkipImage(f"unsupported colour mode {mode}")
    return rgb


_CASCADES: dict[str, object] = {}


def _cascade(name: str = "haarcascade_frontalface_default.xml"):
    import cv2

    if name not in _CASCADES:
        cascade = cv2.CascadeClassifier(cv2.data.haarcascades + name)
        if cascade.empty():
            raise RuntimeError(f"OpenCV cascade {name} could not be loaded from {cv2.data.haarcascades}")
        _CASCADES[name] = cascade
    return _CASCADES[name]


FRONTAL = "haarcascade_frontalface_default.xml"
CASCADE_CHAIN = (
    ("frontal", FRONTAL, False),
    ("frontal_alt2", "haarcascade_frontalface_alt2.xml", False),
    ("profile", "haarcascade_profileface.xml", False),
    ("profile_mirrored", "haarcascade_profileface.xml", True),
)


def detect_largest_face(
    img: Image.Image, cfg: DetectConfig = DetectConfig(), cascade: str = FRONTAL
) -> tuple[int, int, int, int] | None:
    """The largest face found by one Haar ``cascade`` (an OpenCV cascade file name), as ``(x, y, w, h)``
    in pixels, or None.

    Only the largest detection is kept: the other faces in a photo are usually other people.
    """
    gray, k = _search_gray(img, cfg)
    box = _largest(gray, cfg, cascade, _min_side(cfg, k))
    return _scale_box(box, k) if box else None


def _gray(img: Image.Image) -> np.ndarray:
    import cv2

    return cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2GRAY)


def _search_gray(img: Image.Image, cfg: DetectConfig) -> tuple[np.ndarray, float]:
    """The grayscale array the cascades search, and the factor from its pixels to the photo's: the photo itself
    (1.0) or, where it has more than ``cfg.detect_max_pixels`` pixels, a copy scaled down to that many."""
    import cv2

    gray = _gray(img)
    pixels = gray.shape[0] * gray.shape[1]
    if not cfg.detect_max_pixels or pixels <= cfg.detect_max_pixels:
        return gray, 1.0
    k = math.sqrt(pixels / cfg.detect_max_pixels)
    size = (max(1, round(gray.shape[1] / k)), max(1, round(gray.shape[0] / k)))
    # area averaging: the anti-aliased reduction, as the cascades' own image pyramid would see it
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA), k


def check_detect_max_pixels(value: int) -> int:
    """``value`` when it is a usable ``detect_max_pixels``: 0 (full size) or at least :data:`MIN_DETECT_PIXELS`.

    Raises:
        ValueError: another value, with the reason.
    """
    if value != 0 and value < MIN_DETECT_PIXELS:
        raise ValueError(
            f"{value} pixels would shrink ordinary faces below the cascades' 24x24 window: give 0 (search at "
            f"full size) or at least {MIN_DETECT_PIXELS}"
        )
    return value


def _min_side(cfg: DetectConfig, k: float) -> int:
    """``cfg.min_face`` (photo pixels) in the pixels of a search copy ``k`` times smaller."""
    return max(1, round(cfg.min_face / k))


def _scale_box(box: tuple[int, int, int, int], k: float) -> tuple[int, int, int, int]:
    """A box in a search copy's pixels, in the photo's (``k``: photo pixels per copy pixel)."""
    return tuple(round(v * k) for v in box)


def _detections(gray: np.ndarray, cfg: DetectConfig, cascade: str, min_face: int | None = None) -> list[tuple]:
    """Every box ``(x, y, w, h)`` one cascade finds in a grayscale array, largest first."""
    side = min_face or cfg.min_face
    faces = _cascade(cascade).detectMultiScale(
        gray, scaleFactor=cfg.scale_factor, minNeighbors=cfg.min_neighbors, minSize=(side, side)
    )
    return sorted((tuple(int(v) for v in f) for f in faces), key=lambda b: -b[2] * b[3])


def _largest(gray: np.ndarray, cfg: DetectConfig, cascade: str, min_face: int | None = None):
    boxes = _detections(gray, cfg, cascade, min_face)
    return boxes[0] if boxes else None


def detect_face(img: Image.Image, cfg: DetectConfig = DetectConfig()) -> tuple[tuple[int, int, int, int], str] | None:
    """The face of the photo by the fallback chain of the module docstring: ``((x, y, w, h), detector)`` in
    the photo's pixels, with ``detector`` naming the cascade (suffixed ``_x2`` when found upscaled), or None.
    With ``cfg.fallback`` False only the default frontal cascade runs."""
    gray, k = _search_gray(img, cfg)
    return _fallback_chain(img, gray, k, cfg)


def _fallback_chain(img: Image.Image, gray: np.ndarray, k: float, cfg: DetectConfig):
    """:func:`detect_face` on the search array ``gray`` of ``img`` (``k``: photo pixels per array pixel)."""
    import cv2

    min_side = _min_side(cfg, k)
    if not cfg.fallback:
        box = _largest(gray, cfg, FRONTAL, min_side)
        return (_scale_box(box, k), "frontal") if box else None
    upscale = max(img.size) < cfg.upscale_below and 4 * img.size[0] * img.size[1] <= cfg.max_pixels
    # the 2x copy stays within the memory bound of max_pixels
    scales = [1] + ([2] if upscale else [])
    for scale in scales:
        g = gray if scale == 1 else cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        for name, cascade, mirrored in CASCADE_CHAIN:
            box = _largest(g[:, ::-1].copy() if mirrored else g, cfg, cascade, min_side * scale)
            if box is None:
                continue
            x, y, w, h = box
            if mirrored:
                x = g.shape[1] - x - w
            return _scale_box((x, y, w, h), k / scale), name + ("_x2" if scale == 2 else "")
    return None


def detect_faces(img: Image.Image, cfg: DetectConfig = DetectConfig()) -> list[tuple[tuple[int, int, int, int], str]]:
    """Every face the default frontal cascade finds, largest first, as ``((x, y, w, h), detector)``; when it
    finds none, the single face of :func:`detect_face`'s fallback chain (or an empty list)."""
    gray, k = _search_gray(img, cfg)
    boxes = _detections(gray, cfg, FRONTAL, _min_side(cfg, k))
    if boxes:
        return [(_scale_box(b, k), "frontal") for b in boxes]
    # the same search array: the photo is converted and scaled once
    found = _fallback_chain(img, gray, k, cfg)
    return [found] if found else []


def crop_face(img: Image.Image, box: tuple[int, int, int, int] | None, margin: float, size: int) -> Image.Image:
    """Square crop centred on ``box`` with ``margin`` (fraction of the box side) added on each side,
    resized to ``size`` x ``size``; a negative margin cuts inside the box (-0.25: its central half). Parts
    outside the photo are filled with black. ``box=None`` takes the largest centred square of the whole photo."""
    if box is None:
        side = min(img.size)
        cx, cy = img.size[0] / 2, img.size[1] / 2
    else:
        x, y, w, h = box
        side = max(w, h) * (1 + 2 * margin)
        cx, cy = x + w / 2, y + h / 2
    left, top = round(cx - side / 2), round(cy - side / 2)
    square = img.crop((left, top, left + round(side), top + round(side)))
    return square.resize((size, size), Image.Resampling.BICUBIC)


def encode_jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def process_photo(data: bytes, cfg: DetectConfig) -> FaceResult:
    """Decode, detect, crop: a JPEG crop of the largest face, or a skip reason."""
    try:
        img = decode_image(data, cfg.max_pixels)
    except SkipImage as exc:
        return FaceResult(None, None, str(exc))
    found = detect_face(img, cfg)
    if found is None:
        if cfg.on_no_face != "keep-full":
            return FaceResult(None, None, "no face detected")
        # a 1x1 or 5000x1 image would train as a blown-up smear
        if min(img.size) < cfg.min_face:
            return FaceResult(
                None, None, f"no face, and a side under --min-face {cfg.min_face} px: too small to keep whole"
            )
        return FaceResult(encode_jpeg(crop_face(img, None, cfg.margin, cfg.image_size)), None, detector="none")
    box, detector = found
    return FaceResult(encode_jpeg(crop_face(img, box, cfg.margin, cfg.image_size)), box, detector=detector)
