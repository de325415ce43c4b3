"""The face-recognition margin losses of train-classifier (--loss cosface|arcface): the margins against
their papers' formulas, the cosine layer, and a real fine-tune whose model.pt identify and enroll read."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import CASES, run_script
from facessl.common.gallery import load_gallery
from facessl.common.losses import margin_logits
from facessl.common.models import Classifier, CosineLinear, build_encoder
from facessl.common.weights import load_classifier


def cosines(b=6, c=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # within (-0.8, 0.8): theta + 0.5 stays below pi
    cos = torch.rand(b, c, generator=gen) * 1.6 - 0.8
    return cos, torch.randint(0, c, (b,), generator=gen)


def test_cosface_subtracts_the_scaled_margin_from_the_target_logit_only():
    cos, y = cosines()
    out = margin_logits(30 * cos, y, 30.0, 0.35, "cosface")
    expected = 30 * cos.clone()
    expected[torch.arange(len(y)), y] -= 30 * 0.35
    assert torch.allclose(out, expected, atol=1e-5)


def test_arcface_adds_the_angle_and_stays_monotonic_past_pi():
    cos, y = cosines(seed=1)
    out = margin_logits(64 * cos, y, 64.0, 0.5, "arcface")
    rows = torch.arange(len(y))
    theta = torch.acos(cos[rows, y].double())
    assert torch.allclose(out[rows, y].double(), 64 * torch.cos(theta + 0.5), atol=1e-4)
    others = torch.ones_like(cos, dtype=torch.bool)
    others[rows, y] = False
    assert torch.equal(out[others], (64 * cos)[others])
    # theta + m beyond pi: cos(theta + m) would rise again; the target logit must keep falling with theta
    near_pi = torch.tensor([[-0.95, 0.0], [-0.99, 0.0], [-1.0, 0.0]])
    hard = margin_logits(near_pi, torch.zeros(3, dtype=torch.long), 1.0, 0.5, "arcface")[:, 0]
    assert hard[0] > hard[1] > hard[2] and (hard < near_pi[:, 0]).all()


def test_a_margin_makes_the_loss_harder_and_bad_input_is_refused():
    cos, y = cosines(seed=2)
    plain = F.cross_entropy(30 * cos, y)
    for kind in ("cosface", "arcface"):
        assert F.cross_entropy(margin_logits(30 * cos, y, 30.0, 0.3, kind), y) > plain
    with pytest.raises(ValueError, match="unknown margin loss"):
        margin_logits(cos, y, 1.0, 0.3, "sphereface")
    with pytest.raises(ValueError, match="expected"):
        margin_logits(cos, y[:2], 1.0, 0.3, "cosface")


def test_cosine_layer_is_a_scaled_cosine_in_float32_under_bf16_autocast():
    layer = CosineLinear(8, 3, scale=16.0)
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x.bfloat16())
    assert out.dtype == torch.float32
    expected = 16 * F.normalize(x.bfloat16().float(), dim=1) @ F.normalize(layer.weight.detach(), dim=1).t()
    assert torch.allclose(out.detach(), expected, atol=1e-4) and out.abs().max() <= 16 + 1e-4
    with pytest.raises(ValueError):
        CosineLinear(8, 3, scale=0.0)
    with pytest.raises(ValueError, match="unknown classifier head"):
        Classifier(build_encoder(), 3, head="mlp")


run = run_script


def test_conflicting_options_are_usage_errors(prepared_subset, tmp_path):
    for extra in (["--mode", "knn", "--loss", "cosface"], ["--margin", "0.2"]):
        r = run("train-classifier", "--data", prepared_subset, "--output", tmp_path / "out", *extra)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert (
        "--loss cosface trains a cosine layer"
        in run(
            "train-classifier",
            "--data",
            prepared_subset,
            "--output",
            tmp_path / "o",
            "--mode",
            "knn",
            "--loss",
            "cosface",
        ).stderr
    )


@pytest.mark.slow
def test_arcface_fine_tune_learns_and_its_model_serves_identify_and_enroll(prepared_subset, glint_subset, tmp_path):
    out = tmp_path / "arcface"
    r = run(
        "train-classifier", "--data", prepared_subset, "--output", out, "--loss", "arcface", "--epochs", 4,
        "--image-size", 64, "--batch-size", 32, "--lr", 1e-3,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    # three identities: chance is 1/3
    assert metrics["test"]["top1"] > 0.5, metrics["test"]
    config = json.loads((out / "config.json").read_text())
    assert config["loss"] == "arcface" and config["margin"] is None and config["scale"] == 30.0
    assert config["crop_margin"] == 0.2
    model, classes, size = load_classifier(str(out))
    assert model.head == "cosine" and isinstance(model.fc, CosineLinear) and size == 64 and len(classes) == 3
    # the closed-set path reads the cosine model
    r = run("identify", "--model", out, "--photo", CASES / "raw" / "Tom Hanks" / "plain.jpg", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["faces"][0]["top3"]
    # and its backbone enrols people like any other train-classifier run's
    people = tmp_path / "people"
    for person in sorted(glint_subset.iterdir()):
        (people / person.name).mkdir(parents=True)
        for photo in sorted(person.iterdir())[:4]:
            shutil.copyfile(photo, people / person.name / photo.name)
    r = run("enroll", "--people", people, "--encoder", out, "--output", tmp_path / "gallery", "--workers", 1)
    assert r.returncode == 0, r.stdout + r.stderr
    # the run fitted a whitening on its val split, and enroll takes it by default
    whitening = torch.load(out / "model.pt", weights_only=True)["whitening"]
    assert whitening["split"] == "val" and whitening["identities"] == 3 and whitening["matrix"].shape == (512, 512)
    assert load_gallery(str(tmp_path / "gallery")).encoder["representation"] == "whitened"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"scale": float("inf")}, "scale of 1 to 128"),
        ({"scale": 1e300}, "scale of 1 to 128"),
        ({"scale": 10**400}, "scale of 1 to 128"),
        ({"scale": True}, "scale of 1 to 128"),
        ({"head": "mlp"}, "a linear or a cosine"),
        ({"classes": []}, "names 0 identities"),
        ({"head": "linear"}, "does not fit a ResNet18 classifier"),
    ],
)
def test_a_tampered_cosine_model_is_refused_by_identify(change, message, tmp_path):
    torch.manual_seed(0)
    saved = {
        "model": Classifier(build_encoder(), 3, head="cosine").state_dict(),
        "classes": ["a", "b", "c"],
        "image_size": 32,
        "head": "cosine",
        "scale": 30.0,
    }
    torch.save({**saved, **change}, tmp_path / "model.pt")
    r = run("identify", "--model", tmp_path / "model.pt", "--photo", CASES / "raw" / "Tom Hanks" / "plain.jpg")
    assert r.returncode == 3 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    # an untampered one loads, and one from before the cosine layer (no head, no scale) loads as linear
    torch.save(saved, tmp_path / "good.pt")
    assert load_classifier(str(tmp_path / "good.pt"))[0].head == "cosine"
    old = {"model": Classifier(build_encoder(), 3).state_dict(), "classes": ["a", "b", "c"], "image_size": 32}
    torch.save(old, tmp_path / "old.pt")
    assert load_classifier(str(tmp_path / "old.pt"))[0].head == "linear"
