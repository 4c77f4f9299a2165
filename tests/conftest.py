"""Shared fixtures: real servers (tests/conftest_infra.py) and a tiny digits data set."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest_infra import control_plane, node_agent, s3_server  # noqa: F401  (pytest fixtures)
from tests.tiny import TinyData, make_tiny_data


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> TinyData:
    """4 contributors of 8x8 digits (one of them noise, one with a corrupt file) plus a reference set."""
    return make_tiny_data(Path(tmp_path_factory.mktemp("tiny")))
