"""Benchmark (not a test): SimCLR training throughput in fp32 and bf16, side by side, on one device in one run.

Rows, each measured at every ``--precisions`` value (images/s, both views counted):
  1. ceiling: model-only SimCLR steps (two views, ResNet18 + projection head, NT-Xent, backward, AdamW step)
     on random tensors already on the device: no data loading, no augmentation;
  2. ceiling, compiled (with ``--compile``): the same step through ``torch.compile``, after its warm-up steps
     (whose seconds the table gives: compilation happens there);
  3. real job: pretrain-simclr's own epoch loop (``common.simclr.train_one_epoch`` on a run that the job's
     ``build_run`` sets up: uint8 crops from the pool, batched augmentation on the device, the precision's
     autocast and layout, the loss check, the optimizer and LR-schedule step), kNN monitor and checkpoints off;
     the first epoch of each precision is warm-up and not counted;
  4. lightly (when the optional ``bench`` extra, lightly 1.6.0, is installed): lightly's recipe on the same
     crops as a peer: its SimCLRTransform on PIL images in DataLoader worker processes, its projection head
     and NTXentLoss, AdamW, the same batch and image size, the same precision rule.

The precisions are measured interleaved (a step, or for the real job an epoch, of each in turn) and each row
reports the median: on a shared machine other load then hits every precision alike. The CPU model, its
native-bf16 flags, the thread count and torch's version are printed with the table; ``--json`` also writes them
and every measurement to a file.

Usage:
  python benchmarks/simclr_throughput.py --data runs/glint6/prepared [--image-size 64] [--batch-size 128]
      [--device auto] [--precisions fp32,bf16] [--threads N] [--compile] [--data-mode memory]
      [--rows ceiling,real,lightly] [--epochs 4] [--steps 8] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

from checkout import facessl_path

facessl_path()

import torch


def hardware(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name with its family/model numbers, native-bf16 flags and threads."""
    from facessl.common.training import cpu_bf16_flags

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                # the first processor's entries describe them all
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    ids = ", ".join(f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields)
    flags = " ".join(cpu_bf16_flags()) or "no native bf16"
    return f"{name} ({ids}; {flags}), {torch.get_num_threads()} threads"


def timed(step, device: torch.device) -> float:
    """Seconds one call of ``step`` takes (CUDA synchronised)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def interleaved(steps: dict, device: torch.device, warmup: int, count: int, batch_size: int) -> dict:
    """Run every step function ``warmup`` times, then ``count`` rounds of one call each in turn; returns per
    name the median images/s (both views: 2 x ``batch_size`` per call), all rates and the warm-up seconds."""
    results = {}
    for name, step in steps.items():
        results[name] = {"warmup_s": sum(timed(step, device) for _ in range(warmup)), "rates": []}
    for _ in range(count):
        for name, step in steps.items():
            results[name]["rates"].append(2 * batch_size / timed(step, device))
    for result in results.values():
        result["images_per_s"] = statistics.median(result["rates"])
    return results


def ceiling_step(image_size: int, batch_size: int, device: torch.device, precision, compile_: bool):
    """One model-only SimCLR step on fixed random views, as a function."""
    from facessl.common.losses import NTXentLoss
    from facessl.common.models import ProjectionHead, SimCLRModel, build_encoder
    from facessl.common.simclr import build_optimizer, simclr_loss

    torch.manual_seed(0)
    model = precision.layout(SimCLRModel(build_encoder(), ProjectionHead()).to(device))
    forward = torch.compile(model) if compile_ else model
    # the job's own optimizer
    optimizer = build_optimizer(model.parameters(), "adamw", 1e-4, 1e-6)
    loss_fn = NTXentLoss(0.2)
    shape = (batch_size, 3, image_size, image_size)
    v1, v2 = (precision.layout(torch.randn(shape, device=device)) for _ in range(2))

    def step():
        with precision.autocast(device):
            loss = simclr_loss(forward, v1, v2, loss_fn)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def real_job(data: str, image_size: int, batch_size: int, device: torch.device, precisions, epochs: int, mode: str):
    """pretrain-simclr's epoch loop for each precision, epochs interleaved; returns per precision the median
    images/s of the epochs after the first, and every epoch's rate."""
    from facessl.common.distributed import DistInfo
    from facessl.common.simclr import PretrainConfig, build_run, open_output, train_one_epoch
    from facessl.common.training import StopRequest

    stop = StopRequest()
    runs, results = {}, {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, precision in precisions.items():
                cfg = PretrainConfig(
                    epochs=epochs,
                    batch_size=batch_size,
                    image_size=image_size,
                    knn_every=0,
                    checkpoint_every=0,
                    log_every=0,
                    device=str(device),
                    warmup_epochs=0,
                    data_mode=mode,
                    precision=name,
                )
                out = open_output(data, f"{tmp}/{name}", cfg)
                runs[name] = build_run(data, out, cfg, DistInfo(), device, precision, True, lambda *a: None)
                results[name] = {"rates": []}
            started = time.time()
            for epoch in range(epochs):
                for name, run in runs.items():
                    record, _ = train_one_epoch(run, epoch, 0, [], stop, started)
                    results[name]["rates"].append(record["images_per_s"])
    finally:
        stop.restore()
    for result in results.values():
        # the first epoch carries warm-up (allocator, caches)
        result["images_per_s"] = statistics.median(result["rates"][1:] or result["rates"])
    return results


class CropViews(torch.utils.data.Dataset):
    """The prepared crops as PIL images, each returned as lightly's transform makes it: a list of two views."""

    def __init__(self, images: torch.Tensor, transform):
        from PIL import Image

        self.images = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i])


def lightly_step(images: torch.Tensor, image_size: int, batch_size: int, device: torch.device, precision, workers):
    """One step of lightly 1.6.0's SimCLR recipe on the crops, data loading included (the DataLoader's worker
    processes augment while the main process trains), as a function."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform

    from facessl.common.models import build_encoder

    # our preset's strengths (jitter 0.5, smallest crop 0.2, blur 0.5) in lightly's parameters
    transform = SimCLRTransform(input_size=image_size, cj_strength=0.5, min_scale=0.2, gaussian_blur=0.5)
    loader = torch.utils.data.DataLoader(
        CropViews(images, transform),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    torch.manual_seed(0)
    backbone = precision.layout(build_encoder().to(device))
    head = SimCLRProjectionHead(512, 512, 128).to(device)
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3 * batch_size / 256, weight_decay=1e-4)
    loss_fn = NTXentLoss(temperature=0.2)
    batches = iter(())

    def step():
        nonlocal batches
        # a batch is [first views, second views]: the default collate of the transform's pair
        try:
            views = next(batches)
        except StopIteration:
            batches = iter(loader)
            views = next(batches)
        v1, v2 = (precision.layout(v.to(device, non_blocking=True)) for v in views)
        with precision.autocast(device):
            loss = loss_fn(head(backbone(v1)), head(backbone(v2)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def lightly_installed() -> bool:
    try:
        import lightly  # noqa: F401
    except ImportError:
        return False
    return True


def print_table(rows: dict, precisions: dict) -> None:
    """Markdown rows: label, precision (with the reason), median img/s, ratio to fp32, ratio to the ceiling."""
    print("| row | precision | img/s (median) | vs fp32 | vs ceiling |")
    print("|---|---|---|---|---|")
    for (label, name), result in rows.items():
        rate = result["images_per_s"]
        fp32, top = rows.get((label, "fp32")), rows.get(("ceiling", name))
        versus_fp32 = f"{rate / fp32['images_per_s']:.2f}x" if fp32 else "-"
        versus_top = f"{rate / top['images_per_s']:.2f}" if top else "-"
        extra = f" (warm-up {result['warmup_s']:.0f} s)" if "compiled" in label else ""
        print(f"| {label}{extra} | {name} ({precisions[name].reason}) | {rate:,.1f} | {versus_fp32} | {versus_top} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared dataset (output of prepare-data)")
    parser.add_argument("--image-size", type=int, default=None, help="default: 112 on CUDA, 64 on CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 512 on CUDA, 128 on CPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated --precision values to compare")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--epochs", type=int, default=4, help="real job epochs per precision (the first is warm-up)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per precision of the ceiling and lightly")
    parser.add_argument("--compile", action="store_true", help="also time the ceiling through torch.compile")
    parser.add_argument("--data-mode", default="memory", help="pretrain-simclr --data-mode of the real job")
    parser.add_argument("--rows", default="ceiling,real,lightly", help="which rows to measure (comma-separated)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the lightly row")
    parser.add_argument("--json", default=None, help="also write the rows and the hardware to this file")
    args = parser.parse_args()
    from facessl.common.data import PreparedDataset
    from facessl.common.training import pick_device, resolve_precision

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    size = args.image_size or (112 if device.type == "cuda" else 64)
    batch = args.batch_size or (512 if device.type == "cuda" else 128)
    precisions = {name: resolve_precision(name, device) for name in args.precisions.split(",")}
    asked = set(args.rows.split(","))
    rows = {}
    if "ceiling" in asked:
        steps = {
            (f"ceiling{', compiled' if c else ''}", n): ceiling_step(size, batch, device, p, c)
            for c in ((False, True) if args.compile else (False,))
            for n, p in precisions.items()
        }
        # compilation happens in the first calls (forward, then backward graphs)
        rows.update(interleaved(steps, device, 5 if args.compile else 2, args.steps, batch))
    if "real" in asked:
        jobs = real_job(args.data, size, batch, device, precisions, args.epochs, args.data_mode)
        rows.update({(f"real job ({args.data_mode})", n): r for n, r in jobs.items()})
    if "lightly" in asked and lightly_installed():
        images, _ = PreparedDataset(args.data, size).load("train")
        steps = {
            (f"lightly 1.6.0 ({args.workers} workers)", n): lightly_step(images, size, batch, device, p, args.workers)
            for n, p in precisions.items()
        }
        rows.update(interleaved(steps, device, 2, args.steps, batch))
    machine = hardware(device)
    print(f"\n{machine}; torch {torch.__version__}; {size} px, batch {batch}")
    print_table(rows, precisions)
    if args.json:
        with open(args.json, "w") as f:
            entries = [{"row": label, "precision": name, **r} for (label, name), r in rows.items()]
            json.dump(
                {
                    "hardware": machine,
                    "torch": torch.__version__,
                    "image_size": size,
                    "batch_size": batch,
                    "rows": entries,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
