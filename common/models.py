"""ResNet18 encoder, SimCLR projection head and the classifier built on them.

Backbone: torchvision ``resnet18`` (He et al., "Deep Residual Learning for Image Recognition", CVPR
2016, arXiv:1512.03385) with its classification layer replaced by the identity, so it maps float
images (B, 3, H, W) to 512-d representations (B, 512). Projection head: SimCLR's 2-layer MLP
(Chen et al. 2020, arXiv:2002.05709, section 2.1). Cosine classifier layer: the one the margin losses of
face recognition train (CosFace, Wang et al. 2018, arXiv:1801.09414; ArcFace, Deng et al. 2019,
arXiv:1801.07698).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_DIM = 512


class SmallMapConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that computes an output of at most 2x2 pixels as one matrix product per output pixel:
    the same function, weights and state-dict keys, with a faster backward pass on the small maps of CPU-sized
    views.

    At 24 px a ResNet18's third stage sees 3x3 and 2x2 maps and its last stage 2x2 and 1x1 (at 64 px the last
    stage is 2x2). Each output pixel of a zero-padded convolution reads one window of the input, and the taps
    that fall on real input form one rectangle of the kernel, so the pixel is
    ``linear(x[:, :, rows, cols].flatten(1), weight[:, :, taps_y, taps_x].flatten(1))``: only the taps that
    meet input are multiplied (4 of 9 for a 3x3 kernel on a 2x2 map), and both passes are plain matrix
    products. oneDNN's convolution backward is slow for these shapes on the CPU (16 GFLOP/s for a 1x1 output
    on a 2-core Zen 3, against 80-140 for the same layers' forward); measured there, fp32, forward and backward
    of one layer: 121 -> 5.5 ms for a 512-channel 1x1 map (batch 256), 33 -> 19 ms for a 256-channel 2x2 map
    (batch 256), 62 -> 42 ms for a 512-channel 2x2 map (batch 64). It is used where the output has at most
    4 pixels and the input is no larger than the kernel, the shapes where it measured faster
    (``benchmarks/small_map_convs.py``); every other shape (and groups or dilation other than 1, or a padding
    mode other than zeros) takes ``nn.Conv2d``'s own path, which was faster on 3x3 outputs.

    Input float (B, C_in, H, W), output float (B, C_out, H_out, W_out), as ``nn.Conv2d`` (an unbatched input
    takes ``nn.Conv2d``'s path). ``torch.compile`` handles it; TorchScript does not (nothing here uses it).
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> SmallMapConv2d:
        """``conv`` itself, its class switched: the same module, parameters and state-dict keys."""
        conv.__class__ = cls
        return conv

    def _windows(self, height: int, width: int) -> tuple[int, int, list] | None:
        """``(H_out, W_out, windows)``: for each output pixel in row-major order, the :func:`_overlap` of its
        window on the rows and on the columns, ``((row0, row1, tap_y), (col0, col1, tap_x))``. None when the
        layer takes ``nn.Conv2d``'s path."""
        if self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return None
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        out_h, out_w = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
        if not (out_h >= 1 and out_w >= 1 and out_h * out_w <= 4 and height <= kh and width <= kw):
            return None
        windows = [
            (_overlap(i * sh - ph, kh, height), _overlap(j * sw - pw, kw, width))
            for i in range(out_h)
            for j in range(out_w)
        ]
        return out_h, out_w, windows

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        height, width = x.shape[-2:]
        # an unbatched (C, H, W) input, or a wrong rank, gets nn.Conv2d's handling and errors
        plan = self._windows(height, width) if x.dim() == 4 else None
        if plan is None:
            return super()._conv_forward(x, weight, bias)
        out_h, out_w, windows = plan
        pixels = []
        for (row0, row1, tap_y), (col0, col1, tap_x) in windows:
            taps = weight[:, :, tap_y : tap_y + row1 - row0, tap_x : tap_x + col1 - col0]
            pixels.append(F.linear(x[:, :, row0:row1, col0:col1].flatten(1), taps.flatten(1), bias))
        # (B, pixels, C_out) -> (B, C_out, H_out, W_out), strided as channels_last; copied to NCHW unless the
        # input is channels_last (a 1x1 input is both: NCHW)
        y = torch.stack(pixels, 1).view(x.shape[0], out_h, out_w, weight.shape[0]).permute(0, 3, 1, 2)
        return y if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else y.contiguous()


def _overlap(start: int, kernel: int, size: int) -> tuple[int, int, int]:
    """``(first, end, tap)``: the input indices ``first:end`` that a kernel window starting at ``start`` (negative
    in the padding) covers on an axis of ``size``, and the kernel tap at ``first``; an empty range when the window
    lies wholly in the padding."""
    first = min(max(0, start), size)
    end = max(first, min(size, start + kernel))
    return first, end, first - start


def build_encoder() -> nn.Module:
    """A randomly initialised ResNet18 with ``fc`` = Identity: float (B, 3, H, W) -> (B, 512).

    Its convolutions are :class:`SmallMapConv2d` (the same function and state-dict keys as torchvision's).
    """
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    net.fc = nn.Identity()
    for module in net.modules():
        if type(module) is nn.Conv2d:
            SmallMapConv2d.from_conv(module)
    return net


class ProjectionHead(nn.Module):
    """SimCLR projection head g(.): Linear(in, hidden) -> BatchNorm -> ReLU -> Linear(hidden, out).

    Input (B, in_dim) float; output (B, out_dim) float (not normalised; NT-Xent normalises).
    """

    def __init__(self, in_dim: int = FEATURE_DIM, hidden_dim: int = 512, out_dim: int = 128):
        super().__init__()
        if min(in_dim, hidden_dim, out_dim) < 1:
            raise ValueError("projection head dimensions must be positive")
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SimCLRModel(nn.Module):
    """Encoder f(.) + projection head g(.): images (B, 3, H, W) -> projections z (B, out_dim)."""

    def __init__(self, encoder: nn.Module, head: ProjectionHead):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class CosineLinear(nn.Module):
    """Cosine classifier layer: features float (B, D) -> ``scale * cos(theta)`` float32 (B, C), theta the angle
    between a feature and a class's weight row, both L2-normalised, and no bias (CosFace section 3.1).

    Computed in float32 even under autocast: bf16 keeps about 3 significant digits of a cosine, an error
    the scale (typically 30) turns into a tenth of a logit.

    Raises:
        ValueError: a dimension < 1 or ``scale`` <= 0 (constructor).
    """

    def __init__(self, in_dim: int, num_classes: int, scale: float = 30.0):
        super().__init__()
        if in_dim < 1 or num_classes < 1 or not scale > 0:
            raise ValueError(f"cosine layer needs positive sizes and scale, got {in_dim}, {num_classes}, {scale}")
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.randn(num_classes, in_dim) * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.scale * F.linear(F.normalize(x.float(), dim=1), F.normalize(self.weight.float(), dim=1))


CLASSIFIER_HEADS = ("linear", "cosine")


class Classifier(nn.Module):
    """Encoder + classification layer: images (B, 3, H, W) float -> logits (B, num_classes).

    ``head`` "linear" is an ``nn.Linear`` with bias; "cosine" a :class:`CosineLinear` of logit scale ``scale``,
    for the margin losses. Either is ``fc``, so the encoder's weights keep their ``encoder.`` names.

    Raises:
        ValueError: an unknown ``head``.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, head: str = "linear", scale: float = 30.0):
        super().__init__()
        if head not in CLASSIFIER_HEADS:
            raise ValueError(f"unknown classifier head {head!r}: use one of {', '.join(CLASSIFIER_HEADS)}")
        self.encoder = encoder
        self.head = head
        self.fc = (
            nn.Linear(FEATURE_DIM, num_classes) if head == "linear" else CosineLinear(FEATURE_DIM, num_classes, scale)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x))


# weight loading moved to common.weights (the value checks to common.checkpoints); these names stay importable
# from here for the code that imports them from common.models (resolved on first use: common.weights imports
# this module)
_MOVED_TO_WEIGHTS = ("check_weight_values", "encoder_state_from_file", "load_encoder_weights", "load_error_summary")


def __getattr__(name: str):
    """The weight-loading functions of :mod:`facessl.common.weights` under their old home (PEP 562)."""
    if name in _MOVED_TO_WEIGHTS:
        from facessl.common import weights

        return getattr(weights, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
