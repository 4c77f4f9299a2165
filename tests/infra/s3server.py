"""A MinIO S3-compatible server on a free loopback port, with a throw-away data dir and random keys."""

from __future__ import annotations

import contextlib
import secrets
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .binaries import find_binary
from .process import ManagedProcess, free_port, wait_until

READY_TIMEOUT_S = 60.0


@dataclass
class S3Server:
    """Connection details of a running S3 server; `stop()` ends it."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str
    data_dir: Path
    process: ManagedProcess = field(repr=False)
    argv: list[str] = field(default_factory=list, repr=False)
    env_vars: dict[str, str] = field(default_factory=dict, repr=False)
    work_dir: Path | None = None

    def client(self) -> Any:
        """A boto3 S3 client for this server (path-style, SigV4, checksums only when required)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                retries={"max_attempts": 3, "mode": "standard"},
            ),
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (idempotent) and return its name."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)
        return name

    def env(self) -> dict[str, str]:
        """Environment variables that point AWS SDKs at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
        }

    def stop(self) -> None:
        """Stop the server process (its data dir is left for inspection)."""
        self.process.stop()

    def start_again(self) -> None:
        """After `stop()`: the same server (port, keys, data) again, once ready. Call it from the main thread:
        the child dies with the thread that starts it."""
        assert self.work_dir is not None
        self.process = _start(self.argv, self.env_vars, self.work_dir, self.endpoint)


def start_s3_server(work_dir: Path, region: str = "us-east-1") -> S3Server:
    """Start MinIO with data and log under `work_dir`; return once it reports ready."""
    minio = find_binary("minio")
    data_dir = work_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    port, console_port = free_port(), free_port()
    access_key = "dc" + secrets.token_hex(8)
    secret_key = secrets.token_urlsafe(24)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(work_dir),
        "MINIO_ROOT_USER": access_key,
        "MINIO_ROOT_PASSWORD": secret_key,
        "MINIO_REGION": region,
        "MINIO_BROWSER": "off",
        "MINIO_UPDATE": "off",
        "MINIO_CI_CD": "on",
    }
    argv = [
        minio,
        "server",
        "--quiet",
        "--address",
        f"127.0.0.1:{port}",
        "--console-address",
        f"127.0.0.1:{console_port}",
        data_dir,
    ]
    endpoint = f"http://127.0.0.1:{port}"
    process = _start(argv, env, work_dir, endpoint)
    return S3Server(endpoint, access_key, secret_key, region, data_dir, process, argv, env, work_dir)


def _start(argv: list[Any], env: dict[str, str], work_dir: Path, endpoint: str) -> ManagedProcess:
    process = ManagedProcess("minio", argv, work_dir / "minio.log", env=env, cwd=work_dir)

    def ready() -> bool:
        with urllib.request.urlopen(f"{endpoint}/minio/health/ready", timeout=2) as response:
            return bool(response.status == 200)

    try:
        wait_until(ready, "MinIO readiness", READY_TIMEOUT_S, process=process)
    except BaseException:
        process.stop()
        raise
    return process
