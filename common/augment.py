"""What training sees: batched image augmentation that runs on the device holding the batch.

Images stay uint8 ``(N, 3, H, W)`` in memory; each step takes a batch, moves it to the device and
augments every image independently there (per-sample random parameters, no per-image Python loop),
so the CPU never becomes the bottleneck of a GPU step.

Recipes (named presets, one place):
    simclr_preset(...)     SimCLR views: random resized crop, flip, colour jitter (p=0.8), grayscale
                           (p=0.2), Gaussian blur (p=0.5). Chen et al., "A Simple Framework for Contrastive
                           Learning of Visual Representations", ICML 2020, arXiv:2002.05709, appendix A.
    supervised_preset()    milder crop/flip/jitter for classifier training.
    eval_transform(...)    resize + normalise, no randomness.

The distributions follow torchvision's ``RandomResizedCrop`` (area fraction uniform in ``crop_scale``,
log aspect ratio uniform in ``crop_ratio``, 10 tries then a centre-crop fallback), ``ColorJitter``
(factors uniform in [1-s, 1+s], hue shift uniform in [-h, h]; the order of the four operations is drawn
per batch rather than per image), ``RandomGrayscale`` and ``GaussianBlur`` (sigma uniform in
``blur_sigma``, kernel about 10% of the output side).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of one augmentation recipe (probabilities in [0, 1], fractions of the image area)."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self):
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1]")


def simclr_preset(jitter_strength: float = 0.5, crop_min: float = 0.4, blur_p: float = 0.5) -> AugmentConfig:
    """SimCLR's recipe with colour-jitter strength ``s`` -> (0.8s, 0.8s, 0.8s, 0.2s) and crop scale
    (crop_min, 1). The paper uses s=1 and crop_min=0.08 on ImageNet; a tight face crop loses the face below
    about 0.3 of its area, so faces keep more identity with crop_min 0.4 and s=0.5 (docs/recipe.md)."""
    s = jitter_strength
    return AugmentConfig(
        crop_scale=(crop_min, 1.0),
        brightness=0.8 * s,
        contrast=0.8 * s,
        saturation=0.8 * s,
        hue=min(0.2 * s, 0.5),
        blur_p=blur_p,
    )


def supervised_preset() -> AugmentConfig:
    """Mild augmentation for classifier training: crop 60-100% of the face, flip, light jitter, no blur."""
    return AugmentConfig(
        crop_scale=(0.6, 1.0),
        jitter_p=0.5,
        brightness=0.2,
        contrast=0.2,
        saturation=0.2,
        hue=0.02,
        gray_p=0.05,
        blur_p=0.0,
    )


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean, std = _mean_std(x.device, x.dtype)
    return (x - mean) / std


@functools.lru_cache(maxsize=8)
def _mean_std(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as (1, 3, 1, 1) tensors, made once per device: building them from Python lists
    at every call is a host-to-device copy, which waits for the GPU twice per batch."""
    return (
        torch.tensor(IMAGENET_MEAN, device=device, dtype=dtype).view(1, 3, 1, 1),
        torch.tensor(IMAGENET_STD, device=device, dtype=dtype).view(1, 3, 1, 1),
    )


def eval_transform(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, 3, size, size), resized (antialiased bilinear) and normalised."""
    x = images.float().div_(255)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return _normalize(x)


def _uniform(n, lo, hi, gen, device):
    return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo


def sample_crop_boxes(n: int, height: int, width: int, scale, ratio, gen, device) -> torch.Tensor:
    """Random resized crop boxes as float (n, 4) ``x1, y1, x2, y2`` in pixels (torchvision's sampling)."""
    tries = 10
    area = height * width
    target = area * (torch.rand(n, tries, generator=gen, device=device) * (scale[1] - scale[0]) + scale[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(torch.rand(n, tries, generator=gen, device=device) * (log_hi - log_lo) + log_lo)
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = ok.float().argmax(dim=1, keepdim=True)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    found = ok.any(dim=1)
    # fallback: the whole image, with the aspect ratio clamped into range (centre crop)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    x0 = torch.floor(torch.rand(n, generator=gen, device=device) * (width - w + 1))
    y0 = torch.floor(torch.rand(n, generator=gen, device=device) * (height - h + 1))
    x0 = torch.where(found, x0, torch.full_like(x0, 0.0) + ((width - w) // 2))
    y0 = torch.where(found, y0, torch.full_like(y0, 0.0) + ((height - h) // 2))
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _rgb_to_hsv(x):
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = (
        torch.where(
            maxc == r,
            torch.remainder((g - b) / safe, 6),
            torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4),
        )
        / 6
    )
    hue = torch.where(delta > 0, hue, torch.zeros_like(hue))
    sat = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    return hue, sat, maxc


def _hsv_to_rgb(hue, sat, val):
    def channel(n):
        k = torch.remainder(n + hue * 6, 6)
        return val - val * sat * torch.clamp(torch.minimum(k, 4 - k), 0, 1)

    return torch.stack([channel(5), channel(3), channel(1)], dim=1)


def _per(v):
    return v.view(-1, 1, 1, 1)


def color_jitter(x, brightness, contrast, saturation, hue, order) -> torch.Tensor:
    """Per-sample colour jitter of float images in [0, 1]; factors are (B,) tensors, ``order`` a
    permutation of range(4) (brightness, contrast, saturation, hue)."""
    for op in order:
        if op == 0:
            x = (x * _per(brightness)).clamp_(0, 1)
        elif op == 1:
            mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
            x = (_per(contrast) * x + (1 - _per(contrast)) * mean).clamp_(0, 1)
        elif op == 2:
            x = (_per(saturation) * x + (1 - _per(saturation)) * _gray(x)).clamp_(0, 1)
        else:
            h, s, v = _rgb_to_hsv(x)
            h = torch.remainder(h + hue.view(-1, 1, 1), 1.0)
            x = _hsv_to_rgb(h, s, v)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample ``sigma`` (B,), kernel about 10% of the side (odd)."""
    b, c, h, w = x.shape
    k = max(3, int(0.1 * min(h, w)) // 2 * 2 + 1)
    pos = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kern = torch.exp(-(pos.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    # (B*C, k)
    kern = (kern / kern.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
    y = F.pad(x.reshape(1, b * c, h, w), (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    y = F.conv2d(y, kern.view(b * c, 1, k, 1), groups=b * c)
    y = F.conv2d(y, kern.view(b * c, 1, 1, k), groups=b * c)
    return y.view(b, c, h, w)


class BatchAugment:
    """Augments a uint8 batch on its own device with independent random parameters per image.

    Call: ``aug(images, size, generator)``; images uint8 (B, 3, H, W); returns float32
    (B, 3, size, size), ImageNet-normalised. ``generator`` is a ``torch.Generator`` on the images'
    device (reproducible runs) or None (global RNG).
    """

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg

    def __call__(self, images: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        from torchvision.ops import roi_align

        cfg, gen, dev = self.cfg, generator, images.device
        b, _, height, width = images.shape
        x = images.float().div_(255)
        boxes = sample_crop_boxes(b, height, width, cfg.crop_scale, cfg.crop_ratio, gen, dev)
        rois = torch.cat([torch.arange(b, device=dev, dtype=x.dtype).view(-1, 1), boxes.to(x.dtype)], dim=1)
        x = roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)

        flip = torch.rand(b, generator=gen, device=dev) < cfg.flip_p
        x = torch.where(_per(flip), x.flip(-1), x)

        jitter = torch.rand(b, generator=gen, device=dev) < cfg.jitter_p
        if cfg.jitter_p > 0:
            one, zero = torch.ones(b, device=dev), torch.zeros(b, device=dev)
            factors = [
                torch.where(jitter, _uniform(b, max(0.0, 1 - s), 1 + s, gen, dev), one)
                for s in (cfg.brightness, cfg.contrast, cfg.saturation)
            ]
            hue = torch.where(jitter, _uniform(b, -cfg.hue, cfg.hue, gen, dev), zero)
            order = torch.randperm(4, generator=gen, device=dev).tolist()
            x = color_jitter(x, *factors, hue, order)

        gray = torch.rand(b, generator=gen, device=dev) < cfg.gray_p
        x = torch.where(_per(gray), _gray(x).expand_as(x), x)

        blur = torch.rand(b, generator=gen, device=dev) < cfg.blur_p
        sigma = _uniform(b, cfg.blur_sigma[0], cfg.blur_sigma[1], gen, dev)
        # blur all, keep the chosen: no host round trip to find which (same values)
        if dev.type == "cuda":
            x = torch.where(_per(blur), gaussian_blur(x, sigma), x)
        # on the CPU, where nothing waits on the host, blur only the chosen
        elif bool(blur.any()):
            idx = blur.nonzero().squeeze(1)
            x = x.index_copy(0, idx, gaussian_blur(x.index_select(0, idx), sigma.index_select(0, idx)))
        return _normalize(x)
