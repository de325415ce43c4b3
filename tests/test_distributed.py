"""Two gloo processes equal one process on the same global batch; torchrun runs the real job."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from facessl.common.distributed import sync_batchnorm
from facessl.common.losses import NTXentLoss
from facessl.common.models import ProjectionHead, SimCLRModel, build_encoder
from facessl.common.simclr import simclr_loss

# The torchrun tests run gloo CPU ranks (FACESSL_DEVICE=cpu in their environment) so that they mean the same on
# a one-GPU machine, where a second CUDA rank would have no GPU.

N, SIZE = 8, 32


def make_model_and_views():
    """A SimCLR model and two views of N images, in float64: a freshly initialised ResNet is badly
    conditioned, and float32 rounding alone moves its first layers' gradients by ~0.5%."""
    torch.manual_seed(0)
    model = SimCLRModel(build_encoder(), ProjectionHead(512, 64, 32))
    gen = torch.Generator().manual_seed(1)
    return (
        model.double(),
        torch.randn(N, 3, SIZE, SIZE, generator=gen).double(),
        torch.randn(N, 3, SIZE, SIZE, generator=gen).double(),
    )


def _rank(rank, world, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, v1, v2 = make_model_and_views()
    model = sync_batchnorm(model, torch.device("cpu"))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    n = N // world
    loss = simclr_loss(ddp, v1[rank * n : (rank + 1) * n], v2[rank * n : (rank + 1) * n], NTXentLoss(0.5))
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    if rank == 0:
        torch.save({"loss": total / world, "grads": {k: p.grad for k, p in model.named_parameters()}}, result_file)
    dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path):
    torch.set_num_threads(1)
    model, v1, v2 = make_model_and_views()
    loss = simclr_loss(model, v1, v2, NTXentLoss(0.5))
    loss.backward()
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "r.pt")), nprocs=2)
    result = torch.load(tmp_path / "r.pt", weights_only=True)
    assert torch.allclose(result["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(result["grads"][name], p.grad, rtol=1e-4, atol=1e-7), name


def test_local_only_loss_would_differ(tmp_path):
    """The check above can fail: without gathered negatives the loss is not the global one."""
    model, v1, v2 = make_model_and_views()
    with torch.no_grad():
        z = model(torch.cat([v1, v2]))
        z1, z2 = z.chunk(2)
        full = NTXentLoss(0.5)(z1, z2)
        half = (NTXentLoss(0.5)(z1[:4], z2[:4]) + NTXentLoss(0.5)(z1[4:], z2[4:])) / 2
    assert not torch.allclose(full, half, rtol=1e-3)


def one_and_two_processes(script, args, tmp_path):
    """Run a job once as a plain process and once under torchrun with 2 gloo processes."""
    bin_dir = Path(sys.executable).parent
    one = subprocess.run(
        [str(bin_dir / script), *args, "--output", str(tmp_path / "one")], capture_output=True, text=True, timeout=900
    )
    assert one.returncode == 0, one.stdout + one.stderr
    two = subprocess.run(
        [
            str(bin_dir / "torchrun"),
            "--standalone",
            "--nproc-per-node",
            "2",
            str(bin_dir / script),
            *args,
            "--output",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1", "FACESSL_DEVICE": "cpu"},
    )
    assert two.returncode == 0, two.stdout + two.stderr
    return two


@pytest.mark.slow
def test_torchrun_two_processes_write_the_same_outputs(prepared_sharded, tmp_path):
    """Each rank streams its own whole shards (17 train shards of 10 are dealt out between the 2 ranks)."""
    two = one_and_two_processes(
        "pretrain-simclr",
        [
            "--data",
            str(prepared_sharded),
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--image-size",
            "32",
            "--knn-every",
            "1",
            "--log-every",
            "0",
            "--data-mode",
            "stream",
            "--shuffle-window",
            "40",
        ],
        tmp_path,
    )
    assert "data mode stream" in two.stdout

    def files(d):
        return sorted(
            p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and "checkpoints/ckpt" not in p.as_posix()
        )

    assert files(tmp_path / "one") == files(tmp_path / "two")
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["world_size"] == 2 and config["global_batch_size"] == 32 and config["data_mode"] == "stream"
    history = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all(h["loss"] > 0 for h in history) and "knn_top1" in history[-1]


@pytest.mark.slow
def test_torchrun_two_processes_train_a_classifier(prepared_subset, tmp_path):
    two = one_and_two_processes(
        "train-classifier",
        ["--data", str(prepared_subset), "--epochs", "2", "--batch-size", "32", "--image-size", "32"],
        tmp_path,
    )
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert two.stdout.count("test top-1") == 1, "only rank 0 reports"
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["test"]["n"] == 24 and 0.0 <= metrics["test"]["top1"] <= 1.0
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_spec_wrapper_exits_with_the_failing_ranks_code(prepared_sharded, tmp_path):
    """One rank hits a truncated shard (exit 3); torchrun itself exits 1, and the shell line of
    infra/k8s/pretrain-simclr-multinode.yaml turns that back into 3 for the podFailurePolicy."""
    import shutil

    from test_infra import EXIT_WRAPPER_TAIL

    data = tmp_path / "data"
    shutil.copytree(prepared_sharded, data)
    # dealt to rank 1: damaged past byte 3000, its size kept
    shard = data / "train" / "shard-000001.tar"
    # (a shorter file is refused on every rank, from the manifest's count)
    whole = shard.read_bytes()
    shard.write_bytes(whole[:3000] + random.Random(0).randbytes(len(whole) - 3000))
    bin_dir = Path(sys.executable).parent
    torchrun = (
        f"{bin_dir / 'torchrun'} --standalone --nproc-per-node 2 {bin_dir / 'pretrain-simclr'} "
        f"--data {data} --output {tmp_path / 'out'} --epochs 1 --image-size 32 --data-mode memory"
    )
    script = f'rm -f "$FACESSL_EXIT_CODE_FILE"; {torchrun}; {EXIT_WRAPPER_TAIL}'
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "FACESSL_DEVICE": "cpu",
        "FACESSL_EXIT_CODE_FILE": str(tmp_path / "exit-code"),
        "FACESSL_CACHE": str(tmp_path / "cache"),
    }
    bare = subprocess.run(["sh", "-c", torchrun], capture_output=True, text=True, timeout=600, env=env)
    assert bare.returncode == 1, "torchrun on its own loses the code"
    wrapped = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert wrapped.returncode == 3, wrapped.stdout + wrapped.stderr
    assert "error: shard train/shard-000001.tar holds 1 of the 10 samples" in wrapped.stderr


@pytest.mark.slow
def test_resuming_with_another_process_count_is_refused(prepared_sharded, tmp_path):
    """The global batch, the LR and the steps per epoch depend on the process count: a resumed run must not
    silently change them."""
    bin_dir = Path(sys.executable).parent
    args = [
        "--data",
        str(prepared_sharded),
        "--output",
        str(tmp_path / "run"),
        "--epochs",
        "1",
        "--batch-size",
        "9",
        "--image-size",
        "32",
        "--knn-every",
        "0",
    ]
    one = subprocess.run([str(bin_dir / "pretrain-simclr"), *args], capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node", "2", str(bin_dir / "pretrain-simclr"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "FACESSL_DEVICE": "cpu"},
    )
    assert two.returncode != 0 and "world_size: 1 -> 2" in two.stderr
