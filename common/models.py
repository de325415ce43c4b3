"""ResNet18 encoder, SimCLR projection head and the classifier built on them.

Backbone: torchvision ``resnet18`` (He et al., "Deep Residual Learning for Image Recognition", CVPR
2016, arXiv:1512.03385) with its classification layer replaced by the identity, so it maps float
images (B, 3, H, W) to 512-d representations (B, 512). Projection head: SimCLR's 2-layer MLP
(Chen et al. 2020, arXiv:2002.05709, section 2.1).
"""

from __future__ import annotations

import torch
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


class Classifier(nn.Module):
    """Encoder + linear layer: images (B, 3, H, W) float -> logits (B, num_classes)."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.fc = nn.Linear(FEATURE_DIM, num_classes)

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
