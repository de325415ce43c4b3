"""train-classifier --sampler balanced: each identity drawn equally often, whatever its share of the images."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_script
from facessl.common.classify import class_balanced_weights
from facessl.common.pool import MemoryPool, epoch_generator


def run(*args):
    return run_script("train-classifier", *args)


def drawn_labels(labels, weights, epochs=20, batch=16):
    pool = MemoryPool(torch.arange(len(labels)), labels)
    steps = -(-len(labels) // batch)
    drawn = [y for e in range(epochs) for _, y in pool.batches(epoch_generator(7, e), batch, steps, weights=weights)]
    return torch.cat(drawn)


def test_balanced_draws_each_identity_equally_and_uniform_passes_once():
    # 90 images of one identity, 10 of another
    labels = torch.tensor([0] * 90 + [1] * 10)
    weights = class_balanced_weights(labels)
    assert weights.dtype == torch.float64 and torch.allclose(weights[:90].sum(), weights[90:].sum())
    balanced = drawn_labels(labels, weights)
    # an epoch keeps its length; 2,000 draws in all
    assert len(balanced) == 20 * 100
    share = (balanced == 1).double().mean().item()
    assert 0.45 < share < 0.55, share
    # the default: every image once per epoch, so the minority keeps its 10%
    uniform = drawn_labels(labels, None, epochs=1)
    assert sorted(uniform.tolist()) == labels.tolist()


def test_balanced_sampler_outside_finetune_is_a_usage_error(prepared_subset, tmp_path):
    r = run("--data", prepared_subset, "--output", tmp_path / "o", "--mode", "knn", "--sampler", "balanced")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--sampler balanced" in r.stderr


@pytest.mark.slow
def test_a_balanced_fine_tune_learns_and_records_its_sampler(prepared_subset, tmp_path):
    out = tmp_path / "balanced"
    r = run(
        "--data", prepared_subset, "--output", out, "--sampler", "balanced", "--epochs", 4, "--image-size", 64,
        "--batch-size", 32, "--lr", 1e-3,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((out / "config.json").read_text())["sampler"] == "balanced"
    # three identities: chance is 1/3
    assert json.loads((out / "metrics.json").read_text())["test"]["top1"] > 0.5
