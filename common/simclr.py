"""pretrain-simclr: SimCLR pretraining of a ResNet18 encoder on unlabelled face crops.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020,
arXiv:2002.05709. Every image of a batch is augmented twice, independently (common.augment); both views
go through encoder + projection head; NT-Xent (common.losses) pulls the two views of an image together
and pushes the other 2N-2 views away. Labels are never used for training: the val split's labels feed
only the kNN monitor, a report of how well the representation separates identities.

Outputs under the run's location: ``encoder.pt`` (backbone state_dict), ``config.json``,
``metrics.jsonl`` (one record per epoch), ``loss_curve.png``, ``summary.json`` and ``checkpoints/``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from facessl.common.augment import BatchAugment, simclr_preset
from facessl.common.checkpoints import LATEST, load_latest_checkpoint, load_torch, save_checkpoint, save_torch
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
from facessl.common.losses import NTXentLoss
from facessl.common.metrics import plot_curves, topk_accuracy
from facessl.common.models import (
    ProjectionHead,
    SimCLRModel,
    build_encoder,
    check_weight_values,
    load_encoder_weights,
    load_error_summary,
)
from facessl.common.pool import epoch_generator, open_pool
from facessl.common.storage import claim_output, location_within, open_storage
from facessl.common.training import (
    RunWriter,
    StopRequest,
    Throughput,
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
class PretrainConfig:
    """Options of pretrain-simclr (written to ``config.json``); learning rates are per batch of 256."""

    epochs: int = 100
    batch_size: int = 256
    image_size: int = 112
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 5
    temperature: float = 0.2
    proj_hidden_dim: int = 512
    proj_dim: int = 128
    jitter_strength: float = 0.5
    crop_min: float = 0.2
    blur_p: float = 0.5
    use_unlabeled: bool = False
    knn_every: int = 5
    knn_k: int = 20
    init: str = "scratch"
    seed: int = 1337
    device: str = "auto"
    checkpoint_every: int = 1
    resume: str = "auto"
    compile: bool = False
    precision: str = "auto"
    log_every: int = 50
    data_mode: str = "auto"
    shuffle_window: int = 10000


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


def load_init_encoder(init: str) -> torch.nn.Module:
    """A ResNet18 encoder, random (``scratch``) or with the weights of the file at ``init``."""
    encoder = build_encoder()
    if init != "scratch":
        try:
            load_encoder_weights(encoder, load_torch(init), init)
        except ValueError as exc:
            raise BadInputError(str(exc)) from None
    return encoder


def build_optimizer(params, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter, arXiv:1711.05101) or SGD with Nesterov momentum 0.9."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise BadInputError(f"unknown optimizer {name!r}: use adamw or sgd")


def simclr_loss(forward, view1: torch.Tensor, view2: torch.Tensor, loss_fn: NTXentLoss) -> torch.Tensor:
    """One SimCLR forward: both views (B, 3, S, S) float through encoder + head in one batch (so batch
    norm sees both), NT-Xent on the two halves. Returns the scalar loss (float32)."""
    z = forward(torch.cat([view1, view2]))
    return loss_fn(*z.float().chunk(2))


def pretrain(data_location: str, output_location: str, cfg: PretrainConfig, log=print) -> dict:
    """Run SimCLR pretraining (one process, or every rank under torchrun); returns the summary
    written to ``summary.json``.

    Raises:
        BadInputError: unusable dataset or init weights. DivergedError: the loss became NaN/inf.
        PreemptedError: SIGTERM arrived; a checkpoint was written first (rerun to resume).
    """
    info, device = init_distributed(pick_device(cfg.device))
    precision = resolve_precision(cfg.precision, device)
    stop = StopRequest()
    try:
        return _pretrain(
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


def _pretrain(data_location, output_location, cfg, info, device, precision, stop, log) -> dict:
    out = open_storage(output_location)
    refuse_output_inside(data_location, output_location)
    # before any work
    claim_output(out, "pretrain-simclr")
    if cfg.init != "scratch" and location_within(cfg.init, output_location):
        raise UsageError(
            f"--init {cfg.init} lies inside --output {output_location}, whose earlier results a new run "
            "replaces: copy it out first, or use another --output"
        )
    state = load_latest_checkpoint(out) if cfg.resume == "auto" else None
    data, pool, data_mode, counts, n, (val, val_labels) = open_pretraining_data(
        data_location, cfg, info.rank, info.world_size, log
    )
    world = info.world_size
    batch = max(1, min(cfg.batch_size, n)) // world * world
    per_rank = batch // world
    # every rank takes the same steps
    steps_per_epoch = min_across_ranks(len(pool) // max(1, per_rank))
    if batch < world or n < 2 or steps_per_epoch < 1:
        raise BadInputError(
            f"SimCLR needs at least 2 images and a batch share for each process; the dataset has "
            f"{n} images for {world} process(es), this one {len(pool)}"
        )
    if device.type == "cuda" and data_mode == "memory" and pool.nbytes < 0.5 * torch.cuda.mem_get_info(device)[0]:
        # uint8 crops live on the GPU: a step then never waits for host copies
        pool = pool.to(device)
    seed_everything(cfg.seed)
    writer = RunWriter(out)

    # (resumed: the checkpoint's)
    encoder = load_init_encoder(cfg.init) if state is None else build_encoder()
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
    loss_fn = NTXentLoss(cfg.temperature, gather_distributed=True)
    augment = BatchAugment(simclr_preset(cfg.jitter_strength, cfg.crop_min, cfg.blur_p))
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1 + 1000 * info.rank)
    forward = model
    if info.enabled:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        forward = torch.compile(forward)

    start_epoch, start_step, partial = 0, 0, []
    # memory and mmap share one order
    order_kind = "shuffle-buffer" if data_mode == "stream" else "permutation"
    options = {
        **asdict(cfg),
        "world_size": world,
        # the location as storage spells it,
        "data": data.storage.uri,
        "dataset_id": data.manifest.get("dataset_id"),
        # and what is there (other crops change it)
    }
    if state is not None:
        check_same_options(state.get("options", {}), options, out.uri)
        where = out.url(LATEST)
        # every part of the state, so a damaged checkpoint is one clear error, not a traceback mid-setup
        try:
            check_weight_values(state["model"], where)
            # NaN here is NaN weights after one step
            for moments in state["optimizer"]["state"].values():
                check_weight_values(moments, f"{where} (optimizer state)")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            restore_rng_states(state["rng"])
            if world == 1 and state.get("aug_rng_device", device.type) == device.type:
                # the same process and device kind: the run continues bitwise
                aug_gen.set_state(state["aug_rng"])
            # another device kind's generator state does not load; and only rank 0's state was saved
            else:
                aug_gen.manual_seed(hash((cfg.seed, info.rank, int(state["epoch"]), int(state["step"]))) % 2**63)
                log(
                    f"note: augmentation stream reseeded on resume ({world} process(es), checkpoint from "
                    f"{state.get('aug_rng_device', 'the same device kind')}, now {device.type}): the run "
                    "continues, not bitwise equal to an uninterrupted one"
                )
            history, partial = list(state["history"]), [float(x) for x in state["partial_losses"]]
            start_epoch, start_step = state["epoch"], state["step"]
            if not (
                type(start_epoch) is int
                and type(start_step) is int
                and 0 <= start_epoch <= cfg.epochs
                and 0 <= start_step
                and all(isinstance(h, dict) for h in history)
                and all(math.isfinite(x) for x in partial)
            ):
                raise ValueError("its epoch, step, history or partial losses are not what a run writes")
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            detail = f"no {exc}" if isinstance(exc, KeyError) else load_error_summary(exc)
            raise BadInputError(
                f"the checkpoint {where} points at is damaged ({detail}): use --resume never to start over"
            ) from None
        writer.history = history
        # its results again: encoder.pt may have been deleted or damaged since
        if state.get("finished"):
            if info.is_main:
                write_results(out, writer, model, state.get("summary", {}))
            log(
                f"this run already finished ({where}): its encoder.pt, projection_head.pt, summary and plots "
                "written again from its final checkpoint, nothing else to do"
            )
            return state.get("summary", {})
        log(f"resuming at epoch {start_epoch + 1}, step {start_step} from {where}")
        if start_step and state.get("data_order", order_kind) != order_kind:
            log(
                f"warning: the checkpoint was taken mid-epoch with {state['data_order']} data order and this run "
                f"uses {order_kind} order: the rest of epoch {start_epoch + 1} may repeat or skip some images"
            )

    def checkpoint(epoch, step, losses, finished=False, summary=None):
        if info.is_main:
            save_checkpoint(
                out,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "aug_rng": aug_gen.get_state().cpu(),
                    "aug_rng_device": device.type,
                    "rng": capture_rng_states(),
                    "epoch": epoch,
                    "step": step,
                    "partial_losses": losses,
                    "history": list(writer.history),
                    "finished": finished,
                    "summary": summary or {},
                    "options": options,
                    "data_order": order_kind,
                },
                epoch,
            )
        barrier()

    if info.is_main:
        # written at the end: an earlier run's would pass for this one's if it stops
        for key in RESULTS:
            out.delete(key)
        if state is None:
            # a restart (--resume never): an interrupted one must not resume the earlier run
            out.delete(LATEST)
        writer.write_json(
            "config.json",
            {
                **asdict(cfg),
                "data": data_location,
                "output": out.uri,
                "images": n,
                "data_mode": data_mode,
                "global_batch_size": batch,
                "world_size": world,
                "effective_lr": lr,
                "device": str(device),
                "precision_used": precision.name,
                "precision_reason": precision.reason,
                "torch": torch.__version__,
            },
        )
    log(precision.describe())
    log(
        f"SimCLR on {n} images, global batch {batch} ({world} process(es)), {steps_per_epoch} steps/epoch, "
        f"{cfg.epochs} epochs, {device}, data mode {data_mode}"
    )

    started = time.time()
    views = None
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        meter = Throughput(device)
        losses = partial if epoch == start_epoch else []
        first = start_step if epoch == start_epoch else 0
        batches = pool.batches(epoch_generator(cfg.seed, epoch, info.rank), per_rank, steps_per_epoch, first)
        for step, (x, _) in enumerate(batches, start=first):
            x = x.to(device, non_blocking=True)
            v1, v2 = augment(x, cfg.image_size, aug_gen), augment(x, cfg.image_size, aug_gen)
            views = v1
            v1, v2 = precision.layout(v1), precision.layout(v2)
            with precision.autocast(device):
                loss = simclr_loss(forward, v1, v2, loss_fn)
            # the step's one wait for the GPU: a NaN/inf never reaches the weights
            value = loss.item()
            if not math.isfinite(value):
                raise DivergedError(
                    f"loss became {value} at epoch {epoch + 1}, step {step + 1}; lower --lr "
                    "or raise --temperature in a new --output (earlier checkpoints are kept)"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(mean_across_ranks(value))
            meter.add(2 * batch)
            if cfg.log_every and (step + 1) % cfg.log_every == 0:
                log(f"epoch {epoch + 1} step {step + 1}/{steps_per_epoch} loss {losses[-1]:.4f}")
            if stop_requested(stop):
                checkpoint(epoch, step + 1, losses)
                raise PreemptedError(
                    f"stopped by SIGTERM at epoch {epoch + 1}, step {step + 1}; checkpoint written "
                    f"to {out.url(LATEST)}: run again to resume"
                )
        record = {
            "epoch": epoch + 1,
            "loss": sum(losses) / max(1, len(losses)),
            "lr": last_step_lr(scheduler, epoch, steps_per_epoch),
            "images_per_s": round(meter.rate(), 1),
            "elapsed_s": round(time.time() - started, 1),
        }
        last = epoch + 1 == cfg.epochs
        if info.is_main and val is not None and cfg.knn_every > 0 and ((epoch + 1) % cfg.knn_every == 0 or last):
            record["knn_top1"] = knn_monitor(
                model.encoder,
                *pool.labelled(counts["train"]),
                val,
                val_labels,
                len(data.classes),
                cfg,
                device,
                precision,
            )
        if info.is_main:
            writer.log_epoch(record)
        log("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if cfg.checkpoint_every > 0 and (epoch + 1) % cfg.checkpoint_every == 0 and not last:
            checkpoint(epoch + 1, 0, [])

    summary = {
        "epochs": cfg.epochs,
        "images": n,
        "world_size": world,
        "final_loss": writer.history[-1]["loss"] if writer.history else None,
        "knn_top1": next((h["knn_top1"] for h in reversed(writer.history) if "knn_top1" in h), None),
        "precision": precision.name,
        "seconds": round(time.time() - started, 1),
    }
    # the loss is checked before each step, the last step's update only here
    if views is not None:
        model.eval()
        with torch.no_grad(), precision.autocast(device):
            finite = bool(torch.isfinite(model.encoder(views)).all())
        if not min_across_ranks(int(finite)):
            raise DivergedError(
                "the encoder gives NaN or infinite embeddings after the last step: lower --lr in a "
                "new --output (earlier checkpoints are kept)"
            )
    if info.is_main:
        write_results(out, writer, model, summary)
    checkpoint(cfg.epochs, 0, [], finished=True, summary=summary)
    return summary


RESULTS = ("encoder.pt", "projection_head.pt", "summary.json", "loss_curve.png", "knn_monitor.png")


def write_results(out, writer: RunWriter, model: SimCLRModel, summary: dict) -> None:
    """A finished run's results (:data:`RESULTS`): ``encoder.pt`` (the ResNet18 backbone's state_dict, float32
    CPU tensors), ``projection_head.pt``, the loss and kNN-monitor plots of ``writer.history``, ``summary.json``."""
    save_torch(out, "encoder.pt", {k: v.cpu() for k, v in model.encoder.state_dict().items()})
    save_torch(out, "projection_head.pt", {k: v.cpu() for k, v in model.head.state_dict().items()})
    writer.write_plot("loss_curve.png", lambda p: plot_curves(writer.history, ["loss"], p, "SimCLR NT-Xent loss"))
    if any("knn_top1" in h for h in writer.history):
        writer.write_plot(
            "knn_monitor.png", lambda p: plot_curves(writer.history, ["knn_top1"], p, "kNN monitor: val top-1")
        )
    writer.write_json("summary.json", summary)


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


def capture_rng_states() -> dict:
    """Python, NumPy and torch (CPU and CUDA) RNG states as tensors (loadable with weights_only)."""
    import random

    import numpy as np

    py = random.getstate()
    np_state = np.random.get_state()
    states = {
        "python_version": py[0],
        "python": torch.tensor(py[1], dtype=torch.int64),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    import random

    import numpy as np

    random.setstate((states["python_version"], tuple(states["python"].tolist()), None))
    np.random.set_state(("MT19937", states["numpy"].numpy().astype(np.uint32), states["numpy_pos"], 0, 0.0))
    torch.set_rng_state(states["torch"])
    # as many GPUs' states as both runs have
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"][: torch.cuda.device_count()])


def knn_monitor(
    encoder, train_images, train_labels, val_images, val_labels, num_classes, cfg, device, precision=None
) -> float:
    """Val top-1 of a weighted kNN classifier on the encoder's train-split embeddings (computed in ``precision``;
    None: ``auto`` for the device)."""
    bank = embed(encoder, train_images, cfg.image_size, device, precision=precision)
    query = embed(encoder, val_images, cfg.image_size, device, precision=precision)
    scores = knn_predict(bank, train_labels, query, num_classes, cfg.knn_k)
    return topk_accuracy(scores, val_labels, (1,))[1]
