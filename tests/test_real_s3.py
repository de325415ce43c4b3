"""Against a real S3 server (SeaweedFS's ``weed mini``, the ``s3_server`` fixture): multipart uploads with boto3's
default checksums, and the clear exit-3 errors for wrong credentials, a missing permission and a missing bucket.
A missing server and a server answering 5xx (faults a real server will not produce on demand: a closed port and a
stub) give the retry code 4."""

import base64
import http.server
import os
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest

from conftest import CASES, S3_ADMIN, S3_READER, S3_WRITER, _free_port, s3_client
from facessl.common.storage import open_storage

BIN = Path(sys.executable).parent


def prepare_data(output: str, env: dict | None = None, input: str = str(CASES / "raw")):
    """prepare-data from ``input`` into ``output`` as a user would run it, with ``env`` over the current one."""
    return subprocess.run(
        [str(BIN / "prepare-data"), "--input", input, "--output", output, "--min-images", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def objects(endpoint: str, bucket: str) -> list[str]:
    """Every key in ``bucket``, listed as the admin."""
    return [o["Key"] for o in s3_client(endpoint).list_objects_v2(Bucket=bucket).get("Contents", [])]


@pytest.mark.real_s3
def test_multipart_upload_above_8_mib_with_boto3s_default_checksums(s3_env, s3_server, tmp_path):
    """boto3 (1.36 on) sends a CRC32 with every upload unless told otherwise; the server must store and return it,
    for a plain PUT and for the parts of a multipart upload (whose ETag is not an MD5 and ends in -<parts>)."""
    assert "AWS_REQUEST_CHECKSUM_CALCULATION" not in os.environ and "AWS_RESPONSE_CHECKSUM_VALIDATION" not in os.environ
    store = open_storage(f"s3://{s3_env}/run")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(9 * 1024 * 1024 + 17))
    store.upload_file(big, "checkpoints/big.bin")
    small = b"a small object"
    store.write_bytes("small.bin", small)

    client = s3_client(s3_server)
    head = client.head_object(Bucket=s3_env, Key="run/checkpoints/big.bin", ChecksumMode="ENABLED")
    assert head["ContentLength"] == big.stat().st_size
    # two parts of 8 MiB and less: uploaded in parts, each with its checksum
    assert head["ETag"].strip('"').endswith("-2") and head["ChecksumCRC32"].endswith("-2"), head
    got = client.get_object(Bucket=s3_env, Key="run/small.bin", ChecksumMode="ENABLED")
    assert got["ChecksumCRC32"] == base64.b64encode(zlib.crc32(small).to_bytes(4, "big")).decode()

    # and back through the storage layer, with boto3's default response validation
    store.download_file("checkpoints/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()
    assert store.read_bytes("small.bin") == small
    assert store.list() == {"checkpoints/big.bin": big.stat().st_size, "small.bin": len(small)}


@pytest.mark.real_s3
@pytest.mark.parametrize(
    "credentials,code",
    [
        ((S3_WRITER[0], "not-the-secret-of-this-key"), "SignatureDoesNotMatch"),
        (("no-such-access-key", S3_WRITER[1]), "InvalidAccessKeyId"),
        (S3_READER, "AccessDenied"),
    ],
    ids=["wrong-secret", "unknown-key", "read-only-identity"],
)
def test_refused_credentials_exit_3_naming_the_uri_and_code_and_write_nothing(s3_env, s3_server, credentials, code):
    output = f"s3://{s3_env}/prepared"
    r = prepare_data(output, {"AWS_ACCESS_KEY_ID": credentials[0], "AWS_SECRET_ACCESS_KEY": credentials[1]})
    assert r.returncode == 3, r.stdout + r.stderr
    assert f"access denied ({code}) for {output}/" in r.stderr and "check the AWS credentials" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "detect faces" not in r.stderr
    for secret in (credentials[1], S3_WRITER[1], S3_ADMIN[1]):
        assert secret not in r.stdout + r.stderr
    assert objects(s3_server, s3_env) == []


@pytest.mark.real_s3
def test_refused_credentials_on_an_s3_input_exit_3(s3_env, s3_server, tmp_path):
    s3_client(s3_server).put_object(Bucket=s3_env, Key="raw/Tom Hanks/a.jpg", Body=b"not read")
    r = prepare_data(
        str(tmp_path / "out"),
        {"AWS_SECRET_ACCESS_KEY": "not-the-secret-of-this-key"},
        input=f"s3://{s3_env}/raw",
    )
    assert r.returncode == 3 and f"access denied (SignatureDoesNotMatch) for s3://{s3_env}/raw" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and S3_WRITER[1] not in r.stdout + r.stderr


@pytest.mark.real_s3
def test_a_missing_bucket_is_named_and_never_created(s3_env, s3_server, tmp_path):
    """The jobs' (non-admin) identity gets AccessDenied for an upload into a missing bucket from SeaweedFS, and
    NoSuchBucket for a read: both are reported as the missing bucket, and the bucket is not made."""
    r = prepare_data("s3://facessl-no-such-bucket/prepared")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "bucket 'facessl-no-such-bucket' does not exist (NoSuchBucket) for s3://facessl-no-such-bucket/" in r.stderr
    assert "Traceback" not in r.stderr and "detect faces" not in r.stderr
    r = prepare_data(str(tmp_path / "out"), input="s3://facessl-no-such-bucket/raw")
    assert r.returncode == 3 and "'facessl-no-such-bucket' does not exist (NoSuchBucket)" in r.stderr, r.stderr
    buckets = [b["Name"] for b in s3_client(s3_server).list_buckets()["Buckets"]]
    assert "facessl-no-such-bucket" not in buckets and s3_env in buckets


@pytest.mark.real_s3
def test_admin_keys_create_a_missing_bucket_on_upload(s3_server):
    """The SeaweedFS quirk that makes the jobs' tests run as a non-admin identity: with the admin's keys a wrong
    bucket name is silently created by the first upload (``weed mini -s3.autoCreateBucket``, on by default)."""
    client = s3_client(s3_server, S3_ADMIN)
    client.put_object(Bucket="facessl-made-by-upload", Key="k", Body=b"x")
    assert "facessl-made-by-upload" in [b["Name"] for b in client.list_buckets()["Buckets"]]


def test_a_missing_server_exits_4_naming_the_endpoint(tmp_path):
    # a port nothing listens on
    endpoint = f"http://127.0.0.1:{_free_port()}"
    env = {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "secret-do-not-print",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "2",
    }
    r = prepare_data(str(tmp_path / "out"), env, input="s3://bucket/raw")
    assert r.returncode == 4, r.stdout + r.stderr
    assert f"cannot connect to the S3 endpoint {endpoint} for s3://bucket/raw" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "secret-do-not-print" not in r.stderr


class _Answers503(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that is up but overloaded: every request gets 503 SlowDown."""

    def _answer(self):
        body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _answer

    def log_message(self, *args):
        pass


def test_a_server_answering_5xx_exits_4_with_the_s3_code(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers503)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{server.server_address[1]}",
            "AWS_ACCESS_KEY_ID": "key",
            "AWS_SECRET_ACCESS_KEY": "secret-do-not-print",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_MAX_ATTEMPTS": "2",
        }
        r = prepare_data(str(tmp_path / "out"), env, input="s3://bucket/raw")
    finally:
        server.shutdown()
        server.server_close()
    assert r.returncode == 4 and "S3 error SlowDown for s3://bucket/raw" in r.stderr, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "secret-do-not-print" not in r.stderr
