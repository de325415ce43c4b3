"""Batched SimCLR augmentation: shapes, the two views differ, crops follow the configured ranges."""

import math

import pytest
import torch

from facessl.common.augment import AugmentConfig, BatchAugment, eval_transform, sample_crop_boxes, simclr_preset


def real_images(n=8, size=64):
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)


def test_views_have_the_requested_shape_and_differ():
    x = real_images()
    aug = BatchAugment(simclr_preset())
    gen = torch.Generator().manual_seed(1)
    v1, v2 = aug(x, 32, gen), aug(x, 32, gen)
    assert v1.shape == (8, 3, 32, 32) and v1.dtype == torch.float32
    per_image_diff = (v1 - v2).abs().flatten(1).mean(1)
    assert (per_image_diff > 1e-3).all(), "every image's two views must differ"


def test_same_seed_same_views():
    x = real_images()
    aug = BatchAugment(simclr_preset())
    a = aug(x, 32, torch.Generator().manual_seed(5))
    b = aug(x, 32, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_crop_boxes_follow_scale_and_ratio_ranges():
    gen = torch.Generator().manual_seed(0)
    boxes = sample_crop_boxes(20000, 100, 100, (0.2, 1.0), (3 / 4, 4 / 3), gen, "cpu")
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 100).all() and (boxes[:, 3] <= 100).all()
    area = w * h / 10000
    assert area.min() >= 0.19 and area.max() <= 1.0
    ratio = w / h
    # 3/4..4/3, up to integer rounding of small boxes
    assert ratio.min() >= 0.70 and ratio.max() <= 1.43
    assert (ratio < 0.76).any() and (ratio > 1.3).any()
    # uniform in [0.2, 1] gives 0.6, minus some rejected draws
    assert 0.5 < area.mean() < 0.7


def test_flip_and_grayscale_rates():
    x = torch.zeros(4000, 3, 8, 8, dtype=torch.uint8)
    # red left half: flipped images have red on the right
    x[:, 0, :, :4] = 255
    cfg = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0, gray_p=0.2, blur_p=0.0)
    out = BatchAugment(cfg)(x, 8, torch.Generator().manual_seed(3))
    out = out * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(
        1, 3, 1, 1
    )
    flipped = out[:, :, :, 6:].mean(dim=(1, 2, 3)) > out[:, :, :, :2].mean(dim=(1, 2, 3))
    gray = (out[:, 0] - out[:, 1]).abs().amax(dim=(1, 2)) < 1e-4
    assert flipped.float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert gray.float().mean().item() == pytest.approx(0.2, abs=0.03)


def test_eval_transform_is_deterministic_resize():
    x = real_images(2, 64)
    out = eval_transform(x, 32)
    assert out.shape == (2, 3, 32, 32)
    assert torch.equal(out, eval_transform(x, 32))


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="probability"):
        AugmentConfig(gray_p=1.5)
    assert math.isclose(simclr_preset(1.0).brightness, 0.8)


def test_crop_distribution_matches_torchvision_reference():
    """Area fraction and aspect ratio of our batched crops vs torchvision's per-image RandomResizedCrop."""
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    img = torch.zeros(3, 60, 80)
    ref = torch.tensor(
        [RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)],
        dtype=torch.float,
        # (top, left, h, w)
    )
    ref_area, ref_ratio = ref[:, 2] * ref[:, 3] / 4800, ref[:, 3] / ref[:, 2]
    boxes = sample_crop_boxes(4000, 60, 80, (0.2, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0), "cpu")
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area, ratio = w * h / 4800, w / h
    q = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(area.quantile(q), ref_area.quantile(q), atol=0.03)
    assert torch.allclose(ratio.quantile(q), ref_ratio.quantile(q), atol=0.03)
    assert torch.allclose((boxes[:, 0] / (80 - w).clamp(min=1)).mean(), torch.tensor(0.5), atol=0.03)


def test_brightness_and_saturation_ranges_match_torchvision_reference():
    """Per-image ColorJitter of torchvision vs our batched jitter on the same image: same value ranges."""
    from torchvision.transforms import ColorJitter

    torch.manual_seed(0)
    base = torch.tensor([0.6, 0.4, 0.2]).view(3, 1, 1).expand(3, 4, 4)
    ref = torch.stack([ColorJitter(brightness=0.4, saturation=0.4)(base) for _ in range(2000)])
    x = (base * 255).round().to(torch.uint8).expand(2000, 3, 4, 4).contiguous()
    cfg = AugmentConfig(
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        flip_p=0.0,
        jitter_p=1.0,
        brightness=0.4,
        contrast=0.0,
        saturation=0.4,
        hue=0.0,
        gray_p=0.0,
        blur_p=0.0,
    )
    ours = BatchAugment(cfg)(x, 4, torch.Generator().manual_seed(0))
    ours = ours * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(
        1, 3, 1, 1
    )
    q = torch.tensor([0.02, 0.25, 0.5, 0.75, 0.98])
    for channel in range(3):
        assert torch.allclose(ours[:, channel, 0, 0].quantile(q), ref[:, channel, 0, 0].quantile(q), atol=0.03), channel


def test_hue_shift_rotates_colour_like_torchvision():
    from torchvision.transforms.v2.functional import adjust_hue

    from facessl.common.augment import color_jitter

    img = torch.rand(1, 3, 8, 8)
    one = torch.ones(1)
    for shift in (-0.1, 0.05, 0.25):
        ours = color_jitter(img.clone(), one, one, one, torch.tensor([shift]), [3])
        assert torch.allclose(ours, adjust_hue(img, shift), atol=1e-4), shift
