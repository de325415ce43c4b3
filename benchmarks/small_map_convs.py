"""Benchmark (not a test): each 3x3 convolution of ResNet18's last two stages, forward and backward, as
``nn.Conv2d`` and as the encoder's ``SmallMapConv2d``, at one image size and batch, in one run.

It shows where the matrix-product path of ``common.models.SmallMapConv2d`` pays on this machine: the table
gives each layer's map sizes, whether the encoder takes that path there, and the median milliseconds of
``forward + backward`` (input and weight gradients) of both implementations, measured interleaved so that other
load hits both alike. Run it on a new CPU or GPU before trusting the path's rule there.

Usage:
  python benchmarks/small_map_convs.py [--image-size 24] [--batch-size 256] [--device cpu]
      [--precision fp32|bf16] [--repeats 12]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

from checkout import facessl_path

facessl_path()

import torch
from torch import nn


def resnet18_small_layers(image_size: int) -> list[tuple[str, int, int, int, int]]:
    """``(name, in_channels, out_channels, stride, input side)`` of the 3x3 convolutions of ResNet18's third and
    last stages for square ``image_size`` inputs (the stem and first stage divide the side by 8, rounded up)."""
    side = image_size
    for _ in range(3):
        # the stem's stride-2 convolution, its max pool, the second stage's first block: each (side + 1) // 2
        side = (side + 1) // 2
    layers = []
    for stage, channels in ((3, 256), (4, 512)):
        out_side = (side + 1) // 2
        layers += [
            (f"layer{stage}.0.conv1", channels // 2, channels, 2, side),
            (f"layer{stage}.0.conv2", channels, channels, 1, out_side),
            (f"layer{stage}.1.conv1", channels, channels, 1, out_side),
        ]
        side = out_side
    return layers


def timed(step, repeats: int, sync) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``step`` after two warm-up calls."""
    step(), step()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    from facessl.common.models import SmallMapConv2d

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(
        f"{args.image_size} px, batch {args.batch_size}, {args.precision}, channels_last, {device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print("| layer | input -> output | matrix-product path | nn.Conv2d, ms | SmallMapConv2d, ms | ratio |")
    print("|---|---|---|---|---|---|")
    for name, cin, cout, stride, side in resnet18_small_layers(args.image_size):
        torch.manual_seed(0)
        conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False).to(
            device, memory_format=torch.channels_last
        )
        fast = SmallMapConv2d.from_conv(copy.deepcopy(conv))
        x = torch.randn(args.batch_size, cin, side, side, device=device).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        out_side = conv(x).shape[-1]
        grad = torch.randn(args.batch_size, cout, out_side, out_side, device=device)

        def step(layer, x=x, grad=grad):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                y = layer(x)
            y.backward(grad.to(y.dtype))

        times = {id(layer): [] for layer in (conv, fast)}
        # interleaved rounds: a burst of load slows both
        for _ in range(3):
            for layer in (conv, fast):
                times[id(layer)] += timed(lambda layer=layer: step(layer), max(1, args.repeats // 3), sync)
        ref, new = (1000 * statistics.median(times[id(layer)]) for layer in (conv, fast))
        path = "yes" if fast._windows(side, side) is not None else "no"
        print(
            f"| {name} | {side}x{side} -> {out_side}x{out_side} | {path} | {ref:.1f} | {new:.1f} | {ref / new:.2f}x |"
        )


if __name__ == "__main__":
    main()
