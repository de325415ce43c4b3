"""The storage layer on a local folder and on a real S3 server (SeaweedFS over HTTP): same calls, same results."""

import os

import pytest

from facessl.common.errors import BadInputError
from facessl.common.storage import NotFoundError, location_within, open_file_location, open_storage, safe_key


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.real_s3)])
def store(request, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "root"))
    bucket = request.getfixturevalue("s3_env")
    return open_storage(f"s3://{bucket}/some/prefix")


def test_bytes_round_trip_list_and_exists(store):
    store.write_bytes("a/b.bin", b"\x00\x01payload")
    store.write_text("Jos\u00e9 Mar\u00eda/notes 1.txt", "hello")
    assert store.read_bytes("a/b.bin") == b"\x00\x01payload"
    assert store.read_text("Jos\u00e9 Mar\u00eda/notes 1.txt") == "hello"
    assert store.list() == {"a/b.bin": 9, "Jos\u00e9 Mar\u00eda/notes 1.txt": 5}
    assert store.list("a") == {"a/b.bin": 9}
    assert store.exists("a/b.bin") and not store.exists("a/missing.bin")


def test_overwrite_replaces_content(store):
    store.write_bytes("k", b"first")
    store.write_bytes("k", b"second")
    assert store.read_bytes("k") == b"second"


def test_read_with_a_size_limit_refuses_larger_objects_before_reading(store):
    store.write_bytes("photo.jpg", b"x" * 1000)
    assert store.read_bytes("photo.jpg", max_bytes=1000) == b"x" * 1000
    with pytest.raises(BadInputError, match=r"photo.jpg is 1,000 bytes, over the 999-byte limit"):
        store.read_bytes("photo.jpg", max_bytes=999)
    with pytest.raises(NotFoundError):
        store.read_bytes("missing.jpg", max_bytes=999)


def test_missing_key_is_a_clear_error(store):
    with pytest.raises(NotFoundError, match="not found: .*nothing/here"):
        store.read_bytes("nothing/here")


def test_files_and_sync_to_local(store, tmp_path):
    big = tmp_path / "big.bin"
    # above boto3's 8 MiB multipart threshold
    big.write_bytes(os.urandom(9 * 1024 * 1024))
    store.upload_file(big, "shards/big.bin")
    store.write_bytes("shards/small.bin", b"x" * 10)
    store.download_file("shards/big.bin", tmp_path / "back" / "big.bin")
    assert (tmp_path / "back" / "big.bin").read_bytes() == big.read_bytes()
    local = store.sync_to_local("shards", tmp_path / "cache")
    assert sorted(p.name for p in local.iterdir()) == ["big.bin", "small.bin"]
    assert (local / "big.bin").read_bytes() == big.read_bytes()


@pytest.mark.parametrize("bad", ["../escape", "a/../../b", "/etc/passwd", "a\\..\\b", ""])
def test_keys_cannot_escape_the_root(store, bad):
    with pytest.raises(ValueError):
        store.write_bytes(bad, b"x")


def test_safe_key_keeps_odd_but_harmless_names():
    assert safe_key("Ren\u00e9e O'Neil", "x y.jpg") == "Ren\u00e9e O'Neil/x y.jpg"
    assert safe_key("..hidden..", "a") == "..hidden../a"


@pytest.mark.real_s3
def test_s3_errors_name_the_uri_and_never_the_secret(s3_env, monkeypatch):
    missing_bucket = open_storage("s3://no-such-bucket-facessl/x")
    for call in (lambda: missing_bucket.read_bytes("k"), lambda: missing_bucket.write_bytes("k", b"x")):
        with pytest.raises(BadInputError) as info:
            call()
        assert "does not exist (NoSuchBucket) for s3://no-such-bucket-facessl/x/k" in str(info.value)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in str(info.value)


def test_unsupported_scheme_is_refused():
    with pytest.raises(BadInputError, match="unsupported location"):
        open_storage("gs://bucket/x")
    # a file option (identify --photo, --encoder)
    with pytest.raises(BadInputError, match="unsupported location"):
        open_file_location("https://example.com/face.jpg")


def test_location_within_sees_through_links_and_dots(tmp_path):
    (tmp_path / "raw" / "a").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "raw")
    assert location_within(tmp_path / "raw", tmp_path / "raw/../raw")
    assert location_within(tmp_path / "link" / "a" / "out", tmp_path / "raw")
    # a prefix of the name is not inside
    assert not location_within(tmp_path / "raw-2", tmp_path / "raw")
    assert location_within("s3://b/data/raw/x", "s3://b/data//raw/")
    assert not location_within("s3://b/data/rawx", "s3://b/data/raw") and not location_within(
        "s3://b/raw", str(tmp_path)
    )


@pytest.mark.parametrize("spelling", ["dots", "relative dots", "link"])
def test_a_root_spelled_with_dots_or_through_a_link_lists_its_files(tmp_path, monkeypatch, spelling):
    """The main job's default photo folder is the checkout's ../shared: a root written with '..', relative to
    the working folder, or reached through a link lists, reads and finds its files as the plain path does."""
    raw = tmp_path / "shared" / "raw"
    (raw / "Tom Hanks").mkdir(parents=True)
    (raw / "Tom Hanks" / "a.jpg").write_bytes(b"jpeg")
    (tmp_path / "checkout").mkdir()
    (tmp_path / "link").symlink_to(raw)
    (raw / "Tom Hanks" / "more").symlink_to(raw / "Tom Hanks")
    monkeypatch.chdir(tmp_path / "checkout")
    root = {
        "dots": str(tmp_path / "checkout" / ".." / "shared" / "raw"),
        "relative dots": "../shared/raw",
        "link": str(tmp_path / "link"),
    }[spelling]
    store = open_storage(root)
    assert store.list() == {"Tom Hanks/a.jpg": 4}
    assert store.folder_links() == ["Tom Hanks/more"]
    assert store.read_bytes("Tom Hanks/a.jpg") == b"jpeg" and store.exists("Tom Hanks/a.jpg")


@pytest.mark.real_s3
def test_s3_folder_markers_are_not_listed_as_files(s3_env, s3_server):
    """Folders made in the S3 console are zero-byte keys ending in '/': prepare-data would record each as
    a skipped photo."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)
    for key in ("raw/", "raw/Tom Hanks/", "raw/Tom Hanks/a.jpg"):
        client.put_object(Bucket=s3_env, Key=key, Body=b"x" if key.endswith(".jpg") else b"")
    assert open_storage(f"s3://{s3_env}/raw").list() == {"Tom Hanks/a.jpg": 1}


def test_writing_or_deleting_a_link_never_touches_its_target(tmp_path):
    """A key that is a symbolic link is replaced or removed as a link: the file it points to (here another
    run's model) stays as it was. A folder where a file goes is a clear error, not a traceback."""
    from facessl.common.errors import BadInputError

    root, other = tmp_path / "root", tmp_path / "other"
    root.mkdir(), other.mkdir()
    (other / "model.pt").write_bytes(b"weights")
    (other / "notes.txt").write_bytes(b"precious")
    os.symlink(other / "model.pt", root / "out.jpg")
    os.symlink(other / "notes.txt", root / "old.pt")
    store = open_storage(str(root))
    store.write_bytes("out.jpg", b"jpeg")
    store.delete("old.pt")
    assert (root / "out.jpg").read_bytes() == b"jpeg" and not (root / "out.jpg").is_symlink()
    assert not os.path.lexists(root / "old.pt")
    assert (other / "model.pt").read_bytes() == b"weights" and (other / "notes.txt").read_bytes() == b"precious"
    (root / "encoder.pt").mkdir()
    (tmp_path / "local.bin").write_bytes(b"x")
    with pytest.raises(BadInputError, match="cannot write .*encoder.pt"):
        store.upload_file(tmp_path / "local.bin", "encoder.pt")
