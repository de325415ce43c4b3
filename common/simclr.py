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

import time
from dataclasses import asdict, dataclass

import torch

from common.augment import BatchAugment, simclr_preset
from common.checkpoints import load_latest_checkpoint, load_torch, save_checkpoint, save_torch
from common.data import UNLABELED, default_cache_dir, load_split, read_manifest
from common.errors import BadInputError, DivergedError
from common.losses import NTXentLoss
from common.metrics import plot_curves, topk_accuracy
from common.models import ProjectionHead, SimCLRModel, build_encoder, encoder_state_from_file
from common.storage import open_storage
from common.training import (RunWriter, Throughput, autocast, embed, epoch_batches, knn_predict, pick_device,
                             seed_everything, warmup_cosine)


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


def load_pretraining_images(data_location: str, cfg: PretrainConfig, log=print):
    """Train images (plus the unlabelled pool when asked), and the labelled train/val sets for the
    kNN monitor. Returns (pool uint8 (N,3,S,S), train labels (N_train,), val images, val labels, classes)."""
    storage = open_storage(data_location)
    manifest = read_manifest(storage)
    cache = default_cache_dir(f"{storage.uri}#{manifest.get('dataset_id', '')}")
    size = cfg.image_size if manifest.get("image_size", cfg.image_size) > cfg.image_size else None
    train, train_labels = load_split(storage, "train", cache, size)
    pool = [train]
    if cfg.use_unlabeled:
        if manifest.get("shards", {}).get(UNLABELED):
            pool.append(load_split(storage, UNLABELED, cache, size)[0])
        else:
            log("no unlabeled pool in this dataset (prepare-data --unlabeled-pool): using the train split only")
    val, val_labels = None, None
    if manifest.get("shards", {}).get("val"):
        val, val_labels = load_split(storage, "val", cache, size)
    return torch.cat(pool), train_labels, val, val_labels, manifest["classes"]


def load_init_encoder(init: str) -> torch.nn.Module:
    """A ResNet18 encoder, random (``scratch``) or with the weights of the file at ``init``."""
    encoder = build_encoder()
    if init != "scratch":
        try:
            encoder.load_state_dict(encoder_state_from_file(load_torch(init), init))
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


def pretrain(data_location: str, output_location: str, cfg: PretrainConfig, log=print) -> dict:
    """Run SimCLR pretraining; returns the summary written to ``summary.json``.

    Raises:
        BadInputError: unusable dataset or init weights. DivergedError: the loss became NaN/inf.
    """
    pool, train_labels, val, val_labels, classes = load_pretraining_images(data_location, cfg, log)
    n = pool.shape[0]
    if n < 2:
        raise BadInputError(f"SimCLR needs at least 2 images, the dataset has {n}")
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    out = open_storage(output_location)
    writer = RunWriter(out)

    encoder = load_init_encoder(cfg.init)
    model = SimCLRModel(encoder, ProjectionHead(512, cfg.proj_hidden_dim, cfg.proj_dim)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    batch = max(1, min(cfg.batch_size, n))
    lr = cfg.lr * batch / 256
    optimizer = build_optimizer(model.parameters(), cfg.optimizer, lr, cfg.weight_decay)
    steps_per_epoch = max(1, n // batch)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, cfg.warmup_epochs * steps_per_epoch))
    loss_fn = NTXentLoss(cfg.temperature)
    augment = BatchAugment(simclr_preset(cfg.jitter_strength, cfg.crop_min, cfg.blur_p))
    order_gen = torch.Generator().manual_seed(cfg.seed)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    forward = torch.compile(model) if cfg.compile else model

    start_epoch = 0
    state = load_latest_checkpoint(out) if cfg.resume == "auto" else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        order_gen.set_state(state["order_rng"])
        aug_gen.set_state(state["aug_rng"].to("cpu"))
        writer.history = list(state["history"])
        start_epoch = int(state["epoch"])
        log(f"resuming from epoch {start_epoch} ({out.url('checkpoints/latest.json')})")
        if start_epoch >= cfg.epochs:
            log("this run already finished: nothing to do")
            return state["summary"] if "summary" in state else {}

    config = {**asdict(cfg), "data": data_location, "output": out.uri, "images": n, "effective_batch_size": batch,
              "effective_lr": lr, "device": str(device), "torch": torch.__version__}
    writer.write_json("config.json", config)
    log(f"SimCLR on {n} images, batch {batch}, {steps_per_epoch} steps/epoch, {cfg.epochs} epochs, {device}")

    started = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        meter = Throughput(device)
        losses = []
        for idx in epoch_batches(n, batch, order_gen, drop_last=True):
            x = pool[idx].to(device, non_blocking=True)
            views = torch.cat([augment(x, cfg.image_size, aug_gen), augment(x, cfg.image_size, aug_gen)])
            if device.type == "cuda":
                views = views.contiguous(memory_format=torch.channels_last)
            with autocast(device):
                z = forward(views)
            loss = loss_fn(*z.float().chunk(2))
            if not torch.isfinite(loss):
                raise DivergedError(f"loss became {loss.item()} at epoch {epoch + 1}; lower --lr or raise "
                                    "--temperature. The last good checkpoint is kept.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.detach())
            meter.add(2 * len(idx))
        record = {"epoch": epoch + 1, "loss": torch.stack(losses).mean().item(),
                  "lr": optimizer.param_groups[0]["lr"], "images_per_s": round(meter.rate(), 1),
                  "elapsed_s": round(time.time() - started, 1)}
        last = epoch + 1 == cfg.epochs
        if val is not None and cfg.knn_every > 0 and ((epoch + 1) % cfg.knn_every == 0 or last):
            record["knn_top1"] = knn_monitor(model.encoder, pool[: len(train_labels)], train_labels, val,
                                             val_labels, len(classes), cfg, device)
        writer.log_epoch(record)
        log("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if cfg.checkpoint_every > 0 and ((epoch + 1) % cfg.checkpoint_every == 0) and not last:
            save_checkpoint(out, _checkpoint_state(model, optimizer, scheduler, order_gen, aug_gen, writer, epoch + 1), epoch + 1)

    summary = {"epochs": cfg.epochs, "images": n, "final_loss": writer.history[-1]["loss"] if writer.history else None,
               "knn_top1": next((h["knn_top1"] for h in reversed(writer.history) if "knn_top1" in h), None),
               "seconds": round(time.time() - started, 1)}
    save_torch(out, "encoder.pt", {k: v.cpu() for k, v in model.encoder.state_dict().items()})
    save_torch(out, "projection_head.pt", {k: v.cpu() for k, v in model.head.state_dict().items()})
    writer.write_plot("loss_curve.png", lambda p: plot_curves(writer.history, ["loss"], p, "SimCLR NT-Xent loss"))
    if any("knn_top1" in h for h in writer.history):
        writer.write_plot("knn_monitor.png",
                          lambda p: plot_curves(writer.history, ["knn_top1"], p, "kNN monitor: val top-1"))
    writer.write_json("summary.json", summary)
    final = _checkpoint_state(model, optimizer, scheduler, order_gen, aug_gen, writer, cfg.epochs)
    final["summary"] = summary
    save_checkpoint(out, final, cfg.epochs)
    return summary


def knn_monitor(encoder, train_images, train_labels, val_images, val_labels, num_classes, cfg, device) -> float:
    """Val top-1 of a weighted kNN classifier on the encoder's train-split embeddings."""
    bank = embed(encoder, train_images, cfg.image_size, device)
    query = embed(encoder, val_images, cfg.image_size, device)
    scores = knn_predict(bank, train_labels, query, num_classes, cfg.knn_k)
    return topk_accuracy(scores, val_labels, (1,))[1]


def _checkpoint_state(model, optimizer, scheduler, order_gen, aug_gen, writer, epoch) -> dict:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "order_rng": order_gen.get_state(), "aug_rng": aug_gen.get_state().cpu(), "epoch": epoch,
            "history": list(writer.history)}
