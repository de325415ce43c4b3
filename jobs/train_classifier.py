"""train-classifier: ResNet18 identity classifier (fine-tune or linear probe) with test metrics."""

from __future__ import annotations

import click

from facessl.common.cli import (
    COMMAND_SETTINGS,
    config_options,
    data_option,
    device_option,
    image_size_option,
    is_main_process,
    output_option,
    precision_option,
    report_errors,
    seed_option,
)
from facessl.common.config import ClassifierConfig


@click.command(context_settings=COMMAND_SETTINGS)
@data_option("Prepared dataset (output of prepare-data): path or s3:// URI.")
@output_option("Run location for model.pt and metrics.json: path or s3:// URI.")
@config_options(ClassifierConfig, "encoder", "init", "mode", "knn_k", "epochs", "val_every", "batch_size")
@image_size_option(ClassifierConfig)
@config_options(
    ClassifierConfig,
    "optimizer",
    "lr",
    "weight_decay",
    "encoder_lr_scale",
    "warmup_epochs",
    "schedule",
    "label_smoothing",
    "loss",
    "margin",
    "scale",
    "labels_per_class",
    "sampler",
    "teacher",
    "distill_temperature",
    "distill_label_weight",
)
@seed_option(ClassifierConfig)
@device_option(ClassifierConfig)
@precision_option(ClassifierConfig)
@report_errors
def main(data_location, output_location, **options):
    """Train an identity classifier and report top-1/top-3, per-class P/R/F1 and the confusion matrix.

    Example: train-classifier --data runs/glint6/prepared --output runs/glint6/classifier --encoder runs/glint6/simclr
    """
    from facessl.common.classify import train_classifier

    metrics = train_classifier(data_location, output_location, ClassifierConfig(**options), log=click.echo)
    if not is_main_process():
        return
    test = metrics["test"]
    click.echo(
        f"test top-1 {test['top1']:.4f}  top-3 {test['top3']:.4f}  macro-F1 {test['macro_f1']:.4f}  "
        f"(n={test['n']}" + (f", best epoch {metrics['best_epoch']})" if metrics["best_epoch"] else ")")
    )
    click.echo(f"wrote {output_location.rstrip('/')}/metrics.json")


if __name__ == "__main__":
    main()
