"""prepare-data: raw photo folders -> face crops -> stratified train/val/test shards + manifest."""

from __future__ import annotations

import click

from facessl.common.cli import SEED, FiniteFloatRange, parse_list, report_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--input",
    "input_location",
    required=True,
    help="Raw photos: local folder or s3://bucket/prefix with one sub-folder per identity.",
)
@click.option(
    "--output",
    "output_location",
    required=True,
    help="Where the prepared dataset goes: local folder or s3://bucket/prefix.",
)
@click.option(
    "--classes",
    default=None,
    help="Comma-separated identity folder names to keep as classes (default: all passing --min-images).",
)
@click.option(
    "--min-images",
    type=click.IntRange(min=1),
    default=10,
    help="Keep identities with at least this many usable (cropped, de-duplicated) photos.",
)
@click.option("--split", "ratios", default="0.8,0.1,0.1", help="train,val,test fractions.")
@click.option("--seed", type=SEED, default=1337, help="Seed of the stratified split.")
@click.option(
    "--image-size", type=click.IntRange(min=16, max=1024), default=224, help="Side of the square crops, pixels."
)
@click.option(
    "--margin",
    type=FiniteFloatRange(min=0, max=2),
    default=0.2,
    help="Margin around the face box, as a fraction of the box side on each side.",
)
@click.option("--scale-factor", type=FiniteFloatRange(min=1.01, max=2), default=1.1, help="Haar cascade pyramid step.")
@click.option("--min-neighbors", type=click.IntRange(min=0), default=5, help="Haar cascade min neighbours.")
@click.option("--min-face", type=click.IntRange(min=8), default=30, help="Smallest face side, pixels.")
@click.option(
    "--on-no-face",
    type=click.Choice(["skip", "keep-full"]),
    default="skip",
    help="Photos without a detected face: skip them, or keep the whole photo (already-cropped collections).",
)
@click.option(
    "--detector-fallback/--no-detector-fallback",
    default=True,
    help="When the default frontal cascade finds nothing, try the alt2 frontal and profile cascades, the mirror "
    "image, and 2x upscaling.",
)
@click.option(
    "--upscale-below",
    type=click.IntRange(min=0),
    default=500,
    help="With the fallback, photos whose longest side is under this many pixels are also searched at 2x "
    "(unless 2x would exceed --max-pixels).",
)
@click.option(
    "--unlabeled-pool/--no-unlabeled-pool",
    default=False,
    help="Also write crops of the identities not selected as an 'unlabeled' split for pretraining.",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=50_000_000,
    help="Photos with more pixels are skipped before decoding (bounded memory).",
)
@click.option("--shard-size", type=click.IntRange(min=1), default=5000, help="Samples per tar shard.")
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=0,
    envvar="FACESSL_WORKERS",
    help="Detection processes (0: one per CPU core).",
)
@report_errors
def main(
    input_location,
    output_location,
    classes,
    min_images,
    ratios,
    seed,
    image_size,
    margin,
    scale_factor,
    min_neighbors,
    min_face,
    on_no_face,
    detector_fallback,
    upscale_below,
    unlabeled_pool,
    max_pixels,
    shard_size,
    workers,
):
    """Detect, crop and split raw face photos into a prepared dataset.

    Example: prepare-data --input ../shared/data/faces/glint24 --output runs/prepared --classes "Tom Hanks,Keanu Reeves"
    """
    from facessl.common.faces import DetectConfig
    from facessl.common.prepare import PrepareConfig, prepare_dataset

    try:
        fractions = tuple(float(v) for v in ratios.split(","))
    except ValueError:
        raise click.BadParameter("expected three comma-separated numbers, e.g. 0.8,0.1,0.1", param_hint="--split")
    if len(fractions) != 3:
        raise click.BadParameter("expected three comma-separated numbers, e.g. 0.8,0.1,0.1", param_hint="--split")
    detect = DetectConfig(
        scale_factor=scale_factor,
        min_neighbors=min_neighbors,
        min_face=min_face,
        margin=margin,
        image_size=image_size,
        on_no_face=on_no_face,
        max_pixels=max_pixels,
        fallback=detector_fallback,
        upscale_below=upscale_below,
    )
    cfg = PrepareConfig(
        detect=detect,
        classes=parse_list(classes),
        min_images=min_images,
        ratios=fractions,
        seed=seed,
        unlabeled_pool=unlabeled_pool,
        shard_size=shard_size,
        workers=workers,
    )
    manifest = prepare_dataset(input_location, output_location, cfg, log=click.echo)
    counts = manifest["counts"]
    click.echo(f"classes: {len(manifest['classes'])}; crops per split: {counts['splits']}")
    click.echo(f"skipped {counts['skipped']} of {counts['raw_files']} files: {counts['skip_reasons']}")
    kept = "kept whole as crops (--on-no-face keep-full)" if on_no_face == "keep-full" else "skipped"
    click.echo(
        f"face detection: no face in {counts['detection']['no_face']} of {counts['detection']['photos']} photos "
        f"({counts['detection']['miss_rate']:.1%}, {kept}); found by: {counts['detection']['by_detector']}"
    )
    click.echo(f"wrote {output_location.rstrip('/')}/manifest.json")
    if empty := [split for split in ("val", "test") if not counts["splits"].get(split)]:
        click.echo(
            f"warning: the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty: "
            "pretrain-simclr can use this dataset, train-classifier cannot (it selects on val and reports "
            "test); more photos per identity, or --split with larger val/test fractions, fill them",
            err=True,
        )


if __name__ == "__main__":
    main()
