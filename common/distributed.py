"""torch.distributed plumbing, kept away from the training logic.

Jobs started by ``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) join a
process group: NCCL on GPUs, gloo on CPUs. A plain single process sets nothing up at all.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

# torch.distributed.nn.functional's differentiable collectives (used below) warn on every call that the
# private _functional_collectives will replace them; they are the public API with autograd today.
warnings.filterwarnings(
    "ignore", message=r"torch\.distributed\.nn\.functional\.\w+ is deprecated", category=FutureWarning
)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: ``rank`` of ``world_size``; ``local_rank`` picks its GPU."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes outputs."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1; returns the info and this rank's device.

    Raises:
        UsageError: on CUDA, more processes on this node than it has GPUs (``--nproc-per-node``).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            from facessl.common.errors import UsageError

            raise UsageError(
                f"local rank {info.local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                "start at most that many processes per node, or use --device cpu"
            )
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # NCCL for CUDA tensors; gloo as well on GPUs, for the small CPU-side reductions (loss, step counts)
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return info, device


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """All ranks' ``t`` concatenated along dim 0 (rank order); gradients flow back to every source
    rank (torch.distributed.nn's differentiable all_gather). A no-op without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t), dim=0)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def mean_across_ranks(value: float) -> float:
    """Average a Python number over all ranks (itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def min_across_ranks(value: int) -> int:
    """The smallest of a Python int over all ranks (itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics cover the whole global batch, on any device.

    torch's ``SyncBatchNorm`` serves CUDA; this serves gloo/CPU ranks the same way: per-channel sums and
    sums of squares are all-reduced (differentiably, so gradients see the global statistics too), as in
    Ioffe & Szegedy 2015 (arXiv:1502.03167) computed over every rank's samples. Inputs (N, C) or
    (N, C, H, W) float. Parameter and buffer names equal ``BatchNorm1d/2d``'s, so state dicts load into
    plain models.
    """

    def _check_input_dim(self, x):
        if x.dim() not in (2, 3, 4, 5):
            raise ValueError(f"expected a 2-D to 5-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        count = torch.tensor([x.numel() / channels], dtype=x.dtype, device=x.device)
        stats = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        total = stats[-1]
        mean = stats[:channels] / total
        var = stats[channels : 2 * channels] / total - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * total / (total - 1).clamp(min=1))
                self.num_batches_tracked.add_(1)
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batchnorm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Make every batch norm layer use global-batch statistics: torch's SyncBatchNorm on CUDA,
    :class:`GlobalBatchNorm` elsewhere. Call before wrapping in DistributedDataParallel."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            like = next(child.parameters(), child.running_mean)
            new = GlobalBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            ).to(device=like.device, dtype=like.dtype)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            sync_batchnorm(child, device)
    return module
