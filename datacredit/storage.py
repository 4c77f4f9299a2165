"""Run storage behind one interface: local paths / file:// and s3:// (boto3)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI and what to check."""


class StorageUnavailable(StorageError):
    """The store could not be reached (connection refused, timeouts, 5xx) for longer than the patience."""


class InvalidKeyError(StorageError):
    """A key that no storage may hold (absolute, empty or '..' segments): a property of the key, not an outage."""


class Storage(Protocol):
    """A key-value view of a folder or an S3 prefix. Keys are '/'-separated and relative."""

    uri: str

    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def child(self, prefix: str) -> Storage: ...
    def upload_file(self, key: str, path: Path) -> None: ...
    def download_file(self, key: str, path: Path) -> None: ...
    def delete_all(self) -> int: ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if key.startswith("/") or any(p in ("..", "") for p in parts):
        raise InvalidKeyError(f"invalid storage key {key!r}")
    return key


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would create: 0644 under the usual umask 022


class LocalStorage:
    """A folder on disk. Writes are atomic (temp file + rename)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri}/{key}: not found") from None

    def _temp_beside(self, path: Path) -> tuple[int, str]:
        """An open temp file next to `path` (same filesystem, so it can be renamed onto it), with the mode
        open() would give (mkstemp makes 0600; results are for the team to read)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        os.fchmod(fd, _FILE_MODE)
        return fd, tmp

    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Write atomically; with if_absent, keep an existing object and return False."""
        path = self._path(key)
        fd, tmp = self._temp_beside(path)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if if_absent:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True
        os.replace(tmp, path)
        return True

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        root = str(self.root)
        keys = []
        for folder, _, files in os.walk(base):  # os.walk: a fifth of rglob's time on a run's 10k+ files
            rel = os.path.relpath(folder, root)
            keys.extend(f if rel == "." else f"{rel}/{f}" for f in files if not f.startswith(".tmp-"))
        return sorted(keys)

    def child(self, prefix: str) -> LocalStorage:
        return LocalStorage(self._path(prefix.strip("/")))

    def delete_all(self) -> int:
        """Delete the folder and everything in it; the number of files deleted."""
        count = len(self.list())
        shutil.rmtree(self.root, ignore_errors=True)
        return count

    def upload_file(self, key: str, path: Path) -> None:
        """Copy a local file to ``key`` (atomically), without reading it into memory."""
        dest = self._path(key)
        fd, tmp = self._temp_beside(dest)
        with os.fdopen(fd, "wb") as out, path.open("rb") as src:
            shutil.copyfileobj(src, out)
        os.replace(tmp, dest)

    def download_file(self, key: str, path: Path) -> None:
        """Copy ``key`` to a local file, without reading it into memory."""
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri}/{key}: not found") from None


@dataclass(frozen=True)
class S3Options:
    """Connection settings for S3-compatible stores."""

    endpoint: str = ""
    region: str = ""
    path_style: bool = True
    patience: float | None = None  # seconds an outage is waited out; None: $DATACREDIT_STORAGE_PATIENCE or 600

    def patience_seconds(self) -> float:
        """How long transient errors (connection refused, timeouts, 5xx) are retried with back-off."""
        if self.patience is not None:
            return self.patience
        return float(os.environ.get(PATIENCE_ENV, DEFAULT_PATIENCE_S))


PATIENCE_ENV = "DATACREDIT_STORAGE_PATIENCE"
DEFAULT_PATIENCE_S = 600.0
log = logging.getLogger("datacredit.storage")


# 408: request timeout; 499: MinIO's "client disconnected", which it answers while shutting down mid-request
_TRANSIENT_STATUS = (408, 499)
_TRANSIENT_CODES = ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "ClientDisconnected")


def is_transient(err: Exception) -> bool:
    """Whether an S3 error is an outage worth waiting out, rather than a wrong key, bucket or credential."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(err, BotoConnectionError | HTTPClientError):
        return True
    if isinstance(err, ClientError):
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        code = err.response.get("Error", {}).get("Code", "")
        return status >= 500 or status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES
    return False


def s3_client(options: S3Options) -> Any:
    """A boto3 S3 client that works with AWS and S3-compatible stores (MinIO, Ceph).

    Credentials come from the environment or the default profile; the endpoint from `options` or
    AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL. Checksums are only sent when required, since many
    S3-compatible stores reject the CRC headers newer botocore sends by default.
    """
    import boto3
    from botocore.config import Config

    cfg = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path" if options.path_style else "auto"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"max_attempts": 5, "mode": "standard"},
    )
    return boto3.session.Session().client(  # a fresh session: credentials are read now, not cached from earlier
        "s3",
        endpoint_url=options.endpoint or None,
        region_name=options.region or os.environ.get("AWS_REGION") or "us-east-1",
        config=cfg,
    )


class S3Storage:
    """An S3 prefix. result.json-style markers use conditional puts (If-None-Match) where supported."""

    def __init__(self, uri: str, options: S3Options | None = None, client: Any = None):
        u = urlparse(uri)
        if u.scheme != "s3" or not u.netloc or u.query or u.fragment or "?" in uri or "#" in uri:
            raise StorageError(f"{uri!r} is not an s3://bucket/prefix URI (no '?' or '#')")
        self.bucket = u.netloc
        self.prefix = u.path.strip("/")
        self.options = options or S3Options()
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self._client = client or s3_client(self.options)

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, action: str, key: str, err: Exception) -> StorageError:
        from botocore.exceptions import ClientError, NoCredentialsError

        hint = ""
        if isinstance(err, NoCredentialsError):
            hint = " (no credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
        elif isinstance(err, ClientError):
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
                hint = " (check the S3 credentials and their permissions)"
            elif code == "NoSuchBucket":
                hint = f" (bucket {self.bucket!r} does not exist)"
        return StorageError(f"cannot {action} {self.uri}/{key}: {err}{hint}")

    def _call(self, action: str, key: str, fn: Any) -> Any:
        """``fn()``, waiting out an outage with exponential back-off (1 s doubling to 30 s) for up to the
        patience; other errors are raised at once. Past the patience: :class:`StorageUnavailable`."""
        from botocore.exceptions import BotoCoreError, ClientError

        patience, delay, started = self.options.patience_seconds(), 1.0, time.monotonic()
        while True:
            try:
                return fn()
            except (ClientError, BotoCoreError) as e:
                waited = time.monotonic() - started
                if not is_transient(e):
                    raise
                if waited + delay > patience:
                    raise StorageUnavailable(f"{self._fail(action, key, e)} (unreachable for {waited:.0f} s, "
                                             f"patience {patience:.0f} s: ${PATIENCE_ENV})") from None
                log.warning("storage %s unreachable (%s); retrying to %s %s in %.0f s", self.uri, e, action, key, delay)
                time.sleep(delay)
                delay = min(2 * delay, 30.0)

    def read_bytes(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self._call("read", key,
                              lambda: self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read())
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"{self.uri}/{key}: not found") from None
            raise self._fail("read", key, e) from None
        except BotoCoreError as e:
            raise self._fail("read", key, e) from None

    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Put an object; with if_absent, a conditional put that keeps an existing object (returns False)."""
        from botocore.exceptions import BotoCoreError, ClientError

        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key), "Body": data}
        try:
            if if_absent:
                try:
                    self._call("write", key, lambda: self._client.put_object(IfNoneMatch="*", **kwargs))
                    return True
                except ClientError as e:
                    code = e.response.get("Error", {}).get("Code")
                    if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                        return False
                    if code not in ("NotImplemented", "501"):
                        raise
                if self.exists(key):  # store without conditional writes: HEAD then PUT
                    return False
            self._call("write", key, lambda: self._client.put_object(**kwargs))
            return True
        except (ClientError, BotoCoreError) as e:
            raise self._fail("write", key, e) from None

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._call("check", key, lambda: self._client.head_object(Bucket=self.bucket, Key=self._key(key)))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._fail("check", key, e) from None
        except BotoCoreError as e:
            raise self._fail("check", key, e) from None

    def list(self, prefix: str = "") -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._key(prefix.strip("/")) + "/" if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        def listing() -> list[str]:
            keys: list[str] = []
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(o["Key"][strip:] for o in page.get("Contents", []))
            return keys

        try:
            return sorted(self._call("list", prefix, listing))
        except (ClientError, BotoCoreError) as e:
            raise self._fail("list", prefix, e) from None

    def child(self, prefix: str) -> S3Storage:
        return S3Storage(f"{self.uri}/{prefix.strip('/')}", self.options, self._client)

    def delete_all(self) -> int:
        """Delete every object under the prefix (1000 per request); the number deleted."""
        from botocore.exceptions import BotoCoreError, ClientError

        keys = [self._key(k) for k in self.list()]
        try:
            for i in range(0, len(keys), 1000):
                batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
                self._call("delete", "", lambda b=batch: self._client.delete_objects(Bucket=self.bucket, Delete=b))
        except (ClientError, BotoCoreError) as e:
            raise self._fail("delete", "", e) from None
        return len(keys)

    def upload_file(self, key: str, path: Path) -> None:
        """boto3's managed upload: multipart above 8 MiB, streamed from disk, parts retried."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._call("write", key, lambda: self._client.upload_file(str(path), self.bucket, self._key(key)))
        except (ClientError, BotoCoreError) as e:
            raise self._fail("write", key, e) from None

    def download_file(self, key: str, path: Path) -> None:
        """boto3's managed download: ranged parts streamed to disk."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._call("read", key, lambda: self._client.download_file(self.bucket, self._key(key), str(path)))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"{self.uri}/{key}: not found") from None
            raise self._fail("read", key, e) from None
        except BotoCoreError as e:
            raise self._fail("read", key, e) from None


def open_storage(uri: str, options: S3Options | None = None) -> Storage:
    """Open a local path, file:// URI or s3:// URI."""
    if uri.startswith("s3://"):
        return S3Storage(uri, options)
    if uri.startswith("file://"):
        return LocalStorage(urlparse(uri).path)
    if "://" in uri:
        raise StorageError(f"unsupported storage URI {uri!r}: use a path, file:// or s3://")
    return LocalStorage(uri)


def read_json(store: Storage, key: str) -> Any:
    """Read a JSON object."""
    return json.loads(store.read_bytes(key))


def write_json(store: Storage, key: str, obj: Any, *, if_absent: bool = False) -> bool:
    """Write a JSON object (indented, stable key order)."""
    return store.write_bytes(key, json.dumps(obj, indent=2, sort_keys=True).encode(), if_absent=if_absent)


def upload_dir(store: Storage, prefix: str, directory: Path) -> None:
    """Copy a local folder under a storage prefix (file by file, streamed: model weights can be GBs)."""
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            store.upload_file(f"{prefix}/{p.relative_to(directory).as_posix()}", p)


def download_dir(store: Storage, prefix: str, directory: Path) -> Path:
    """Copy a storage prefix into a local folder (replacing it) and return the folder."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    for key in store.list(prefix):
        dest = directory / (key[len(prefix) + 1 :] if prefix else key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        store.download_file(key, dest)
    return directory
