"""train-classifier: a ResNet18 identity classifier, fine-tuned or linear-probed.

Starting points: a SimCLR ``encoder.pt`` (``encoder``), given ResNet18 weights such as torchvision's
ImageNet file (``init``), or random weights. Modes:
    finetune       the whole network trains (encoder LR scaled by ``encoder_lr_scale``)
    knn            no training: a weighted k-nearest-neighbour vote of the train split's embeddings
                   (Wu et al. 2018, the kNN monitor's classifier), the usual SSL representation check
    linear-probe   the encoder is frozen (eval mode, no gradients); only the linear layer trains, on
                   embeddings computed once (the standard linear evaluation protocol, Chen et al. 2020)
    distill        SimCLRv2's third step (Chen et al. 2020, "Big Self-Supervised Models are Strong
                   Semi-Supervised Learners", arXiv:2006.10029, section 2.3): a student trains on every
                   image of the train split to match a fine-tuned ``teacher``'s softened predictions
                   (Hinton et al. 2015, arXiv:1503.02531), plus ``distill_label_weight`` times the cross-entropy
                   of the labelled subset. The train split's other labels are never read; val and test
                   images are never trained on.

Each epoch reports train top-1 and val top-1/top-3; the best-by-val weights are evaluated on the test
split. Outputs under the run's location: ``model.pt``, ``metrics.json``, ``metrics.jsonl``,
``classification_report.txt``, ``test_predictions.csv`` (each test image's true and predicted identity, in
the split's order, so that two runs on one dataset can be compared image by image), ``confusion_matrix.png``,
``training_curves.png``, ``config.json``.

Reading order: :func:`train_classifier` sets a run up (:func:`open_output`, :func:`build_run`,
:func:`start_writing`), then either votes (:func:`knn_classify`) or repeats :func:`train_one_epoch` and
:func:`evaluate` (:func:`fit`), and ends with :func:`finish` (:func:`write_results`).
"""

from __future__ import annotations

import copy
import csv
import io
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from facessl.common.augment import BatchAugment, eval_transform, supervised_preset
from facessl.common.checkpoints import save_torch
from facessl.common.config import CLASSIFIER_MODES, ClassifierConfig
from facessl.common.data import PreparedDataset, refuse_output_inside
from facessl.common.distributed import (
    barrier,
    cleanup,
    init_distributed,
    mean_across_ranks,
    min_across_ranks,
    sync_batchnorm,
)
from facessl.common.errors import BadInputError, DivergedError, PreemptedError, UsageError
from facessl.common.losses import MARGIN_LOSSES, margin_logits
from facessl.common.metrics import classification_summary, plot_confusion_matrix, plot_curves, topk_accuracy
from facessl.common.models import FEATURE_DIM, Classifier, build_encoder
from facessl.common.pool import MemoryPool, epoch_generator, rank_share
from facessl.common.storage import Storage, claim_output, location_within, open_storage
from facessl.common.training import (
    Precision,
    RunWriter,
    StopRequest,
    TrainingRun,
    embed,
    format_record,
    knn_predict,
    last_step_lr,
    optimizer_step,
    pick_device,
    resolve_precision,
    seed_everything,
    silent,
    stop_requested,
    warmup_cosine,
)
from facessl.common.weights import load_classifier, load_encoder

# importable from here as before common.config and common.weights held them
__all__ = ["ClassifierConfig", "load_encoder", "train_classifier"]

# what a run writes besides config.json; a rerun into the same folder deletes them all first
RESULTS = (
    "metrics.json",
    "model.pt",
    "metrics.jsonl",
    "classification_report.txt",
    "test_predictions.csv",
    "confusion_matrix.png",
    "training_curves.png",
)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0):
    """Cross-entropy of the student's softened distribution to the teacher's, times T^2 so gradients keep
    their scale across temperatures (Hinton et al. 2015, arXiv:1503.02531; SimCLRv2 eq. 2).

    Args:
        student_logits, teacher_logits: float (N, C). temperature: T > 0.
    Returns:
        scalar float32, the mean over the N images.
    """
    target = F.softmax(teacher_logits / temperature, dim=1)
    return -(target * F.log_softmax(student_logits / temperature, dim=1)).sum(1).mean() * temperature**2


def endless_batches(pool: MemoryPool, batch_size: int, seed: int, rank: int = 0):
    """``(images, labels)`` batches of ``pool`` forever, one fresh seeded permutation per pass."""
    steps = len(pool) // batch_size
    passes = 0
    while True:
        yield from pool.batches(epoch_generator(seed, passes, rank), batch_size, steps)
        passes += 1


def class_balanced_weights(labels: torch.Tensor) -> torch.Tensor:
    """float64 (N,) sampling weights of int64 (N,) ``labels``, each sample ``1 / count(its class)``, so that
    every class is drawn equally often (class-balanced sampling, as in Kang et al. 2020, "Decoupling
    Representation and Classifier for Long-Tailed Recognition", arXiv:1910.09217)."""
    counts = torch.bincount(labels)
    return 1.0 / counts[labels].double()


def load_teacher(
    location: str, classes: list[str], image_size: int, device: torch.device, precision: Precision | None = None
) -> torch.nn.Module:
    """A fine-tuned train-classifier model (``model.pt`` or its run location) for distillation, in eval
    mode on ``device`` with frozen weights, in ``precision``'s layout (None: ``auto`` for the device).

    Raises:
        BadInputError: not a train-classifier model, or trained on other identities than ``classes``.
        UsageError: trained at another image size than ``image_size``.
    """
    teacher, teacher_classes, teacher_size = load_classifier(location)
    if teacher_size != image_size:
        raise UsageError(
            f"the teacher {location} was trained at {teacher_size} px: distil at --image-size {teacher_size}"
        )
    if teacher_classes != list(classes):
        raise BadInputError(
            f"the teacher {location} knows other identities than this dataset: distil a teacher "
            "trained on the same prepared data"
        )
    for p in teacher.parameters():
        p.requires_grad_(False)
    return (precision or resolve_precision("auto", device)).layout(teacher.to(device).eval())


def subsample_per_class(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Indices of at most ``per_class`` samples of every class, chosen reproducibly from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().squeeze(1)
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    return torch.cat(keep).sort().values


def initial_encoder(cfg: ClassifierConfig) -> tuple[torch.nn.Module, str]:
    """The encoder to start from and a description of where its weights came from."""
    if cfg.encoder:
        return load_encoder(cfg.encoder)
    if cfg.init == "scratch":
        return build_encoder(), "random init"
    return load_encoder(cfg.init, run_location=False)


@dataclass
class ClassifierRun(TrainingRun):
    """What one train-classifier run holds between its steps. ``world``/``rank`` are the torchrun ones when the
    mode trains distributed (finetune, distill), else 1/0 (every rank computes the same). ``train_x``: this
    rank's labelled train images (uint8), or their embeddings in linear-probe and knn; ``unlabelled``: distill's
    pool of every train image; ``evals``: ``{"val": (x, y), "test": (x, y)}`` like ``train_x``. ``augment``,
    ``aug_gen`` and ``train_model`` (DDP-wrapped when distributed) are set for the modes that train the encoder."""

    cfg: ClassifierConfig
    classes: list[str]
    distributed: bool
    world: int
    rank: int
    n_train: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    unlabelled: MemoryPool | None
    evals: dict
    model: Classifier
    teacher: torch.nn.Module | None
    source: str
    # prepare-data's, for config.json (enroll crops at it)
    crop_margin: float | None
    augment: BatchAugment | None = None
    aug_gen: torch.Generator | None = None
    train_model: torch.nn.Module | None = None


@dataclass
class StepPlan:
    """How an epoch steps: the pool it passes over (the labelled train images, or distill's unlabelled pool),
    the per-rank batch, the steps, distill's endless labelled batches, the optimizer and its schedule."""

    step_pool: MemoryPool
    per_rank: int
    steps_per_epoch: int
    labelled_batches: object
    sample_weights: torch.Tensor | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None


def train_classifier(data_location: str, output_location: str, cfg: ClassifierConfig, log=print) -> dict:
    """Train, select by val top-1, evaluate on test; returns the metrics written to ``metrics.json``.

    Under torchrun, fine-tuning runs DistributedDataParallel (each rank its slice of every global batch,
    global batch norm); a linear probe, cheap on precomputed embeddings, runs identically on every rank.
    Only rank 0 writes.

    Raises:
        UsageError: conflicting options, or a --teacher inside --output.
        BadInputError: unusable dataset or weights. DivergedError: the loss became NaN/inf.
        PreemptedError: SIGTERM arrived (nothing is kept; a rerun starts over).
    """
    info, device = init_distributed(pick_device(cfg.device))
    stop = StopRequest()
    # rank 0 reports for all
    log = log if info.is_main else silent
    try:
        precision = resolve_precision(cfg.precision, device)
        check_options(cfg)
        out = open_output(data_location, output_location, cfg)
        run = build_run(data_location, out, cfg, info, device, precision, log)
        start_writing(run, data_location)
        if cfg.mode == "knn":
            return knn_classify(run)
        if cfg.mode == "linear-probe":
            embed_splits(run)
        else:
            add_augmentation(run)
        plan = plan_steps(run)
        plan.optimizer, plan.scheduler = build_optimizer(run, plan.steps_per_epoch)
        best_epoch, started = fit(run, plan, stop)
        return finish(run, best_epoch, started)
    finally:
        stop.restore()
        cleanup()


def check_options(cfg: ClassifierConfig) -> None:
    """Raise UsageError for conflicting options (``--encoder`` with ``--init``, ``--teacher`` without
    ``--mode distill`` or the reverse, a margin loss outside finetune and linear-probe, ``--margin`` without
    one) and BadInputError for an unknown mode."""
    if cfg.encoder and cfg.init != "scratch":
        raise UsageError("give either --encoder (a SimCLR encoder) or --init (other weights), not both")
    if cfg.mode not in CLASSIFIER_MODES:
        raise BadInputError(f"unknown mode {cfg.mode!r}: use finetune, linear-probe, knn or distill")
    if cfg.loss != "cross-entropy" and cfg.mode not in ("finetune", "linear-probe"):
        raise UsageError(f"--loss {cfg.loss} trains a cosine layer: use it with --mode finetune or linear-probe")
    if cfg.margin is not None and cfg.loss == "cross-entropy":
        raise UsageError("--margin belongs to --loss cosface or arcface")
    if cfg.sampler != "uniform" and cfg.mode not in ("finetune", "linear-probe"):
        raise UsageError(f"--sampler {cfg.sampler} draws labelled images: use it with --mode finetune or linear-probe")
    if (cfg.mode == "distill") != bool(cfg.teacher):
        raise UsageError(
            "--mode distill needs --teacher (a fine-tuned train-classifier model.pt), and --teacher "
            "needs --mode distill"
        )


def open_output(data_location: str, output_location: str, cfg: ClassifierConfig) -> Storage:
    """The run location, claimed for train-classifier before any work.

    Raises:
        UsageError: the output lies inside the dataset, or ``--teacher`` inside the output (its model.pt is the
        one a new run deletes). BadInputError: the output belongs to another job or cannot be written.
    """
    out = open_storage(output_location)
    refuse_output_inside(data_location, output_location)
    # before any work
    claim_output(out, "train-classifier")
    # its model.pt is the one a new run deletes
    if cfg.teacher and location_within(cfg.teacher, output_location):
        raise UsageError(
            f"--teacher {cfg.teacher} lies inside --output {output_location}, whose model.pt a new run "
            "replaces: give the student another --output"
        )
    return out


def load_training_data(data: PreparedDataset, cfg: ClassifierConfig, distributed: bool, rank: int, world: int):
    """This rank's labelled train images and labels, the labelled images of all ranks, and distill's pool of
    every train image of this rank (labels replaced by zeros; None in other modes).

    Returns ``(uint8 (N, 3, S, S), int64 (N,), labelled images in all, MemoryPool or None)``.
    """
    unlabelled = None
    # each rank decodes its shards only
    if distributed and not cfg.labels_per_class and cfg.mode != "distill":
        train_x, train_y = data.decode(rank_share(data, ["train"], rank, world))
        return train_x, train_y, sum(data.shard_sizes("train")), unlabelled
    # the labelled subset is drawn from the whole split, identically on every rank
    train_x, train_y = data.load("train")
    if cfg.mode == "distill":
        images = train_x[rank::world]
        unlabelled = MemoryPool(images, torch.zeros(len(images), dtype=torch.long))
    if cfg.labels_per_class:
        keep = subsample_per_class(train_y, cfg.labels_per_class, cfg.seed)
        train_x, train_y = train_x[keep], train_y[keep]
    return train_x[rank::world], train_y[rank::world], len(train_y), unlabelled


def build_run(data_location, out, cfg, info, device, precision, log) -> ClassifierRun:
    """Open the dataset (two classes at least), load this rank's share of it, seed, and build the classifier
    on its initial encoder (and distill's teacher), on ``device`` in ``precision``'s layout.

    Raises:
        BadInputError: unusable dataset, fewer than two classes, unusable weights or teacher.
        UsageError: a teacher trained at another image size.
    """
    data = PreparedDataset(data_location, cfg.image_size)
    classes = data.classes
    # top-1 would be a trivial 1.0; pretrain-simclr can still use such a dataset
    if len(classes) < 2:
        raise BadInputError(
            f"{data_location} has {len(classes)} class(es) {classes}: a classifier needs at least "
            "two identities; run prepare-data on two or more identity folders"
        )
    distributed = info.enabled and cfg.mode in ("finetune", "distill")
    world, rank = (info.world_size, info.rank) if distributed else (1, 0)
    evals = {s: data.load(s) for s in ("val", "test")}
    train_x, train_y, n_train, unlabelled = load_training_data(data, cfg, distributed, rank, world)
    seed_everything(cfg.seed)
    encoder, source = initial_encoder(cfg)
    teacher = load_teacher(cfg.teacher, classes, cfg.image_size, device, precision) if cfg.mode == "distill" else None
    head = "linear" if cfg.loss == "cross-entropy" else "cosine"
    model = Classifier(encoder, len(classes), head=head, scale=cfg.scale)
    if distributed:
        model = sync_batchnorm(model, device)
    model = precision.layout(model.to(device))
    return ClassifierRun(
        cfg=cfg,
        info=info,
        device=device,
        precision=precision,
        log=log,
        out=out,
        writer=RunWriter(out),
        classes=classes,
        distributed=distributed,
        world=world,
        rank=rank,
        n_train=n_train,
        train_x=train_x,
        train_y=train_y,
        unlabelled=unlabelled,
        evals=evals,
        model=model,
        teacher=teacher,
        source=source,
        crop_margin=data.crop_margin,
    )


def start_writing(run: ClassifierRun, data_location: str) -> None:
    """Remove an earlier run's results (an interrupted one, or a knn one, leaves none), write ``config.json``
    and log the plan."""
    cfg, out, unlabelled = run.cfg, run.out, run.unlabelled
    distilled = len(unlabelled) * run.world if unlabelled is not None else 0
    if run.info.is_main:
        for key in RESULTS:
            out.delete(key)
        run.writer.write_json(
            "config.json",
            {
                **asdict(cfg),
                "data": data_location,
                "crop_margin": run.crop_margin,
                "output": out.uri,
                "weights": run.source,
                "train_images": run.n_train,
                "classes": run.classes,
                "device": str(run.device),
                "precision_used": run.precision.name,
                "precision_reason": run.precision.reason,
                "world_size": run.info.world_size,
                "unlabelled_images": distilled,
                "torch": torch.__version__,
            },
        )
    run.log(run.precision.describe())
    run.log(
        f"{cfg.mode} from {run.source}: {run.n_train} labelled train images, {len(run.classes)} classes, "
        f"{run.device}" + (f"; distilling {cfg.teacher} on {distilled} train images" if unlabelled is not None else "")
    )


def embed_splits(run: ClassifierRun) -> None:
    """Freeze the encoder and replace the train, val and test images by their embeddings, computed once
    (linear-probe and knn)."""
    for p in run.model.encoder.parameters():
        p.requires_grad_(False)
    size, device, precision = run.cfg.image_size, run.device, run.precision
    run.train_x = embed(run.model.encoder, run.train_x, size, device, precision=precision)
    run.evals = {
        s: (embed(run.model.encoder, x, size, device, precision=precision), y) for s, (x, y) in run.evals.items()
    }


def add_augmentation(run: ClassifierRun) -> None:
    """The supervised augmentation with its seeded generator, and the model as trained (DDP when distributed)."""
    run.augment = BatchAugment(supervised_preset())
    run.aug_gen = torch.Generator(device=run.device).manual_seed(run.cfg.seed + 1)
    run.train_model = run.model
    if run.distributed:
        run.train_model = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None
        )


def plan_steps(run: ClassifierRun) -> StepPlan:
    """The batch and step plan of an epoch: every sample once (a last batch of one dropped: batch norm cannot
    train on one sample); under torchrun the same steps on every rank.

    Raises:
        BadInputError: too few training images for the processes, or fewer than 2 to fine-tune on.
    """
    cfg, world, unlabelled = run.cfg, run.world, run.unlabelled
    train_pool = MemoryPool(run.train_x, run.train_y)
    # an epoch is one pass over this pool
    step_pool = train_pool if unlabelled is None else unlabelled
    n_step = run.n_train if unlabelled is None else len(unlabelled) * world
    batch = max(1, min(cfg.batch_size, n_step)) // world * world
    per_rank = batch // world
    labelled_batches = None
    # the labelled subset, reshuffled whenever it runs out, beside every distillation batch (none when its
    # cross-entropy has no weight: distillation alone, which spares the labelled half of each step)
    if unlabelled is not None and cfg.distill_label_weight > 0:
        labelled_per_rank = max(1, min(per_rank, len(train_pool)))
        labelled_batches = endless_batches(train_pool, labelled_per_rank, cfg.seed + 7919, run.rank)
    if run.distributed:
        # same steps on every rank
        steps_per_epoch = min_across_ranks(len(step_pool) // max(1, per_rank))
    else:
        steps_per_epoch = -(-n_step // batch) - (n_step % batch == 1 and n_step > batch)
    if batch < world or steps_per_epoch < 1:
        raise BadInputError(f"{n_step} training images cannot feed {world} processes")
    if cfg.mode in ("finetune", "distill") and run.n_train < 2:
        raise BadInputError(f"{run.n_train} labelled training image: fine-tuning needs at least 2 (batch norm)")
    weights = class_balanced_weights(run.train_y) if cfg.sampler == "balanced" else None
    return StepPlan(step_pool, per_rank, steps_per_epoch, labelled_batches, weights)


def build_optimizer(run: ClassifierRun, steps_per_epoch: int):
    """Adam, AdamW or SGD (Nesterov momentum 0.9) over the linear layer and, when it trains, the encoder (its LR
    scaled by ``encoder_lr_scale``), with a per-step warm-up + cosine or constant schedule.

    Raises:
        BadInputError: an unknown optimizer.
    """
    cfg, model, lr = run.cfg, run.model, run.cfg.lr
    groups = [{"params": model.fc.parameters(), "lr": lr}]
    if cfg.mode in ("finetune", "distill"):
        groups.append({"params": model.encoder.parameters(), "lr": lr * cfg.encoder_lr_scale})
    # fused: one kernel over every parameter (common.simclr.build_optimizer says why)
    if cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=lr, weight_decay=cfg.weight_decay, fused=True)
    elif cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay, fused=True)
    elif cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    else:
        raise BadInputError(f"unknown optimizer {cfg.optimizer!r}: use adam, adamw or sgd")
    total = cfg.epochs * steps_per_epoch
    schedule = (
        (lambda step: warmup_cosine(step, total, cfg.warmup_epochs * steps_per_epoch))
        if cfg.schedule == "cosine"
        else (lambda step: 1.0)
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def predict(run: ClassifierRun, x: torch.Tensor, train: bool = False, with_teacher: int = 0):
    """Class scores (float32 (B, C)) of a batch: uint8 images (augmented when ``train``) through the network, or
    in linear-probe and knn the batch's embeddings through the linear layer or the train embeddings' weighted
    kNN vote. With ``with_teacher`` n, also the teacher's logits for the batch's first n images, on the same
    augmented views."""
    cfg, device, precision = run.cfg, run.device, run.precision
    if cfg.mode == "knn":
        # weighted kNN vote of the train embeddings (the kNN monitor's classifier)
        return knn_predict(run.train_x, run.train_y, x, len(run.classes), cfg.knn_k)
    if cfg.mode == "linear-probe":
        return run.model.fc(x.to(device))
    x = x.to(device, non_blocking=True)
    x = run.augment(x, cfg.image_size, run.aug_gen) if train else eval_transform(x, cfg.image_size)
    x = precision.layout(x)
    with precision.autocast(device):
        logits = (run.train_model if train else run.model)(x).float()
        if not with_teacher:
            return logits
        with torch.no_grad():
            return logits, run.teacher(x[:with_teacher]).float()


def batch_loss(run: ClassifierRun, plan: StepPlan, x: torch.Tensor, y: torch.Tensor):
    """``(logits, targets, loss)`` of one training batch: cross-entropy with label smoothing, of the margin
    logits (:func:`~facessl.common.losses.margin_logits`) under ``--loss cosface|arcface``; in distill, the
    distillation loss of the unlabelled batch ``x`` plus ``distill_label_weight`` times the cross-entropy of the
    next labelled batch (whose logits and targets are returned); with weight 0, the distillation loss alone, with
    the unlabelled batch's logits and the teacher's top classes as targets."""
    cfg = run.cfg
    if run.teacher is not None and plan.labelled_batches is None:
        # distillation alone (--distill-label-weight 0): the train top-1 is the agreement with the teacher
        logits, soft = predict(run, x, train=True, with_teacher=len(x))
        return logits, soft.argmax(1), distillation_loss(logits, soft, cfg.distill_temperature)
    if plan.labelled_batches is None:
        logits = predict(run, x, train=True)
        target = y.to(run.device)
        trained = logits
        if cfg.loss != "cross-entropy":
            margin = MARGIN_LOSSES[cfg.loss] if cfg.margin is None else cfg.margin
            trained = margin_logits(logits, target, cfg.scale, margin, cfg.loss)
        return logits, target, F.cross_entropy(trained, target, label_smoothing=cfg.label_smoothing)
    # x: unlabelled images (y is all zeros, unused); the labelled batch goes through with them
    lx, y = next(plan.labelled_batches)
    both, soft = predict(run, torch.cat([x, lx.to(x.device)]), train=True, with_teacher=len(x))
    logits, target = both[len(x) :], y.to(run.device)
    loss = distillation_loss(
        both[: len(x)], soft, cfg.distill_temperature
    ) + cfg.distill_label_weight * F.cross_entropy(logits, target, label_smoothing=cfg.label_smoothing)
    return logits, target, loss


def train_one_epoch(run: ClassifierRun, plan: StepPlan, epoch: int, stop: StopRequest) -> dict:
    """Train 0-based ``epoch``; returns its ``train_loss`` and ``train_top1`` (over all ranks).

    Raises:
        DivergedError: the loss became NaN/inf. PreemptedError: SIGTERM (train-classifier keeps no checkpoint).
    """
    run.model.train()
    if run.cfg.mode == "linear-probe":
        run.model.encoder.eval()
    correct, seen, loss_sum = 0, 0, 0.0
    batches = plan.step_pool.batches(
        epoch_generator(run.cfg.seed, epoch, run.rank), plan.per_rank, plan.steps_per_epoch, weights=plan.sample_weights
    )
    for x, y in batches:
        logits, target, loss = batch_loss(run, plan, x, y)
        value = optimizer_step(loss, plan.optimizer, plan.scheduler, f"epoch {epoch + 1}", "lower --lr")
        # minutes of work: no checkpoint, the retry starts over
        if stop_requested(stop):
            raise PreemptedError(
                f"stopped by SIGTERM at epoch {epoch + 1}; train-classifier keeps no checkpoint: "
                "run it again to start over"
            )
        # a tensor on the device until the epoch ends
        correct += (logits.argmax(1) == target).sum()
        seen += len(target)
        loss_sum += value * len(target)
    correct = int(correct)
    if run.distributed:
        correct, seen, loss_sum = (mean_across_ranks(v) * run.world for v in (correct, seen, loss_sum))
    return {"train_loss": loss_sum / seen, "train_top1": correct / seen}


def evaluate(run: ClassifierRun, split: str) -> torch.Tensor:
    """Class scores (float32 (N, C), CPU) of the ``val`` or ``test`` split, in eval mode, 256 images at a time."""
    run.model.eval()
    with torch.no_grad():
        return torch.cat([predict(run, x).float().cpu() for x in run.evals[split][0].split(256)])


def fit(run: ClassifierRun, plan: StepPlan, stop: StopRequest) -> tuple[int, float]:
    """Train every epoch, record and log it; score the val split every ``val_every`` epochs and after the last,
    keep the weights of the best scored epoch by val top-1 (then val loss) and load them at the end. Returns
    ``(best epoch, 1-based; start time)``.

    Raises:
        DivergedError: a NaN/inf train or val loss. PreemptedError: SIGTERM.
    """
    cfg, labels = run.cfg, run.evals["val"][1]
    best, best_key, started = {"epoch": None, "state": run.model.state_dict()}, None, time.time()
    for epoch in range(cfg.epochs):
        record = {"epoch": epoch + 1, **train_one_epoch(run, plan, epoch, stop)}
        scored = (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs
        if scored:
            val_logits = evaluate(run, "val")
            val_acc = topk_accuracy(val_logits, labels, (1, 3))
            val_loss = F.cross_entropy(val_logits, labels).item()
            # e.g. weights that overflow in eval mode: no metrics worth writing
            if not math.isfinite(val_loss):
                raise DivergedError(f"val loss became {val_loss} at epoch {epoch + 1}; lower --lr or check the weights")
            record.update(val_loss=val_loss, val_top1=val_acc[1], val_top3=val_acc[3])
            key = (val_acc[1], -val_loss)
        record["lr"] = last_step_lr(plan.scheduler, epoch, plan.steps_per_epoch)
        record["elapsed_s"] = round(time.time() - started, 1)
        if run.info.is_main:
            run.writer.log_epoch(record)
        run.log(format_record(record))
        if scored and (best_key is None or key > best_key):
            best_key, best = key, {"epoch": epoch + 1, "state": copy.deepcopy(run.model.state_dict())}
    run.model.load_state_dict(best["state"])
    return best["epoch"], started


def knn_classify(run: ClassifierRun) -> dict:
    """``--mode knn``: no training. The frozen encoder embeds the train, val and test images once; each val and
    test image is classified by the weighted vote of its ``knn_k`` nearest train embeddings (Wu et al. 2018,
    arXiv:1805.01978). Returns the metrics (nothing to save: the classifier is the encoder plus the train split).

    Raises:
        BadInputError: no train image to vote.
    """
    embed_splits(run)
    # the same refusal of an empty train split as the modes that train
    plan_steps(run)
    return finish(run, None, time.time())


def finish(run: ClassifierRun, best_epoch: int | None, started: float) -> dict:
    """Evaluate the selected weights on test and val, write the results; returns the metrics."""
    labels = {s: y for s, (_, y) in run.evals.items()}
    test = classification_summary(evaluate(run, "test"), labels["test"], run.classes)
    val = classification_summary(evaluate(run, "val"), labels["val"], run.classes)
    metrics = {
        "test": {k: test[k] for k in ("top1", "top3", "macro_f1", "n")},
        "val": {k: val[k] for k in ("top1", "top3", "macro_f1", "n")},
        "best_epoch": best_epoch,
        "mode": run.cfg.mode,
        "precision": run.precision.name,
        "weights": run.source,
        "train_images": run.n_train,
        "classes": run.classes,
        "per_class": test["per_class"],
        "confusion_matrix": test["confusion_matrix"],
        "seconds": round(time.time() - started, 1),
    }
    if run.info.is_main:
        write_results(run, metrics, test)
    barrier()
    return metrics


def val_whitening(run: ClassifierRun) -> dict | None:
    """The within-class whitening (common.gallery.fit_whitening) of the val split's embeddings by the trained
    backbone, flip-averaged and unit as enroll embeds them, for enroll's ``whitened`` representation. None
    (logged) when the mode keeps no val images (linear-probe, knn hold embeddings) or the val split has fewer
    than two identities with two images."""
    from facessl.common.gallery import Embedder, fit_whitening

    if run.cfg.mode not in ("finetune", "distill"):
        return None
    images, labels = run.evals["val"]
    info = {"dim": FEATURE_DIM, "location": run.out.uri}
    embedder = Embedder(run.model.encoder, run.cfg.image_size, True, run.device, info)
    try:
        whitening = fit_whitening(embedder(images), labels)
    except ValueError as exc:
        run.log(f"no whitening saved with model.pt: {exc} in the val split")
        return None
    run.log(f"whitening fitted on {whitening['images']} val images of {whitening['identities']} identities")
    whitening["split"] = "val"
    return whitening


def predictions_csv(targets: torch.Tensor, predicted: list[int], classes: list[str]) -> str:
    """``test_predictions.csv``: a header, then ``index,true,predicted,correct`` for each test image (index: its
    position in the split, in the manifest's shard order; true and predicted: identity names; correct: 1 or
    0 for top-1)."""
    text = io.StringIO()
    rows = csv.writer(text, lineterminator="\n")
    rows.writerow(["index", "true", "predicted", "correct"])
    for i, (t, p) in enumerate(zip(targets.tolist(), predicted)):
        rows.writerow([i, classes[t], classes[p], int(t == p)])
    return text.getvalue()


def write_results(run: ClassifierRun, metrics: dict, test: dict) -> None:
    """``model.pt`` (not for knn: a kNN classifier is the encoder plus the train embeddings), ``metrics.json``,
    the test split's classification report, per-image predictions and confusion matrix, and the training
    curves. ``model.pt`` holds the val split's whitening (:func:`val_whitening`) when there is one."""
    cfg, classes, writer = run.cfg, run.classes, run.writer
    if cfg.mode != "knn":
        whitening = val_whitening(run)
        save_torch(
            run.out,
            "model.pt",
            {
                "model": {k: v.cpu() for k, v in run.model.state_dict().items()},
                "classes": classes,
                "image_size": cfg.image_size,
                "head": run.model.head,
                **({"scale": cfg.scale} if run.model.head == "cosine" else {}),
                **({"whitening": whitening} if whitening else {}),
            },
        )
    writer.write_json("metrics.json", metrics)
    run.out.write_text("classification_report.txt", test["report_text"])
    run.out.write_text("test_predictions.csv", predictions_csv(run.evals["test"][1], test["predicted"], classes))
    writer.write_plot(
        "confusion_matrix.png",
        lambda p: plot_confusion_matrix(
            test["confusion_matrix"], classes, p, f"test confusion matrix (top-1 {test['top1']:.3f})"
        ),
    )
    if writer.history:
        writer.write_plot(
            "training_curves.png",
            lambda p: plot_curves(
                writer.history, ["train_top1", "val_top1", "val_top3"], p, f"train-classifier ({cfg.mode})"
            ),
        )
