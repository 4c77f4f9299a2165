"""Shared fixtures: real servers (tests/conftest_infra.py) and a tiny digits data set."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from datacredit.storage import S3Options
from tests.conftest_infra import control_plane, node_agent, s3_server  # noqa: F401  (pytest fixtures)
from tests.infra.s3server import S3Server
from tests.tiny import TinyData, make_tiny_data


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> TinyData:
    """4 contributors of 8x8 digits (one of them noise, one with a corrupt file) plus a reference set."""
    return make_tiny_data(Path(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(autouse=True)
def _one_torch_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """Workload tests run torch on one thread: reproducible numbers, and no oversubscription of a small CI box."""
    if request.node.get_closest_marker("workload") is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Options:  # noqa: F811
    """Credentials in the environment, as users give them, and a private worker download folder."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DATACREDIT_WORK_DIR", str(tmp_path / "work"))
    return S3Options(endpoint=s3_server.endpoint, region=s3_server.region)
