"""prepare-data: raw photo folders -> face crops -> stratified train/val/test shards + manifest."""

from __future__ import annotations

import click

from facessl.common.cli import (
    COMMAND_SETTINGS,
    config_options,
    image_size_option,
    output_option,
    parse_list,
    report_errors,
    seed_option,
)
from facessl.common.config import PrepareOptions


@click.command(context_settings=COMMAND_SETTINGS)
@click.option(
    "--input",
    "input_location",
    required=True,
    help="Raw photos: local folder or s3://bucket/prefix with one sub-folder per identity.",
)
@output_option("Where the prepared dataset goes: local folder or s3://bucket/prefix.")
@config_options(PrepareOptions, "classes", "min_images", "ratios")
@seed_option(PrepareOptions)
@image_size_option(PrepareOptions)
@config_options(
    PrepareOptions,
    "margin",
    "scale_factor",
    "min_neighbors",
    "min_face",
    "on_no_face",
    "detector_fallback",
    "upscale_below",
    "detect_max_pixels",
    "unlabeled_pool",
    "max_pixels",
    "shard_size",
    "workers",
)
@report_errors
def main(input_location, output_location, **options):
    """Detect, crop and split raw face photos into a prepared dataset.

    Example: prepare-data --input ../shared/data/faces/glint24 --output runs/prepared --classes "Tom Hanks,Keanu Reeves"
    """
    from facessl.common.faces import DetectConfig, check_detect_max_pixels
    from facessl.common.prepare import PrepareConfig, prepare_dataset

    opts = PrepareOptions(**options)
    ratios, on_no_face = opts.ratios, opts.on_no_face
    try:
        fractions = tuple(float(v) for v in ratios.split(","))
    except ValueError:
        raise click.BadParameter("expected three comma-separated numbers, e.g. 0.8,0.1,0.1", param_hint="--split")
    if len(fractions) != 3:
        raise click.BadParameter("expected three comma-separated numbers, e.g. 0.8,0.1,0.1", param_hint="--split")
    try:
        check_detect_max_pixels(opts.detect_max_pixels)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--detect-max-pixels") from None
    detect = DetectConfig(
        scale_factor=opts.scale_factor,
        min_neighbors=opts.min_neighbors,
        min_face=opts.min_face,
        margin=opts.margin,
        image_size=opts.image_size,
        on_no_face=on_no_face,
        max_pixels=opts.max_pixels,
        fallback=opts.detector_fallback,
        upscale_below=opts.upscale_below,
        detect_max_pixels=opts.detect_max_pixels,
    )
    cfg = PrepareConfig(
        detect=detect,
        classes=parse_list(opts.classes),
        min_images=opts.min_images,
        ratios=fractions,
        seed=opts.seed,
        unlabeled_pool=opts.unlabeled_pool,
        shard_size=opts.shard_size,
        workers=opts.workers,
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
