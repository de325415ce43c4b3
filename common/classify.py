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
``classification_report.txt``, ``confusion_matrix.png``, ``training_curves.png``, ``config.json``.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from facessl.common.augment import BatchAugment, eval_transform, supervised_preset
from facessl.common.checkpoints import load_torch, save_torch
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
from facessl.common.metrics import classification_summary, plot_confusion_matrix, plot_curves, topk_accuracy
from facessl.common.models import Classifier, build_encoder, load_encoder_weights
from facessl.common.pool import MemoryPool, epoch_generator, rank_share
from facessl.common.storage import claim_output, join_location, location_within, open_storage
from facessl.common.training import (
    Precision,
    RunWriter,
    StopRequest,
    embed,
    knn_predict,
    last_step_lr,
    pick_device,
    resolve_precision,
    seed_everything,
    stop_requested,
    warmup_cosine,
)


@dataclass
class ClassifierConfig:
    """Options of train-classifier (written to ``config.json``)."""

    mode: str = "finetune"
    encoder: str | None = None
    init: str = "scratch"
    epochs: int = 10
    batch_size: int = 64
    image_size: int = 112
    optimizer: str = "adam"
    lr: float = 3e-4
    weight_decay: float = 8e-4
    encoder_lr_scale: float = 1.0
    warmup_epochs: int = 0
    schedule: str = "cosine"
    label_smoothing: float = 0.0
    labels_per_class: int | None = None
    knn_k: int = 20
    teacher: str | None = None
    distill_temperature: float = 1.0
    distill_label_weight: float = 1.0
    seed: int = 1337
    device: str = "auto"
    precision: str = "auto"


# what a run writes besides config.json; a rerun into the same folder deletes them all first
RESULTS = (
    "metrics.json",
    "model.pt",
    "metrics.jsonl",
    "classification_report.txt",
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


def load_teacher(
    location: str, classes: list[str], image_size: int, device: torch.device, precision: Precision | None = None
) -> torch.nn.Module:
    """A fine-tuned train-classifier model (``model.pt`` or its run location) for distillation, in eval
    mode on ``device`` with frozen weights, in ``precision``'s layout (None: ``auto`` for the device).

    Raises:
        BadInputError: not a train-classifier model, or trained on other identities than ``classes``.
        UsageError: trained at another image size than ``image_size``.
    """
    from facessl.common.identify import load_classifier

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


def load_encoder(location: str, run_location: bool = True) -> tuple[torch.nn.Module, str]:
    """A ResNet18 backbone from a weights file (``encoder.pt``, a classifier ``model.pt``, torchvision's
    ImageNet file) or, with ``run_location``, a pretrain-simclr run location holding ``encoder.pt``; returns
    it and the file it came from. A train-classifier run location (``model.pt``, no ``encoder.pt``) gives its
    fine-tuned backbone.

    Raises:
        BadInputError: not ResNet18 backbone weights, or a run location holding neither file.
    """
    encoder = build_encoder()
    if run_location and _is_run_location(location):
        run = open_storage(location)
        name = next((n for n in ("encoder.pt", "model.pt") if run.exists(n)), None)
        if name is None:
            raise BadInputError(
                f"{location} holds neither encoder.pt (a pretrain-simclr run) nor model.pt (a train-classifier run)"
            )
        location = join_location(location, name)
    try:
        load_encoder_weights(encoder, load_torch(location), location)
    except ValueError as exc:
        raise BadInputError(str(exc)) from None
    return encoder, location


def _is_run_location(location: str) -> bool:
    """A folder / prefix holding ``encoder.pt`` rather than a weights file itself."""
    import os

    if location.startswith("s3://"):
        return not location.rstrip("/").endswith((".pt", ".pth"))
    return os.path.isdir(location)


def _optimizer(cfg: ClassifierConfig, model: Classifier, lr: float):
    groups = [{"params": model.fc.parameters(), "lr": lr}]
    if cfg.mode in ("finetune", "distill"):
        groups.append({"params": model.encoder.parameters(), "lr": lr * cfg.encoder_lr_scale})
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    raise BadInputError(f"unknown optimizer {cfg.optimizer!r}: use adam, adamw or sgd")


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
    precision = resolve_precision(cfg.precision, device)
    stop = StopRequest()
    try:
        return _train_classifier(
            data_location,
            output_location,
            cfg,
            info,
            device,
            precision,
            stop,
            log if info.is_main else (lambda *a, **k: None),
        )
    finally:
        stop.restore()
        cleanup()


def _train_classifier(data_location, output_location, cfg, info, device, precision, stop, log) -> dict:
    if cfg.encoder and cfg.init != "scratch":
        raise UsageError("give either --encoder (a SimCLR encoder) or --init (other weights), not both")
    if cfg.mode not in ("finetune", "linear-probe", "knn", "distill"):
        raise BadInputError(f"unknown mode {cfg.mode!r}: use finetune, linear-probe, knn or distill")
    if (cfg.mode == "distill") != bool(cfg.teacher):
        raise UsageError(
            "--mode distill needs --teacher (a fine-tuned train-classifier model.pt), and --teacher "
            "needs --mode distill"
        )
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
    # distill: this rank's share of every train image, its labels replaced by zeros
    unlabelled = None
    # each rank decodes its shards only
    if distributed and not cfg.labels_per_class and cfg.mode != "distill":
        train_x, train_y = data.decode(rank_share(data, ["train"], rank, world))
        n_train = sum(data.shard_sizes("train"))
    # the labelled subset is drawn from the whole split, identically on every rank
    else:
        train_x, train_y = data.load("train")
        if cfg.mode == "distill":
            images = train_x[rank::world]
            unlabelled = MemoryPool(images, torch.zeros(len(images), dtype=torch.long))
        if cfg.labels_per_class:
            keep = subsample_per_class(train_y, cfg.labels_per_class, cfg.seed)
            train_x, train_y = train_x[keep], train_y[keep]
        n_train = len(train_y)
        train_x, train_y = train_x[rank::world], train_y[rank::world]
    seed_everything(cfg.seed)
    encoder, source = initial_encoder(cfg)
    teacher = load_teacher(cfg.teacher, classes, cfg.image_size, device, precision) if cfg.mode == "distill" else None
    model = Classifier(encoder, len(classes))
    if distributed:
        model = sync_batchnorm(model, device)
    model = precision.layout(model.to(device))
    writer = RunWriter(out)
    if info.is_main:
        # a rerun replaces the run: an interrupted one (or a knn one) leaves no old results
        for key in RESULTS:
            out.delete(key)
        writer.write_json(
            "config.json",
            {
                **asdict(cfg),
                "data": data_location,
                "output": out.uri,
                "weights": source,
                "train_images": n_train,
                "classes": classes,
                "device": str(device),
                "precision_used": precision.name,
                "precision_reason": precision.reason,
                "world_size": info.world_size,
                "unlabelled_images": len(unlabelled) * world if unlabelled is not None else 0,
                "torch": torch.__version__,
            },
        )
    log(precision.describe())
    log(
        f"{cfg.mode} from {source}: {n_train} labelled train images, {len(classes)} classes, {device}"
        + (f"; distilling {cfg.teacher} on {len(unlabelled) * world} train images" if unlabelled is not None else "")
    )

    # the frozen encoder's embeddings, computed once
    if cfg.mode in ("linear-probe", "knn"):
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        train_x = embed(model.encoder, train_x, cfg.image_size, device, precision=precision)
        evals = {
            s: (embed(model.encoder, x, cfg.image_size, device, precision=precision), y) for s, (x, y) in evals.items()
        }

        def run(x, train=False):
            # weighted kNN vote of the train embeddings (the kNN monitor's classifier)
            if cfg.mode == "knn":
                return knn_predict(train_x, train_y, x, len(classes), cfg.knn_k)
            return model.fc(x.to(device))
    else:
        augment = BatchAugment(supervised_preset())
        aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        train_model = model
        if distributed:
            train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )

        def run(x, train=False, with_teacher=0):
            """Logits (float32) of the model for a uint8 batch; with ``with_teacher`` n, also the teacher's
            for the batch's first n images, on the same augmented views."""
            x = x.to(device, non_blocking=True)
            x = augment(x, cfg.image_size, aug_gen) if train else eval_transform(x, cfg.image_size)
            x = precision.layout(x)
            with precision.autocast(device):
                logits = (train_model if train else model)(x).float()
                if not with_teacher:
                    return logits
                with torch.no_grad():
                    return logits, teacher(x[:with_teacher]).float()

    train_pool = MemoryPool(train_x, train_y)
    # an epoch is one pass over this pool
    step_pool = train_pool if unlabelled is None else unlabelled

    n_step = n_train if unlabelled is None else len(unlabelled) * world
    batch = max(1, min(cfg.batch_size, n_step)) // world * world
    per_rank = batch // world
    labelled_batches = None
    # the labelled subset, reshuffled whenever it runs out, beside every distillation batch
    if unlabelled is not None:
        labelled_per_rank = max(1, min(per_rank, len(train_pool)))
        labelled_batches = endless_batches(train_pool, labelled_per_rank, cfg.seed + 7919, rank)
    if distributed:
        # same steps on every rank
        steps_per_epoch = min_across_ranks(len(step_pool) // max(1, per_rank))
    # every sample each epoch; a last batch of one is dropped (batch norm cannot train on one sample)
    else:
        steps_per_epoch = -(-n_step // batch) - (n_step % batch == 1 and n_step > batch)
    if batch < world or steps_per_epoch < 1:
        raise BadInputError(f"{n_step} training images cannot feed {world} processes")
    if cfg.mode in ("finetune", "distill") and n_train < 2:
        raise BadInputError(f"{n_train} labelled training image: fine-tuning needs at least 2 (batch norm)")
    lr = cfg.lr
    optimizer = _optimizer(cfg, model, lr)
    total = cfg.epochs * steps_per_epoch
    schedule = (
        (lambda step: warmup_cosine(step, total, cfg.warmup_epochs * steps_per_epoch))
        if cfg.schedule == "cosine"
        else (lambda step: 1.0)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    labels = {s: y for s, (_, y) in evals.items()}

    def evaluate(split):
        model.eval()
        with torch.no_grad():
            return torch.cat([run(x).float().cpu() for x in evals[split][0].split(256)])

    best, best_key, started = {"epoch": None, "state": model.state_dict()}, None, time.time()
    for epoch in range(cfg.epochs if cfg.mode != "knn" else 0):
        model.train()
        if cfg.mode == "linear-probe":
            model.encoder.eval()
        correct, seen, loss_sum = 0, 0, 0.0
        for x, y in step_pool.batches(epoch_generator(cfg.seed, epoch, rank), per_rank, steps_per_epoch):
            if labelled_batches is None:
                logits = run(x, train=True)
                target = y.to(device)
                loss = F.cross_entropy(logits, target, label_smoothing=cfg.label_smoothing)
            # x: unlabelled images (y is all zeros, unused); the labelled batch goes through with them
            else:
                lx, y = next(labelled_batches)
                both, soft = run(torch.cat([x, lx.to(x.device)]), train=True, with_teacher=len(x))
                logits, target = both[len(x) :], y.to(device)
                loss = distillation_loss(
                    both[: len(x)], soft, cfg.distill_temperature
                ) + cfg.distill_label_weight * F.cross_entropy(logits, target, label_smoothing=cfg.label_smoothing)
            # the step's one wait for the GPU: a NaN/inf never reaches the weights
            value = loss.item()
            if not math.isfinite(value):
                raise DivergedError(f"loss became {value} at epoch {epoch + 1}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            # minutes of work: no checkpoint, the retry starts over
            if stop_requested(stop):
                raise PreemptedError(
                    f"stopped by SIGTERM at epoch {epoch + 1}; train-classifier keeps no checkpoint: "
                    "run it again to start over"
                )
            # a tensor on the device until the epoch ends
            correct += (logits.argmax(1) == target).sum()
            seen += len(y)
            loss_sum += value * len(y)
        correct = int(correct)
        if distributed:
            correct, seen, loss_sum = (mean_across_ranks(v) * world for v in (correct, seen, loss_sum))
        val_logits = evaluate("val")
        val_acc = topk_accuracy(val_logits, labels["val"], (1, 3))
        val_loss = F.cross_entropy(val_logits, labels["val"]).item()
        # e.g. weights that overflow in eval mode: no metrics worth writing
        if not math.isfinite(val_loss):
            raise DivergedError(f"val loss became {val_loss} at epoch {epoch + 1}; lower --lr or check the weights")
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_top1": correct / seen,
            "val_loss": val_loss,
            "val_top1": val_acc[1],
            "val_top3": val_acc[3],
            "lr": last_step_lr(scheduler, epoch, steps_per_epoch),
            "elapsed_s": round(time.time() - started, 1),
        }
        if info.is_main:
            writer.log_epoch(record)
        log("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        key = (val_acc[1], -val_loss)
        if best_key is None or key > best_key:
            best_key, best = key, {"epoch": epoch + 1, "state": copy.deepcopy(model.state_dict())}

    model.load_state_dict(best["state"])
    test = classification_summary(evaluate("test"), labels["test"], classes)
    val = classification_summary(evaluate("val"), labels["val"], classes)
    metrics = {
        "test": {k: test[k] for k in ("top1", "top3", "macro_f1", "n")},
        "val": {k: val[k] for k in ("top1", "top3", "macro_f1", "n")},
        "best_epoch": best["epoch"],
        "mode": cfg.mode,
        "precision": precision.name,
        "weights": source,
        "train_images": n_train,
        "classes": classes,
        "per_class": test["per_class"],
        "confusion_matrix": test["confusion_matrix"],
        "seconds": round(time.time() - started, 1),
    }
    if info.is_main:
        # a kNN classifier is the encoder plus the train embeddings: nothing to save
        if cfg.mode != "knn":
            save_torch(
                out,
                "model.pt",
                {
                    "model": {k: v.cpu() for k, v in model.state_dict().items()},
                    "classes": classes,
                    "image_size": cfg.image_size,
                },
            )
        writer.write_json("metrics.json", metrics)
        out.write_text("classification_report.txt", test["report_text"])
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
    barrier()
    return metrics
