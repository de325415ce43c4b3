"""Benchmark (not a test): how close the real pretrain-simclr job comes to the model-only step ceiling.

Measures in one run, on one device:
  1. ceiling: SimCLR steps (two views, ResNet18 + projection head, NT-Xent, backward, optimizer step) on
     random tensors already on the device, so no data loading or augmentation at all;
  2. real: the pretrain-simclr training loop on a prepared dataset (uint8 crops in memory, memory-mapped
     or streamed from the shards, batched augmentation on the device), as the job runs it, with the kNN
     monitor and checkpoints off;
and prints images/s for both (both views counted) and their ratio.

Usage:
  python benchmarks/simclr_throughput.py --data runs/glint6/prepared [--image-size 112] [--batch-size 256]
      [--device auto] [--compile] [--data-modes memory,mmap,stream]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

from checkout import facessl_path

facessl_path()

import torch


def ceiling(image_size: int, batch_size: int, device: torch.device, steps: int, compile_: bool) -> float:
    from facessl.common.losses import NTXentLoss
    from facessl.common.models import ProjectionHead, SimCLRModel, build_encoder
    from facessl.common.simclr import simclr_loss
    from facessl.common.training import autocast

    model = SimCLRModel(build_encoder(), ProjectionHead()).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if compile_ else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = NTXentLoss(0.2)
    shape = (batch_size, 3, image_size, image_size)
    v1, v2 = torch.randn(shape, device=device), torch.randn(shape, device=device)
    if device.type == "cuda":
        v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in (v1, v2))

    def step():
        with autocast(device):
            loss = simclr_loss(forward, v1, v2, loss_fn)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3 if not compile_ else 10):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * batch_size * steps / (time.perf_counter() - start)


def real_job(
    data: str, image_size: int, batch_size: int, device: str, epochs: int, compile_: bool, data_mode: str = "auto"
) -> float:
    from facessl.common.simclr import PretrainConfig, pretrain

    with tempfile.TemporaryDirectory() as out:
        cfg = PretrainConfig(
            epochs=epochs,
            batch_size=batch_size,
            image_size=image_size,
            knn_every=0,
            checkpoint_every=0,
            log_every=0,
            device=device,
            compile=compile_,
            warmup_epochs=0,
            data_mode=data_mode,
        )
        pretrain(data, out, cfg, log=lambda *a: None)
        history = [json.loads(x) for x in open(f"{out}/metrics.jsonl")]
    rates = [h["images_per_s"] for h in history[1:]] or [history[0]["images_per_s"]]
    # the first epoch carries warm-up (allocator, compile); report the steady state
    return max(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared dataset (output of prepare-data)")
    parser.add_argument("--image-size", type=int, default=None, help="default: 112 on CUDA, 64 on CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 512 on CUDA, 128 on CPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the real job (the first is warm-up)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of the ceiling")
    parser.add_argument("--compile", action="store_true", help="torch.compile both")
    parser.add_argument("--data-modes", default="memory", help="comma-separated pretrain-simclr --data-mode values")
    args = parser.parse_args()
    from facessl.common.training import pick_device

    device = pick_device(args.device)
    size = args.image_size or (112 if device.type == "cuda" else 64)
    batch = args.batch_size or (512 if device.type == "cuda" else 128)
    hardware = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    top = ceiling(size, batch, device, args.steps, args.compile)
    print("| device | image px | batch | compile | data mode | ceiling img/s | real job img/s | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in args.data_modes.split(","):
        real = real_job(args.data, size, batch, str(device), args.epochs, args.compile, mode)
        print(
            f"| {hardware} ({device.type}) | {size} | {batch} | {args.compile} | {mode} | {top:,.0f} | {real:,.0f} "
            f"| {real / top:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
