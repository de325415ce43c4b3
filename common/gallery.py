"""Open-set identification: enrolment of a gallery, its calibrated threshold, gallery files, open-set metrics.

A *gallery* holds the L2-normalised embeddings of a few reference photos of each known person (enrolment), and
a similarity threshold. A face is named as the best-matching person when its cosine similarity to that person
reaches the threshold, and is *unknown* otherwise (open-set identification; Grother & Ngan, "Face Recognition
Vendor Test, Part 2: Identification", NIST IR 8271, 2019, for the terms and metrics used here).

Person score (``template``): ``best`` is the highest cosine similarity over the person's enrolled photos
(nearest neighbour); ``mean`` is the cosine similarity to the normalised mean of their embeddings.

Threshold calibration (:func:`calibrate`): a stranger is accepted when his *best* score over the whole gallery
reaches the threshold, so the impostor score of each enrolment photo is its maximum person score over all the
*other* people (leave one person out), not a single impostor pair. The threshold is the lowest similarity at
which at most a fraction ``far`` of those impostor scores pass; the genuine acceptance rate is the fraction of
enrolment photos whose score against the rest of their own person's photos (leave one photo out) passes it.

Gallery file (``gallery.pt``): a ``torch.save`` dict of tensors, strings, numbers and lists only, so it loads
with ``torch.load(weights_only=True)`` and cannot run code (see :func:`save_gallery` for the fields). The
encoder is referenced by its location and sha256, never copied in; ``identify`` refuses another encoder.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F

from facessl.common.checkpoints import load_torch_bytes, save_torch
from facessl.common.config import is_crop_margin, is_crop_side
from facessl.common.errors import BadInputError, UsageError
from facessl.common.faces import DetectConfig
from facessl.common.storage import (
    LocalStorage,
    NotFoundError,
    Storage,
    claim_output,
    join_location,
    location_within,
    open_file_location,
    open_storage,
)

GALLERY_FILE = "gallery.pt"
ENROLMENT_FILE = "enrolment.json"
FORMAT = "facessl-gallery"
VERSION = 1
TEMPLATES = ("best", "mean")
REPRESENTATIONS = ("encoder", "whitened", "head")
# ``auto``: ``whitened`` when the encoder file holds a whitening (a train-classifier model.pt), else ``encoder``
REPRESENTATION_CHOICES = ("auto", *REPRESENTATIONS)
# ridge added to the within-class covariance, as a fraction of its mean eigenvalue (keeps rare directions finite)
WHITENING_RIDGE = 0.01
# a second face at least this fraction of the largest face's side makes a reference photo ambiguous
SIMILAR_FACE_RATIO = 0.8


# --- encoders -------------------------------------------------------------------------------------------


def file_sha256(location: str) -> str:
    """Hex sha256 of the file at a local path or ``s3://`` URI. Raises NotFoundError / StorageError."""
    storage, key = open_file_location(location)
    return hashlib.sha256(storage.read_bytes(key)).hexdigest()


def resolve_encoder_file(location: str) -> str:
    """The weights file of ``--encoder``, absolute when local: the location itself when it names a ``.pt``/``.pth``
    file, else the ``encoder.pt`` (pretrain-simclr) or ``model.pt`` (train-classifier) in that run location.

    Raises:
        BadInputError: a run location holding neither file.
    """
    if location.rstrip("/").endswith((".pt", ".pth")):
        storage, key = open_file_location(location)
        # absolute: the gallery records it, and identify may run from another directory
        return storage.url(key)
    run = open_storage(location)
    for name in ("encoder.pt", "model.pt"):
        if run.exists(name):
            return run.url(name)
    raise BadInputError(
        f"{location} holds neither encoder.pt (a pretrain-simclr run) nor model.pt (a train-classifier run)"
    )


def _read_weights(location: str) -> tuple[object, str]:
    """The torch file at ``location`` loaded with weights_only=True, and the sha256 of its bytes."""
    storage, key = open_file_location(location)
    try:
        data = storage.read_bytes(key)
    except NotFoundError:
        raise BadInputError(f"encoder file {location} not found") from None
    return load_torch_bytes(data, location), hashlib.sha256(data).hexdigest()


def recorded_image_size(location: str, state, config: dict) -> int | None:
    """The crop side an encoder was trained at: ``image_size`` of a train-classifier ``model.pt``, else the
    ``image_size`` of ``config`` (the ``config.json`` beside the file, :func:`_run_config`: a pretrain-simclr or
    train-classifier run), else None (a bare weights file).

    Raises:
        BadInputError: a ``model.pt`` whose ``image_size`` is not a whole number of pixels from 16 to 4096.
    """
    size = state.get("image_size") if isinstance(state, dict) else None
    if size is not None and not is_crop_side(size):
        raise BadInputError(
            f"{location} records image_size {size!r}, not a crop side of 16-4096 px: the file was altered"
        )
    if size is None:
        size = config.get("image_size")
    return size if is_crop_side(size) else None


def _run_config(location: str) -> dict:
    """The ``config.json`` beside a weights file (the run that wrote it), or {} when there is none."""
    storage, key = open_file_location(location)
    folder = key.rpartition("/")[0]
    try:
        config = json.loads(storage.read_text(f"{folder}/config.json" if folder else "config.json"))
    except (BadInputError, ValueError, UnicodeDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def recorded_crop_margin(config: dict) -> float | None:
    """The margin prepare-data cut an encoder's training faces with (``crop_margin`` of ``config``, the
    ``config.json`` beside the file, written by both training jobs), or None (a bare weights file, or a run
    that records none). enroll crops at this margin unless told otherwise: an encoder knows faces framed as it
    saw them."""
    margin = config.get("crop_margin")
    return float(margin) if is_crop_margin(margin) else None


def _projection_head(location: str) -> tuple[torch.nn.Module, str]:
    """The SimCLR projection head saved beside an ``encoder.pt`` (``projection_head.pt``) and its sha256."""
    from facessl.common.models import ProjectionHead, check_weight_values, load_error_summary

    state, sha = _read_weights(location)
    try:
        if not isinstance(state, dict) or not {"net.0.weight", "net.3.weight"} <= set(state):
            raise ValueError(f"{location} is not a SimCLR projection_head.pt (no net.0 / net.3 weights)")
        hidden, in_dim = state["net.0.weight"].shape
        out_dim = state["net.3.weight"].shape[0]
        head = ProjectionHead(in_dim, hidden, out_dim)
        check_weight_values(state, location)
        head.load_state_dict(state)
    except ValueError as exc:
        raise BadInputError(str(exc)) from None
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise BadInputError(f"{location} does not fit a projection head: {load_error_summary(exc)}") from None
    return head, sha


def fit_whitening(embeddings: torch.Tensor, labels: torch.Tensor, ridge: float = WHITENING_RIDGE) -> dict:
    """Within-class covariance normalisation (WCCN; Hatch, Kajarekar & Stolcke, "Within-class covariance
    normalization for SVM-based speaker recognition", Interspeech 2006) of unit embeddings of labelled faces.

    The embeddings are centred on their mean and multiplied by ``W^-1/2``, where ``W`` is the covariance of
    each embedding around its own identity's mean, plus ``ridge`` times its mean eigenvalue. Directions in which
    one person's photos vary (pose, light, framing) are shrunk and the others stretched, so a cosine after the
    transform weighs what tells people apart. Fit on faces of the training identities, it carries over to
    people the network never saw as far as their within-person variation looks alike (docs/open-set.md).

    Args:
        embeddings: float32 (N, D), unit rows. labels: int64 (N,), the identity of each row.
    Returns:
        ``{"mean": float32 (D,), "matrix": float32 (D, D), "images": N, "identities": number of labels with two
        or more rows (only they contribute), "ridge": ridge}``.
    Raises:
        ValueError: fewer than two identities with two or more rows, or non-finite embeddings.
    """
    x = embeddings.double()
    if not torch.isfinite(x).all():
        raise ValueError("whitening needs finite embeddings")
    counts = torch.bincount(labels)
    if int((counts >= 2).sum()) < 2:
        raise ValueError("whitening needs at least two identities with two or more images each")
    sums = torch.zeros(len(counts), x.shape[1], dtype=x.dtype).index_add_(0, labels, x)
    within = x - (sums / counts.clamp(min=1).unsqueeze(1))[labels]
    cov = within.T @ within / len(x)
    cov += ridge * cov.trace() / len(cov) * torch.eye(len(cov), dtype=x.dtype)
    values, vectors = torch.linalg.eigh(cov)
    matrix = vectors @ torch.diag(values.rsqrt()) @ vectors.T
    return {
        "mean": x.mean(0).float(),
        "matrix": matrix.float(),
        "images": len(x),
        "identities": int((counts >= 2).sum()),
        "ridge": ridge,
    }


def check_whitening(whitening, dim: int, where: str) -> dict:
    """A whitening record (:func:`fit_whitening`) read from a file, checked.

    Raises:
        BadInputError: not a dict of a finite float32 (dim,) mean and (dim, dim) matrix.
    """
    mean = whitening.get("mean") if isinstance(whitening, dict) else None
    matrix = whitening.get("matrix") if isinstance(whitening, dict) else None
    ok = (
        torch.is_tensor(mean)
        and torch.is_tensor(matrix)
        and mean.dtype == matrix.dtype == torch.float32
        and mean.shape == (dim,)
        and matrix.shape == (dim, dim)
        and bool(torch.isfinite(mean).all() and torch.isfinite(matrix).all())
    )
    if not ok:
        raise BadInputError(
            f"{where} holds a damaged whitening (a finite float32 ({dim},) mean and ({dim}, {dim}) matrix are "
            "needed): the file was altered; train again, or enrol with --representation encoder"
        )
    return whitening


class Embedder:
    """Face crops -> L2-normalised embeddings with a ResNet18 backbone (and optionally its projection head).

    Attributes:
        image_size: crop side in pixels the network takes. dim: embedding size (512 for the backbone's output).
        flip: average the embeddings of the crop and its mirror image before normalising (a cheap test-time
            augmentation: a face and its mirror image are the same person).
        whitening: None, or ``{"mean": float32 (D,), "matrix": float32 (D, D)}`` applied to the unit embedding
            (then normalised again): the ``whitened`` representation, see :func:`fit_whitening`.
        crop_margin: the margin the encoder's training crops were cut with, when its run records one
            (:func:`recorded_crop_margin`), else None.
        info: the gallery's ``encoder`` record: ``location``, ``sha256``, ``representation`` (and
            ``head_location``, ``head_sha256``), ``dim``.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        image_size: int,
        flip: bool,
        device: torch.device,
        info: dict,
        whitening: dict | None = None,
        crop_margin: float | None = None,
    ):
        self.net, self.image_size, self.flip, self.device, self.info = (
            net.to(device).eval(),
            image_size,
            flip,
            device,
            info,
        )
        self.dim = int(info["dim"])
        self.whitening = whitening
        self.crop_margin = crop_margin

    @torch.no_grad()
    def __call__(self, crops: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """uint8 (N, 3, S, S) crops at ``image_size`` -> float32 (N, dim) unit-length rows on the CPU.

        Raises:
            BadInputError: the network gives NaN or infinite values (weights no trained network holds).
        """
        from facessl.common.training import embed

        if not len(crops):
            return torch.zeros(0, self.dim)
        out = embed(self.net, crops, self.image_size, self.device, batch_size)
        if self.flip:
            out = out + embed(self.net, crops.flip(-1), self.image_size, self.device, batch_size)
        if not torch.isfinite(out).all():
            raise BadInputError(f"the encoder {self.info['location']} gives NaN or infinite embeddings")
        out = F.normalize(out, dim=1)
        if self.whitening is not None:
            out = F.normalize((out - self.whitening["mean"]) @ self.whitening["matrix"], dim=1)
        return out


def load_embedder(
    location: str,
    image_size: int | None = None,
    representation: str = "encoder",
    flip: bool = True,
    device_name: str = "auto",
) -> Embedder:
    """The embedding network of ``--encoder``: a pretrain-simclr run or ``encoder.pt``, or a train-classifier
    run or ``model.pt`` (its backbone), with the sha256 of each file it read.

    Args:
        image_size: the crop side; None takes the one the encoder records (:func:`recorded_image_size`).
        representation: ``encoder`` (the backbone's 512-d output), ``whitened`` (that output whitened with the
            within-class covariance a train-classifier run fitted on its val split, :func:`fit_whitening`),
            ``head`` (the SimCLR projection head's output, from the run's ``projection_head.pt``), or ``auto``
            (``whitened`` when the file holds a whitening, else ``encoder``); ``info`` records the one used.
    Raises:
        UsageError: ``image_size`` differs from the recorded one, or none is recorded and none given; ``head``
            for an encoder without a projection head, ``whitened`` for one without a whitening. BadInputError:
            not ResNet18 weights, or a damaged whitening.
    """
    from facessl.common.models import FEATURE_DIM, build_encoder, load_encoder_weights
    from facessl.common.training import pick_device

    if representation not in REPRESENTATION_CHOICES:
        raise UsageError(f"representation {representation!r}: choose {', '.join(REPRESENTATION_CHOICES)}")
    device = pick_device(device_name)
    file = resolve_encoder_file(location)
    state, sha = _read_weights(file)
    encoder = build_encoder()
    try:
        load_encoder_weights(encoder, state, file)
    except ValueError as exc:
        raise BadInputError(str(exc)) from None
    config = _run_config(file)
    recorded = recorded_image_size(file, state, config)
    if image_size is None and recorded is None:
        raise UsageError(
            f"{file} records no image size (a bare weights file): give --image-size, the crop side it was trained at"
        )
    if image_size is not None and recorded is not None and image_size != recorded:
        raise UsageError(
            f"{file} was trained at {recorded} px, not {image_size}: leave --image-size out or give {recorded}"
        )
    has_whitening = isinstance(state, dict) and "whitening" in state
    if representation == "auto":
        representation = "whitened" if has_whitening else "encoder"
    whitening = None
    if representation == "whitened":
        if not has_whitening:
            raise UsageError(
                f"--representation whitened needs a train-classifier model.pt holding a whitening; {file} has none"
            )
        whitening = check_whitening(state["whitening"], FEATURE_DIM, file)
    info = {"location": file, "sha256": sha, "representation": representation, "dim": FEATURE_DIM}
    net = encoder
    if representation == "head":
        storage, key = open_file_location(file)
        folder = key.rpartition("/")[0]
        head_key = f"{folder}/projection_head.pt" if folder else "projection_head.pt"
        if not storage.exists(head_key):
            raise UsageError(
                f"--representation head needs the projection_head.pt of a pretrain-simclr run beside {file}"
            )
        head_file = storage.url(head_key)
        head, head_sha = _projection_head(head_file)
        net = torch.nn.Sequential(encoder, head)
        info.update(head_location=head_file, head_sha256=head_sha, dim=int(head.net[3].out_features))
    return Embedder(net, image_size or recorded, flip, device, info, whitening, recorded_crop_margin(config))


# --- thresholds -----------------------------------------------------------------------------------------


def threshold_at_far(impostor: np.ndarray, far: float) -> float:
    """The lowest similarity threshold at which at most a fraction ``far`` of the ``impostor`` scores pass
    (``score >= threshold``): halfway between the last passing score and the first rejected one, or just above
    the highest score when not one may pass (``far`` below 1 / n).

    Args:
        impostor: float (n,) scores, n >= 1 (``-inf`` for a probe without a face: never accepted). far: in [0, 1].
    """
    s = np.sort(np.asarray(impostor, dtype=np.float64))[::-1]
    k = int(math.floor(far * len(s) + 1e-9))
    if k >= len(s):
        return float(s[-1])
    if k == 0:
        return float(s[0] + 1e-6)
    hi, lo = s[k - 1], s[k]
    if not np.isfinite(lo):
        return -math.inf
    return float((hi + lo) / 2) if hi > lo else float(lo + 1e-6)


def acceptance(scores: np.ndarray, threshold: float) -> float:
    """Fraction of ``scores`` at or above ``threshold`` (0.0 for no scores)."""
    scores = np.asarray(scores, dtype=np.float64)
    return float((scores >= threshold).mean()) if len(scores) else 0.0


def leave_one_out_scores(
    embeddings: torch.Tensor, labels: torch.Tensor, n_people: int, template: str
) -> tuple[np.ndarray, np.ndarray]:
    """Calibration scores of the enrolment photos themselves.

    Args:
        embeddings: float32 (N, D) unit rows. labels: int64 (N,) person index in [0, n_people). template:
            ``best`` or ``mean`` (module docstring).
    Returns:
        ``(impostor, genuine)``: float64 (N,) each photo's best person score over the *other* people (leave one
        person out), and float64 (G,) the score of each photo of a person with two or more photos against that
        person's *other* photos (leave one photo out).
    """
    n = len(labels)
    counts = torch.bincount(labels, minlength=n_people)
    if template == "best":
        sims = embeddings @ embeddings.T
        sims.fill_diagonal_(-math.inf)
        per_person = torch.full((n, n_people), -math.inf).scatter_reduce_(
            1, labels.expand(n, n), sims, "amax", include_self=True
        )
        own = per_person.gather(1, labels[:, None]).squeeze(1)
    else:
        sums = torch.zeros(n_people, embeddings.shape[1]).index_add_(0, labels, embeddings)
        per_person = embeddings @ F.normalize(sums, dim=1).T
        # the photo's own person without it: the mean of the others
        rest = F.normalize(sums[labels] - embeddings, dim=1)
        own = (embeddings * rest).sum(1)
    others = per_person.scatter(1, labels[:, None], -math.inf)
    impostor = others.max(1).values.double().numpy()
    genuine = own[counts[labels] >= 2].double().numpy()
    return impostor, genuine


def calibrate(embeddings: torch.Tensor, labels: torch.Tensor, n_people: int, template: str, far: float) -> dict:
    """The leave-one-person-out threshold at ``far`` (module docstring) with what it gives on the enrolment
    photos: ``value``, ``method``, ``far`` (the target), ``impostor_acceptance`` and ``genuine_acceptance``
    (the rates at the threshold), ``impostor_scores`` and ``genuine_scores`` (how many), and a ``note`` when
    there are too few impostor scores to resolve ``far``."""
    impostor, genuine = leave_one_out_scores(embeddings, labels, n_people, template)
    value = threshold_at_far(impostor, far)
    result = {
        "value": value,
        "method": "leave-one-person-out",
        "far": far,
        **calibration_rates(embeddings, labels, n_people, template, value),
    }
    if far * len(impostor) < 1:
        result["note"] = (
            f"{len(impostor)} impostor scores cannot resolve a FAR of {far:g}: the threshold lies above every "
            "impostor score (enrol more photos or people for a finer calibration)"
        )
    return result


def calibration_rates(embeddings, labels, n_people: int, template: str, threshold: float) -> dict:
    """What ``threshold`` gives on the enrolment photos (leave one out, :func:`leave_one_out_scores`)."""
    impostor, genuine = leave_one_out_scores(embeddings, labels, n_people, template)
    return {
        "impostor_acceptance": acceptance(impostor, threshold),
        "genuine_acceptance": acceptance(genuine, threshold) if len(genuine) else None,
        "impostor_scores": len(impostor),
        "genuine_scores": len(genuine),
    }


PAIR_FARS = (1e-2, 1e-3)


def pair_thresholds(scores: np.ndarray, same: np.ndarray) -> dict:
    """Verification thresholds of evaluate-pairs' pair scores (``threshold.json``): the accuracy-maximising
    one, and one per FAR of :data:`PAIR_FARS` (at most that fraction of the different-identity pairs pass),
    each with its TAR (the fraction of same-identity pairs that pass) and its FAR on these pairs.

    Args:
        scores: float (N,) cosine similarity per pair. same: int (N,) 1 for a same-identity pair.
    """
    from facessl.common.verify import best_threshold

    scores, same = np.asarray(scores, dtype=np.float64), np.asarray(same).astype(bool)

    def rates(t: float) -> dict:
        return {"threshold": t, "tar": acceptance(scores[same], t), "far": acceptance(scores[~same], t)}

    best = best_threshold(scores, same.astype(int))
    return {
        "accuracy_max": {**rates(best), "accuracy": float(((scores >= best) == same).mean())},
        "at_far": {f"{far:g}": rates(threshold_at_far(scores[~same], far)) for far in PAIR_FARS},
        "same_pairs": int(same.sum()),
        "different_pairs": int((~same).sum()),
        "note": "thresholds for single pairs (verification); a gallery's own calibration counts a stranger's "
        "best match over every person, which single-pair thresholds underestimate",
    }


def is_cosine_threshold(value) -> bool:
    """Whether ``value`` is a number a cosine similarity can be compared with: from -1 to 1, with a little room
    for a threshold set just above the highest score (:func:`threshold_at_far`)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and -1.01 <= value <= 1.01


def threshold_from_file(location: str, far: float, encoder: dict, image_size: int) -> dict:
    """The threshold at ``far`` in an evaluate-pairs ``threshold.json`` made with the same encoder file.

    Raises:
        BadInputError: not such a file, made with another encoder or image size, or no threshold at ``far``.
        UsageError: a representation other than the encoder's output (``whitened``, ``head``).
    """
    storage, key = open_file_location(location)
    try:
        data = json.loads(storage.read_text(key))
    except NotFoundError:
        raise BadInputError(f"--threshold-from {location} not found") from None
    except (ValueError, UnicodeDecodeError):
        raise BadInputError(f"--threshold-from {location} is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("at_far"), dict):
        raise BadInputError(f"--threshold-from {location} is not an evaluate-pairs threshold.json")
    # evaluate-pairs scores the backbone's own output
    if encoder["representation"] != "encoder":
        raise UsageError(
            f"--threshold-from holds for the encoder's own output; this gallery uses the {encoder['representation']}"
            " representation: add --representation encoder, or let enroll calibrate (leave --threshold-from out)"
        )
    if data.get("encoder_sha256") != encoder["sha256"] or data.get("image_size") != image_size:
        raise BadInputError(
            f"--threshold-from {location} was measured with {data.get('encoder')} at {data.get('image_size')} px, "
            f"not with this encoder ({encoder['location']}, sha256 {encoder['sha256'][:12]}) at {image_size} px: "
            "a threshold holds only for the embeddings it was measured on"
        )
    entry = data["at_far"].get(f"{far:g}")
    value = entry.get("threshold") if isinstance(entry, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadInputError(
            f"--threshold-from {location} has no threshold at FAR {far:g} (it has {sorted(data['at_far'])}): "
            "give --far one of those"
        )
    # refused here, not by identify after the whole enrolment
    if not is_cosine_threshold(value):
        raise BadInputError(
            f"--threshold-from {location}: threshold {value!r} at FAR {far:g} is not a cosine similarity"
        )
    return {
        "value": float(value),
        "method": "threshold-from",
        "source": location,
        "far": far,
        "pair_tar": entry.get("tar"),
    }


# --- the gallery ----------------------------------------------------------------------------------------


@dataclass
class Gallery:
    """An enrolled gallery (see :func:`save_gallery` for the file).

    Attributes:
        embeddings: float32 (N, D), unit rows. labels: int64 (N,), index into ``people``. people: P >= 2
            distinct names. photos: N source photo keys, relative to the enrolment's ``--people``.
        encoder: the Embedder's ``info``. image_size: crop side, pixels. flip: flip-averaged embeddings.
        template: ``best`` or ``mean``. detection: DetectConfig fields plus ``similar_face_ratio`` and ``align``.
        threshold: ``value`` (cosine similarity) and how it was set. skipped: ``{"photo", "reason"}`` of the
        reference photos left out. sha256: of the gallery file's bytes (set when read).
    """

    embeddings: torch.Tensor
    labels: torch.Tensor
    people: list[str]
    photos: list[str]
    encoder: dict
    image_size: int
    flip: bool
    template: str
    detection: dict
    threshold: dict
    skipped: list = field(default_factory=list)
    created: str = ""
    sha256: str = ""

    @property
    def align(self) -> str:
        """How the faces were aligned before cropping (common.photos.aligned_crop): ``none`` or ``eyes``."""
        return self.detection.get("align", "none")

    @property
    def detect_config(self) -> DetectConfig:
        """The detection settings the references were cropped with (identify detects the same way)."""
        known = {f.name for f in fields(DetectConfig)}
        return DetectConfig(**{k: v for k, v in self.detection.items() if k in known})

    def person_scores(self, queries: torch.Tensor) -> torch.Tensor:
        """Cosine person scores (module docstring) of float32 (M, D) unit queries: float32 (M, P)."""
        if self.template == "mean":
            sums = torch.zeros(len(self.people), self.embeddings.shape[1]).index_add_(0, self.labels, self.embeddings)
            return queries @ F.normalize(sums, dim=1).T
        sims = queries @ self.embeddings.T
        index = self.labels.expand(len(queries), -1)
        return torch.full((len(queries), len(self.people)), -math.inf).scatter_reduce_(1, index, sims, "amax")

    def match(self, queries: torch.Tensor, threshold: float | None = None) -> list[dict]:
        """Per query: ``identity`` (the best person, or None below the threshold), ``score`` (its person score)
        and ``top3`` ([name, score], best first), scores rounded to 4 decimals."""
        threshold = self.threshold["value"] if threshold is None else threshold
        scores = self.person_scores(queries)
        top = scores.topk(min(3, len(self.people)), dim=1)
        out = []
        for values, index in zip(top.values.tolist(), top.indices.tolist()):
            best = values[0]
            out.append(
                {
                    "identity": self.people[index[0]] if best >= threshold else None,
                    "score": round(best, 4),
                    "top3": [[self.people[i], round(v, 4)] for i, v in zip(index, values)],
                }
            )
        return out

    def summary(self) -> dict:
        """The gallery without its embeddings (``enrolment.json``, and what enroll prints)."""
        counts = torch.bincount(self.labels, minlength=len(self.people)).tolist()
        return {
            "people": len(self.people),
            "photos": len(self.photos),
            "photos_per_person": dict(zip(self.people, counts)),
            "encoder": self.encoder,
            "image_size": self.image_size,
            "flip": self.flip,
            "template": self.template,
            "detection": self.detection,
            "threshold": self.threshold,
            "skipped": self.skipped,
            "created": self.created,
        }


def save_gallery(storage: Storage, gallery: Gallery) -> None:
    """Write ``gallery.pt`` (every field of :class:`Gallery` but ``sha256``, plus ``format`` and ``version``;
    tensors, strings, numbers, booleans, lists and dicts only) and then ``enrolment.json`` (the summary)."""
    record = {"format": FORMAT, "version": VERSION, **{k: v for k, v in asdict(gallery).items() if k != "sha256"}}
    record["embeddings"], record["labels"] = gallery.embeddings.float().contiguous(), gallery.labels.long()
    save_torch(storage, GALLERY_FILE, record)
    storage.write_text(ENROLMENT_FILE, json.dumps(gallery.summary(), indent=1, ensure_ascii=False))


def _fail(where: str, what: str) -> BadInputError:
    return BadInputError(f"{where} is not a usable gallery: {what} (was it edited? enrol again)")


# The numeric detection settings a gallery may hold: prepare-data's and enroll's option bounds, and for those
# without an upper one a bound no real setting reaches (a tampered 10**12 would make identify hang or skip all)
_DETECTION_BOUNDS = {
    "scale_factor": (1.01, 2.0),
    "similar_face_ratio": (1e-6, 1.0),
    "min_neighbors": (0, 1000),
    "min_face": (8, 4096),
    "max_pixels": (1, 10**10),
    "upscale_below": (0, 10**6),
    "detect_max_pixels": (0, 10**10),
}


def _check_detection(detection, where: str, image_size: int) -> None:
    """Refuse detection settings that DetectConfig would take but that make no sense (wrong types, ranges, a crop
    size other than the gallery's ``image_size``)."""
    if not isinstance(detection, dict):
        raise _fail(where, "detection is not a dict")
    spec = {f.name: f.type for f in fields(DetectConfig)}
    for name, value in detection.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if name == "margin":
            ok = is_crop_margin(value)
        elif name == "image_size":
            ok = value == image_size and isinstance(value, int)
        elif name in _DETECTION_BOUNDS:
            low, high = _DETECTION_BOUNDS[name]
            ok = (
                number
                and low <= value <= high
                and (isinstance(value, int) or name in ("scale_factor", "similar_face_ratio"))
            )
        elif name == "fallback":
            ok = isinstance(value, bool)
        elif name == "on_no_face":
            ok = value in ("skip", "keep-full")
        elif name == "align":
            ok = value in ("none", "eyes")
        else:
            ok = False
        if not ok:
            raise _fail(where, f"detection setting {name}={value!r} is not one of {sorted(spec)} with a usable value")


def check_gallery(obj, where: str) -> Gallery:
    """A Gallery from a loaded ``gallery.pt`` dict, every field checked.

    Raises:
        BadInputError: naming the first field that is missing, of the wrong type or shape, or holds NaN,
        infinite or non-unit embeddings, out-of-range labels, or a person without embeddings.
    """
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise BadInputError(f"{where} is not a facessl gallery (no format {FORMAT!r}): give enroll's gallery.pt")
    if obj.get("version") != VERSION:
        raise _fail(where, f"version {obj.get('version')!r}; this facessl reads version {VERSION}")
    emb, labels, people, photos = (obj.get(k) for k in ("embeddings", "labels", "people", "photos"))
    if not torch.is_tensor(emb) or emb.dtype != torch.float32 or emb.dim() != 2 or min(emb.shape) < 1:
        raise _fail(where, "embeddings are not a float32 (N, D) tensor")
    if not torch.isfinite(emb).all():
        raise _fail(where, "embeddings hold NaN or infinite values")
    if ((emb.norm(dim=1) - 1).abs() > 1e-3).any():
        raise _fail(where, "embeddings are not of unit length")
    if (
        not isinstance(people, list)
        or not all(isinstance(p, str) and p for p in people)
        or len(set(people)) != len(people)
    ):
        raise _fail(where, "people are not distinct non-empty names")
    if len(people) < 2:
        raise _fail(where, "fewer than two people")
    if not torch.is_tensor(labels) or labels.dtype != torch.int64 or labels.shape != (len(emb),):
        raise _fail(where, f"labels are not an int64 ({len(emb)},) tensor, one per embedding")
    if labels.min() < 0 or labels.max() >= len(people):
        raise _fail(where, f"labels outside 0..{len(people) - 1}")
    if (torch.bincount(labels, minlength=len(people)) == 0).any():
        raise _fail(where, "a person without an embedding")
    if not isinstance(photos, list) or len(photos) != len(emb) or not all(isinstance(p, str) for p in photos):
        raise _fail(where, "photos are not one name per embedding")
    encoder = obj.get("encoder")
    if not (
        isinstance(encoder, dict)
        and isinstance(encoder.get("location"), str)
        and isinstance(encoder.get("sha256"), str)
        and re.fullmatch(r"[0-9a-f]{64}", encoder["sha256"])
        and encoder.get("representation") in REPRESENTATIONS
        and encoder.get("dim") == emb.shape[1]
    ):
        raise _fail(where, "the encoder record (location, sha256, representation, dim of the embeddings) is damaged")
    size = obj.get("image_size")
    if not is_crop_side(size):
        raise _fail(where, f"image_size {size!r}")
    if not isinstance(obj.get("flip"), bool) or obj.get("template") not in TEMPLATES:
        raise _fail(where, "flip is not a boolean or template not one of best, mean")
    _check_detection(obj.get("detection"), where, size)
    threshold = obj.get("threshold")
    value = threshold.get("value") if isinstance(threshold, dict) else None
    if not is_cosine_threshold(value):
        raise _fail(where, f"threshold {value!r} is not a cosine similarity")
    return Gallery(
        embeddings=emb,
        labels=labels,
        people=people,
        photos=photos,
        encoder=encoder,
        image_size=size,
        flip=obj["flip"],
        template=obj["template"],
        detection=obj["detection"],
        threshold=threshold,
        skipped=obj.get("skipped") if isinstance(obj.get("skipped"), list) else [],
        created=str(obj.get("created", "")),
    )


def load_gallery(location: str) -> Gallery:
    """The gallery at ``location``: enroll's output location or its ``gallery.pt`` (path or ``s3://``),
    loaded with weights_only=True and checked (:func:`check_gallery`).

    Raises:
        BadInputError: missing, pickled objects, or a damaged gallery. StorageError: S3 unreachable.
    """
    file = location if location.rstrip("/").endswith((".pt", ".pth")) else join_location(location, GALLERY_FILE)
    storage, key = open_file_location(file)
    try:
        data = storage.read_bytes(key)
    except NotFoundError:
        raise BadInputError(f"no gallery at {file}: give enroll's --output location or its gallery.pt") from None
    gallery = check_gallery(load_torch_bytes(data, file), file)
    gallery.sha256 = hashlib.sha256(data).hexdigest()
    return gallery


def embedder_for_gallery(gallery: Gallery, encoder_location: str | None = None, device_name: str = "auto") -> Embedder:
    """The encoder the gallery was enrolled with (its recorded location, or ``encoder_location`` when the file
    moved), checked against the gallery.

    Raises:
        UsageError: an unknown device or one this machine does not have.
        BadInputError: another file than the gallery's (sha256), an encoder trained at another image size, or
            embeddings of another size.
    """
    from facessl.common.training import pick_device

    location = encoder_location or gallery.encoder["location"]
    # a bad --device is the command's fault (exit 2), not the encoder's
    pick_device(device_name)
    try:
        embedder = load_embedder(location, None, gallery.encoder["representation"], gallery.flip, device_name)
    # a bare encoder.pt records no size: the gallery's is the one it was enrolled at
    except UsageError as exc:
        if "records no image size" not in str(exc):
            raise BadInputError(f"the encoder does not fit the gallery: {exc}") from None
        embedder = load_embedder(
            location, gallery.image_size, gallery.encoder["representation"], gallery.flip, device_name
        )
    if embedder.info["sha256"] != gallery.encoder["sha256"] or embedder.info.get("head_sha256") != gallery.encoder.get(
        "head_sha256"
    ):
        raise BadInputError(
            f"the encoder {embedder.info['location']} (sha256 {embedder.info['sha256'][:12]}) is not the one the "
            f"gallery was enrolled with ({gallery.encoder['location']}, sha256 {gallery.encoder['sha256'][:12]}): "
            "embeddings of two networks cannot be compared; enrol again with this encoder"
        )
    if embedder.image_size != gallery.image_size or embedder.dim != gallery.embeddings.shape[1]:
        raise BadInputError(
            f"the encoder {embedder.info['location']} gives {embedder.dim}-d embeddings of {embedder.image_size} px "
            f"crops; the gallery holds {gallery.embeddings.shape[1]}-d embeddings of {gallery.image_size} px crops"
        )
    return embedder


# --- enrolment ------------------------------------------------------------------------------------------


def list_people(storage: Storage) -> tuple[dict[str, list[str]], list[dict]]:
    """The reference photos of a people location (one folder per person, prepare-data's layout): person ->
    photo keys (sorted), and the files left out with their reasons (outside any person folder, links to
    folders, hidden and system files are ignored as prepare-data ignores them).

    Raises:
        BadInputError: fewer than two person folders, or an empty person folder (named).
    """
    from facessl.common.prepare import is_ignored, list_raw_files, shown_name

    try:
        files, skipped = list_raw_files(storage)
    except BadInputError:
        raise BadInputError(
            f"the people location {storage.uri} is empty or does not exist: give one folder per person"
        ) from None
    people: dict[str, list[str]] = {}
    for key, _ in files:
        people.setdefault(key.split("/", 1)[0], []).append(key)
    # an object store has no empty folders; a local one does, and that person would silently be missing
    if isinstance(storage, LocalStorage):
        # a folder whose files were all left out says why (a name that is not UTF-8 leaves out every file in it)
        why = {}
        for r in skipped:
            why.setdefault(r["source"].split("/", 1)[0], r["reason"])
        empty = sorted(
            shown_name(d.name)
            for d in storage.root.iterdir()
            if d.is_dir() and not d.is_symlink() and not is_ignored(d.name) and d.name not in people
        )
        if empty:
            named = ", ".join(f"{name} (every file left out: {why[name]})" if name in why else name for name in empty)
            raise BadInputError(f"person folder(s) with no photo: {named} (add photos or remove the folder)")
    if len(people) < 2:
        found = f"only {next(iter(people))!r}" if people else "none"
        raise BadInputError(
            f"{storage.uri} holds {found} of the person folders a gallery needs, at least two: the threshold is "
            "calibrated on how much each person's photos resemble the other people"
        )
    return {p: sorted(k) for p, k in sorted(people.items())}, [
        {"photo": r["source"], "reason": r["reason"]} for r in skipped
    ]


def _ambiguity(faces, ratio: float) -> str | None:
    """Why a reference photo is ambiguous (a second face at least ``ratio`` of the largest one's width), or None."""
    if len(faces) >= 2 and faces[1].box[2] >= ratio * faces[0].box[2]:
        return (
            f"{len(faces)} faces of similar size ({faces[0].box[2]} and {faces[1].box[2]} px wide): which one is the "
            "person is uncertain; crop the photo to the person"
        )
    return None


def progress(iterable, total: int, desc: str):
    """A tqdm bar on stderr: every 0.5 s on a terminal, every 30 s in a log file."""
    import sys

    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="photo", mininterval=0.5 if sys.stderr.isatty() else 30)


def _check_enroll_options(align: str, template: str, far: float, output_location: str, people_location: str) -> None:
    """Raise UsageError for an unknown alignment or template, a FAR outside (0, 1), or overlapping locations."""
    from facessl.common.photos import ALIGNMENTS

    if align not in ALIGNMENTS:
        raise UsageError(f"align {align!r}: choose {' or '.join(ALIGNMENTS)}")
    if template not in TEMPLATES:
        raise UsageError(f"template {template!r}: choose {' or '.join(TEMPLATES)}")
    if not 0 < far < 1:
        raise UsageError(f"--far {far} must lie between 0 and 1")
    if location_within(output_location, people_location) or location_within(people_location, output_location):
        raise UsageError(
            f"--output {output_location} and --people {people_location} overlap: give the gallery a folder of its own"
        )


def _reference_crops(
    people_location: str,
    people: dict[str, list[str]],
    cfg: DetectConfig,
    *,
    similar_face_ratio: float,
    align: str,
    workers: int,
    skipped: list[dict],
) -> tuple[list[torch.Tensor], list[str]]:
    """Detect and crop every reference photo; append a recorded skip to ``skipped`` for each unusable one.

    Returns:
        ``(crops, kept)``: one CHW float tensor per usable photo and its key (``person/file``).
    Raises:
        BadInputError: a person is left with no usable photo (each named, with the first reasons).
    """
    from facessl.common.data import image_to_chw
    from facessl.common.photos import detect_photos

    keys = [k for ks in people.values() for k in ks]
    crops, kept, seen = [], [], {}
    stream = detect_photos(people_location, keys, cfg, crops="largest", workers=workers, align=align)
    for photo in progress(stream, len(keys), "enrol"):
        reason = photo.error or ("no face detected" if not photo.faces else _ambiguity(photo.faces, similar_face_ratio))
        if reason is None and photo.sha256 in seen:
            reason = f"the same file as {seen[photo.sha256]}"
        if reason:
            skipped.append({"photo": photo.key, "reason": reason})
            continue
        seen[photo.sha256] = photo.key
        crops.append(image_to_chw(photo.faces[0].crop))
        kept.append(photo.key)
    enrolled = {k.split("/", 1)[0] for k in kept}
    if lost := [p for p in people if p not in enrolled]:
        why = {s["photo"]: s["reason"] for s in skipped}
        detail = "; ".join(
            f"{p}: " + ", ".join(f"{k.split('/', 1)[1]} ({why.get(k)})" for k in people[p][:3]) for p in lost[:5]
        )
        raise BadInputError(f"{len(lost)} person(s) left with no usable photo: {', '.join(lost)} ({detail})")
    return crops, kept


def _choose_threshold(
    embeddings: torch.Tensor, labels: torch.Tensor, n_people: int, template: str, far: float, given, from_file
) -> dict:
    """The gallery's threshold record: ``given`` (--threshold), else ``from_file`` (--threshold-from), else
    calibrated by leaving one person out; a threshold not calibrated here also gets its rates on these photos."""
    if given is not None:
        chosen = {"value": float(given), "method": "given (--threshold)"}
    elif from_file is not None:
        chosen = from_file
    else:
        chosen = calibrate(embeddings, labels, n_people, template, far)
    if chosen["method"] != "leave-one-person-out":
        # what the given threshold does on the enrolment photos, for comparison with a calibration
        chosen.update(calibration_rates(embeddings, labels, n_people, template, chosen["value"]))
    return chosen


def enroll(
    people_location: str,
    encoder_location: str,
    output_location: str,
    *,
    image_size: int | None = None,
    representation: str = "auto",
    flip: bool = True,
    template: str = "best",
    far: float = 0.01,
    threshold: float | None = None,
    threshold_from: str | None = None,
    detect: DetectConfig = DetectConfig(),
    margin: float | None = None,
    similar_face_ratio: float = SIMILAR_FACE_RATIO,
    align: str = "none",
    workers: int = 0,
    device_name: str = "auto",
    log=print,
) -> Gallery:
    """Enrol every person folder of ``people_location`` into a gallery written to ``output_location``.

    Each photo is detected and cropped as prepare-data does (``detect``, at the encoder's image size and at
    ``margin``, by default the margin the encoder's training data was cut with, :func:`recorded_crop_margin`,
    else ``detect.margin``) and embedded; a photo that cannot be read, has no face, has two faces of similar
    size (``similar_face_ratio``) or repeats another photo's bytes is a recorded skip. The threshold is
    ``threshold`` when given, else the ``far`` entry of ``threshold_from`` (an evaluate-pairs
    ``threshold.json``), else calibrated (:func:`calibrate`).

    Raises:
        UsageError: bad options, an output inside the people folder or holding another job's run.
        BadInputError: fewer than two people, an empty person folder, a person left with no usable photo (all
            named), an unusable encoder or threshold file. StorageError: S3 unreachable (exit 4).
    """
    started = time.time()
    _check_enroll_options(align, template, far, output_location, people_location)
    out = open_storage(output_location)
    if out.exists("identify.json"):
        raise UsageError(f"--output {output_location} holds identify results: give the gallery a folder of its own")
    claim_output(out, "enroll")
    embedder = load_embedder(encoder_location, image_size, representation, flip, device_name)
    size = embedder.image_size
    from_file = None
    if threshold is None and threshold_from:
        from_file = threshold_from_file(threshold_from, far, embedder.info, size)
    people, skipped = list_people(open_storage(people_location))
    recorded = embedder.crop_margin if margin is None else None
    margin = margin if margin is not None else recorded if recorded is not None else detect.margin
    cfg = DetectConfig(**{**asdict(detect), "image_size": size, "on_no_face": "skip", "margin": margin})
    log(
        f"enrolling {len(people)} people from {sum(map(len, people.values()))} photos at {size} px on {embedder.device}"
        f", representation {embedder.info['representation']}, crop margin {margin:g}"
        + (" (the encoder's training crops)" if recorded is not None else "")
    )
    crops, kept = _reference_crops(
        people_location,
        people,
        cfg,
        similar_face_ratio=similar_face_ratio,
        align=align,
        workers=workers,
        skipped=skipped,
    )
    names = [p for p in people if any(k.split("/", 1)[0] == p for k in kept)]
    index = {p: i for i, p in enumerate(names)}
    labels = torch.tensor([index[k.split("/", 1)[0]] for k in kept])
    embeddings = embedder(torch.stack(crops))
    gallery = Gallery(
        embeddings=embeddings,
        labels=labels,
        people=names,
        photos=kept,
        encoder=embedder.info,
        image_size=size,
        flip=flip,
        template=template,
        detection={**asdict(cfg), "similar_face_ratio": similar_face_ratio, "align": align},
        threshold=_choose_threshold(embeddings, labels, len(names), template, far, threshold, from_file),
        skipped=skipped,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    save_gallery(out, gallery)
    log(f"enrolled {len(kept)} photos of {len(names)} people in {time.time() - started:.0f} s; skipped {len(skipped)}")
    return gallery


# --- open-set metrics -----------------------------------------------------------------------------------


def open_set_metrics(
    known_correct: np.ndarray,
    known_scores: np.ndarray,
    unknown_scores: np.ndarray,
    threshold: float | None = None,
    fars: tuple[float, ...] = (0.01, 0.1),
) -> dict:
    """Open-set identification metrics (NIST IR 8271's terms) of a probe set.

    Args:
        known_correct: bool (K,) whether a known probe's best-matching person is its own (False when no face
            was found). known_scores: float (K,) that best person score (``-inf`` without a face).
        unknown_scores: float (U,) each unknown probe's best person score (``-inf`` without a face: a rejection).
        threshold: the gallery's threshold, for the rates at it.
    Returns:
        ``rank1``; ``dir_at_far`` {far: DIR} where DIR is the fraction of known probes that are correct *and*
        score at or above the threshold at which a fraction ``far`` of the unknown probes pass; with
        ``threshold``: ``known_named_correctly`` and ``unknown_accepted`` at it; ``curve``: FAR and DIR over every
        threshold between the unknown scores (for the DIR-vs-FAR figure).
    """
    correct = np.asarray(known_correct, dtype=bool)
    known = np.asarray(known_scores, dtype=np.float64)
    unknown = np.asarray(unknown_scores, dtype=np.float64)

    def dir_at(t: float) -> float:
        return float((correct & (known >= t) & np.isfinite(known)).mean())

    out = {
        "rank1": float(correct.mean()),
        "dir_at_far": {f"{far:g}": dir_at(threshold_at_far(unknown, far)) for far in fars},
        "known_probes": len(correct),
        "unknown_probes": len(unknown),
    }
    if threshold is not None:
        out["known_named_correctly"] = dir_at(threshold)
        out["unknown_accepted"] = float((np.isfinite(unknown) & (unknown >= threshold)).mean())
    finite = np.sort(unknown[np.isfinite(unknown)])[::-1]
    curve_far, curve_dir = [], []
    for k in range(len(finite) + 1):
        t = finite[0] + 1e-6 if k == 0 else finite[k - 1]
        curve_far.append(k / len(unknown))
        curve_dir.append(dir_at(t))
    out["curve"] = {"far": curve_far, "dir": curve_dir}
    return out
