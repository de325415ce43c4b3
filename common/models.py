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


class OnePixelConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that computes a one-pixel output as a matrix product: the same function, weights and
    state-dict keys, with a faster backward pass on the small maps of SimCLR's CPU-sized views.

    At 24 and 32 px a ResNet18's last stage sees 2x2 and 1x1 maps, where its 3x3 convolutions have a 1x1
    output: every output reads one window of the zero-padded input, so the convolution is
    ``linear(x.flatten(1), weight[:, :, p:p + H, p:p + W].flatten(1))``; the taps that fall on the padding
    multiply zeros and get zero gradients either way. oneDNN's convolution backward is slow for these shapes
    (16 GFLOP/s on a 2-core Zen 3 against 80-140 for the same layers' forward), which made the last stage most
    of a 24 px step; as a matrix product the whole SimCLR step runs about twice as fast there
    (``benchmarks/simclr_throughput.py``). Every other shape (and groups or dilation other than 1, or a padding
    mode other than zeros) takes ``nn.Conv2d``'s own path.

    Input float (B, C_in, H, W), output float (B, C_out, H_out, W_out), as ``nn.Conv2d``.
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> OnePixelConv2d:
        """A copy of ``conv``'s settings that shares its parameters (no copy of the weights)."""
        fast = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        fast.weight, fast.bias = conv.weight, conv.bias
        return fast

    def _window(self, height: int, width: int) -> tuple[int, int] | None:
        """The top-left tap of the one window an input of ``height`` x ``width`` meets, or None when the
        output is not 1x1 (or the layer is not a plain zero-padded convolution)."""
        if self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return None
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        one_output = (height + 2 * ph - kh) // sh == 0 and (width + 2 * pw - kw) // sw == 0
        # the input must lie inside the kernel's one window (it does whenever the output is 1x1 and the
        # padding is at most the kernel's half)
        inside = ph + height <= kh and pw + width <= kw
        return (ph, pw) if one_output and inside else None

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        height, width = x.shape[-2:]
        window = self._window(height, width)
        if window is None:
            return super()._conv_forward(x, weight, bias)
        top, left = window
        taps = weight[:, :, top : top + height, left : left + width].reshape(weight.shape[0], -1)
        return F.linear(x.reshape(x.shape[0], -1), taps, bias)[:, :, None, None]


def build_encoder() -> nn.Module:
    """A randomly initialised ResNet18 with ``fc`` = Identity: float (B, 3, H, W) -> (B, 512).

    Its convolutions are :class:`OnePixelConv2d` (the same function and state-dict keys as torchvision's).
    """
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    net.fc = nn.Identity()
    convs = [(name, module) for name, module in net.named_modules() if type(module) is nn.Conv2d]
    for name, conv in convs:
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent), child, OnePixelConv2d.from_conv(conv))
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
