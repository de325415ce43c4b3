import json
import math

import pytest
import torch

from facessl.common.losses import DCLLoss, NTXentLoss


def direct_nt_xent(z1, z2, tau):
    """Equation 1 of Chen et al. 2020 computed pair by pair with Python loops."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        sim = lambda a, b: float(z[a] @ z[b]) / tau  # noqa: E731
        denom = sum(math.exp(sim(i, k)) for k in range(n2) if k != i)
        total += -math.log(math.exp(sim(i, j)) / denom)
    return total / n2


@pytest.mark.parametrize("n,d,tau", [(1, 4, 0.5), (4, 8, 0.2), (16, 32, 0.07), (7, 128, 1.0)])
def test_nt_xent_matches_direct_formula(n, d, tau):
    gen = torch.Generator().manual_seed(n * 100 + d)
    z1, z2 = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    assert NTXentLoss(tau)(z1, z2).item() == pytest.approx(direct_nt_xent(z1, z2, tau), rel=1e-5, abs=1e-6)


def test_nt_xent_rewards_aligned_views():
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(32, 16, generator=gen)
    aligned = NTXentLoss(0.2)(z1, z1 + 0.01 * torch.randn(32, 16, generator=gen))
    unrelated = NTXentLoss(0.2)(z1, torch.randn(32, 16, generator=gen))
    assert aligned < unrelated
    assert aligned.item() < math.log(63) < unrelated.item() + 1.0


def test_nt_xent_gradient_flows_to_both_views():
    z1 = torch.randn(5, 8, requires_grad=True)
    z2 = torch.randn(5, 8, requires_grad=True)
    NTXentLoss(0.5)(z1, z2).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


@pytest.mark.parametrize("tau", [0.0, -0.1])
def test_nt_xent_rejects_bad_temperature(tau):
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(tau)


def test_nt_xent_rejects_mismatched_views():
    with pytest.raises(ValueError, match="equal shape"):
        NTXentLoss()(torch.randn(4, 8), torch.randn(5, 8))


def test_loss_is_float32_inside_bf16_autocast():
    """Under bf16 autocast (the CUDA training path; CPU autocast applies the same matmul rule) the
    similarity logits must stay float32: in bf16 the loss moves by percents."""
    torch.manual_seed(0)
    z1 = torch.randn(64, 128)
    # close positives: where bf16 rounding hurts most
    z2 = z1 + 0.05 * torch.randn(64, 128)
    loss_fn = NTXentLoss(0.1, gather_distributed=False)
    exact = loss_fn(z1.double(), z2.double())
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        amp = loss_fn(z1, z2)
    assert amp.dtype == torch.float32
    assert abs(amp.item() - exact.item()) < 1e-4 * exact.item()


def direct_dcl(z1, z2, tau):
    """Equation 6 of Yeh et al. 2021 (arXiv:2110.06848) computed pair by pair with Python loops: the positive
    is left out of the denominator."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        sim = lambda a, b: float(z[a] @ z[b]) / tau  # noqa: E731
        denom = sum(math.exp(sim(i, k)) for k in range(n2) if k not in (i, j))
        total += -sim(i, j) + math.log(denom)
    return total / n2


@pytest.mark.parametrize("n,d,tau", [(2, 4, 0.5), (4, 8, 0.2), (16, 32, 0.07), (7, 128, 1.0)])
def test_dcl_matches_direct_formula(n, d, tau):
    gen = torch.Generator().manual_seed(n * 100 + d)
    z1, z2 = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    assert DCLLoss(tau)(z1, z2).item() == pytest.approx(direct_dcl(z1, z2, tau), rel=1e-5, abs=1e-6)


def test_dcl_is_nt_xent_without_the_positive_term_and_rewards_aligned_views():
    """NT-Xent's denominator is DCL's plus the positive, so NT-Xent is always the larger; like NT-Xent, DCL is
    lower for two views that agree than for unrelated ones."""
    gen = torch.Generator().manual_seed(3)
    z1 = torch.randn(32, 16, generator=gen)
    z2 = torch.randn(32, 16, generator=gen)
    aligned = z1 + 0.01 * torch.randn(32, 16, generator=gen)
    assert NTXentLoss(0.3)(z1, z2).item() > DCLLoss(0.3)(z1, z2).item()
    assert DCLLoss(0.2)(z1, aligned).item() < DCLLoss(0.2)(z1, z2).item()


def test_dcl_gradients_match_a_double_precision_autograd_of_the_formula():
    gen = torch.Generator().manual_seed(5)
    z1 = torch.randn(6, 10, generator=gen, dtype=torch.double, requires_grad=True)
    z2 = torch.randn(6, 10, generator=gen, dtype=torch.double, requires_grad=True)
    DCLLoss(0.2)(z1, z2).backward()
    # the same loss written out with dense tensors
    a1 = z1.detach().clone().requires_grad_(True)
    a2 = z2.detach().clone().requires_grad_(True)
    z = torch.nn.functional.normalize(torch.cat([a1, a2]), dim=1)
    sim = z @ z.t() / 0.2
    n2 = sim.shape[0]
    pos = (torch.arange(n2) + n2 // 2) % n2
    keep = ~torch.eye(n2, dtype=torch.bool)
    keep[torch.arange(n2), pos] = False
    ref = (torch.logsumexp(sim.masked_fill(~keep, float("-inf")), dim=1) - sim[torch.arange(n2), pos]).mean()
    ref.backward()
    assert torch.allclose(z1.grad, a1.grad) and torch.allclose(z2.grad, a2.grad)


def test_dcl_rejects_a_batch_without_negatives():
    with pytest.raises(ValueError, match="at least 2 pairs"):
        DCLLoss(0.2, gather_distributed=False)(torch.randn(1, 8), torch.randn(1, 8))


def test_dcl_rejects_bad_temperature_and_mismatched_views():
    with pytest.raises(ValueError, match="temperature"):
        DCLLoss(0.0)
    with pytest.raises(ValueError, match="equal shape"):
        DCLLoss()(torch.randn(4, 8), torch.randn(5, 8))


def test_dcl_is_float32_inside_bf16_autocast():
    torch.manual_seed(0)
    z1 = torch.randn(64, 128)
    z2 = z1 + 0.05 * torch.randn(64, 128)
    loss_fn = DCLLoss(0.1, gather_distributed=False)
    exact = loss_fn(z1.double(), z2.double())
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        amp = loss_fn(z1, z2)
    assert amp.dtype == torch.float32
    assert abs(amp.item() - exact.item()) < 1e-4 * abs(exact.item()) + 1e-5


@pytest.mark.slow
def test_pretrain_simclr_trains_with_dcl_and_records_it(prepared_subset, tmp_path):
    """--loss dcl reaches the trainer: same seed, same batches, and DCL's first-epoch loss lies below NT-Xent's
    (the positive's term leaves the log-sum-exp, which can only make it smaller)."""
    from click.testing import CliRunner

    from facessl.jobs.pretrain_simclr import main as pretrain_main

    losses = {}
    for loss in ("ntxent", "dcl"):
        out = tmp_path / loss
        args = ["--data", prepared_subset, "--output", out, "--epochs", 1, "--image-size", 32, "--batch-size", 32]
        args += ["--warmup-epochs", 0, "--knn-every", 0, "--checkpoint-every", 0, "--device", "cpu", "--loss", loss]
        result = CliRunner().invoke(pretrain_main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        assert json.loads((out / "config.json").read_text())["loss"] == loss
        losses[loss] = json.loads((out / "summary.json").read_text())["final_loss"]
    assert losses["dcl"] < losses["ntxent"]
