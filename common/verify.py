"""evaluate-pairs: face verification with a trained encoder, LFW-protocol style.

For every pair of photos (a CSV ``image_a,image_b,same_identity``, paths relative to an image root), each
photo goes through prepare-data's face detection and crop (common.faces), the encoder embeds the crop, and
the pair's score is the cosine similarity of the two embeddings. Accuracy follows the LFW protocol (Huang
et al., "Labeled Faces in the Wild", UMass TR 07-49, 2007): the pairs are split into 10 folds; for each fold
the threshold that maximises accuracy on the other nine is applied to it; the report gives the mean and
standard deviation over the folds. ROC AUC and the ROC curve come from scikit-learn over all pairs.

Outputs under the run's location: ``metrics.json``, ``scores.csv`` (one row per pair), ``roc.png``, and
``threshold.json`` (the accuracy-maximising threshold and those at FAR 1e-2 and 1e-3 with their TAR, for
``enroll --threshold-from``).
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import asdict, replace

import numpy as np
import torch

from facessl.common.data import image_to_chw
from facessl.common.errors import BadInputError, UsageError
from facessl.common.faces import DetectConfig, SkipImage, crop_face, decode_image, detect_face, encode_jpeg
from facessl.common.storage import (
    NotFoundError,
    UnsafeKeyError,
    claim_output,
    join_location,
    location_within,
    open_file_location,
    open_storage,
    safe_key,
)
from facessl.common.training import RunWriter, embed, pick_device, resolve_precision
from facessl.common.weights import load_encoder

# what evaluate_pairs writes under its output location
OUTPUTS = ("scores.csv", "roc.png", "threshold.json", "metrics.json")


def read_pairs(text: str, where: str, dropped: dict | None = None) -> list[tuple[str, str, int]]:
    """Rows ``(image_a, image_b, same)`` of a pairs CSV with header ``image_a,image_b,same_identity``; the
    paths normalised as storage keys (``./`` and doubled slashes dropped). A pair named again (in either
    order) and a photo paired with itself are left out, each recorded in ``dropped`` (``"line N"`` ->
    reason) when a dict is given: counted twice, a pair would weigh twice in the accuracy.

    Raises:
        BadInputError: missing columns, a label other than 0/1, a path leaving the image folder, a pair
        named again with the other label, or no rows.
    """
    reader = csv.DictReader(io.StringIO(text))

    # the csv module's own errors (a field over its size limit...) as a bad-input line
    def rows():
        try:
            if not {"image_a", "image_b", "same_identity"} <= set(reader.fieldnames or []):
                raise BadInputError(f"{where} must have the columns image_a,image_b,same_identity")
            yield from reader
        except csv.Error as exc:
            raise BadInputError(f"{where}: the row after line {reader.line_num} is not a CSV row ({exc})") from None

    pairs, seen, skipped = [], {}, {}
    for row in rows():
        a, b, same = ((row.get(k) or "").strip() for k in ("image_a", "image_b", "same_identity"))
        if same not in ("0", "1") or not a or not b:
            raise BadInputError(f"{where} line {reader.line_num}: expected two image paths and same_identity 0 or 1")
        # one spelling per photo ('./a/1.jpg' is 'a/1.jpg'), so a photo is recognised wherever it is named
        try:
            a, b = safe_key(a), safe_key(b)
        except UnsafeKeyError as exc:
            raise BadInputError(
                f"{where} line {reader.line_num}: {exc}: paths must stay inside the image folder"
            ) from None
        key = frozenset((a, b))
        if a == b:
            skipped[f"line {reader.line_num}"] = f"{a} paired with itself"
        elif key in seen:
            first, label = seen[key]
            if label != int(same):
                raise BadInputError(
                    f"{where} line {reader.line_num}: {a} and {b} are labelled same_identity "
                    f"{same} here and {label} on line {first}"
                )
            skipped[f"line {reader.line_num}"] = f"the pair of line {first} again"
        else:
            seen[key] = (reader.line_num, int(same))
            pairs.append((a, b, int(same)))
    if not pairs:
        left = f" ({len(skipped)} rows left out: repeated pairs or photos paired with themselves)" if skipped else ""
        raise BadInputError(f"{where} holds no pairs{left}")
    if dropped is not None:
        dropped.update(skipped)
    return pairs


def check_fold_counts(n_same: int, n_different: int, folds: int) -> None:
    """Raise BadInputError when stratified ``folds``-fold accuracy cannot run: fewer pairs of a kind than folds."""
    if min(n_same, n_different) < folds:
        raise BadInputError(
            f"{folds}-fold accuracy needs at least {folds} same and {folds} different pairs "
            f"({n_same} same, {n_different} different): give more pairs or a smaller --folds"
        )


def fold_accuracy(scores: np.ndarray, same: np.ndarray, folds: int = 10, seed: int = 0) -> dict:
    """LFW-style accuracy: threshold chosen on nine folds, applied to the tenth (stratified folds).

    Args:
        scores: float (N,) similarity per pair (higher: more alike). same: int (N,) 1 for same identity.
    Returns:
        ``accuracy`` (mean over folds), ``accuracy_std``, ``thresholds`` (one per fold), ``folds``.
    Raises:
        BadInputError: fewer pairs of either kind than folds.
    """
    from sklearn.model_selection import StratifiedKFold

    check_fold_counts(int(same.sum()), int((1 - same).sum()), folds)
    accs, thresholds = [], []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(scores, same):
        t = best_threshold(scores[train], same[train])
        thresholds.append(t)
        accs.append(float(((scores[test] >= t) == same[test]).mean()))
    return {
        "accuracy": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs)),
        "thresholds": thresholds,
        "folds": folds,
    }


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold t maximising the accuracy of ``score >= t`` (midpoints between sorted scores)."""
    order = np.argsort(scores)
    s, y = scores[order], same[order]
    # predicting "same" from position i on: correct = different pairs below i + same pairs from i on
    below_diff = np.concatenate([[0], np.cumsum(1 - y)])
    from_same = np.concatenate([np.cumsum(y[::-1])[::-1], [0]])
    i = int(np.argmax(below_diff + from_same))
    if i == 0:
        return float(s[0] - 1e-6)
    if i == len(s):
        return float(s[-1] + 1e-6)
    return float((s[i - 1] + s[i]) / 2)


def crop_photos(storage, names: list[str], cfg: DetectConfig | None, size: int):
    """Decode, detect and crop each photo as prepare-data does (``cfg`` None: the photos are face crops
    already and are only centre-squared and resized). Yields ``(name, crop, detected, reason)``: an RGB
    ``size`` x ``size`` PIL image, whether a face was detected (always True without detection), or
    ``(name, None, False, why it is unreadable)``."""
    for name in names:
        try:
            img = decode_image(storage.read_bytes(name))
        # corrupt, missing, or a path leaving the image root
        except (SkipImage, BadInputError) as exc:
            yield name, None, False, str(exc)
            continue
        found = detect_face(img, cfg) if cfg is not None else None
        box = found[0] if found else None
        yield name, crop_face(img, box, cfg.margin if cfg else 0.0, size), cfg is None or found is not None, ""


def load_crops(storage, names: list[str], cfg: DetectConfig | None, size: int):
    """uint8 (M, 3, size, size) crops of the photos that decode (see :func:`crop_photos`), the names they
    belong to, how many had no detected face (centre-cropped instead), and the unreadable ones with their
    reasons.

    Raises:
        BadInputError: not one photo could be read (the message gives one photo's reason).
    """
    crops, kept, no_face, unreadable = [], [], 0, {}
    for name, crop, detected, reason in crop_photos(storage, names, cfg, size):
        if crop is None:
            unreadable[name] = reason
            continue
        no_face += not detected
        crops.append(image_to_chw(crop))
        kept.append(name)
    if not crops:
        example = next(iter(unreadable.items()), ("-", "no photos"))
        raise BadInputError(
            f"none of the {len(names)} pair images could be read (for example {example[0]}: "
            f"{example[1]}); is --images the folder the CSV's paths are relative to?"
        )
    return torch.stack(crops), kept, no_face, unreadable


def read_pairs_file(pairs_location: str, dropped: dict | None = None) -> list[tuple[str, str, int]]:
    """The rows of the pairs CSV at a path or ``s3://`` URI (see :func:`read_pairs`, also for ``dropped``).

    Raises:
        BadInputError: missing, not UTF-8 text, or not a pairs CSV.
    """
    pairs_store, pairs_key = open_file_location(pairs_location)
    try:
        text = pairs_store.read_text(pairs_key)
    # (missing, or a folder)
    except NotFoundError as exc:
        raise BadInputError(f"pairs file {pairs_location}: {exc}") from None
    except UnicodeDecodeError:
        raise BadInputError(f"pairs file {pairs_location} is not UTF-8 text") from None
    return read_pairs(
        text.removeprefix("\ufeff"),
        pairs_location,
        dropped,
        # a byte-order mark (Excel's CSV) is not a column
    )


def write_pair_crops(
    pairs_location: str,
    images_location: str,
    output_location: str,
    image_size: int = 112,
    detect: DetectConfig = DetectConfig(),
    log=print,
) -> dict:
    """The face crop of every photo of a pairs CSV, made once, as JPEG files under ``output_location`` at
    the photos' relative paths, plus ``crops.json`` (photos, those without a detected face, unreadable
    ones with reasons). ``evaluate_pairs(..., detect=None)`` on that folder then embeds exactly these crops:
    the CPU-bound detection runs where the data is, the embedding where the GPU is.

    Raises:
        BadInputError: unusable pairs file, output location, or not one readable photo.
    """
    if image_size < 16:
        raise UsageError(f"image_size must be at least 16 pixels, got {image_size}")
    names = sorted({n for a, b, _ in read_pairs_file(pairs_location) for n in (a, b)})
    src, out = open_storage(images_location), open_storage(output_location)
    if location_within(output_location, images_location):
        raise UsageError(f"the crops would overwrite or join the photos: give an output outside {images_location}")
    # written last, crops.json marks completion
    out.check_writable()
    log(f"cropping the faces of {len(names)} pair photos at {image_size} px")
    no_face, unreadable = [], {}
    for name, crop, detected, reason in crop_photos(src, names, detect, image_size):
        if crop is None:
            unreadable[name] = reason
            continue
        if not detected:
            no_face.append(name)
        out.write_bytes(name, encode_jpeg(crop))
    if len(unreadable) == len(names):
        raise BadInputError(
            f"none of the {len(names)} pair photos could be read, for example {names[0]}: {unreadable[names[0]]}"
        )
    summary = {
        "photos": len(names),
        "image_size": image_size,
        "without_detected_face": no_face,
        "unreadable_photos": unreadable,
        "detect": asdict(replace(detect, image_size=image_size)) if detect is not None else None,
    }
    RunWriter(out).write_json("crops.json", summary)
    return summary


def evaluate_pairs(
    pairs_location: str,
    images_location: str,
    encoder_location: str,
    output_location: str,
    image_size: int = 112,
    folds: int = 10,
    device_name: str = "auto",
    detect: DetectConfig | None = DetectConfig(),
    log=print,
    precision: str = "auto",
) -> dict:
    """Run the verification protocol; returns the metrics written to ``metrics.json`` (last, after
    ``scores.csv`` and ``roc.png``). ``detect=None``: the photos are face crops already (for example
    made by :func:`write_pair_crops`) and are embedded whole. ``precision`` (``auto``, ``fp32``, ``bf16``) is
    the encoder's arithmetic, resolved for the device as the training jobs do; similarities are float32.

    Raises:
        BadInputError: unreadable pairs file, images or encoder, or an unusable output location.
        UsageError: fewer than 2 folds.
    """
    if folds < 2:
        raise UsageError("--folds must be at least 2")
    started = time.time()
    device = pick_device(device_name)
    arithmetic = resolve_precision(precision, device)
    if any(location_within(pairs_location, join_location(output_location, name)) for name in OUTPUTS):
        raise UsageError(f"the output {output_location} would overwrite the pairs file {pairs_location}")
    # roc.png would later be listed as a photo
    if location_within(output_location, images_location):
        raise UsageError(f"the outputs would join the photos: give an --output outside {images_location}")
    dropped = {}
    pairs = read_pairs_file(pairs_location, dropped)
    n_same = sum(s for _, _, s in pairs)
    check_fold_counts(
        n_same,
        len(pairs) - n_same,
        folds,
        # now, not after the embedding (checked again on the pairs kept)
    )
    out = open_storage(output_location)
    # now, not after the embedding
    claim_output(out, "evaluate-pairs")
    encoder, encoder_file = load_encoder(encoder_location)
    names = sorted({n for a, b, _ in pairs for n in (a, b)})
    if dropped:
        log(
            f"left out {len(dropped)} rows of {pairs_location} (repeated pairs, photos paired with themselves), "
            f"listed in metrics.json"
        )
    log(
        f"{len(pairs)} pairs over {len(names)} photos; {'detecting and ' if detect else ''}embedding at "
        f"{image_size} px on {device}, {arithmetic.describe()}"
    )
    crops, kept, no_face, unreadable = load_crops(open_storage(images_location), names, detect, image_size)
    feats = embed(arithmetic.layout(encoder.to(device)), crops, image_size, device, precision=arithmetic)
    if not torch.isfinite(feats).all():
        raise BadInputError(f"the encoder {encoder_location} gives NaN or infinite embeddings: not a usable network")
    feats = torch.nn.functional.normalize(feats, dim=1)
    index = {n: i for i, n in enumerate(kept)}
    usable = [(a, b, s) for a, b, s in pairs if a in index and b in index]
    if not usable:
        raise BadInputError("no pair has two readable images")
    a_idx = torch.tensor([index[a] for a, _, _ in usable])
    b_idx = torch.tensor([index[b] for _, b, _ in usable])
    scores = (feats[a_idx] * feats[b_idx]).sum(1).numpy().astype(np.float64)
    same = np.array([s for _, _, s in usable])

    from sklearn.metrics import roc_auc_score, roc_curve

    result = fold_accuracy(scores, same, folds)
    fpr, tpr, _ = roc_curve(same, scores)
    metrics = {
        "pairs": len(pairs),
        "rows_left_out": dropped,
        "pairs_evaluated": len(usable),
        "photos": len(names),
        "photos_without_detected_face": no_face,
        "unreadable_photos": unreadable,
        **result,
        "roc_auc": float(roc_auc_score(same, scores)),
        "threshold_all_pairs": best_threshold(scores, same),
        "encoder": encoder_file,
        "image_size": image_size,
        "detection": detect is not None,
        "precision": arithmetic.name,
        "seconds": round(time.time() - started, 1),
    }
    writer = RunWriter(out)
    table = io.StringIO()
    # quoted where a path holds a comma or a quote
    rows = csv.writer(table, lineterminator="\n")
    rows.writerow(["image_a", "image_b", "same_identity", "cosine_similarity"])
    rows.writerows([a, b, s, f"{score:.6f}"] for (a, b, s), score in zip(usable, scores))
    out.write_text("scores.csv", table.getvalue())
    writer.write_plot("roc.png", lambda p: plot_roc(fpr, tpr, metrics["roc_auc"], metrics["accuracy"], folds, p))
    writer.write_json("threshold.json", threshold_record(scores, same, encoder_file, image_size))
    writer.write_json("metrics.json", metrics)
    return metrics


def threshold_record(scores: np.ndarray, same: np.ndarray, encoder_file: str, image_size: int) -> dict:
    """``threshold.json``: the accuracy-maximising threshold and those at FAR 1e-2 and 1e-3 with their TAR
    (common.gallery.pair_thresholds), with the encoder file, its sha256 and the image size they hold for
    (``enroll --threshold-from`` checks them)."""
    from facessl.common.gallery import file_sha256, pair_thresholds

    return {
        **pair_thresholds(scores, same),
        "encoder": encoder_file,
        "encoder_sha256": file_sha256(encoder_file),
        "image_size": image_size,
    }


def plot_roc(fpr, tpr, auc: float, accuracy: float, folds: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"ROC (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"face verification: {folds}-fold accuracy {accuracy:.3f}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
