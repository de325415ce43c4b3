"""The jobs' options, each declared once: a dataclass per job whose fields hold the default, the bounds and the
help text. The click options of ``jobs/`` are built from these fields (``common.cli.config_option``), and the
training code takes the same dataclasses, so a default can only change in one place.

Torch-free on purpose: ``--help`` imports this module and click, nothing heavier.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

PRECISIONS = ("auto", "fp32", "bf16")
# what torch.manual_seed and random.seed take: larger seeds overflow
SEED_MAX = 2**63 - 1


def option(
    default,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    choices: tuple[str, ...] | None = None,
    envvar: str | None = None,
    flag: str | None = None,
):
    """A dataclass field that is also a job option.

    Args:
        default: the field's default, also the option's. help: the option's help text.
        min, max, min_open: bounds of an int or float option (floats must also be finite).
        choices: the allowed values of a str option. envvar: environment variable read when the option is not
            given. flag: the option's name when it is not ``--`` plus the field name with dashes.
    """
    meta = {"help": help, "min": min, "max": max, "min_open": min_open, "choices": choices, "envvar": envvar}
    return field(default=default, metadata={**meta, "flag": flag})


def seed_field(help: str = "Random seed."):
    """The ``--seed`` option: 0 to 2**63 - 1, default 1337."""
    return option(1337, help, min=0, max=SEED_MAX)


def image_size_field(help: str, default: int = 112):
    """The ``--image-size`` option: a square side of 16 to 1024 pixels."""
    return option(default, help, min=16, max=1024)


def is_crop_side(size) -> bool:
    """Whether a recorded ``image_size`` (from a model.pt, config.json or gallery) is a whole number of pixels
    from 16 to 4096: what any file of ours may hold, wider than the options' bounds for files of other tools."""
    return isinstance(size, int) and not isinstance(size, bool) and 16 <= size <= 4096


# A negative crop margin cuts inside the detector's box: a Haar box holds forehead and background that a
# backbone trained on tight, aligned faces has rarely seen (docs/open-set.md). -0.25 keeps the central half.
MIN_CROP_MARGIN = -0.25
MAX_CROP_MARGIN = 2.0


def is_crop_margin(margin) -> bool:
    """Whether a recorded crop margin (a manifest's, a run's or a gallery's) is a finite number from
    MIN_CROP_MARGIN to MAX_CROP_MARGIN, prepare-data's and enroll's bounds."""
    return (
        isinstance(margin, (int, float))
        and not isinstance(margin, bool)
        and MIN_CROP_MARGIN <= margin <= MAX_CROP_MARGIN
    )


def device_field():
    """The ``--device`` option (``FACESSL_DEVICE``); ``common.training.pick_device`` checks the value."""
    return option("auto", "auto, cpu, cuda or cuda:N.", envvar="FACESSL_DEVICE")


def precision_field():
    """The ``--precision`` option (``FACESSL_PRECISION``); ``common.training.resolve_precision`` resolves it."""
    return option(
        "auto",
        "Network arithmetic. auto: bf16 autocast in channels_last on CUDA and on CPUs with native bf16 "
        "(avx512_bf16 or amx_bf16), fp32 elsewhere (in channels_last on a CPU). Losses and softmaxes stay "
        "float32.",
        choices=PRECISIONS,
        envvar="FACESSL_PRECISION",
    )


# learning rates above this are a typo, not a schedule
LR_MAX = 1e30


@dataclass
class PretrainConfig:
    """Options of pretrain-simclr (written to ``config.json``); learning rates are per batch of 256."""

    epochs: int = option(100, "Training epochs.", min=1)
    batch_size: int = option(256, "Images per step (2x views); capped at the dataset size.", min=2)
    image_size: int = image_size_field("Side of the views fed to the network, pixels.")
    optimizer: str = option("adamw", "Optimizer.", choices=("adamw", "sgd"))
    lr: float = option(
        1e-3, "Learning rate per 256 images (scaled linearly with the batch).", min=0, min_open=True, max=LR_MAX
    )
    weight_decay: float = option(1e-4, "Weight decay.", min=0, max=10)
    warmup_epochs: int = option(5, "Linear LR warm-up epochs before the cosine decay.", min=0)
    temperature: float = option(0.2, "Contrastive temperature tau.", min=0.01, max=10)
    loss: str = option(
        "ntxent",
        "Contrastive loss: ntxent (SimCLR's NT-Xent) or dcl (decoupled: the positive left out of the denominator).",
        choices=("ntxent", "dcl"),
    )
    proj_hidden_dim: int = option(512, "Projection head hidden size.", min=1, max=16384)
    proj_dim: int = option(128, "Projection head output size.", min=1, max=8192)
    jitter_strength: float = option(0.5, "Colour jitter strength s: (0.8s, 0.8s, 0.8s, 0.2s).", min=0, max=2.5)
    crop_min: float = option(0.4, "Smallest random-resized-crop area fraction (of a tight face crop).", min=0.01, max=1)
    blur_p: float = option(0.5, "Probability of Gaussian blur per view.", min=0, max=1)
    use_unlabeled: bool = option(False, "Also train on the dataset's unlabeled pool.")
    knn_every: int = option(5, "Run the kNN monitor on the val split every N epochs (0: never).", min=0)
    knn_k: int = option(20, "kNN monitor: neighbours that vote.", min=1)
    init: str = option(
        "scratch", "'scratch' or a ResNet18 weights file (path or s3:// URI), e.g. torchvision's ImageNet file."
    )
    seed: int = seed_field()
    device: str = device_field()
    checkpoint_every: int = option(1, "Write a resumable checkpoint every N epochs (0: never).", min=0)
    resume: str = option(
        "auto", "auto: continue from the output's latest checkpoint when there is one.", choices=("auto", "never")
    )
    compile: bool = option(False, "torch.compile the model.")
    precision: str = precision_field()
    log_every: int = option(50, "Print the loss every N steps (0: per epoch only).", min=0)
    data_mode: str = option(
        "auto",
        "How decoded crops are held: memory, a memory-mapped file in the cache, or streamed from the shards; "
        "auto picks by free RAM and disk.",
        choices=("auto", "memory", "mmap", "stream"),
    )
    shuffle_window: int = option(10000, "--data-mode stream: samples decoded and shuffled together.", min=1)


CLASSIFIER_MODES = ("finetune", "linear-probe", "knn", "distill")


@dataclass
class ClassifierConfig:
    """Options of train-classifier (written to ``config.json``)."""

    mode: str = option(
        "finetune",
        "Train everything, only a linear layer on the frozen encoder, no training (a kNN vote of the train "
        "embeddings), or distil --teacher's predictions on every train image into a new network (SimCLRv2).",
        choices=CLASSIFIER_MODES,
    )
    encoder: str | None = option(
        None, "SimCLR encoder: an encoder.pt file or a pretrain-simclr run location (path or s3:// URI)."
    )
    init: str = option(
        "scratch", "Without --encoder: 'scratch' or a ResNet18 weights file such as torchvision's ImageNet file."
    )
    epochs: int = option(10, "Training epochs.", min=1)
    val_every: int = option(
        1,
        "Score the val split every N epochs and after the last; the best of the scored epochs is kept. Above 1 "
        "it saves time where the val split is large beside the labelled one.",
        min=1,
    )
    batch_size: int = option(64, "Images per step; capped at the number of training images.", min=2)
    image_size: int = image_size_field("Side of the images fed to the network, pixels.")
    optimizer: str = option("adam", "Optimizer.", choices=("adam", "adamw", "sgd"))
    lr: float = option(
        3e-4,
        "Learning rate (of the linear layer; the encoder's is scaled by --encoder-lr-scale).",
        min=0,
        min_open=True,
        max=LR_MAX,
    )
    weight_decay: float = option(8e-4, "Weight decay.", min=0, max=10)
    encoder_lr_scale: float = option(1.0, "Encoder LR as a fraction of --lr when fine-tuning.", min=0, max=100)
    warmup_epochs: int = option(0, "Linear LR warm-up epochs.", min=0)
    schedule: str = option("cosine", "LR schedule after the warm-up.", choices=("cosine", "constant"))
    label_smoothing: float = option(0.0, "Cross-entropy label smoothing.", min=0, max=0.5)
    loss: str = option(
        "cross-entropy",
        "cross-entropy on a linear layer, or a face-recognition margin loss on a cosine layer: cosface "
        "(additive cosine margin) or arcface (additive angular margin), for embeddings that separate people "
        "outside the training set (enroll). finetune and linear-probe only.",
        choices=("cross-entropy", "cosface", "arcface"),
    )
    margin: float | None = option(
        None, "cosface/arcface margin m (default 0.35 for cosface, 0.5 radians for arcface).", min=0, max=1.5
    )
    scale: float = option(30.0, "cosface/arcface logit scale s.", min=1, max=128)
    labels_per_class: int | None = option(None, "Train on at most N labelled train images per identity.", min=1)
    sampler: str = option(
        "uniform",
        "How an epoch draws its images: uniform (each once, shuffled) or balanced (as many draws, with "
        "replacement, each identity equally likely), for training sets where a few identities hold most images.",
        choices=("uniform", "balanced"),
    )
    knn_k: int = option(20, "--mode knn: neighbours that vote.", min=1)
    teacher: str | None = option(None, "--mode distill: a fine-tuned train-classifier model.pt (or its run location).")
    distill_temperature: float = option(
        1.0, "--mode distill: softmax temperature of teacher and student.", min=0.01, max=100
    )
    distill_label_weight: float = option(
        1.0,
        "--mode distill: weight of the labelled images' cross-entropy beside the distillation loss; 0 runs "
        "distillation alone, without a labelled batch beside each unlabelled one.",
        min=0,
        max=100,
    )
    seed: int = seed_field()
    device: str = device_field()
    precision: str = precision_field()


@dataclass
class PairsConfig:
    """Options of evaluate-pairs besides its locations."""

    image_size: int = image_size_field("Crop side fed to the encoder (use the size it was trained at).")
    folds: int = option(10, "Cross-validation folds for the threshold.", min=2)
    detect: bool = option(
        True, "--no-detect: the photos are face crops already (e.g. made once on a CPU machine); embed them whole."
    )
    device: str = device_field()
    precision: str = precision_field()


@dataclass
class PrepareOptions:
    """Options of prepare-data besides its locations, as the command line spells them; the job turns them into
    ``common.faces.DetectConfig`` and ``common.prepare.PrepareConfig`` (tests check that the defaults agree)."""

    classes: str | None = option(
        None, "Comma-separated identity folder names to keep as classes (default: all passing --min-images)."
    )
    min_images: int = option(
        10, "Keep identities with at least this many usable (cropped, de-duplicated) photos.", min=1
    )
    ratios: str = option("0.8,0.1,0.1", "train,val,test fractions.", flag="--split")
    seed: int = seed_field("Seed of the stratified split.")
    image_size: int = image_size_field("Side of the square crops, pixels.", default=224)
    margin: float = option(
        0.2,
        "Margin around the face box, as a fraction of the box side on each side; below 0 cuts inside the box.",
        min=MIN_CROP_MARGIN,
        max=MAX_CROP_MARGIN,
    )
    scale_factor: float = option(1.1, "Haar cascade pyramid step.", min=1.01, max=2)
    min_neighbors: int = option(5, "Haar cascade min neighbours.", min=0)
    min_face: int = option(30, "Smallest face side, pixels.", min=8)
    on_no_face: str = option(
        "skip",
        "Photos without a detected face: skip them, or keep the whole photo (already-cropped collections).",
        choices=("skip", "keep-full"),
    )
    detector_fallback: bool = option(
        True,
        "When the default frontal cascade finds nothing, try the alt2 frontal and profile cascades, the mirror "
        "image, and 2x upscaling.",
    )
    upscale_below: int = option(
        500,
        "With the fallback, photos whose longest side is under this many pixels are also searched at 2x "
        "(unless 2x would exceed --max-pixels).",
        min=0,
    )
    detect_max_pixels: int = option(
        2_000_000,
        "Photos with more pixels are searched for faces on a copy scaled down to this many (much faster on phone "
        "photos; the crop keeps full resolution); 0 searches at full size. At least 250000 unless 0.",
        min=0,
    )
    unlabeled_pool: bool = option(
        False, "Also write crops of the identities not selected as an 'unlabeled' split for pretraining."
    )
    max_pixels: int = option(50_000_000, "Photos with more pixels are skipped before decoding (bounded memory).", min=1)
    shard_size: int = option(5000, "Samples per tar shard.", min=1)
    workers: int = option(0, "Detection processes (0: one per CPU core).", min=0, envvar="FACESSL_WORKERS")


def field_names(config) -> list[str]:
    """The option fields of a config dataclass (or instance), in declaration order."""
    return [f.name for f in fields(config)]
