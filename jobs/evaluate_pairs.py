"""evaluate-pairs: face verification accuracy (10-fold, LFW style) and ROC AUC of a trained encoder."""

from __future__ import annotations

import click

from facessl.common.cli import precision_option, report_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
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
@click.option("--output", "output_location", required=True, help="Where metrics.json, scores.csv and roc.png go.")
@click.option(
    "--image-size",
    type=click.IntRange(min=16, max=1024),
    default=112,
    help="Crop side fed to the encoder (use the size it was trained at).",
)
@click.option("--folds", type=click.IntRange(min=2), default=10, help="Cross-validation folds for the threshold.")
@click.option(
    "--detect/--no-detect",
    default=True,
    help="--no-detect: the photos are face crops already (e.g. made once on a CPU machine); embed them whole.",
)
@click.option("--device", default="auto", envvar="FACESSL_DEVICE", help="auto, cpu, cuda or cuda:N.")
@precision_option
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
