"""pretrain-simclr: SimCLR pretraining (ResNet18 + projection head, NT-Xent) on prepared face crops."""

from __future__ import annotations

import click

from facessl.common.cli import SEED, FiniteFloatRange, is_main_process, precision_option, report_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--data", "data_location", required=True, help="Prepared dataset (output of prepare-data): path or s3:// URI."
)
@click.option(
    "--output", "output_location", required=True, help="Run location for encoder.pt and logs: path or s3:// URI."
)
@click.option("--epochs", type=click.IntRange(min=1), default=100, help="Training epochs.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=2),
    default=256,
    help="Images per step (2x views); capped at the dataset size.",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=16, max=1024),
    default=112,
    help="Side of the views fed to the network, pixels.",
)
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", help="Optimizer.")
@click.option(
    "--lr",
    type=FiniteFloatRange(min=0, min_open=True, max=1e30),
    default=1e-3,
    help="Learning rate per 256 images (scaled linearly with the batch).",
)
@click.option("--weight-decay", type=FiniteFloatRange(min=0, max=10), default=1e-4, help="Weight decay.")
@click.option(
    "--warmup-epochs", type=click.IntRange(min=0), default=5, help="Linear LR warm-up epochs before the cosine decay."
)
@click.option("--temperature", type=FiniteFloatRange(min=0.01, max=10), default=0.2, help="NT-Xent temperature tau.")
@click.option("--proj-dim", type=click.IntRange(min=1, max=8192), default=128, help="Projection head output size.")
@click.option(
    "--proj-hidden-dim", type=click.IntRange(min=1, max=16384), default=512, help="Projection head hidden size."
)
@click.option(
    "--jitter-strength",
    type=FiniteFloatRange(min=0, max=2.5),
    default=0.5,
    help="Colour jitter strength s: (0.8s, 0.8s, 0.8s, 0.2s).",
)
@click.option(
    "--crop-min",
    type=FiniteFloatRange(min=0.01, max=1),
    default=0.2,
    help="Smallest random-resized-crop area fraction.",
)
@click.option(
    "--blur-p", type=FiniteFloatRange(min=0, max=1), default=0.5, help="Probability of Gaussian blur per view."
)
@click.option("--use-unlabeled/--no-use-unlabeled", default=False, help="Also train on the dataset's unlabeled pool.")
@click.option(
    "--knn-every",
    type=click.IntRange(min=0),
    default=5,
    help="Run the kNN monitor on the val split every N epochs (0: never).",
)
@click.option(
    "--init",
    default="scratch",
    help="'scratch' or a ResNet18 weights file (path or s3:// URI), e.g. torchvision's ImageNet file.",
)
@click.option("--seed", type=SEED, default=1337, help="Random seed.")
@click.option("--device", default="auto", envvar="FACESSL_DEVICE", help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=0),
    default=1,
    help="Write a resumable checkpoint every N epochs (0: never).",
)
@click.option(
    "--resume",
    type=click.Choice(["auto", "never"]),
    default="auto",
    help="auto: continue from the output's latest checkpoint when there is one.",
)
@click.option(
    "--log-every", type=click.IntRange(min=0), default=50, help="Print the loss every N steps (0: per epoch only)."
)
@click.option(
    "--data-mode",
    type=click.Choice(["auto", "memory", "mmap", "stream"]),
    default="auto",
    help="How decoded crops are held: memory, a memory-mapped file in the cache, or streamed from the shards; "
    "auto picks by free RAM and disk.",
)
@click.option(
    "--shuffle-window",
    type=click.IntRange(min=1),
    default=10000,
    help="--data-mode stream: samples decoded and shuffled together.",
)
@click.option("--compile/--no-compile", "compile_", default=False, help="torch.compile the model.")
@precision_option
@report_errors
def main(data_location, output_location, compile_, **options):
    """Pretrain a ResNet18 face encoder with SimCLR; writes encoder.pt to --output.

    Example: pretrain-simclr --data runs/glint6/prepared --output runs/glint6/simclr --epochs 50 --image-size 64
    """
    from facessl.common.simclr import PretrainConfig, pretrain

    cfg = PretrainConfig(compile=compile_, **options)
    summary = pretrain(data_location, output_location, cfg, log=click.echo)
    if not is_main_process():
        return
    click.echo(f"summary: {summary}")
    click.echo(f"wrote {output_location.rstrip('/')}/encoder.pt")


if __name__ == "__main__":
    main()
