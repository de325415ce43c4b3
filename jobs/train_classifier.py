"""train-classifier: ResNet18 identity classifier (fine-tune or linear probe) with test metrics."""

from __future__ import annotations

import click

from facessl.common.cli import SEED, FiniteFloatRange, is_main_process, precision_option, report_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--data", "data_location", required=True, help="Prepared dataset (output of prepare-data): path or s3:// URI."
)
@click.option(
    "--output", "output_location", required=True, help="Run location for model.pt and metrics.json: path or s3:// URI."
)
@click.option(
    "--encoder",
    default=None,
    help="SimCLR encoder: an encoder.pt file or a pretrain-simclr run location (path or s3:// URI).",
)
@click.option(
    "--init",
    default="scratch",
    help="Without --encoder: 'scratch' or a ResNet18 weights file such as torchvision's ImageNet file.",
)
@click.option(
    "--mode",
    type=click.Choice(["finetune", "linear-probe", "knn", "distill"]),
    default="finetune",
    help="Train everything, only a linear layer on the frozen encoder, no training (a kNN vote of the train "
    "embeddings), or distil --teacher's predictions on every train image into a new network (SimCLRv2).",
)
@click.option("--knn-k", type=click.IntRange(min=1), default=20, help="--mode knn: neighbours that vote.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, help="Training epochs.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=2),
    default=64,
    help="Images per step; capped at the number of training images.",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=16, max=1024),
    default=112,
    help="Side of the images fed to the network, pixels.",
)
@click.option("--optimizer", type=click.Choice(["adam", "adamw", "sgd"]), default="adam", help="Optimizer.")
@click.option(
    "--lr",
    type=FiniteFloatRange(min=0, min_open=True, max=1e30),
    default=3e-4,
    help="Learning rate (of the linear layer; the encoder's is scaled by --encoder-lr-scale).",
)
@click.option("--weight-decay", type=FiniteFloatRange(min=0, max=10), default=8e-4, help="Weight decay.")
@click.option(
    "--encoder-lr-scale",
    type=FiniteFloatRange(min=0, max=100),
    default=1.0,
    help="Encoder LR as a fraction of --lr when fine-tuning.",
)
@click.option("--warmup-epochs", type=click.IntRange(min=0), default=0, help="Linear LR warm-up epochs.")
@click.option(
    "--schedule", type=click.Choice(["cosine", "constant"]), default="cosine", help="LR schedule after the warm-up."
)
@click.option(
    "--label-smoothing", type=FiniteFloatRange(min=0, max=0.5), default=0.0, help="Cross-entropy label smoothing."
)
@click.option(
    "--labels-per-class",
    type=click.IntRange(min=1),
    default=None,
    help="Train on at most N labelled train images per identity.",
)
@click.option(
    "--teacher", default=None, help="--mode distill: a fine-tuned train-classifier model.pt (or its run location)."
)
@click.option(
    "--distill-temperature",
    type=FiniteFloatRange(min=0.01, max=100),
    default=1.0,
    help="--mode distill: softmax temperature of teacher and student.",
)
@click.option(
    "--distill-label-weight",
    type=FiniteFloatRange(min=0, max=100),
    default=1.0,
    help="--mode distill: weight of the labelled images' cross-entropy beside the distillation loss.",
)
@click.option("--seed", type=SEED, default=1337, help="Random seed.")
@click.option("--device", default="auto", envvar="FACESSL_DEVICE", help="auto, cpu, cuda or cuda:N.")
@precision_option
@report_errors
def main(data_location, output_location, **options):
    """Train an identity classifier and report top-1/top-3, per-class P/R/F1 and the confusion matrix.

    Example: train-classifier --data runs/glint6/prepared --output runs/glint6/classifier --encoder runs/glint6/simclr
    """
    from facessl.common.classify import ClassifierConfig, train_classifier

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
