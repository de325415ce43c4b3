"""identify: detect the faces in a photo and name them with a trained classifier."""

from __future__ import annotations

import json
import os

import click

from facessl.common.cli import FiniteFloatRange, report_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--model",
    "model_location",
    default=None,
    help="One-photo mode: train-classifier model.pt or its run location (path or s3:// URI).",
)
@click.option("--photo", "photo_location", default=None, help="One-photo mode: the photo to read (path or s3:// URI).")
@click.option(
    "--gallery",
    "gallery_location",
    default=None,
    help="Collection mode: enroll's gallery (its output location or gallery.pt; path or s3:// URI).",
)
@click.option(
    "--photos",
    "photos_location",
    default=None,
    help="Collection mode: every photo under this folder or s3:// prefix, recursively.",
)
@click.option(
    "--output",
    "output_location",
    default=None,
    help="Collection mode: where results.jsonl and summary.json go (a rerun resumes there).",
)
@click.option(
    "--threshold",
    type=FiniteFloatRange(min=-1, max=1),
    default=None,
    help="One-photo mode: below this top probability a face is 'unknown' (default 0.5). Collection mode: "
    "cosine similarity below which a face is unknown (default: the gallery's calibrated threshold).",
)
@click.option(
    "--annotate",
    "annotate_location",
    default=None,
    help="Also write the photo with boxes and names drawn on it (path or s3:// URI, JPEG).",
)
@click.option(
    "--detect/--no-detect", default=True, help="--no-detect: the photo is already a face crop (classify it whole)."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option(
    "--encoder",
    "encoder_location",
    default=None,
    help="Collection mode: where the gallery's encoder file is now, when it moved (checked by its sha256).",
)
@click.option("--num-shards", type=click.IntRange(min=1), default=1, help="Collection mode: split it into N shards.")
@click.option(
    "--shard-index",
    type=click.IntRange(min=0),
    default=0,
    envvar="JOB_COMPLETION_INDEX",
    help="Collection mode: the shard this run does (an Indexed Job sets JOB_COMPLETION_INDEX).",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=64, help="Collection mode: face crops per embedding batch."
)
@click.option(
    "--chunk", type=click.IntRange(min=1), default=500, help="Collection mode: photos per results part written."
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=0,
    envvar="FACESSL_WORKERS",
    help="Collection mode: detection processes (0: one per CPU core).",
)
@click.option("--device", default="auto", envvar="FACESSL_DEVICE", help="auto, cpu, cuda or cuda:N.")
@report_errors
def main(
    model_location,
    photo_location,
    gallery_location,
    photos_location,
    output_location,
    threshold,
    annotate_location,
    detect,
    as_json,
    encoder_location,
    num_shards,
    shard_index,
    batch_size,
    chunk,
    workers,
    device,
):
    """Print each face's box with its top-3 identities and probabilities.

    One photo: identify --model runs/glint6/classifier --photo group.jpg --annotate group-named.jpg

    A collection, open-set: identify --gallery runs/gallery --photos holiday/ --output runs/holiday-named
    """
    if gallery_location or photos_location or output_location:
        return identify_collection_mode(locals())
    if not model_location or not photo_location:
        raise click.UsageError(
            "give --model and --photo (one photo), or --gallery, --photos and --output (a collection)"
        )
    if threshold is None:
        threshold = 0.5
    elif threshold < 0:
        raise click.BadParameter(f"{threshold} is a probability threshold here: 0 to 1", param_hint="--threshold")
    from facessl.common.errors import UsageError
    from facessl.common.identify import annotate, identify, load_classifier, read_photo
    from facessl.common.storage import location_within, open_file_location

    # checked before any work; a JPEG name, so it cannot replace a manifest or model
    if annotate_location is not None:
        if not annotate_location.lower().endswith((".jpg", ".jpeg")):
            raise UsageError(f"--annotate {annotate_location!r} must name a .jpg or .jpeg file (it is written as JPEG)")
        if location_within(annotate_location, photo_location):
            raise UsageError(f"--annotate {annotate_location} would overwrite the photo: give another file name")
        if os.path.isdir(annotate_location):
            raise UsageError(f"--annotate {annotate_location} is a folder: give a file name in it")
        # a bad location fails now, not after the faces
        annotate_to = open_file_location(annotate_location)
        annotate_to[0].check_writable()
    model, classes, size = load_classifier(model_location)
    img, faces = identify(read_photo(photo_location), model, classes, size, threshold, detect, device_name=device)
    if as_json:
        click.echo(json.dumps({"photo": photo_location, "faces": faces}, ensure_ascii=False))
    elif not faces:
        click.echo("no face found")
    for n, face in enumerate([] if as_json else faces, start=1):
        x, y, w, h = face["box"]
        top3 = ", ".join(f"{name} {p:.2f}" for name, p in face["top3"])
        click.echo(f"face {n} at x={x} y={y} w={w} h={h}: {face['identity']}  (top-3: {top3})")
    if annotate_location:
        storage, key = annotate_to
        storage.write_bytes(key, annotate(img, faces))
        if not as_json:
            click.echo(f"wrote {annotate_location}")


def identify_collection_mode(options: dict) -> None:
    """``--gallery --photos --output``: identify a whole collection (common.collection)."""
    from facessl.common.collection import identify_collection

    missing = [f"--{name}" for name in ("gallery", "photos", "output") if not options[f"{name}_location"]]
    if missing:
        raise click.UsageError(f"collection mode needs --gallery, --photos and --output: {', '.join(missing)} missing")
    if extra := [f"--{name}" for name in ("model", "photo", "annotate") if options[f"{name}_location"]]:
        raise click.UsageError(f"{', '.join(extra)} belong to the one-photo mode, not to --gallery")
    if options["as_json"] or not options["detect"]:
        raise click.UsageError("--json and --no-detect belong to the one-photo mode, not to --gallery")
    status = identify_collection(
        options["gallery_location"],
        options["photos_location"],
        options["output_location"],
        encoder_location=options["encoder_location"],
        threshold=options["threshold"],
        num_shards=options["num_shards"],
        shard_index=options["shard_index"],
        chunk=options["chunk"],
        batch_size=options["batch_size"],
        workers=options["workers"],
        device_name=options["device"],
        log=click.echo,
    )
    click.echo(
        f"shard {status['shard']} of {status['num_shards']}: {status['photos']} photos, {status['faces']} faces "
        f"({status['named']} named, {status['unknown']} unknown), {status['errors']} unreadable, "
        f"{status['photos_per_second']} photos/s"
    )
    where = options["output_location"].rstrip("/")
    if status["merged"]:
        click.echo(f"wrote {where}/results.jsonl and summary.json")
    else:
        click.echo(f"wrote this shard's results under {where}/parts/ (results.jsonl comes with the last shard)")


if __name__ == "__main__":
    main()
