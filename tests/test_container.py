"""The image, run as containers: the three jobs in order against a real S3 server, and a SIGTERM'd
pretraining container resumed by the next one.

Needs podman and a built image named by FACESSL_IMAGE (``infra/ci/build-image.sh`` builds one; .ci/run does
it). These are the ``container`` tier: the fast tier deselects them, and when they are selected (``--all``,
``-m container``) a missing podman or image fails them: a tier that was asked for is never skipped.
The containers reach the real S3 server of the tests (SeaweedFS, ``s3_server``) on 127.0.0.1 through
``--network host``, as its non-admin writer identity.
"""

import json
import os
import re
import shutil
import subprocess
import time
import uuid

import pytest

from conftest import E2E_IDENTITIES, GLINT24, S3_WRITER, s3_client

IMAGE = os.environ.get("FACESSL_IMAGE")
pytestmark = [pytest.mark.container, pytest.mark.real_s3]


@pytest.fixture(scope="module", autouse=True)
def podman_and_image():
    """Fail, never skip, when the container tier runs without podman or without a built image."""
    if not shutil.which("podman"):
        pytest.fail("the container tier needs podman (apt-get install podman; see docs/development.md)")
    if not IMAGE:
        pytest.fail("the container tier needs FACESSL_IMAGE: build one with infra/ci/build-image.sh")


# 6 test images per identity, 18 in all: 'above chance' is not one lucky image
PER_IDENTITY = 60


@pytest.fixture(scope="module")
def bucket(s3_server):
    """A bucket on the S3 server holding raw photos: PER_IDENTITY of each of three glint24 identities; yields its
    name and an admin client."""
    name = f"ctr-{uuid.uuid4().hex[:10]}"
    s3 = s3_client(s3_server)
    s3.create_bucket(Bucket=name)
    for identity in E2E_IDENTITIES:
        for photo in sorted((GLINT24 / identity).iterdir())[:PER_IDENTITY]:
            s3.upload_file(str(photo), name, f"raw/{identity}/{photo.name}")
    return name, s3


def container(s3_server, *args, name=None, detach=False):
    """``podman run`` of the image with the standard AWS variables pointing at the S3 server (boto3's default
    checksum settings)."""
    env = {
        "AWS_ENDPOINT_URL_S3": s3_server,
        "AWS_ACCESS_KEY_ID": S3_WRITER[0],
        "AWS_SECRET_ACCESS_KEY": S3_WRITER[1],
        "AWS_DEFAULT_REGION": "us-east-1",
        "OMP_NUM_THREADS": "2",
    }
    cmd = ["podman", "run", "--network", "host", "--shm-size", "256m"]
    cmd += ["--name", name] if name else ["--rm"]
    cmd += ["-d"] if detach else []
    for key, value in env.items():
        cmd += ["-e", f"{key}={value}"]
    return subprocess.run([*cmd, IMAGE, *map(str, args)], capture_output=True, text=True, timeout=1200)


def test_three_jobs_run_as_containers_and_pretraining_survives_sigterm(s3_server, bucket):
    name, s3 = bucket
    root = f"s3://{name}"
    prep = container(
        s3_server,
        "prepare-data",
        "--input",
        f"{root}/raw",
        "--output",
        f"{root}/prepared",
        "--image-size",
        64,
        "--on-no-face",
        "keep-full",
        "--workers",
        2,
    )
    assert prep.returncode == 0, prep.stdout + prep.stderr
    manifest = json.loads(s3.get_object(Bucket=name, Key="prepared/manifest.json")["Body"].read())
    assert manifest["classes"] == sorted(E2E_IDENTITIES)
    assert sum(manifest["counts"]["splits"].values()) == manifest["counts"]["ok"] > 0.9 * 3 * PER_IDENTITY

    simclr = [
        "pretrain-simclr",
        "--data",
        f"{root}/prepared",
        "--output",
        f"{root}/simclr",
        "--epochs",
        4,
        "--batch-size",
        16,
        "--image-size",
        48,
        "--warmup-epochs",
        1,
        "--knn-every",
        0,
        "--log-every",
        1,
    ]
    run_name = f"facessl-test-{uuid.uuid4().hex[:8]}"
    started = container(s3_server, *simclr, name=run_name, detach=True)
    assert started.returncode == 0, started.stderr
    try:
        deadline = time.time() + 600
        # wait until training is under way in epoch 2, then preempt it
        while time.time() < deadline:
            logs = subprocess.run(["podman", "logs", run_name], capture_output=True, text=True).stdout
            if "epoch 2 step 2/" in logs:
                break
            time.sleep(0.5)
        else:
            pytest.fail("pretraining never reached epoch 2:\n" + logs)
        subprocess.run(["podman", "kill", "--signal", "TERM", run_name], check=True, capture_output=True)
        waited = subprocess.run(["podman", "wait", run_name], capture_output=True, text=True, timeout=300)
        logs = subprocess.run(["podman", "logs", run_name], capture_output=True, text=True)
        # checkpoint written, retry and resume
        assert waited.stdout.strip() == "4", logs.stdout + logs.stderr
        assert "stopped by SIGTERM" in logs.stdout + logs.stderr
    finally:
        subprocess.run(["podman", "rm", "-f", run_name], capture_output=True)
    latest = json.loads(s3.get_object(Bucket=name, Key="simclr/checkpoints/latest.json")["Body"].read())
    assert latest

    resumed = container(s3_server, *simclr)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    # SIGTERM is sent once epoch 2 is under way; on a fast or busy machine it lands a few steps later
    assert re.search(r"resuming at epoch [234], step \d+", resumed.stdout), resumed.stdout
    history = [
        json.loads(line)
        for line in s3.get_object(Bucket=name, Key="simclr/metrics.jsonl")["Body"].read().decode().splitlines()
    ]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]

    classify = container(
        s3_server,
        "train-classifier",
        "--data",
        f"{root}/prepared",
        "--output",
        f"{root}/cls",
        "--encoder",
        f"{root}/simclr",
        "--epochs",
        10,
        "--image-size",
        64,
        "--optimizer",
        "adamw",
        "--lr",
        "1e-3",
        "--weight-decay",
        "0.05",
        "--label-smoothing",
        "0.1",
    )
    assert classify.returncode == 0, classify.stdout + classify.stderr
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=name)["Contents"]}
    assert {"prepared/manifest.json", "simclr/encoder.pt", "cls/model.pt", "cls/metrics.json"} <= keys
    metrics = json.loads(s3.get_object(Bucket=name, Key="cls/metrics.json")["Body"].read())
    # chance is 1/3
    assert metrics["test"]["top1"] > 0.5, metrics["test"]


def test_container_exit_codes(s3_server, bucket):
    """The codes the job specs rely on: 2 usage error, 3 bad input (never retried)."""
    name, _ = bucket
    # --output missing
    usage = container(s3_server, "pretrain-simclr", "--data", f"s3://{name}/prepared")
    assert usage.returncode == 2, usage.stderr
    bad = container(s3_server, "pretrain-simclr", "--data", f"s3://{name}/raw", "--output", f"s3://{name}/x")
    assert bad.returncode == 3 and "manifest.json" in bad.stderr + bad.stdout and "Traceback" not in bad.stderr
