"""Pieces both training jobs use: device and seeding, LR schedule, embeddings, kNN monitor,
and the run-output writer."""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from facessl.common.augment import eval_transform
from facessl.common.distributed import DistInfo, mean_across_ranks
from facessl.common.storage import Storage


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise the named device (``cpu``, ``cuda``, ``cuda:N``).

    Raises:
        UsageError: an unknown device, or a CUDA device this machine does not have.
    """
    from facessl.common.errors import UsageError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UsageError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier: linear warm-up from ~0 to 1 over ``warmup_steps``, then cosine decay to 0
    (Loshchilov & Hutter, "SGDR", arXiv:1608.03983; Goyal et al. 2017 for the warm-up)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def last_step_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, epoch: int, steps_per_epoch: int) -> float:
    """The learning rate (of the first parameter group) that the last step of 0-based ``epoch`` ran with,
    from the schedule itself: the same whether the run went straight through or resumed mid-epoch."""
    return scheduler.base_lrs[0] * scheduler.lr_lambdas[0]((epoch + 1) * steps_per_epoch - 1)


# x86 CPU flags of native bf16 arithmetic: AVX512-BF16 dot products (Intel Cooper Lake, AMD Zen 4 on) and
# AMX-BF16 tiles (Intel Sapphire Rapids on); without them oneDNN emulates bf16 and it runs slower than fp32
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Precision:
    """The arithmetic a job runs its network in, resolved from ``--precision`` for one device.

    ``bf16``: the forward pass under bf16 autocast (convolutions and matmuls in bfloat16, weights, optimizer
    state and gradients of the weights in float32; Micikevicius et al., "Mixed Precision Training",
    arXiv:1710.03740, and Kalamkar et al., "A Study of BFLOAT16 for Deep Learning Training", arXiv:1905.12322),
    images and modules in channels_last, the layout oneDNN and cuDNN run bf16 convolutions in. ``fp32``: plain
    float32, in channels_last on a CPU (oneDNN's fp32 convolutions run faster in it: 1.1x on Zen 4 at 64 px,
    1.3x for the main job's fine-tuning on Zen 3; docs/benchmarks.md) and in the default layout on a GPU.
    Losses and softmaxes stay float32 either way (the callers compute them on ``.float()`` outputs or outside
    autocast).

    Attributes:
        name: ``bf16`` or ``fp32``. reason: why it was chosen, for the log and config.json.
        channels_last: whether :meth:`layout` puts modules and images in channels_last.
    """

    name: str
    reason: str
    channels_last: bool = True

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    def autocast(self, device: torch.device):
        """The autocast context of this precision on ``device`` (a no-op context for fp32)."""
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def layout(self, x):
        """``x`` (a module, or a 4-D float tensor (B, 3, H, W)) in channels_last where :attr:`channels_last` is
        set; unchanged otherwise."""
        if not self.channels_last:
            return x
        if isinstance(x, torch.nn.Module):
            return x.to(memory_format=torch.channels_last)
        return x.contiguous(memory_format=torch.channels_last)

    def describe(self) -> str:
        """The log line: e.g. ``precision bf16 (auto: CPU has avx512_bf16)``."""
        return f"precision {self.name} ({self.reason})"


def cpu_bf16_flags(cpuinfo: str | None = None) -> tuple[str, ...]:
    """The native-bf16 flags (:data:`NATIVE_BF16_CPU_FLAGS`) among the CPU's feature flags.

    Args:
        cpuinfo: the text of ``/proc/cpuinfo`` (read when None; no file, as off Linux, gives no flags).
    Returns:
        the flags present, sorted; () when none.
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return ()
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return tuple(sorted(flags & set(NATIVE_BF16_CPU_FLAGS)))


def resolve_precision(name: str, device: torch.device, cpu_flags: tuple[str, ...] | None = None) -> Precision:
    """``--precision`` for ``device``: ``auto`` is bf16 on a CUDA GPU with native bf16 (Ampere on) and on a CPU
    with native bf16 (:func:`cpu_bf16_flags`), fp32 elsewhere; ``fp32`` and ``bf16`` are taken as asked. The
    layout is channels_last except for fp32 on a GPU (:class:`Precision`).

    Args:
        cpu_flags: the CPU's native-bf16 flags (tests); None reads them from ``/proc/cpuinfo``.
    Raises:
        UsageError: a name other than auto, fp32 or bf16.
    """
    from facessl.common.errors import UsageError

    if name not in ("auto", "fp32", "bf16"):
        raise UsageError(f"unknown precision {name!r}: use auto, fp32 or bf16")
    if name == "fp32":
        return Precision("fp32", "asked", channels_last=device.type == "cpu")
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        if name == "bf16":
            return Precision("bf16", "asked" if native else "asked; this GPU has no native bf16: emulated, slower")
        if native:
            return Precision("bf16", "auto: GPU has bf16")
        # cuDNN's fp32 kernels on GPUs without bf16 (before Ampere) are not measured in channels_last here
        return Precision("fp32", "auto: GPU has no bf16", channels_last=False)
    flags = cpu_bf16_flags() if cpu_flags is None else tuple(cpu_flags)
    if name == "bf16":
        return Precision(
            "bf16", "asked" if flags else "asked; this CPU has no avx512_bf16 or amx_bf16: emulated, slower than fp32"
        )
    if flags:
        return Precision("bf16", f"auto: CPU has {' and '.join(flags)}")
    return Precision("fp32", "auto: CPU has no avx512_bf16 or amx_bf16")


def autocast(device: torch.device, precision: Precision | None = None):
    """The autocast context of ``precision`` on ``device``; None resolves ``auto`` for the device."""
    return (precision or resolve_precision("auto", device)).autocast(device)


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    where: str,
    advice: str,
) -> float:
    """One training step of both jobs: check the loss, then zero the gradients, backpropagate, step the optimizer
    and the LR schedule. Returns the loss as a Python float.

    Args:
        loss: the scalar float32 loss of the batch. where, advice: the error message's position ("epoch 3,
            step 7") and remedy.
    Raises:
        DivergedError: the loss is NaN or infinite (checked before the update, so it never reaches the weights).
    """
    from facessl.common.errors import DivergedError

    # the step's one wait for the GPU
    value = loss.item()
    if not math.isfinite(value):
        raise DivergedError(f"loss became {value} at {where}; {advice}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return value


def format_record(record: dict) -> str:
    """An epoch's record as its log line: ``key=value`` pairs, floats to 4 significant digits."""
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())


@torch.no_grad()
def embed(
    encoder: torch.nn.Module,
    images: torch.Tensor,
    size: int,
    device: torch.device,
    batch_size: int = 256,
    precision: Precision | None = None,
) -> torch.Tensor:
    """Encoder outputs for uint8 images (N, 3, H, W): float32 (N, 512) on the CPU, eval mode, computed in
    ``precision`` (None: ``auto`` for ``device``, see :func:`resolve_precision`)."""
    precision = precision or resolve_precision("auto", device)
    was_training = encoder.training
    encoder.eval()
    out = []
    for chunk in images.split(batch_size):
        x = precision.layout(eval_transform(chunk.to(device), size))
        with precision.autocast(device):
            out.append(encoder(x).float().cpu())
    encoder.train(was_training)
    return torch.cat(out)


def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> torch.Tensor:
    """Weighted kNN class scores (N_query, C): cosine similarity, the k nearest training embeddings
    vote with weight exp(sim / temperature). Wu et al., "Unsupervised Feature Learning via
    Non-Parametric Instance Discrimination", CVPR 2018, arXiv:1805.01978."""
    train = F.normalize(train_feats, dim=1)
    query = F.normalize(query_feats, dim=1)
    k = max(1, min(k, train.shape[0]))
    sims, idx = (query @ train.t()).topk(k, dim=1)
    weights = (sims / temperature).exp()
    scores = torch.zeros(query.shape[0], num_classes)
    scores.scatter_add_(1, train_labels[idx], weights)
    return scores


class RunWriter:
    """Writes a run's outputs to its storage: JSON files, the per-epoch ``metrics.jsonl``, PNGs, and TensorBoard
    event files of the epoch records (``tensorboard``: None writes them when the optional tensorboard package
    imports; True without it raises UsageError; see :mod:`facessl.common.tensorboard`)."""

    def __init__(self, storage: Storage, tensorboard: bool | None = None):
        from facessl.common.tensorboard import EventLog, tensorboard_available

        self.storage = storage
        self.history: list[dict] = []
        use_tensorboard = tensorboard_available() if tensorboard is None else tensorboard
        self.events = EventLog(storage) if use_tensorboard else None

    def write_json(self, key: str, obj) -> None:
        self.storage.write_text(key, json.dumps(obj, indent=1, ensure_ascii=False, default=str))

    def log_epoch(self, record: dict) -> None:
        """Append a record and rewrite ``metrics.jsonl`` (one JSON object per line); add its numbers to the
        TensorBoard events."""
        self.history.append(record)
        self.storage.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))
        if self.events is not None:
            self.events.add_epoch(record, int(record.get("epoch", len(self.history))))

    def write_plot(self, key: str, draw) -> None:
        """``draw(path)`` into a local temporary PNG, then upload it to ``key``."""
        fd, tmp = tempfile.mkstemp(suffix=".png")
        os.close(fd)
        try:
            draw(tmp)
            self.storage.upload_file(tmp, key)
        finally:
            os.unlink(tmp)


@dataclass
class TrainingRun:
    """What both training jobs' runs hold between their steps: the options (``cfg``, the job's config
    dataclass), the torchrun set-up, the device and precision, the log (:func:`silent` on ranks other than 0),
    the output location and its :class:`RunWriter`. ``PretrainRun`` and ``ClassifierRun`` extend it."""

    cfg: object
    info: DistInfo
    device: torch.device
    precision: Precision
    log: object
    out: Storage
    writer: RunWriter


def silent(*args, **kwargs) -> None:
    """The log of the ranks other than 0."""


class Throughput:
    """Images per second over a span of steps (synchronising CUDA before reading the clock)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = time.perf_counter()
        self.images = 0

    def add(self, n: int) -> None:
        self.images += n

    def rate(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.images / max(1e-9, time.perf_counter() - self.start)


class StopRequest:
    """Records SIGTERM (what Kubernetes and spot reclaims send) so training can checkpoint at the next
    step boundary and exit with the retry code instead of dying mid-write."""

    def __init__(self):
        import signal

        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        import signal

        signal.signal(signal.SIGTERM, self._previous)


def stop_requested(stop: StopRequest) -> bool:
    """True on every rank as soon as any rank got SIGTERM (so all checkpoint at the same step)."""
    return mean_across_ranks(float(stop.requested)) > 0
