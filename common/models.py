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


def build_encoder() -> nn.Module:
    """A randomly initialised ResNet18 with ``fc`` = Identity: float (B, 3, H, W) -> (B, 512)."""
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    net.fc = nn.Identity()
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
