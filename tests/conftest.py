"""Shared fixtures: the real face data in ../shared, a real S3 server process (moto's standalone
server, spoken to over HTTP), and small real datasets built from ../shared/data/faces."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    for candidate in (os.environ.get("FACESSL_SHARED"), REPO.parent / "shared"):
        if candidate and (Path(candidate) / "data" / "faces").is_dir():
            return Path(candidate)
    raise RuntimeError("real test data not found: set FACESSL_SHARED to the folder holding data/faces and cases/")


SHARED = _shared_dir()
GLINT24 = SHARED / "data" / "faces" / "glint24"
CASES = SHARED / "cases" / "prepare-data"
E2E_IDENTITIES = ("Barack Obama", "Keira Knightley", "Tom Hanks")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 in its own process; yields its endpoint URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Standard AWS environment pointing at the moto server, and a fresh bucket; yields the bucket name."""
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-do-not-print")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    monkeypatch.setenv("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
    from facessl.common import storage

    storage._CLIENTS.clear()
    bucket = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    yield bucket
    storage._CLIENTS.clear()


@pytest.fixture(scope="session")
def glint_subset(tmp_path_factory) -> Path:
    """A raw folder with 80 real glint24 photos of each of three identities (copied, not linked)."""
    root = tmp_path_factory.mktemp("glint-subset")
    for name in E2E_IDENTITIES:
        (root / name).mkdir()
        for src in sorted((GLINT24 / name).iterdir())[:80]:
            shutil.copyfile(src, root / name / src.name)
    return root


@pytest.fixture(scope="session")
def prepared_subset(glint_subset, tmp_path_factory) -> Path:
    """``glint_subset`` prepared at 64 px (the already-cropped faces kept whole when Haar misses)."""
    from facessl.common.faces import DetectConfig
    from facessl.common.prepare import PrepareConfig, prepare_dataset

    out = tmp_path_factory.mktemp("prepared") / "ds"
    cfg = PrepareConfig(detect=DetectConfig(image_size=64, on_no_face="keep-full"), workers=2)
    prepare_dataset(str(glint_subset), str(out), cfg, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def prepared_sharded(glint_subset, tmp_path_factory) -> Path:
    """``glint_subset`` at 32 px in shards of 10 samples (17 train shards, the last one short)."""
    from facessl.common.faces import DetectConfig
    from facessl.common.prepare import PrepareConfig, prepare_dataset

    out = tmp_path_factory.mktemp("prepared-sharded") / "ds"
    cfg = PrepareConfig(detect=DetectConfig(image_size=32, on_no_face="keep-full"), workers=2, shard_size=10)
    prepare_dataset(str(glint_subset), str(out), cfg, log=lambda *_: None)
    return out
