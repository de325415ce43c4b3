"""identify: who is in a photo, by a trained classifier (train-classifier's ``model.pt``).

Every face the Haar cascades find (common.faces.detect_faces) is cropped as prepare-data crops it and
classified; a face whose top probability is below the threshold is reported as ``unknown`` (the classifier
only knows its training identities, so a low maximum softmax probability is the usual open-set signal;
Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution Examples", ICLR 2017).
"""

from __future__ import annotations

import io

import torch

from facessl.common.data import image_to_chw
from facessl.common.errors import BadInputError
from facessl.common.faces import MAX_PHOTO_BYTES, DetectConfig, SkipImage, crop_face, decode_image, detect_faces
from facessl.common.models import Classifier
from facessl.common.storage import open_file_location
from facessl.common.training import pick_device, resolve_precision

# re-exported: callers of identify load the model they pass to it from here
from facessl.common.weights import load_classifier

__all__ = ["annotate", "identify", "load_classifier", "read_photo"]


def read_photo(location: str) -> bytes:
    """The bytes of a local photo or an ``s3://bucket/key`` object.

    Raises:
        BadInputError: over :data:`MAX_PHOTO_BYTES`, or a local FIFO, device... (not a regular file).
        NotFoundError: no such file or object. StorageError: S3 unreachable.
    """
    storage, key = open_file_location(location)
    return storage.read_bytes(key, max_bytes=MAX_PHOTO_BYTES)


@torch.no_grad()
def identify(
    photo: bytes,
    model: Classifier,
    classes: list[str],
    image_size: int,
    threshold: float = 0.5,
    detect: bool = True,
    cfg: DetectConfig = DetectConfig(),
    device_name: str = "auto",
    precision: str = "auto",
):
    """Faces of a photo with their top-3 identities, the classifier run in ``precision`` (``auto``, ``fp32`` or
    ``bf16``, resolved for the device as the training jobs do; the softmax is float32).

    Returns ``(image, faces)``: the decoded RGB photo and one dict per face, largest first: ``box`` (x, y, w,
    h in pixels; the whole photo with ``detect=False``), ``detector``, ``top3`` [(name, probability)], and
    ``identity`` (the top name, or ``unknown`` below ``threshold``).

    Raises:
        BadInputError: the photo cannot be decoded.
    """
    from facessl.common.augment import eval_transform

    try:
        img = decode_image(photo, cfg.max_pixels)
    except SkipImage as exc:
        raise BadInputError(f"cannot read the photo: {exc}") from None
    found = detect_faces(img, cfg) if detect else [((0, 0, *img.size), "whole photo")]
    if not found:
        return img, []
    device = pick_device(device_name)
    crops = torch.stack(
        [image_to_chw(crop_face(img, box if detect else None, cfg.margin, image_size)) for box, _ in found]
    )
    arithmetic = resolve_precision(precision, device)
    model = arithmetic.layout(model.to(device))
    with arithmetic.autocast(device):
        logits = model(arithmetic.layout(eval_transform(crops.to(device), image_size)))
    probs = logits.float().softmax(1).cpu()
    k = min(3, len(classes))
    top_p, top_i = probs.topk(k, dim=1)
    faces = []
    for (box, detector), p, i in zip(found, top_p.tolist(), top_i.tolist()):
        top3 = [(classes[c], round(q, 4)) for c, q in zip(i, p)]
        faces.append(
            {
                "box": list(box),
                "detector": detector,
                "top3": top3,
                "identity": top3[0][0] if top3[0][1] >= threshold else "unknown",
            }
        )
    return img, faces


def annotate(img, faces: list[dict]) -> bytes:
    """The photo as JPEG with each face's box and identity drawn on it."""
    from PIL import ImageDraw

    out = img.copy()
    draw = ImageDraw.Draw(out)
    width = max(2, round(max(img.size) / 300))
    for face in faces:
        x, y, w, h = face["box"]
        colour = (230, 60, 60) if face["identity"] == "unknown" else (40, 200, 90)
        draw.rectangle([x, y, x + w, y + h], outline=colour, width=width)
        label = f"{face['identity']} {face['top3'][0][1]:.2f}"
        left, top, right, bottom = draw.textbbox((x, max(0, y - 12)), label)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=colour)
        draw.text((x, max(0, y - 12)), label, fill=(255, 255, 255))
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=92)
    return buf.getvalue()
