"""The training losses: SimCLR's contrastive losses over a batch of N positive pairs (2N views), and the
margins of the classifier's face-recognition losses.

NTXentLoss: NT-Xent, the normalised temperature-scaled cross-entropy loss of SimCLR. Chen, Kornblith,
    Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020,
    https://arxiv.org/abs/2002.05709 (equation 1).
DCLLoss: the decoupled contrastive loss, NT-Xent with the positive left out of the denominator. Yeh, Hong,
    Hsu, Liu, Chen, LeCun, "Decoupled Contrastive Learning", ECCV 2022, https://arxiv.org/abs/2110.06848
    (equation 6).
margin_logits: the target-logit margins of face recognition's cosine classifiers. CosFace: Wang, Wang, Zhou,
    Ji, Gong, Zhou, Li, Liu, "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018,
    https://arxiv.org/abs/1801.09414 (equation 4). ArcFace: Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive
    Angular Margin Loss for Deep Face Recognition", CVPR 2019, https://arxiv.org/abs/1801.07698 (equation 3).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class NTXentLoss(nn.Module):
    """NT-Xent over a batch of N positive pairs (2N views).

    For view i with positive j: ``l(i, j) = -log( exp(sim(z_i, z_j)/tau) / sum_{k != i} exp(sim(z_i, z_k)/tau) )``,
    ``sim`` the cosine similarity; the loss is the mean of ``l`` over all 2N views, so each view has
    its other view as positive and the remaining 2N-2 views as negatives.

    Attributes:
        temperature: tau > 0 (0.1-0.5 typical; lower suits small batches).
        gather_distributed: under torch.distributed, use the views of every rank as negatives
            (gathered with gradients flowing back), so the loss and its gradients equal those of one
            process holding the global batch. Without this a per-rank loss sees only its local batch,
            a known SimCLR pitfall. No effect in a single process.

    Raises:
        ValueError: temperature <= 0 (constructor); inputs of different shapes or not 2-D (forward).

    Example:
        >>> loss = NTXentLoss(0.2)(z1, z2)   # z1, z2: float (N, D) projections of the two views
    """

    def __init__(self, temperature: float = 0.2, gather_distributed: bool = True):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}; try 0.1-0.5")
        self.temperature = float(temperature)
        self.gather_distributed = gather_distributed

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """z1, z2: float (N, D), row i of both the two views of image i. Returns a scalar float32 tensor,
        computed in float32 also under autocast (bf16 similarity logits would shift the loss by percents
        and grow worse as the positives get close and tau small)."""
        if z1.shape != z2.shape or z1.dim() != 2:
            raise ValueError(f"expected two (N, D) tensors of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
        # float32 logits even inside bf16 autocast
        with torch.autocast(device_type=z1.device.type, enabled=False):
            return self._loss(z1.float(), z2.float())

    def _loss(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        from facessl.common.distributed import gather_with_grad, rank_and_world

        n = z1.shape[0]
        rank, world = rank_and_world() if self.gather_distributed else (0, 1)
        z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        if world > 1:
            z1_all, z2_all = gather_with_grad(z1), gather_with_grad(z2)
        else:
            z1_all, z2_all = z1, z2
        # N over all ranks
        total = z1_all.shape[0]
        local = torch.arange(rank * n, rank * n + n, device=z1.device)
        # this rank's views in the global 2N
        rows = torch.cat([local, local + total])
        # each view's other view
        positives = torch.cat([local + total, local])
        logits = torch.cat([z1, z2]) @ torch.cat([z1_all, z2_all]).t() / self.temperature
        # a view is not its own negative
        logits[torch.arange(2 * n, device=z1.device), rows] = float("-inf")
        return self._from_logits(logits, positives)

    def _from_logits(self, logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        """float32 (2n, 2N) logits, each row's own column already -inf, and long (2n,) positive columns ->
        the mean loss over the rows."""
        return F.cross_entropy(logits, positives)


class DCLLoss(NTXentLoss):
    """The decoupled contrastive loss (DCL) over a batch of N positive pairs (2N views).

    For view i with positive j: ``l(i, j) = -sim(z_i, z_j)/tau + log sum_{k != i, k != j} exp(sim(z_i, z_k)/tau)``,
    NT-Xent without the positive in the denominator; the loss is the mean of ``l`` over all 2N views.
    Yeh et al., "Decoupled Contrastive Learning", ECCV 2022, https://arxiv.org/abs/2110.06848, equation 6 (the
    unweighted DCL, not DCLW). NT-Xent's gradient carries a factor ``1 - p_ij`` (the softmax weight of the
    positive) that shrinks both the pull and the push once the positive dominates a small batch's
    denominator; leaving the positive out removes that coupling, so DCL learns more per step at small batch
    sizes and few epochs (the paper's section 3).

    Unlike NT-Xent the loss can be negative (it is no cross-entropy), and it needs at least one negative:
    at least 2 pairs in the batch, over all processes.

    Attributes and distributed behaviour: as :class:`NTXentLoss`.

    Raises:
        ValueError: temperature <= 0 (constructor); inputs of different shapes or not 2-D, or fewer than
            2 pairs in the whole batch (forward).

    Example:
        >>> loss = DCLLoss(0.2)(z1, z2)   # z1, z2: float (N, D) projections of the two views, N >= 2
    """

    def _from_logits(self, logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] < 4:
            raise ValueError(
                f"DCL needs at least 2 pairs in the batch (a negative for each view), got {logits.shape[1] // 2}"
            )
        rows = torch.arange(logits.shape[0], device=logits.device)
        positive = logits[rows, positives]
        # the positive leaves the denominator (not in place: autograd still needs the logits)
        negatives = logits.index_put((rows, positives), torch.tensor(float("-inf"), device=logits.device))
        return (torch.logsumexp(negatives, dim=1) - positive).mean()


MARGIN_LOSSES = {"cosface": 0.35, "arcface": 0.5}


def margin_logits(logits: torch.Tensor, target: torch.Tensor, scale: float, margin: float, kind: str) -> torch.Tensor:
    """The training logits of a margin loss, for ``F.cross_entropy``: the target class's cosine made harder.

    Args:
        logits: float32 (B, C), ``scale * cos(theta)`` of a :class:`~facessl.common.models.CosineLinear`.
        target: long (B,) class indices. scale: the layer's s (> 0). margin: m, in cosine units for cosface
            and radians for arcface (``MARGIN_LOSSES`` holds the papers' defaults, 0.35 and 0.5).
        kind: "cosface", ``s (cos(theta_y) - m)``; or "arcface", ``s cos(theta_y + m)``.

    Every other class keeps ``s cos(theta_j)``: the margin asks the features of one person to sit closer
    to their own class than to any other by m, which is what lets the embedding separate people it was
    never trained on (the papers' open-set results).

    Raises:
        ValueError: an unknown ``kind``, or shapes that do not match.
    """
    if kind not in MARGIN_LOSSES:
        raise ValueError(f"unknown margin loss {kind!r}: use one of {', '.join(MARGIN_LOSSES)}")
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"expected (B, C) logits and (B,) targets, got {tuple(logits.shape)}, {tuple(target.shape)}")
    rows = torch.arange(len(target), device=logits.device)
    cos = (logits[rows, target] / scale).clamp(-1.0, 1.0)
    if kind == "cosface":
        hard = cos - margin
    else:
        # cos(theta + m) stops falling once theta + m passes pi; past that point the penalty stays linear
        # in the cosine, so a badly placed feature still gets a gradient towards its class
        theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
        hard = torch.where(theta + margin < math.pi, torch.cos(theta + margin), cos - margin * math.sin(margin))
    return logits.index_put((rows, target), scale * hard)
