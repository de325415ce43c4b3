"""Within-class covariance normalisation (common.gallery.fit_whitening), the ``whitened`` representation of
enroll: what the fit does to embeddings. Its use by enroll and train-classifier: test_enroll.py and
test_margin_loss.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facessl.common.gallery import fit_whitening


def blobs(seed: int = 0, people: int = 6, photos: int = 40, dim: int = 8):
    """Unit rows where people sit on a small circle (axes 1 and 3, radius 0.05) and each person's photos vary
    widely along another axis (0, std 0.4: pose or light), with noise of 0.01 elsewhere: (people * photos,
    dim) float32 and the int64 labels."""
    gen = torch.Generator().manual_seed(seed)
    angle = torch.arange(people) * 2 * math.pi / people
    centre = torch.zeros(people, dim)
    centre[:, 1], centre[:, 3], centre[:, 2] = 0.05 * angle.cos(), 0.05 * angle.sin(), 1.0
    noise = torch.randn(people * photos, dim, generator=gen) * 0.01
    noise[:, 0] *= 40
    labels = torch.arange(people).repeat_interleave(photos)
    return F.normalize(centre[labels] + noise, dim=1), labels


def rank1(gallery: torch.Tensor, probes: torch.Tensor, labels: torch.Tensor) -> float:
    """Probes named right by the cosine to each person's mean gallery row (the same people, the same order)."""
    means = torch.stack([gallery[labels == c].mean(0) for c in labels.unique()])
    sims = F.normalize(probes, dim=1) @ F.normalize(means, dim=1).T
    return (sims.argmax(1) == labels).float().mean().item()


def test_whitening_equalises_within_person_variation_and_separates_people():
    x, y = blobs()
    w = fit_whitening(x, y, ridge=0.0)
    assert w["images"] == len(x) and w["identities"] == 6 and w["mean"].dtype == w["matrix"].dtype == torch.float32
    z = (x - w["mean"]) @ w["matrix"]
    within = z - torch.stack([z[y == c].mean(0) for c in range(6)])[y]
    # the within-person covariance becomes the identity matrix
    assert torch.allclose(within.T @ within / len(z), torch.eye(8), atol=1e-3)
    # fresh photos of the same people, named by the closest person: near chance before, mostly right after
    x2, _ = blobs(seed=1)
    before = rank1(x, x2, y)
    centred = rank1(x - w["mean"], x2 - w["mean"], y)
    after = rank1((x - w["mean"]) @ w["matrix"], (x2 - w["mean"]) @ w["matrix"], y)
    assert max(before, centred) < 0.5 and after > 0.9, (before, centred, after)


def test_whitening_needs_two_people_with_two_photos():
    x, y = blobs(people=3, photos=1)
    with pytest.raises(ValueError, match="two identities"):
        fit_whitening(x, y)
    x, y = blobs()
    with pytest.raises(ValueError, match="finite"):
        fit_whitening(x * float("nan"), y)
