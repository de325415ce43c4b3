"""pretrain-simclr: SimCLR pretraining of a ResNet18 encoder on unlabelled face crops.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020,
arXiv:2002.05709. Every image of a batch is augmented twice, independently (common.augment); both views
go through encoder + projection head; NT-Xent (common.losses) pulls the two views of an image together
and pushes the other 2N-2 views away. Labels are never used for training: the val split's labels feed
only the kNN monitor, a report of how well the representation separates identities.

Reading order: :func:`pretrain` sets a run up (:func:`open_output`, :func:`open_pretraining_data`,
:func:`build_run`), continues a checkpoint when there is one (:func:`resume`), then repeats
:func:`train_one_epoch` and :func:`evaluate` and ends with :func:`finish` (:func:`write_results`).

Outputs under the run's location: ``encoder.pt`` (backbone state_dict), ``config.json``,
``metrics.jsonl`` (one record per epoch), ``loss_curve.png``, ``summary.json`` and ``checkpoints/``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from facessl.common.augment import BatchAugment, simclr_preset
from facessl.common.checkpoints import (
    LATEST,
    ResumePoint,
    capture_rng_states,
    load_latest_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    save_torch,
)
from facessl.common.config import PretrainConfig
from facessl.common.data import UNLABELED, PreparedDataset, refuse_output_inside
from facessl.common.distributed import (
    barrier,
    cleanup,
    init_distributed,
    mean_across_ranks,
    min_across_ranks,
    sync_batchnorm,
)
from facessl.common.errors import BadInputError, DivergedError, PreemptedError, UsageError
from facessl.common.losses import DCLLoss, NTXentLoss
from facessl.common.metrics import plot_curves, topk_accuracy
from facessl.common.models import ProjectionHead, SimCLRModel, build_encoder
from facessl.common.pool import epoch_generator, open_pool
from facessl.common.storage import Storage, claim_output, location_within, open_storage
from facessl.common.training import (
    RunWriter,
    StopRequest,
    Throughput,
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
from facessl.common.weights import load_init_encoder

# importable from here as before common.config and common.weights held them
__all__ = ["PretrainConfig", "load_init_encoder", "pretrain", "simclr_loss"]

RESULTS = ("encoder.pt", "projection_head.pt", "summary.json", "loss_curve.png", "knn_monitor.png")

# options a resumed run may change: they alter how it runs or reports, not what it trains
RESUMABLE_CHANGES = {
    "device",
    "log_every",
    "checkpoint_every",
    "knn_every",
    "resume",
    "compile",
    "precision",
    "data_mode",
    "shuffle_window",
}


@dataclass
class PretrainRun(TrainingRun):
    """What one pretraining run holds between its steps: the options, where it runs and writes, the data
    (this rank's ``pool``, the kNN monitor's ``val`` split), the batch plan and the network with its optimizer,
    schedule, loss and augmentation. ``forward`` is the model as trained (DDP-wrapped and/or compiled)."""

    cfg: PretrainConfig
    data: PreparedDataset
    pool: object
    data_mode: str
    counts: dict
    images: int
    val: tuple
    batch: int
    per_rank: int
    steps_per_epoch: int
    model: SimCLRModel
    forward: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss_fn: NTXentLoss
    augment: BatchAugment
    aug_gen: torch.Generator
    options: dict
    order_kind: str


def pretrain(data_location: str, output_location: str, cfg: PretrainConfig, log=print) -> dict:
    """Run SimCLR pretraining (one process, or every rank under torchrun); returns the summary
    written to ``summary.json``.

    Raises:
        UsageError: ``--init`` inside ``--output``, or a resumed run with options that change what it trains.
        BadInputError: unusable dataset, init weights or checkpoint. DivergedError: the loss became NaN/inf.
        PreemptedError: SIGTERM arrived; a checkpoint was written first (rerun to resume).
    """
    info, device = init_distributed(pick_device(cfg.device))
    stop = StopRequest()
    # rank 0 reports for all
    log = log if info.is_main else silent
    try:
        precision = resolve_precision(cfg.precision, device)
        out = open_output(data_location, output_location, cfg)
        state = load_latest_checkpoint(out) if cfg.resume == "auto" else None
        run = build_run(data_location, out, cfg, info, device, precision, state is None, log)
        start = ResumePoint(0, 0, [], [], False)
        if state is not None:
            start = resume(run, state)
            if state.get("finished"):
                return state.get("summary", {})
        start_writing(run, data_location, fresh=state is None)
        started, views = time.time(), None
        for epoch in range(start.epoch, cfg.epochs):
            resumed = epoch == start.epoch
            losses, first = (start.partial_losses, start.step) if resumed else ([], 0)
            record, last_views = train_one_epoch(run, epoch, first, losses, stop, started)
            views = last_views if last_views is not None else views
            evaluate(run, epoch, record)
            if info.is_main:
                run.writer.log_epoch(record)
            log(format_record(record))
            if cfg.checkpoint_every > 0 and (epoch + 1) % cfg.checkpoint_every == 0 and epoch + 1 < cfg.epochs:
                save_run_checkpoint(run, epoch + 1, 0, [])
        return finish(run, started, views)
    finally:
        stop.restore()
        cleanup()


def open_output(data_location: str, output_location: str, cfg: PretrainConfig) -> Storage:
    """The run location, claimed for pretrain-simclr before any work.

    Raises:
        UsageError: the output lies inside the dataset, or ``--init`` inside the output (a new run replaces it).
        BadInputError: the output belongs to another job or cannot be written.
    """
    out = open_storage(output_location)
    refuse_output_inside(data_location, output_location)
    # before any work
    claim_output(out, "pretrain-simclr")
    if cfg.init != "scratch" and location_within(cfg.init, output_location):
        raise UsageError(
            f"--init {cfg.init} lies inside --output {output_location}, whose earlier results a new run "
            "replaces: copy it out first, or use another --output"
        )
    return out


def open_pretraining_data(data_location: str, cfg: PretrainConfig, rank: int, world: int, log=print):
    """This rank's share of the training images (train split, plus the unlabelled pool when asked) as a
    pool (common.pool), and for the kNN monitor on rank 0 the labelled val split.

    Returns ``(dataset, pool, resolved data mode, per-split counts of the share, total images of all
    ranks, (val uint8 (N, 3, S, S), val labels (N,)) or (None, None))``.
    """
    data = PreparedDataset(data_location, cfg.image_size)
    splits = ["train"]
    if cfg.use_unlabeled:
        if data.has(UNLABELED):
            splits.append(UNLABELED)
        else:
            log("no unlabeled pool in this dataset (prepare-data --unlabeled-pool): using the train split only")
    pool, mode, counts = open_pool(data, splits, rank, world, cfg.data_mode, cfg.shuffle_window)
    total = sum(sum(data.shard_sizes(s)) for s in splits)
    monitor = rank == 0 and cfg.knn_every > 0 and data.has("val")
    val = data.load("val") if monitor else (None, None)
    return data, pool, mode, counts, total, val


def plan_batches(images: int, pool_size: int, batch_size: int, world: int) -> tuple[int, int, int]:
    """``(global batch, per-rank batch, steps per epoch)``: the batch capped at the dataset and divisible by the
    process count; every rank takes the same number of steps.

    Raises:
        BadInputError: fewer than 2 images, or not a batch share for every process.
    """
    batch = max(1, min(batch_size, images)) // world * world
    per_rank = batch // world
    # every rank takes the same steps
    steps_per_epoch = min_across_ranks(pool_size // max(1, per_rank))
    if batch < world or images < 2 or steps_per_epoch < 1:
        raise BadInputError(
            f"SimCLR needs at least 2 images and a batch share for each process; the dataset has "
            f"{images} images for {world} process(es), this one {pool_size}"
        )
    return batch, per_rank, steps_per_epoch


def build_optimizer(params, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter, arXiv:1711.05101) or SGD with Nesterov momentum 0.9.

    AdamW is torch's fused implementation (CPU and CUDA): one kernel over every parameter instead of a dozen
    element-wise passes per tensor, the same update. On a 2-core Zen 3 it took a 24 px SimCLR step (batch 128,
    fp32) from 373 to 335 ms.

    Raises:
        BadInputError: another optimizer name.
    """
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise BadInputError(f"unknown optimizer {name!r}: use adamw or sgd")


def build_run(data_location, out, cfg, info, device, precision, fresh: bool, log) -> PretrainRun:
    """Open the data, plan the batches, seed, and build the network (``--init`` weights when ``fresh``, else
    random ones the checkpoint replaces), its optimizer, warm-up + cosine schedule (per step), NT-Xent and the
    augmentation with its generator.

    Raises:
        BadInputError: unusable dataset or init weights, too few images for the processes.
    """
    data, pool, data_mode, counts, n, val = open_pretraining_data(data_location, cfg, info.rank, info.world_size, log)
    batch, per_rank, steps_per_epoch = plan_batches(n, len(pool), cfg.batch_size, info.world_size)
    if device.type == "cuda" and data_mode == "memory" and pool.nbytes < 0.5 * torch.cuda.mem_get_info(device)[0]:
        # uint8 crops live on the GPU: a step then never waits for host copies
        pool = pool.to(device)
    seed_everything(cfg.seed)
    writer = RunWriter(out)
    # (resumed: the checkpoint's)
    encoder = load_init_encoder(cfg.init) if fresh else build_encoder()
    model = SimCLRModel(encoder, ProjectionHead(512, cfg.proj_hidden_dim, cfg.proj_dim))
    if info.enabled:
        model = sync_batchnorm(model, device)
    model = precision.layout(model.to(device))
    lr = cfg.lr * batch / 256
    optimizer = build_optimizer(model.parameters(), cfg.optimizer, lr, cfg.weight_decay)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, cfg.warmup_epochs * steps_per_epoch)
    )
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1 + 1000 * info.rank)
    forward = model
    if info.enabled:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        forward = torch.compile(forward)
    options = {
        **asdict(cfg),
        "world_size": info.world_size,
        # the location as storage spells it,
        "data": data.storage.uri,
        "dataset_id": data.manifest.get("dataset_id"),
        # and what is there (other crops change it)
    }
    return PretrainRun(
        cfg=cfg,
        info=info,
        device=device,
        precision=precision,
        log=log,
        out=out,
        writer=writer,
        data=data,
        pool=pool,
        data_mode=data_mode,
        counts=counts,
        images=n,
        val=val,
        batch=batch,
        per_rank=per_rank,
        steps_per_epoch=steps_per_epoch,
        model=model,
        forward=forward,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=(DCLLoss if cfg.loss == "dcl" else NTXentLoss)(cfg.temperature, gather_distributed=True),
        augment=BatchAugment(simclr_preset(cfg.jitter_strength, cfg.crop_min, cfg.blur_p)),
        aug_gen=aug_gen,
        options=options,
        # memory and mmap share one order
        order_kind="shuffle-buffer" if data_mode == "stream" else "permutation",
    )


def resume(run: PretrainRun, state: dict) -> ResumePoint:
    """Continue the run of ``state`` (the output's latest checkpoint): same options, its weights, optimizer,
    schedule, RNG and history restored. A finished run only writes its results again.

    Raises:
        UsageError: the checkpoint's run had options that change what is trained.
        BadInputError: the checkpoint is damaged.
    """
    cfg, device, log = run.cfg, run.device, run.log
    check_same_options(state.get("options", {}), run.options, run.out.uri)
    where = run.out.url(LATEST)
    start = restore_checkpoint(
        state,
        where,
        run.model,
        run.optimizer,
        run.scheduler,
        run.aug_gen,
        same_aug_stream=run.info.world_size == 1 and state.get("aug_rng_device", device.type) == device.type,
        reseed_key=(cfg.seed, run.info.rank),
        max_epoch=cfg.epochs,
    )
    if start.aug_reseeded:
        log(
            f"note: augmentation stream reseeded on resume ({run.info.world_size} process(es), checkpoint from "
            f"{state.get('aug_rng_device', 'the same device kind')}, now {device.type}): the run "
            "continues, not bitwise equal to an uninterrupted one"
        )
    run.writer.history = start.history
    # its results again: encoder.pt may have been deleted or damaged since
    if state.get("finished"):
        if run.info.is_main:
            write_results(run.out, run.writer, run.model, state.get("summary", {}))
        log(
            f"this run already finished ({where}): its encoder.pt, projection_head.pt, summary and plots "
            "written again from its final checkpoint, nothing else to do"
        )
        return start
    log(f"resuming at epoch {start.epoch + 1}, step {start.step} from {where}")
    if start.step and state.get("data_order", run.order_kind) != run.order_kind:
        log(
            f"warning: the checkpoint was taken mid-epoch with {state['data_order']} data order and this run "
            f"uses {run.order_kind} order: the rest of epoch {start.epoch + 1} may repeat or skip some images"
        )
    return start


def start_writing(run: PretrainRun, data_location: str, fresh: bool) -> None:
    """Remove an earlier run's results (written at the end: they would pass for this run's if it stops) and,
    for a ``fresh`` run, its checkpoint pointer; write ``config.json``; log the plan."""
    cfg, out = run.cfg, run.out
    if run.info.is_main:
        for key in RESULTS:
            out.delete(key)
        if fresh:
            # a restart (--resume never): an interrupted one must not resume the earlier run
            out.delete(LATEST)
        run.writer.write_json(
            "config.json",
            {
                **asdict(cfg),
                "data": data_location,
                "crop_margin": run.data.crop_margin,
                "output": out.uri,
                "images": run.images,
                "data_mode": run.data_mode,
                "global_batch_size": run.batch,
                "world_size": run.info.world_size,
                "effective_lr": cfg.lr * run.batch / 256,
                "device": str(run.device),
                "precision_used": run.precision.name,
                "precision_reason": run.precision.reason,
                "torch": torch.__version__,
            },
        )
    run.log(run.precision.describe())
    run.log(
        f"SimCLR on {run.images} images, global batch {run.batch} ({run.info.world_size} process(es)), "
        f"{run.steps_per_epoch} steps/epoch, {cfg.epochs} epochs, {run.device}, data mode {run.data_mode}"
    )


def simclr_loss(forward, view1: torch.Tensor, view2: torch.Tensor, loss_fn: NTXentLoss) -> torch.Tensor:
    """One SimCLR forward: both views (B, 3, S, S) float through encoder + head in one batch (so batch
    norm sees both), NT-Xent on the two halves. Returns the scalar loss (float32)."""
    z = forward(torch.cat([view1, view2]))
    return loss_fn(*z.float().chunk(2))


def train_one_epoch(
    run: PretrainRun, epoch: int, first_step: int, losses: list[float], stop: StopRequest, started: float
) -> tuple[dict, torch.Tensor | None]:
    """Train 0-based ``epoch`` from ``first_step`` (a resumed epoch's ``losses`` continue); returns the epoch's
    record (mean loss, the last step's LR, images/s of both views, elapsed seconds since ``started``) and the
    last batch's first views (None when no step ran).

    Raises:
        DivergedError: the loss became NaN/inf. PreemptedError: SIGTERM; a checkpoint at this step was written.
    """
    cfg, device, precision = run.cfg, run.device, run.precision
    run.model.train()
    meter = Throughput(device)
    views = None
    batches = run.pool.batches(
        epoch_generator(cfg.seed, epoch, run.info.rank), run.per_rank, run.steps_per_epoch, first_step
    )
    for step, (x, _) in enumerate(batches, start=first_step):
        x = x.to(device, non_blocking=True)
        v1, v2 = run.augment(x, cfg.image_size, run.aug_gen), run.augment(x, cfg.image_size, run.aug_gen)
        views = v1
        v1, v2 = precision.layout(v1), precision.layout(v2)
        with precision.autocast(device):
            loss = simclr_loss(run.forward, v1, v2, run.loss_fn)
        value = optimizer_step(
            loss,
            run.optimizer,
            run.scheduler,
            f"epoch {epoch + 1}, step {step + 1}",
            "lower --lr or raise --temperature in a new --output (earlier checkpoints are kept)",
        )
        losses.append(mean_across_ranks(value))
        meter.add(2 * run.batch)
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            run.log(f"epoch {epoch + 1} step {step + 1}/{run.steps_per_epoch} loss {losses[-1]:.4f}")
        if stop_requested(stop):
            save_run_checkpoint(run, epoch, step + 1, losses)
            raise PreemptedError(
                f"stopped by SIGTERM at epoch {epoch + 1}, step {step + 1}; checkpoint written "
                f"to {run.out.url(LATEST)}: run again to resume"
            )
    record = {
        "epoch": epoch + 1,
        "loss": sum(losses) / max(1, len(losses)),
        "lr": last_step_lr(run.scheduler, epoch, run.steps_per_epoch),
        "images_per_s": round(meter.rate(), 1),
        "elapsed_s": round(time.time() - started, 1),
    }
    return record, views


def evaluate(run: PretrainRun, epoch: int, record: dict) -> None:
    """Add the kNN monitor's val top-1 (``knn_top1``) to ``record`` on rank 0 every ``knn_every`` epochs and
    after the last one, when the dataset has a val split."""
    cfg = run.cfg
    due = cfg.knn_every > 0 and ((epoch + 1) % cfg.knn_every == 0 or epoch + 1 == cfg.epochs)
    val_images, val_labels = run.val
    if run.info.is_main and val_images is not None and due:
        record["knn_top1"] = knn_monitor(
            run.model.encoder,
            *run.pool.labelled(run.counts["train"]),
            val_images,
            val_labels,
            len(run.data.classes),
            cfg,
            run.device,
            run.precision,
        )


def knn_monitor(
    encoder, train_images, train_labels, val_images, val_labels, num_classes, cfg, device, precision=None
) -> float:
    """Val top-1 of a weighted kNN classifier on the encoder's train-split embeddings (computed in ``precision``;
    None: ``auto`` for the device)."""
    bank = embed(encoder, train_images, cfg.image_size, device, precision=precision)
    query = embed(encoder, val_images, cfg.image_size, device, precision=precision)
    scores = knn_predict(bank, train_labels, query, num_classes, cfg.knn_k)
    return topk_accuracy(scores, val_labels, (1,))[1]


def save_run_checkpoint(
    run: PretrainRun, epoch: int, step: int, losses: list[float], finished: bool = False, summary=None
) -> None:
    """Checkpoint the run at 0-based ``epoch``, ``step`` (rank 0 writes; every rank waits for it)."""
    if run.info.is_main:
        save_checkpoint(
            run.out,
            {
                "model": run.model.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "aug_rng": run.aug_gen.get_state().cpu(),
                "aug_rng_device": run.device.type,
                "rng": capture_rng_states(),
                "epoch": epoch,
                "step": step,
                "partial_losses": losses,
                "history": list(run.writer.history),
                "finished": finished,
                "summary": summary or {},
                "options": run.options,
                "data_order": run.order_kind,
            },
            epoch,
        )
    barrier()


def finish(run: PretrainRun, started: float, views: torch.Tensor | None) -> dict:
    """Check the last update, write the results and the final checkpoint; returns the summary.

    Raises:
        DivergedError: the encoder gives NaN/inf embeddings after the last step.
    """
    cfg, history = run.cfg, run.writer.history
    summary = {
        "epochs": cfg.epochs,
        "images": run.images,
        "world_size": run.info.world_size,
        "final_loss": history[-1]["loss"] if history else None,
        "knn_top1": next((h["knn_top1"] for h in reversed(history) if "knn_top1" in h), None),
        "precision": run.precision.name,
        "seconds": round(time.time() - started, 1),
    }
    # the loss is checked before each step, the last step's update only here
    if views is not None:
        run.model.eval()
        with torch.no_grad(), run.precision.autocast(run.device):
            finite = bool(torch.isfinite(run.model.encoder(views)).all())
        if not min_across_ranks(int(finite)):
            raise DivergedError(
                "the encoder gives NaN or infinite embeddings after the last step: lower --lr in a "
                "new --output (earlier checkpoints are kept)"
            )
    if run.info.is_main:
        write_results(run.out, run.writer, run.model, summary)
    save_run_checkpoint(run, cfg.epochs, 0, [], finished=True, summary=summary)
    return summary


def write_results(out, writer: RunWriter, model: SimCLRModel, summary: dict) -> None:
    """A finished run's results (:data:`RESULTS`): ``encoder.pt`` (the ResNet18 backbone's state_dict, float32
    CPU tensors), ``projection_head.pt``, the loss and kNN-monitor plots of ``writer.history``, ``summary.json``."""
    save_torch(out, "encoder.pt", {k: v.cpu() for k, v in model.encoder.state_dict().items()})
    save_torch(out, "projection_head.pt", {k: v.cpu() for k, v in model.head.state_dict().items()})
    writer.write_plot("loss_curve.png", lambda p: plot_curves(writer.history, ["loss"], p, "SimCLR contrastive loss"))
    if any("knn_top1" in h for h in writer.history):
        writer.write_plot(
            "knn_monitor.png", lambda p: plot_curves(writer.history, ["knn_top1"], p, "kNN monitor: val top-1")
        )
    writer.write_json("summary.json", summary)


def check_same_options(saved: dict, current: dict, where: str) -> None:
    """Refuse to resume a run with options that change what is trained (a resumed optimizer would
    silently keep the old learning rate, a different head would not load).

    Raises:
        UsageError: an option differs; names each one.
    """
    changed = {
        k: (saved[k], current.get(k)) for k in saved if k not in RESUMABLE_CHANGES and saved[k] != current.get(k)
    }
    if changed:
        detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
        raise UsageError(
            f"{where} holds a run started with other options ({detail}); use a new --output, "
            "or --resume never to start over there"
        )
