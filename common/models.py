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


def load_encoder_weights(encoder: nn.Module, state, where: str) -> None:
    """Load backbone weights (see :func:`encoder_state_from_file`) into ``encoder``.

    Raises:
        ValueError: not ResNet18 backbone weights (wrong keys, shapes or value types).
    """
    try:
        encoder.load_state_dict(encoder_state_from_file(state, where))
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ValueError(f"{where} does not fit a ResNet18 backbone: {load_error_summary(exc)}") from None


def load_error_summary(exc: Exception) -> str:
    """The first two non-blank lines of a ``load_state_dict`` error, joined (at most 300 characters): torch's
    first line names no tensor, its second does. The exception's type name when it has no message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:2])[:300] or type(exc).__name__


def encoder_state_from_file(state: dict, where: str) -> dict:
    """Backbone weights from a loaded state dict: a facessl ``encoder.pt``, a classifier ``model.pt``
    (``encoder.`` prefix) or torchvision's ImageNet ``resnet18`` file (``fc.*`` dropped).

    Raises:
        ValueError: the dict does not hold ResNet18 backbone weights, or values no network holds
        (:func:`check_weight_values`).
    """
    if not isinstance(state, dict):
        raise ValueError(f"{where} does not hold a state dict")
    for wrapper in ("model", "encoder"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if any(k.startswith("encoder.") for k in state):
        state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = set(build_encoder().state_dict())
    if set(state) != expected:
        missing = sorted(expected - set(state))[:3]
        extra = sorted(set(state) - expected)[:3]
        raise ValueError(f"{where} is not a ResNet18 backbone (missing {missing}, unexpected {extra})")
    check_weight_values(state, where)
    return state


def check_weight_values(state: dict, where: str) -> None:
    """Refuse a state dict whose values no trained network holds: NaN or infinite floats, complex tensors
    (``load_state_dict`` would keep their real part), integer or bool weights (batch-norm's
    ``num_batches_tracked`` and optimizer ``step`` counters excepted), negative batch-norm ``running_var``.
    A diverged or
    damaged file is refused at load, not after hours of training on NaN features.

    Raises:
        ValueError: naming the first tensor at fault.
    """
    for key, v in state.items():
        if not torch.is_tensor(v):
            continue
        if v.is_complex():
            raise ValueError(f"{where} holds a complex tensor at {key}: weights are real numbers")
        # (counters)
        if not v.is_floating_point() and not key.endswith(("num_batches_tracked", "step")):
            raise ValueError(
                f"{where} holds {v.dtype} values at {key}: weights are floating point (a cast "
                "to integers or booleans loses them)"
            )
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{where} holds NaN or infinite weights, e.g. in {key}")
        if key.endswith("running_var") and (v < 0).any():
            raise ValueError(f"{where} holds a negative batch-norm variance in {key}")


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
