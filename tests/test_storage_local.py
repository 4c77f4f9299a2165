"""Local storage semantics and safe ids (the S3 flavour is in test_storage_s3.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from datacredit.ids import coalition_id, contributor_id
from datacredit.layout import join_uri
from datacredit.storage import LocalStorage, StorageError, open_storage, read_json, write_json


def test_round_trip_list_and_conditional_write(tmp_path: Path) -> None:
    store = open_storage(f"file://{tmp_path}/run")
    assert isinstance(store, LocalStorage)
    write_json(store, "coalitions/c1/result.json", {"utility": 1.0})
    assert store.exists("coalitions/c1/result.json")
    assert not store.write_bytes("coalitions/c1/result.json", b"{}", if_absent=True)
    assert read_json(store, "coalitions/c1/result.json") == {"utility": 1.0}
    store.write_bytes("a.txt", b"x")
    assert store.list() == ["a.txt", "coalitions/c1/result.json"]
    assert store.child("coalitions").list() == ["c1/result.json"]
    with pytest.raises(FileNotFoundError):
        store.read_bytes("nope")


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/../../b"])
def test_keys_cannot_escape(tmp_path: Path, key: str) -> None:
    with pytest.raises(StorageError):
        LocalStorage(tmp_path).write_bytes(key, b"x")


def test_unknown_scheme() -> None:
    with pytest.raises(StorageError, match="unsupported"):
        open_storage("gs://bucket/x")


@pytest.mark.parametrize("name", ["../../etc/passwd", "Ann/Lee", "ünïcode", "", "a b", "A B"])
def test_contributor_ids_are_safe(name: str) -> None:
    cid = contributor_id(name)
    assert "/" not in cid and ".." not in cid and cid == cid.lower()


def test_contributor_ids_do_not_collide() -> None:
    names = ["a b", "a-b", "A B", "a_b", "a/b"]
    assert len({contributor_id(n) for n in names}) == len(names)


def test_coalition_id_is_order_free_and_config_bound() -> None:
    assert coalition_id(["x", "y"], "h") == coalition_id(["y", "x"], "h") != coalition_id(["x", "y"], "h2")
    assert coalition_id([], "h") != coalition_id(["x"], "h")


@pytest.mark.parametrize(("base", "joined"), [
    ("./runs", "./runs/ns/run-1/results"),
    ("/", "/ns/run-1/results"),
    ("s3://bkt", "s3://bkt/ns/run-1/results"),
    ("s3://bkt/p/q/", "s3://bkt/p/q/ns/run-1/results"),
    ("file:///tmp/r", "file:///tmp/r/ns/run-1/results"),
])
def test_uris_are_joined_by_segments_keeping_scheme_and_bucket(base: str, joined: str) -> None:
    assert join_uri(base, "ns/run-1", "results") == joined


@pytest.mark.parametrize(("base", "part"), [
    ("s3://", "ns/run"), ("s3://b/p?x", "ns/run"), ("s3://b/p#x", "ns/run"), ("s3://b/p", "ns/../run"),
    ("s3://b/p", "ns//run"), ("s3://b/p", "run?x"),
])
def test_uris_that_would_lose_or_escape_the_run_prefix_are_refused(base: str, part: str) -> None:
    with pytest.raises(ValueError):
        join_uri(base, part)


def test_stored_files_are_readable_by_the_team_and_files_copy_without_loading(tmp_path: Path) -> None:
    """mkstemp makes 0600 files; results are written with the mode open() would use (umask applies)."""
    store = LocalStorage(tmp_path / "run")
    store.write_bytes("results/shapley.json", b"{}")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "run/results/shapley.json").stat().st_mode & 0o777 == 0o666 & ~mask
    big = tmp_path / "weights.bin"
    big.write_bytes(os.urandom(1 << 20))
    store.upload_file("models/weights.bin", big)
    assert (tmp_path / "run/models/weights.bin").stat().st_mode & 0o777 == 0o666 & ~mask
    back = tmp_path / "back.bin"
    store.download_file("models/weights.bin", back)
    assert back.read_bytes() == big.read_bytes()
    with pytest.raises(FileNotFoundError):
        store.download_file("models/nope.bin", back)


def test_delete_all_removes_the_folder(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "runs/ns/r-1")
    store.write_bytes("coalitions/c1/result.json", b"{}")
    store.write_bytes("run.json", b"{}")
    LocalStorage(tmp_path / "runs/ns/r-10").write_bytes("run.json", b"{}")
    assert store.delete_all() == 2 and store.list() == []
    assert LocalStorage(tmp_path / "runs/ns/r-10").list() == ["run.json"]
