"""pretrain-simclr: SimCLR pretraining (ResNet18 + projection head, NT-Xent) on prepared face crops."""

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
from facessl.common.config import PretrainConfig


@click.command(context_settings=COMMAND_SETTINGS)
@data_option("Prepared dataset (output of prepare-data): path or s3:// URI.")
@output_option("Run location for encoder.pt and logs: path or s3:// URI.")
@config_options(PretrainConfig, "epochs", "batch_size")
@image_size_option(PretrainConfig)
@config_options(
    PretrainConfig,
    "optimizer",
    "lr",
    "weight_decay",
    "warmup_epochs",
    "temperature",
    "loss",
    "proj_dim",
    "proj_hidden_dim",
    "jitter_strength",
    "crop_min",
    "blur_p",
    "use_unlabeled",
    "knn_every",
    "init",
)
@seed_option(PretrainConfig)
@device_option(PretrainConfig)
@config_options(PretrainConfig, "checkpoint_every", "resume", "log_every", "data_mode", "shuffle_window", "compile")
@precision_option(PretrainConfig)
@report_errors
def main(data_location, output_location, **options):
    """Pretrain a ResNet18 face encoder with SimCLR; writes encoder.pt to --output.

    Example: pretrain-simclr --data runs/glint6/prepared --output runs/glint6/simclr --epochs 50 --image-size 64
    """
    from facessl.common.simclr import pretrain

    summary = pretrain(data_location, output_location, PretrainConfig(**options), log=click.echo)
    if not is_main_process():
        return
    click.echo(f"summary: {summary}")
    click.echo(f"wrote {output_location.rstrip('/')}/encoder.pt")


if __name__ == "__main__":
    main()
