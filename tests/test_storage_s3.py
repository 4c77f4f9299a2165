"""S3 storage against a real S3-compatible server (MinIO) on loopback, and a tiny run stored there."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from datacredit import layout
from datacredit.local import execute
from datacredit.runstate import open_run
from datacredit.spec import parse_manifest
from datacredit.storage import (
    S3Options,
    S3Storage,
    StorageError,
    StorageUnavailable,
    is_transient,
    open_storage,
    read_json,
    upload_dir,
    write_json,
)
from tests.infra.s3server import S3Server
from tests.tiny import CONTRIBUTORS, TinyData, tiny_manifest

pytestmark = pytest.mark.s3


def test_round_trip_and_conditional_put(s3_server: S3Server, s3_env: S3Options) -> None:
    s3_server.make_bucket("store-test")
    store = open_storage("s3://store-test/runs/ns/r-1", s3_env)
    assert isinstance(store, S3Storage)
    assert write_json(store, "coalitions/c1/result.json", {"utility": 1.5}, if_absent=True)
    assert not write_json(store, "coalitions/c1/result.json", {"utility": 9.0}, if_absent=True)
    assert read_json(store, "coalitions/c1/result.json") == {"utility": 1.5}
    store.write_bytes("manifest.json", b"{}")
    assert store.exists("manifest.json") and not store.exists("nope.json")
    assert store.list() == ["coalitions/c1/result.json", "manifest.json"]
    assert store.child("coalitions").list() == ["c1/result.json"]
    with pytest.raises(FileNotFoundError):
        store.read_bytes("nope.json")


def test_files_go_through_managed_multipart_transfers(s3_server: S3Server, s3_env: S3Options,
                                                      tmp_path: Path) -> None:
    """upload_file/download_file stream through boto3's transfer manager: 9 MiB is a multipart upload."""
    s3_server.make_bucket("transfer-test")
    store = open_storage("s3://transfer-test/models", s3_env)
    big = tmp_path / "weights.bin"
    big.write_bytes(os.urandom(9 << 20))
    store.upload_file("unet/weights.bin", big)
    head = s3_server.client().head_object(Bucket="transfer-test", Key="models/unet/weights.bin")
    assert head["ContentLength"] == 9 << 20 and head["ETag"].strip('"').endswith("-2")  # two parts
    back = tmp_path / "back.bin"
    store.download_file("unet/weights.bin", back)
    assert back.read_bytes() == big.read_bytes()
    with pytest.raises(FileNotFoundError):
        store.download_file("unet/nope.bin", back)


def test_delete_all_removes_only_the_prefix(s3_server: S3Server, s3_env: S3Options) -> None:
    s3_server.make_bucket("delete-test")
    run = open_storage("s3://delete-test/runs/ns/r-1", s3_env)
    other = open_storage("s3://delete-test/runs/ns/r-10", s3_env)  # shares the string prefix "r-1"
    for i in range(1203):  # more than one delete_objects batch
        run.write_bytes(f"coalitions/c{i}/result.json", b"{}")
    other.write_bytes("run.json", b"{}")
    assert run.delete_all() == 1203
    assert run.list() == [] and other.list() == ["run.json"]


def test_wrong_credentials_and_missing_bucket(s3_server: S3Server, s3_env: S3Options,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    s3_server.make_bucket("creds-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(StorageError, match="credentials"):
        open_storage("s3://creds-test/x", s3_env).write_bytes("a", b"x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    with pytest.raises(StorageError, match="does not exist"):
        open_storage("s3://no-such-bucket/x", s3_env).list()


def test_an_outage_is_waited_out_and_a_longer_one_ends_the_worker_with_its_own_exit_code(
        s3_server: S3Server, s3_env: S3Options) -> None:
    """MinIO stopped and started again: a patient storage call backs off and succeeds once it is back; past
    the patience it raises StorageUnavailable, and a worker exits with code 4 (the Job's retryable failure)."""
    s3_server.make_bucket("outage")
    patient = open_storage("s3://outage/run", dataclasses.replace(s3_env, patience=180))
    write_json(patient, "run.json", {"manifest": {}})
    done: dict[str, Any] = {}

    def during() -> None:
        try:
            done["written"] = patient.write_bytes("during", b"2")
            done["read"] = read_json(patient, "run.json")
        except Exception as error:  # noqa: BLE001 (reported by the assertion below)
            done["error"] = error

    s3_server.stop()
    try:
        worker = threading.Thread(target=during)
        worker.start()
        time.sleep(8)
        assert worker.is_alive() and not done, done  # still backing off, not failed
    finally:
        s3_server.start_again()  # from the main thread: the server dies with the thread that starts it
    worker.join(120)
    assert done == {"written": True, "read": {"manifest": {}}}

    s3_server.stop()
    try:
        impatient = open_storage("s3://outage/run", dataclasses.replace(s3_env, patience=1))
        started = time.monotonic()
        with pytest.raises(StorageUnavailable, match="DATACREDIT_STORAGE_PATIENCE"):
            impatient.read_bytes("run.json")
        assert time.monotonic() - started < 60
        env = {**os.environ, "DATACREDIT_STORAGE_PATIENCE": "1"}
        cli = str(Path(sys.executable).parent / "datacredit")
        proc = subprocess.run([cli, "worker", "coalition", "--run", "s3://outage/run", "--members", "0",
                               "--endpoint", s3_server.endpoint, "--region", s3_server.region],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 4, proc.stderr
        assert "storage unavailable" in proc.stderr and "s3://outage/run" in proc.stderr
    finally:
        s3_server.start_again()


@pytest.mark.parametrize(("status", "code", "transient"), [
    (503, "ServiceUnavailable", True), (500, "InternalError", True), (503, "SlowDown", True),
    (499, "ClientDisconnected", True),  # MinIO answers this to requests it drops while it shuts down
    (408, "RequestTimeout", True), (403, "AccessDenied", False), (404, "NoSuchKey", False),
    (403, "InvalidAccessKeyId", False), (412, "PreconditionFailed", False), (400, "ClientDisconnected", True),
])
def test_outages_are_told_from_wrong_requests(status: int, code: str, transient: bool) -> None:
    from botocore.exceptions import ClientError

    error = ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                        "PutObject")
    assert is_transient(error) is transient


@pytest.mark.workload
def test_a_local_run_on_s3_survives_a_storage_outage(s3_server: S3Server, s3_env: S3Options,
                                                     tiny_data: TinyData) -> None:
    """MinIO stopped mid-run for 15 s: the local runner's workers back off, the run completes, and no
    coalition is evaluated twice."""
    s3_server.make_bucket("outage-run")
    data = open_storage("s3://outage-run/data", s3_env)
    upload_dir(data, "images", tiny_data.images)
    upload_dir(data, "reference", tiny_data.reference)
    storage = {"uri": "s3://outage-run/runs", "endpoint": s3_server.endpoint, "region": s3_server.region}
    run = parse_manifest(tiny_manifest("tiny-outage", "s3://outage-run/data/images",
                                       "s3://outage-run/data/reference", storage))
    store = open_run(run).store
    outcome: dict[str, Any] = {}

    def go() -> None:
        try:
            outcome["doc"] = execute(run).results
        except Exception as error:  # noqa: BLE001 (reported by the assertion below)
            outcome["error"] = error

    runner = threading.Thread(target=go)
    runner.start()
    deadline = time.monotonic() + 600
    while not any(k.endswith("result.json") for k in store.list("coalitions")) and runner.is_alive():
        assert time.monotonic() < deadline, "no coalition finished in 10 minutes"
        time.sleep(0.5)
    s3_server.stop()
    try:
        time.sleep(15)
        assert runner.is_alive(), outcome  # waiting for storage, not failed
    finally:
        s3_server.start_again()
    runner.join(900)
    assert "doc" in outcome, outcome
    keys = store.list("coalitions")
    results = [k for k in keys if k.endswith("/result.json")]
    assert len(results) == 16 and len(outcome["doc"]["contributors"]) == len(CONTRIBUTORS)
    assert not [k for k in keys if "/attempt-2/" in k], "a coalition was evaluated twice"


@pytest.mark.workload
def test_tiny_run_on_s3(s3_server: S3Server, s3_env: S3Options, tiny_data: TinyData, tmp_path: Path) -> None:
    """Data and run in S3: the same values as the same manifest with the run stored on local disk."""
    s3_server.make_bucket("tiny")
    data = open_storage("s3://tiny/data", s3_env)
    upload_dir(data, "images", tiny_data.images)
    upload_dir(data, "reference", tiny_data.reference)
    storage = {"uri": "s3://tiny/runs", "endpoint": s3_server.endpoint, "region": s3_server.region}
    run = parse_manifest(tiny_manifest("tiny-s3", "s3://tiny/data/images", "s3://tiny/data/reference", storage))
    doc = execute(run).results
    assert sorted(r["name"] for r in doc["contributors"]) == sorted(CONTRIBUTORS)
    store = open_run(run).store
    assert store.uri.startswith("s3://tiny/runs/default/tiny-s3-")
    assert len([k for k in store.list("coalitions") if k.endswith("result.json")]) == 16
    assert read_json(store, layout.MANIFEST)["skipped"][0]["path"] == tiny_data.corrupt

    # the same manifest with the run stored on local disk (storage is not part of the config): same values
    local = parse_manifest(tiny_manifest("tiny-s3", "s3://tiny/data/images", "s3://tiny/data/reference",
                                         {**storage, "uri": str(tmp_path)}))
    assert local.config_hash() == run.config_hash()
    local_doc = execute(local).results
    assert {r["name"]: r["value"] for r in doc["contributors"]} == pytest.approx(
        {r["name"]: r["value"] for r in local_doc["contributors"]}, abs=1e-9)


def test_model_and_weight_uris_resolve_to_local_copies(s3_server: S3Server, s3_env: S3Options,
                                                         tmp_path: Path) -> None:
    """What the worker does with spec.model.checkpoint / autoencoder / property.weights: a single object
    downloads as a file, a prefix as a folder, once per process; missing things name the field."""
    from datacredit.errors import ModelError
    from datacredit.jobs.worker import _fetch

    s3_server.make_bucket("assets-test")
    store = open_storage("s3://assets-test/models", s3_env)
    store.write_bytes("inception.pth", b"weights")
    store.write_bytes("vq/config.json", b"{}")
    store.write_bytes("vq/diffusion_pytorch_model.safetensors", b"tensors")

    weights = _fetch("s3://assets-test/models/inception.pth", "spec.property.weights", s3_env)
    assert weights.is_file() and weights.read_bytes() == b"weights"
    folder = _fetch("s3://assets-test/models/vq/", "spec.model.autoencoder", s3_env)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    store.write_bytes("inception.pth", b"changed")
    assert _fetch("s3://assets-test/models/inception.pth", "spec.property.weights", s3_env) == weights
    assert weights.read_bytes() == b"weights"  # downloaded once, reused

    with pytest.raises(ModelError, match=r"spec.model.autoencoder: nothing at s3://assets-test/models/nope"):
        _fetch("s3://assets-test/models/nope", "spec.model.autoencoder", s3_env)
    with pytest.raises(ModelError, match=r"spec.property.head: .*does not exist"):
        _fetch(str(tmp_path / "missing.pth"), "spec.property.head", s3_env)
    local = tmp_path / "head.pth"
    local.write_bytes(b"h")
    assert _fetch(f"file://{local}", "spec.property.head", s3_env) == local
