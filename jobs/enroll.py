"""enroll: build a gallery of known people (one folder of reference photos each) with a calibrated threshold."""

from __future__ import annotations

import click

from facessl.common.cli import FiniteFloatRange, report_errors
from facessl.common.config import MAX_CROP_MARGIN, MIN_CROP_MARGIN


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--people",
    "people_location",
    required=True,
    help="Reference photos: local folder or s3://bucket/prefix with one sub-folder per person (prepare-data's layout).",
)
@click.option(
    "--encoder",
    "encoder_location",
    required=True,
    help="pretrain-simclr run or encoder.pt, or train-classifier run or model.pt (its backbone): path or s3:// URI.",
)
@click.option(
    "--output",
    "output_location",
    required=True,
    help="Where gallery.pt and enrolment.json go: local folder or s3://bucket/prefix.",
)
@click.option(
    "--far",
    type=FiniteFloatRange(min=0, max=1, min_open=True, max_open=True),
    default=0.01,
    help="Calibrate the threshold so that this fraction of strangers would be accepted (leave one person out).",
)
@click.option(
    "--threshold",
    type=FiniteFloatRange(min=-1, max=1),
    default=None,
    help="Use this cosine-similarity threshold instead of calibrating (overrides --threshold-from).",
)
@click.option(
    "--threshold-from",
    default=None,
    help="Take the threshold at --far (0.01 or 0.001) from an evaluate-pairs threshold.json of the same encoder.",
)
@click.option(
    "--template",
    type=click.Choice(["best", "mean"]),
    default="best",
    help="A person's score: best match over their photos, or similarity to their mean embedding.",
)
@click.option(
    "--representation",
    type=click.Choice(["auto", "encoder", "whitened", "head"]),
    default="auto",
    help="Embed with the backbone's 512-d output; that output whitened by the within-class covariance a "
    "train-classifier run fitted on its val split (WCCN); or a pretrain-simclr run's projection head. auto: "
    "whitened when the encoder holds a whitening, else encoder.",
)
@click.option("--flip/--no-flip", default=True, help="Average each crop's embedding with its mirror image's.")
@click.option(
    "--image-size",
    type=click.IntRange(min=16, max=1024),
    default=None,
    help="Crop side in pixels (default: the size the encoder records; needed for a bare encoder.pt).",
)
@click.option(
    "--margin",
    type=FiniteFloatRange(min=MIN_CROP_MARGIN, max=MAX_CROP_MARGIN),
    default=None,
    help="Margin around the face box, as a fraction of the box side on each side (as prepare-data; below 0 cuts "
    "inside the box). Default: the margin the encoder's training data was prepared with (its run's "
    "config.json), else 0.2.",
)
@click.option("--min-face", type=click.IntRange(min=8, max=4096), default=30, help="Smallest face side, pixels.")
@click.option(
    "--detect-max-pixels",
    type=click.IntRange(min=0),
    default=2_000_000,
    help="Photos with more pixels are searched for faces on a copy scaled down to this many, as in prepare-data; "
    "0 searches at full size (group photos with small faces). identify detects as the gallery records.",
)
@click.option(
    "--similar-face-ratio",
    type=FiniteFloatRange(min=0, max=1, min_open=True),
    default=0.8,
    help="A reference photo whose second face is at least this fraction of the largest face's width is skipped.",
)
@click.option(
    "--align",
    type=click.Choice(["none", "eyes"]),
    default="none",
    help="eyes: rotate each face so that the eyes found by OpenCV's eye cascade lie level before cropping "
    "(identify aligns the same way).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=0,
    envvar="FACESSL_WORKERS",
    help="Detection processes (0: one per CPU core).",
)
@click.option("--device", default="auto", envvar="FACESSL_DEVICE", help="auto, cpu, cuda or cuda:N.")
@report_errors
def main(
    people_location,
    encoder_location,
    output_location,
    far,
    threshold,
    threshold_from,
    template,
    representation,
    flip,
    image_size,
    margin,
    min_face,
    detect_max_pixels,
    similar_face_ratio,
    align,
    workers,
    device,
):
    """Detect, crop and embed every person's reference photos, calibrate the threshold, write the gallery.

    Example: enroll --people known_people/ --encoder runs/glint24/classifier --output runs/gallery
    """
    from facessl.common.faces import DetectConfig, check_detect_max_pixels
    from facessl.common.gallery import enroll

    try:
        check_detect_max_pixels(detect_max_pixels)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--detect-max-pixels") from None
    from facessl.common.photos import sigterm_stops

    with sigterm_stops("stopped by SIGTERM before the gallery was written: run again to enrol"):
        gallery = enroll(
            people_location,
            encoder_location,
            output_location,
            image_size=image_size,
            representation=representation,
            flip=flip,
            template=template,
            far=far,
            threshold=threshold,
            threshold_from=threshold_from,
            detect=DetectConfig(min_face=min_face, detect_max_pixels=detect_max_pixels),
            margin=margin,
            similar_face_ratio=similar_face_ratio,
            align=align,
            workers=workers,
            device_name=device,
            log=click.echo,
        )
    t = gallery.threshold
    rates = ""
    if t.get("genuine_acceptance") is not None:
        rates = (
            f": on the enrolment photos (leave one out) it accepts {t['genuine_acceptance']:.1%} of genuine "
            f"and {t['impostor_acceptance']:.1%} of impostor scores"
        )
    click.echo(f"threshold {t['value']:.4f} ({t['method']}){rates}")
    if note := t.get("note"):
        click.echo(f"note: {note}", err=True)
    for skip in gallery.skipped:
        click.echo(f"skipped {skip['photo']}: {skip['reason']}", err=True)
    click.echo(f"wrote {output_location.rstrip('/')}/gallery.pt and enrolment.json")


if __name__ == "__main__":
    main()
