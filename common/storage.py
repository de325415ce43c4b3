"""One storage layer for local folders and S3-compatible object stores.

Every job names its input and output as a *location*: a local path (``./runs/x``, ``/data/raw``) or an
``s3://bucket/prefix`` URI. :func:`open_storage` returns an object with the same calls for both:

    read_bytes / write_bytes / upload_file / download_file / list / exists / sync_to_local

Keys are ``/``-separated paths relative to the location's root. :func:`safe_key` refuses keys that
would escape the root (``..``, absolute paths, backslashes, NUL), so names taken from user data (identity
folder names) can never write outside the output prefix.

S3 settings come from the standard AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``); with a custom endpoint
(MinIO, moto, Ceph...) path-style addressing is used. Retries use botocore's ``standard`` mode and
files above 8 MiB go up as multipart uploads (boto3's transfer manager). Error messages carry the
URI and the S3 error code, never credentials.

Writes are atomic: a local file is written to a temporary name in the same folder and renamed; an S3
object becomes visible only when its PUT (or multipart upload) completes.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import threading
from pathlib import Path

from facessl.common.errors import BadInputError, StorageError, UsageError


class NotFoundError(BadInputError):
    """The key does not exist at the location."""


class UnsafeKeyError(BadInputError, ValueError):
    """A key that would leave the location's root (``..``, absolute, backslash, NUL) or is empty."""


def is_s3(location: str) -> bool:
    """True when ``location`` is an ``s3://`` URI."""
    return str(location).startswith("s3://")


def safe_key(*parts: str) -> str:
    """Join key parts with ``/`` and refuse anything that could leave the root.

    Raises:
        UnsafeKeyError (a ValueError): a part is empty, absolute, contains ``..``, a backslash or a NUL byte.
    """
    out = []
    for part in parts:
        for seg in str(part).split("/"):
            if seg in ("", "."):
                continue
            if seg == ".." or "\\" in seg or "\x00" in seg:
                raise UnsafeKeyError(f"unsafe key segment {seg!r} in {'/'.join(map(str, parts))!r}")
            out.append(seg)
    if not out:
        raise UnsafeKeyError("empty key")
    if str(parts[0]).startswith("/"):
        raise UnsafeKeyError(f"absolute key {parts[0]!r}")
    return "/".join(out)


def location_within(inner: str | os.PathLike, outer: str | os.PathLike) -> bool:
    """True when location ``inner`` is ``outer`` or lies inside it: local paths compared after resolving
    links and ``..``, ``s3://`` URIs by bucket and key segments; a local path and a URI never overlap."""
    inner, outer = str(inner), str(outer)
    if is_s3(inner) != is_s3(outer):
        return False
    if is_s3(inner):
        a, b = ([seg for seg in loc[len("s3://") :].split("/") if seg not in ("", ".")] for loc in (inner, outer))
        return a[: len(b)] == b
    a, b = Path(inner).resolve(), Path(outer).resolve()
    return a == b or b in a.parents


def join_location(location: str, *parts: str) -> str:
    """``location`` with ``parts`` appended (works for local paths and ``s3://`` URIs)."""
    key = safe_key(*parts)
    if is_s3(location):
        return location.rstrip("/") + "/" + key
    return str(Path(location) / key)


class Storage:
    """Common interface; use :func:`open_storage` to get one."""

    uri: str

    def read_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        """The object's bytes. With ``max_bytes``, a larger object (or a local FIFO, device... anything but a
        regular file) raises BadInputError before it is read."""

    def write_bytes(self, key: str, data: bytes) -> None: ...
    def upload_file(self, local_path: str | os.PathLike, key: str) -> None: ...
    def download_file(self, key: str, local_path: str | os.PathLike) -> None: ...
    def list(self, prefix: str = "") -> dict[str, int]: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def sync_to_local(self, prefix: str, cache_dir: str | os.PathLike) -> Path: ...
    def local_copy(self, key: str, cache_dir: str | os.PathLike) -> Path: ...

    def url(self, key: str) -> str:
        """Human-readable address of ``key`` (for messages)."""
        return join_location(self.uri, key)

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def folder_links(self, prefix: str = "") -> list[str]:
        """Links to folders that :meth:`list` leaves out (object stores have none)."""
        return []

    def check_writable(self, *folders: str) -> None:
        """Write and remove a small probe object at the top and in each of ``folders`` (keys the job will write
        under), so an unusable output fails before any work.

        Raises:
            BadInputError: the location cannot be written (a file where a folder should be, permissions, a
            read-only or pseudo file system, a missing bucket). StorageError: S3 unreachable.
        """
        try:
            for probe in [".facessl-write-check"] + [f"{folder}/.facessl-write-check" for folder in folders]:
                self.write_text(probe, "")
                self.delete(probe)
        # e.g. /proc reporting the probe it refused as missing
        except NotFoundError as exc:
            raise BadInputError(f"cannot write to {self.uri}: {exc}") from None


def _local_errors(method):
    """LocalStorage methods: a missing file -> NotFoundError, any other OSError (a file where a folder
    should be, permissions, read-only file system...) -> BadInputError naming the location."""
    import functools

    @functools.wraps(method)
    def wrapper(self, key="", *args, **kwargs):
        try:
            return method(self, key, *args, **kwargs)
        except FileNotFoundError:
            raise NotFoundError(f"not found: {self.url(key) if key else self.uri}") from None
        # mkdir/open through a path component that is a file
        except (FileExistsError, NotADirectoryError):
            raise BadInputError(
                f"cannot use {self.url(key) if key else self.uri}: a file stands on the path where a folder is needed"
            ) from None
        except OSError as exc:
            raise BadInputError(f"cannot use {self.url(key) if key else self.uri}: {exc.strerror or exc}") from None

    return wrapper


def _check_size(url: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise BadInputError(f"{url} is {size:,} bytes, over the {max_bytes:,}-byte limit")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


class LocalStorage(Storage):
    """A local folder (created on first write)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / safe_key(key)).resolve()
        if path != self.root.resolve() and self.root.resolve() not in path.parents:
            raise UnsafeKeyError(f"key {key!r} resolves outside {self.root}")
        return path

    def _entry(self, key: str) -> Path:
        """The key's own directory entry: its folder resolved and checked as in :meth:`_path`, its last part
        not, so that writing or deleting a key that is a symbolic link replaces or removes the link, never
        the file it points to (another run's model, a photo, a file outside the root)."""
        parent, _, name = safe_key(key).rpartition("/")
        return (self._path(parent) if parent else self.root.resolve()) / name

    @_local_errors
    def read_bytes(self, key, max_bytes=None):
        try:
            path = self._path(key)
            # stat first: opening a FIFO would wait for a writer
            if max_bytes is not None:
                st = path.stat()
                if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
                    raise BadInputError(f"{self.url(key)} is not a regular file")
                _check_size(self.url(key), st.st_size, max_bytes)
            return path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"not found: {self.url(key)}") from None
        except IsADirectoryError:
            raise NotFoundError(f"is a folder, not a file: {self.url(key)}") from None

    def _atomic_target(self, key):
        path = self._entry(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        # mkstemp makes 0600 files; outputs get the usual permissions
        os.chmod(tmp, 0o666 & ~_UMASK)
        return path, fd, tmp

    @_local_errors
    def write_bytes(self, key, data):
        path, fd, tmp = self._atomic_target(key)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def upload_file(self, local_path, key):
        try:
            path, fd, tmp = self._atomic_target(key)
        except OSError as exc:
            raise BadInputError(f"cannot write {self.url(key)}: {exc.strerror or exc}") from None
        os.close(fd)
        try:
            shutil.copyfile(local_path, tmp)
            # e.g. a folder standing where the file goes
            os.replace(tmp, path)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise BadInputError(f"cannot write {self.url(key)}: {exc.strerror or exc}") from None
            raise

    @_local_errors
    def download_file(self, key, local_path):
        src = self._path(key)
        if not src.is_file():
            raise NotFoundError(f"not found: {self.url(key)}")
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, local_path)

    @_local_errors
    def list(self, prefix=""):
        """Regular files under ``prefix`` (links to files followed; links to folders are not walked, see
        :meth:`folder_links`; dangling links, FIFOs and other special files are left out). A file reached
        through a link that leaves the root is listed, and reading it raises UnsafeKeyError."""
        # resolved, as _path resolves a prefix: the keys are relative to the resolved root, so a root spelled
        # with ".." or through a link lists its files too
        root = self.root.resolve()
        base = self._path(prefix) if prefix else root
        if not base.is_dir():
            return {}
        out = {}
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                if name.startswith(".tmp-"):
                    continue
                full = Path(dirpath) / name
                if not full.is_file():
                    continue
                out[full.relative_to(root).as_posix()] = full.stat().st_size
        return out

    @_local_errors
    def folder_links(self, prefix=""):
        """Keys of the symbolic links to folders under ``prefix``, which :meth:`list` does not walk (walking
        them can loop, leave the root, or list a folder twice under another name)."""
        root = self.root.resolve()
        base = self._path(prefix) if prefix else root
        links = []
        for dirpath, dirnames, _ in os.walk(base):
            for name in sorted(dirnames):
                full = Path(dirpath) / name
                if full.is_symlink():
                    links.append(full.relative_to(root).as_posix())
        return links

    @_local_errors
    def exists(self, key):
        return self._path(key).is_file()

    @_local_errors
    def delete(self, key):
        self._entry(key).unlink(missing_ok=True)

    def sync_to_local(self, prefix, cache_dir):
        """A local folder already is local: returns the folder itself, copies nothing."""
        return self._path(prefix) if prefix else self.root

    @_local_errors
    def local_copy(self, key, cache_dir):
        """The file itself (nothing is copied). Raises NotFoundError when missing."""
        path = self._path(key)
        if not path.is_file():
            raise NotFoundError(f"{'is a folder, not a file' if path.is_dir() else 'not found'}: {self.url(key)}")
        return path


_CLIENT_LOCK = threading.Lock()
_CLIENTS: dict[int, object] = {}


def _s3_client():
    """One boto3 S3 client per process (clients are not fork-safe), configured from the environment."""
    pid = os.getpid()
    with _CLIENT_LOCK:
        if pid not in _CLIENTS:
            import boto3
            from botocore.config import Config

            custom_endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            config = Config(
                retries={"mode": "standard", "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "8"))},
                s3={"addressing_style": "path" if custom_endpoint else "auto"},
                connect_timeout=10,
                # botocore's default: a silent server costs attempts x 60 s
                read_timeout=60,
            )
            _CLIENTS[pid] = boto3.session.Session().client("s3", config=config)
        return _CLIENTS[pid]


class S3Storage(Storage):
    """An ``s3://bucket/prefix`` location on AWS S3 or any S3-compatible server."""

    def __init__(self, uri: str):
        rest = uri[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise BadInputError(f"no bucket in {uri!r}: expected s3://bucket/prefix")
        # what botocore accepts; S3 itself is stricter
        if not re.fullmatch(r"[a-zA-Z0-9._-]{1,255}", bucket):
            raise BadInputError(f"{bucket!r} in {uri!r} is not a bucket name: letters, digits, '.', '-' and '_' only")
        self.bucket = bucket
        self.prefix = safe_key(prefix) if prefix.strip("/") else ""
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")

    def _key(self, key: str) -> str:
        key = safe_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, exc: Exception, key: str) -> Exception:
        """Turn a boto3/botocore exception into a credential-free NotFoundError / BadInputError /
        StorageError."""
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ParamValidationError

        where = self.url(key) if key else self.uri
        code = None
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", "error"))
        elif type(exc).__name__ in ("S3UploadFailedError", "S3TransferFailedError"):
            known = ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchKey")
            code = next((c for c in known if c in str(exc)), "UploadFailed")
        if isinstance(exc, ParamValidationError):
            return BadInputError(f"invalid S3 request for {where}: check the bucket name and key")
        if code is not None:
            if code in ("NoSuchKey", "404", "NotFound"):
                return NotFoundError(f"not found: {where}")
            # SeaweedFS answers an upload into a missing bucket with AccessDenied (it would create the bucket for an
            # admin identity): the bucket's own answer names the real cause
            if code == "NoSuchBucket" or (code == "AccessDenied" and self._bucket_missing()):
                return BadInputError(f"bucket {self.bucket!r} does not exist (NoSuchBucket) for {where}")
            # a HEAD answer has no body, so no error code: a GET of the same key gives it
            if code == "403" and key:
                code = self._error_code(key) or code
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return BadInputError(f"access denied ({code}) for {where}: check the AWS credentials")
            return StorageError(f"S3 error {code} for {where}")
        if isinstance(exc, NoCredentialsError):
            return BadInputError(f"no AWS credentials found for {where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        if isinstance(exc, EndpointConnectionError):
            endpoint = _s3_client().meta.endpoint_url
            return StorageError(
                f"cannot connect to the S3 endpoint {endpoint} for {where} (EndpointConnectionError): is the server up,"
                " and AWS_ENDPOINT_URL_S3 right?"
            )
        return StorageError(f"S3 request failed for {where}: {type(exc).__name__}")

    def _bucket_missing(self) -> bool:
        """True only when the server says the bucket does not exist (any other answer or failure: False)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            _s3_client().head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            return str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket", "NotFound")
        except BotoCoreError:
            return False
        return False

    def _error_code(self, key: str) -> str | None:
        """The S3 error code a one-byte GET of ``key`` gets (None when it gets none, or succeeds)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            _s3_client().get_object(Bucket=self.bucket, Key=self._key(key), Range="bytes=0-0")["Body"].close()
        except ClientError as exc:
            return exc.response.get("Error", {}).get("Code")
        except BotoCoreError:
            return None
        return None

    def _call(self, key, fn, *args, **kwargs):
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            raise self._fail(exc, key) from None

    def read_bytes(self, key, max_bytes=None):
        client = _s3_client()
        resp = self._call(key, client.get_object, Bucket=self.bucket, Key=self._key(key))
        if max_bytes is not None:
            try:
                _check_size(self.url(key), int(resp.get("ContentLength", 0)), max_bytes)
            except BadInputError:
                resp["Body"].close()
                raise
        return self._call(key, resp["Body"].read)

    def write_bytes(self, key, data):
        client = _s3_client()
        self._call(key, client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def upload_file(self, local_path, key):
        self._call(key, _s3_client().upload_file, str(local_path), self.bucket, self._key(key))

    def download_file(self, key, local_path):
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{local_path}.part"
        self._call(key, _s3_client().download_file, self.bucket, self._key(key), tmp)
        os.replace(tmp, local_path)

    def list(self, prefix=""):
        client = _s3_client()
        full = self._key(prefix) + "/" if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = {}
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
        for page in self._call(prefix, lambda: list(pages)):
            for obj in page.get("Contents", []):
                # a folder marker (the S3 console's "Create folder"), no file
                if not obj["Key"].endswith("/"):
                    out[obj["Key"][strip:]] = int(obj["Size"])
        return dict(sorted(out.items()))

    def exists(self, key):
        try:
            self._call(key, _s3_client().head_object, Bucket=self.bucket, Key=self._key(key))
            return True
        except NotFoundError:
            return False

    def delete(self, key):
        self._call(key, _s3_client().delete_object, Bucket=self.bucket, Key=self._key(key))

    def sync_to_local(self, prefix, cache_dir):
        """Copy every object under ``prefix`` into ``cache_dir`` (skipping files already there with the
        same size) and return the local folder that mirrors ``prefix``."""
        root = Path(cache_dir)
        for key, size in self.list(prefix).items():
            dest = root / safe_key(key)
            if dest.is_file() and dest.stat().st_size == size:
                continue
            self.download_file(key, dest)
        return root / safe_key(prefix) if prefix else root

    def local_copy(self, key, cache_dir):
        """Download ``key`` into ``cache_dir`` once (kept while its size matches) and return the path."""
        dest = Path(cache_dir) / safe_key(key)
        if not dest.is_file():
            self.download_file(key, dest)
        return dest


# files that mark a location as one job's: each writes them and no other job does (metrics.json and config.json
# are written by several)
RUN_MARKERS = {
    "prepare-data": ("manifest.json",),
    "pretrain-simclr": ("encoder.pt", "checkpoints/latest.json"),
    "train-classifier": ("model.pt", "classification_report.txt"),
    "evaluate-pairs": ("scores.csv",),
}


def claim_output(out: Storage, job: str, *folders: str) -> None:
    """Refuse an output location that holds a prepared dataset or another job's run (writing there would
    replace that run's ``config.json`` and ``metrics.jsonl``), then probe that it, and ``folders`` under it,
    can be written (:meth:`Storage.check_writable`). A location of the same job
    is reused (resume, or a rerun that replaces it).

    Raises:
        UsageError: naming the other job and the file that shows it. BadInputError / StorageError: the
        location cannot be read or written.
    """
    for other, markers in RUN_MARKERS.items():
        found = [key for key in markers if out.exists(key)] if other != job else []
        if found:
            raise UsageError(f"{out.uri} holds a {other} output ({found[0]}): give {job} a folder of its own")
    out.check_writable(*folders)


def open_file_location(location: str | os.PathLike) -> tuple[Storage, str]:
    """The storage of a file's folder and the file's key in it, for a local file path or ``s3://bucket/key``.

    Raises:
        BadInputError: an S3 URI that names no object, or another URI scheme (http...). UsageError: empty.
    """
    location = str(location)
    if is_s3(location):
        parent, _, name = location.rstrip("/").rpartition("/")
        if parent in ("s3:", "s3:/") or not name:
            raise BadInputError(f"{location!r} names no file: expected s3://bucket/path/file")
        return open_storage(parent), name
    if not location.strip():
        raise UsageError("empty location: give a file path or s3://bucket/key")
    # https://... would otherwise be looked for as a local folder named "https:"
    if "://" in location:
        raise BadInputError(f"unsupported location {location!r}: use a local path or s3://bucket/key")
    return open_storage(os.path.dirname(os.path.abspath(location))), os.path.basename(location)


def open_storage(location: str | os.PathLike) -> Storage:
    """Storage for a local path or an ``s3://bucket/prefix`` URI."""
    location = str(location)
    if not location.strip():
        raise UsageError("empty location: give a folder path or s3://bucket/prefix")
    if is_s3(location):
        return S3Storage(location)
    if "://" in location:
        raise BadInputError(f"unsupported location {location!r}: use a local path or s3://bucket/prefix")
    return LocalStorage(location)
