"""--precision auto|fp32|bf16: how auto resolves, that bf16 trains to finite losses on real crops, and that
fp32 is the plain float32 computation (channels_last on a CPU changes only the order of its sums)."""

from __future__ import annotations

import json

import pytest
import torch

from facessl.common.errors import UsageError
from facessl.common.training import Precision, cpu_bf16_flags, embed, resolve_precision

CPU = torch.device("cpu")

ZEN4_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni
"""
SAPPHIRE_RAPIDS_CPUINFO = "processor\t: 0\nflags\t\t: avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
SKYLAKE_CPUINFO = "processor\t: 0\nflags\t\t: avx2 avx512f avx512bw avx512_vnni\n"
ARM_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd bf16 sve\n"


@pytest.mark.parametrize(
    ("cpuinfo", "flags"),
    [
        (ZEN4_CPUINFO, ("avx512_bf16",)),
        (SAPPHIRE_RAPIDS_CPUINFO, ("amx_bf16", "avx512_bf16")),
        (SKYLAKE_CPUINFO, ()),
        # the Arm bf16 feature is not one oneDNN's x86 bf16 kernels use
        (ARM_CPUINFO, ()),
        ("", ()),
    ],
)
def test_native_bf16_flags_are_read_from_cpuinfo(cpuinfo, flags):
    assert cpu_bf16_flags(cpuinfo) == flags


def test_auto_is_bf16_on_a_cpu_with_native_bf16_and_says_why():
    chosen = resolve_precision("auto", CPU, cpu_flags=("avx512_bf16",))
    assert chosen.name == "bf16"
    assert chosen.describe() == "precision bf16 (auto: CPU has avx512_bf16)"
    assert resolve_precision("auto", CPU, cpu_flags=("amx_bf16", "avx512_bf16")).reason == (
        "auto: CPU has amx_bf16 and avx512_bf16"
    )


def test_auto_is_fp32_on_a_cpu_without_native_bf16():
    chosen = resolve_precision("auto", CPU, cpu_flags=())
    assert chosen.name == "fp32"
    assert "no avx512_bf16 or amx_bf16" in chosen.reason


def test_explicit_precisions_are_taken_as_asked():
    assert resolve_precision("fp32", CPU, cpu_flags=("avx512_bf16",)).name == "fp32"
    emulated = resolve_precision("bf16", CPU, cpu_flags=())
    assert emulated.name == "bf16" and "emulated" in emulated.reason
    assert resolve_precision("bf16", CPU, cpu_flags=("amx_bf16",)).reason == "asked"


def test_unknown_precision_is_a_usage_error():
    with pytest.raises(UsageError, match="use auto, fp32 or bf16"):
        resolve_precision("fp16", CPU)


def test_this_machine_resolves_auto_by_its_own_flags():
    expected = "bf16" if cpu_bf16_flags() else "fp32"
    assert resolve_precision("auto", CPU).name == expected


def _simclr_step(precision: Precision | None, dtype: torch.dtype = torch.float32) -> dict:
    """One SimCLR training step from seeded weights and views, both in ``dtype``; None runs it with no autocast
    code at all."""
    from facessl.common.losses import NTXentLoss
    from facessl.common.models import ProjectionHead, SimCLRModel, build_encoder
    from facessl.common.simclr import simclr_loss

    torch.manual_seed(3)
    model = SimCLRModel(build_encoder(), ProjectionHead()).to(dtype)
    views = torch.rand(2, 8, 3, 32, 32, dtype=dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if precision is None:
        loss = simclr_loss(model, views[0], views[1], NTXentLoss(0.2))
    else:
        model = precision.layout(model)
        with precision.autocast(CPU):
            loss = simclr_loss(model, precision.layout(views[0]), precision.layout(views[1]), NTXentLoss(0.2))
    # NT-Xent is computed in float32 whatever the network's dtype
    assert loss.dtype == torch.float32
    loss.backward()
    grads = {f"grad.{k}": p.grad.detach().clone() for k, p in model.named_parameters()}
    optimizer.step()
    return {"loss": loss.detach(), **grads, **{k: v.detach().clone() for k, v in model.state_dict().items()}}


def test_fp32_training_step_is_plain_float32():
    plain, fp32 = _simclr_step(None), _simclr_step(resolve_precision("fp32", CPU))
    assert plain.keys() == fp32.keys()
    # the same float32 arithmetic in another memory layout: the loss equal up to the order of the sums
    assert fp32["loss"].item() == pytest.approx(plain["loss"].item(), rel=1e-5)
    # and every gradient, compared in float64: a random network's NT-Xent gradients on noise images are
    # differences of nearly equal terms, so float32 rounding alone moves some by several percent (measured
    # up to 0.4 of a tensor's largest gradient, in either layout order) while float64 keeps them to 1e-13; a
    # wrong layout or weight differs by O(1) (the weights after AdamW's first step are not compared: it moves
    # each weight by about lr times the sign of its gradient, which flips for gradients within rounding of 0)
    plain64, fp32_64 = (_simclr_step(p, torch.float64) for p in (None, resolve_precision("fp32", CPU)))
    grads = [k for k in plain64 if k.startswith("grad.")]
    assert grads
    for k in grads:
        scale = plain64[k].abs().max()
        assert (plain64[k] - fp32_64[k]).abs().max() <= 1e-9 * scale, k
    # in the default layout it is the plain computation bit for bit
    default_layout = _simclr_step(Precision("fp32", "asked", channels_last=False))
    assert all(torch.equal(plain[k], default_layout[k]) for k in plain)


def test_cpu_layout_is_channels_last_in_both_precisions_and_gpu_fp32_keeps_the_default():
    x = torch.rand(2, 3, 8, 8)
    for name in ("fp32", "bf16"):
        chosen = resolve_precision(name, CPU, cpu_flags=())
        assert chosen.layout(x).is_contiguous(memory_format=torch.channels_last)
        conv = chosen.layout(torch.nn.Conv2d(3, 4, 3))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # what resolve_precision gives fp32 on a CUDA device (not reachable without one)
    assert resolve_precision("fp32", torch.device("cuda")).channels_last is False
    gpu_fp32 = Precision("fp32", "asked", channels_last=False)
    assert gpu_fp32.layout(x) is x


def test_bf16_step_stays_close_to_fp32_and_finite():
    fp32, bf16 = _simclr_step(resolve_precision("fp32", CPU)), _simclr_step(resolve_precision("bf16", CPU))
    assert torch.isfinite(bf16["loss"])
    # bf16 keeps 8 bits of mantissa: the loss of random views agrees to about a percent
    assert bf16["loss"].item() == pytest.approx(fp32["loss"].item(), rel=0.03)


def test_embed_in_fp32_equals_the_encoder_in_float32():
    from facessl.common.augment import eval_transform
    from facessl.common.models import build_encoder

    torch.manual_seed(5)
    encoder = build_encoder().eval()
    images = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8)
    with torch.no_grad():
        expected = encoder(eval_transform(images, 32))
    got = embed(encoder, images, 32, CPU, precision=resolve_precision("fp32", CPU))
    assert got.dtype == torch.float32 and torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    bf16 = embed(encoder, images, 32, CPU, precision=resolve_precision("bf16", CPU))
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert torch.nn.functional.cosine_similarity(bf16, expected).min() > 0.99


def test_bf16_pretraining_and_finetuning_give_finite_losses_on_real_crops(prepared_subset, tmp_path):
    from facessl.common.classify import ClassifierConfig, train_classifier
    from facessl.common.simclr import PretrainConfig, pretrain

    simclr = tmp_path / "simclr"
    cfg = PretrainConfig(epochs=1, batch_size=32, image_size=32, knn_every=1, log_every=0, precision="bf16")
    lines = []
    summary = pretrain(str(prepared_subset), str(simclr), cfg, log=lines.append)
    # asked for on a CPU without native bf16, it still runs, and the log says what it costs
    native = "precision bf16 (asked)"
    emulated = "precision bf16 (asked; this CPU has no avx512_bf16 or amx_bf16: emulated, slower than fp32)"
    assert (native if cpu_bf16_flags() else emulated) in lines, lines
    assert summary["precision"] == "bf16"
    assert torch.isfinite(torch.tensor(summary["final_loss"])) and 0 <= summary["knn_top1"] <= 1
    config = json.loads((simclr / "config.json").read_text())
    assert config["precision"] == "bf16" and config["precision_used"] == "bf16"

    classifier = tmp_path / "classifier"
    ccfg = ClassifierConfig(encoder=str(simclr), epochs=1, batch_size=32, image_size=32, precision="bf16")
    metrics = train_classifier(str(prepared_subset), str(classifier), ccfg, log=lambda *_: None)
    assert metrics["precision"] == "bf16"
    record = json.loads((classifier / "metrics.jsonl").read_text().splitlines()[0])
    assert all(torch.isfinite(torch.tensor(record[k])) for k in ("train_loss", "val_loss"))


def test_precision_option_refuses_other_values(tmp_path):
    from click.testing import CliRunner

    from facessl.jobs.pretrain_simclr import main

    result = CliRunner().invoke(main, ["--data", str(tmp_path), "--output", str(tmp_path / "o"), "--precision", "fp16"])
    assert result.exit_code == 2 and "fp16" in result.output
