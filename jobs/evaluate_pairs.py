"""evaluate-pairs: face verification accuracy (10-fold, LFW style) and ROC AUC of a trained encoder."""

from __future__ import annotations

import click

from facessl.common.cli import (
    COMMAND_SETTINGS,
    config_options,
    device_option,
    image_size_option,
    output_option,
    precision_option,
    report_errors,
)
from facessl.common.config import PairsConfig


@click.command(context_settings=COMMAND_SETTINGS)
@click.option(
    "--pairs",
    "pairs_location",
    required=True,
    help="CSV with columns image_a,image_b,same_identity: path or s3:// URI.",
)
@click.option(
    "--images", "images_location", required=True, help="Folder (or s3:// prefix) the CSV's image paths are relative to."
)
@click.option(
    "--encoder",
    "encoder_location",
    required=True,
    help="encoder.pt or a pretrain-simclr run location, or a train-classifier model.pt or run location "
    "(path or s3:// URI).",
)
@output_option("Where metrics.json, scores.csv and roc.png go.")
@image_size_option(PairsConfig)
@config_options(PairsConfig, "folds", "detect")
@device_option(PairsConfig)
@precision_option(PairsConfig)
@report_errors
def main(
    pairs_location, images_location, encoder_location, output_location, image_size, folds, detect, device, precision
):
    """Embed both photos of every pair (Haar detection and crop as in prepare-data) and report verification
    accuracy at a cross-validated threshold, ROC AUC and a ROC plot.

    Example: evaluate-pairs --pairs ../shared/data/faces/celeba-wild/pairs.csv --images ../shared/data/faces/celeba-wild
    --encoder runs/celeba/simclr --output runs/celeba/pairs
    """
    from facessl.common.faces import DetectConfig
    from facessl.common.verify import evaluate_pairs

    m = evaluate_pairs(
        pairs_location,
        images_location,
        encoder_location,
        output_location,
        image_size,
        folds,
        device,
        DetectConfig() if detect else None,
        log=click.echo,
        precision=precision,
    )
    click.echo(
        f"verification accuracy {m['accuracy']:.3f} +- {m['accuracy_std']:.3f} ({m['folds']}-fold), "
        f"ROC AUC {m['roc_auc']:.3f}, {m['pairs_evaluated']} of {m['pairs']} pairs"
    )
    click.echo(f"wrote {output_location.rstrip('/')}/metrics.json, roc.png, scores.csv")


if __name__ == "__main__":
    main()
