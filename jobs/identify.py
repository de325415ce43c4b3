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
    required=True,
    help="train-classifier model.pt or its run location (path or s3:// URI).",
)
@click.option("--photo", "photo_location", required=True, help="Photo to read: path or s3:// URI.")
@click.option(
    "--threshold",
    type=FiniteFloatRange(min=0, max=1),
    default=0.5,
    help="Below this top probability a face is 'unknown'.",
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
@click.option("--device", default="auto", envvar="FACESSL_DEVICE", help="auto, cpu, cuda or cuda:N.")
@report_errors
def main(model_location, photo_location, threshold, annotate_location, detect, as_json, device):
    """Print each face's box with its top-3 identities and probabilities.

    Example: identify --model runs/glint6/classifier --photo group.jpg --annotate group-named.jpg
    """
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


if __name__ == "__main__":
    main()
