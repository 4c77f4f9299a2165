"""Session fixtures for the real-component tests: MinIO, a Kubernetes control plane and a fake GPU node.

tests/conftest.py imports them; the components themselves live in tests/infra/ and work outside pytest.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.infra.controlplane import ControlPlane, start_control_plane
from tests.infra.nodeagent import NodeAgent
from tests.infra.s3server import S3Server, start_s3_server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A MinIO server on loopback with random keys; `make_bucket(name)` and `client()` help."""
    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + kube-controller-manager; `kubeconfig`, `server`, `api_client()`."""
    with start_control_plane(tmp_path_factory.mktemp("controlplane")) as plane:
        yield plane


@pytest.fixture(scope="session")
def node_agent(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeAgent]:
    """A Ready fake node with 8 GPUs that runs bound pods as local processes.

    Its `executables`, `image_commands` and `extra_env` dicts may be updated by tests before they
    create pods; pod output is in `pod_log(namespace, name)`.
    """
    with NodeAgent(control_plane.api_client, tmp_path_factory.mktemp("pods")) as agent:
        yield agent
