"""A real Kubernetes control plane on loopback: etcd, kube-apiserver and kube-controller-manager.

There is no scheduler, kubelet or kube-proxy; `tests.infra.nodeagent` stands in for a node.

Manual use: `python -m tests.infra.controlplane [--node-agent]` starts one and prints the kubeconfig.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import ipaddress
import json
import logging
import signal
import ssl
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .binaries import find_binary
from .process import ManagedProcess, free_port, wait_until

SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
READY_TIMEOUT_S = 120.0


@dataclass
class Certificates:
    """PEM files of the test PKI."""

    ca_cert: Path
    ca_key: Path
    apiserver_cert: Path
    apiserver_key: Path
    sa_key: Path
    sa_pub: Path
    admin_cert: Path
    admin_key: Path
    kcm_cert: Path
    kcm_key: Path


def _write_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _issue(
    subject: x509.Name,
    key: rsa.RSAPrivateKey,
    issuer: x509.Name,
    issuer_key: rsa.RSAPrivateKey,
    *,
    ca: bool = False,
    usage: ExtendedKeyUsageOID | None = None,
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=not ca,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def generate_certificates(pki_dir: Path) -> Certificates:
    """Create a CA, the apiserver serving cert, the service-account key pair and client certs."""
    pki_dir.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM

    ca_key = _new_key()
    ca_name = _name("datacredit-test-ca")
    ca_cert = _issue(ca_name, ca_key, ca_name, ca_key, ca=True)

    def write_pair(stem: str, cert: x509.Certificate, key: rsa.RSAPrivateKey) -> tuple[Path, Path]:
        cert_path, key_path = pki_dir / f"{stem}.crt", pki_dir / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(pem))
        _write_key(key_path, key)
        return cert_path, key_path

    first_service_ip = next(ipaddress.ip_network(SERVICE_CLUSTER_IP_RANGE).hosts())
    sans: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(first_service_ip),
        x509.DNSName("localhost"),
        *(
            x509.DNSName(name)
            for name in (
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            )
        ),
    ]
    apiserver_key = _new_key()
    apiserver = _issue(
        _name("kube-apiserver"),
        apiserver_key,
        ca_name,
        ca_key,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        sans=sans,
    )
    admin_key = _new_key()
    admin = _issue(
        _name("datacredit-test-admin", "system:masters"),
        admin_key,
        ca_name,
        ca_key,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    kcm_key = _new_key()
    kcm = _issue(
        _name("system:kube-controller-manager"),
        kcm_key,
        ca_name,
        ca_key,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )

    ca_paths = write_pair("ca", ca_cert, ca_key)
    apiserver_paths = write_pair("apiserver", apiserver, apiserver_key)
    admin_paths = write_pair("admin", admin, admin_key)
    kcm_paths = write_pair("kube-controller-manager", kcm, kcm_key)
    sa_key = _new_key()
    sa_key_path, sa_pub_path = pki_dir / "sa.key", pki_dir / "sa.pub"
    _write_key(sa_key_path, sa_key)
    sa_pub_path.write_bytes(sa_key.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo))
    return Certificates(*ca_paths, *apiserver_paths, sa_key_path, sa_pub_path, *admin_paths, *kcm_paths)


def write_kubeconfig(path: Path, server: str, ca_cert: Path, cert: Path, key: Path, user: str) -> Path:
    """Write a self-contained kubeconfig (certificates embedded) for `user` and return its path."""

    def b64(file: Path) -> str:
        return base64.b64encode(file.read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "datacredit-test",
                "cluster": {"server": server, "certificate-authority-data": b64(ca_cert)},
            }
        ],
        "users": [{"name": user, "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)}}],
        "contexts": [{"name": "datacredit-test", "context": {"cluster": "datacredit-test", "user": user}}],
        "current-context": "datacredit-test",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


@dataclass
class ControlPlane:
    """A running etcd + kube-apiserver + kube-controller-manager; `stop()` ends all three."""

    server: str
    kubeconfig: Path
    certs: Certificates
    work_dir: Path
    processes: list[ManagedProcess] = field(repr=False)

    def api_client(self) -> Any:
        """A new `kubernetes.client.ApiClient` authenticated as a cluster admin."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def ensure_namespace(self, name: str, timeout: float = 60.0) -> None:
        """Create namespace `name` if needed and wait for its `default` ServiceAccount.

        Pods are rejected by the ServiceAccount admission plugin until the controller-manager has
        created that account, so tests should create their namespaces through this helper.
        """
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        with self.api_client() as api_client:
            core = client.CoreV1Api(api_client)
            try:
                core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
            except ApiException as error:
                if error.status != 409:
                    raise
            wait_until(
                lambda: core.read_namespaced_service_account("default", name) is not None,
                f"ServiceAccount {name}/default",
                timeout,
            )

    def stop(self) -> None:
        """Stop the controller-manager, apiserver and etcd (in that order)."""
        for process in reversed(self.processes):
            process.stop()

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _https_ok(url: str, certs: Certificates | None) -> Callable[[], bool]:
    """A check that GET `url` answers 200 "ok" (client cert auth when `certs` is given)."""
    if certs is None:
        context = ssl.create_default_context()  # the controller-manager serves a self-signed cert
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=str(certs.ca_cert))
        context.load_cert_chain(str(certs.admin_cert), str(certs.admin_key))

    def check() -> bool:
        with urllib.request.urlopen(url, timeout=5, context=context) as response:
            return bool(response.status == 200 and response.read().strip() == b"ok")

    return check


def _etcd_healthy(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
        return bool(json.load(response).get("health") == "true")


def start_control_plane(work_dir: Path, verbosity: int = 1) -> ControlPlane:
    """Start etcd, kube-apiserver and kube-controller-manager under `work_dir`; return when ready."""
    etcd, apiserver, kcm = (find_binary(n) for n in ("etcd", "kube-apiserver", "kube-controller-manager"))
    work_dir.mkdir(parents=True, exist_ok=True)
    certs = generate_certificates(work_dir / "pki")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work_dir)}
    processes: list[ManagedProcess] = []
    try:
        etcd_port, etcd_peer_port = free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{etcd_peer_port}"
        processes.append(
            ManagedProcess(
                "etcd",
                [
                    etcd,
                    "--name=test",
                    f"--data-dir={work_dir / 'etcd'}",
                    f"--listen-client-urls={etcd_url}",
                    f"--advertise-client-urls={etcd_url}",
                    f"--listen-peer-urls={peer_url}",
                    f"--initial-advertise-peer-urls={peer_url}",
                    f"--initial-cluster=test={peer_url}",
                    "--initial-cluster-state=new",
                    "--unsafe-no-fsync",
                    "--log-level=warn",
                ],
                work_dir / "etcd.log",
                env=env,
                cwd=work_dir,
            )
        )
        wait_until(lambda: _etcd_healthy(etcd_url), "etcd health", READY_TIMEOUT_S, process=processes[-1])

        port = free_port()
        server = f"https://127.0.0.1:{port}"
        processes.append(
            ManagedProcess(
                "kube-apiserver",
                [
                    apiserver,
                    f"--etcd-servers={etcd_url}",
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    f"--secure-port={port}",
                    f"--tls-cert-file={certs.apiserver_cert}",
                    f"--tls-private-key-file={certs.apiserver_key}",
                    f"--client-ca-file={certs.ca_cert}",
                    # Delegated authentication (the controller-manager) reads the request-header CA; only
                    # a "front-proxy-client" certificate may assert X-Remote-* identities, and none is issued.
                    f"--requestheader-client-ca-file={certs.ca_cert}",
                    "--requestheader-allowed-names=front-proxy-client",
                    "--requestheader-username-headers=X-Remote-User",
                    "--requestheader-group-headers=X-Remote-Group",
                    "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                    f"--cert-dir={work_dir / 'apiserver-certs'}",
                    f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                    f"--service-account-key-file={certs.sa_pub}",
                    f"--service-account-signing-key-file={certs.sa_key}",
                    f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                    "--authorization-mode=Node,RBAC",
                    # The default admission chain (NamespaceLifecycle, ServiceAccount, LimitRanger,
                    # ResourceQuota, DefaultTolerationSeconds, webhooks, ...) plus NodeRestriction.
                    "--enable-admission-plugins=NodeRestriction",
                    "--allow-privileged=true",
                    # The `kubernetes` Service endpoints cannot hold a loopback address; nothing here
                    # reaches the apiserver through that Service, so do not reconcile them at all.
                    "--endpoint-reconciler-type=none",
                    "--profiling=false",
                    f"--v={verbosity}",
                ],
                work_dir / "kube-apiserver.log",
                env=env,
                cwd=work_dir,
            )
        )
        wait_until(
            _https_ok(f"{server}/readyz", certs),
            "kube-apiserver /readyz",
            READY_TIMEOUT_S,
            process=processes[-1],
        )

        kubeconfig = write_kubeconfig(
            work_dir / "admin.kubeconfig", server, certs.ca_cert, certs.admin_cert, certs.admin_key, "admin"
        )
        kcm_kubeconfig = write_kubeconfig(
            work_dir / "kube-controller-manager.kubeconfig",
            server,
            certs.ca_cert,
            certs.kcm_cert,
            certs.kcm_key,
            "system:kube-controller-manager",
        )
        kcm_port = free_port()
        processes.append(
            ManagedProcess(
                "kube-controller-manager",
                [
                    kcm,
                    f"--kubeconfig={kcm_kubeconfig}",
                    f"--authentication-kubeconfig={kcm_kubeconfig}",
                    f"--authorization-kubeconfig={kcm_kubeconfig}",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={kcm_port}",
                    f"--cert-dir={work_dir / 'kcm-certs'}",
                    "--controllers=*",
                    "--leader-elect=false",
                    "--use-service-account-credentials=true",
                    f"--service-account-private-key-file={certs.sa_key}",
                    f"--root-ca-file={certs.ca_cert}",
                    f"--cluster-signing-cert-file={certs.ca_cert}",
                    f"--cluster-signing-key-file={certs.ca_key}",
                    f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                    "--profiling=false",
                    f"--v={verbosity}",
                ],
                work_dir / "kube-controller-manager.log",
                env=env,
                cwd=work_dir,
            )
        )
        wait_until(
            _https_ok(f"https://127.0.0.1:{kcm_port}/healthz", None),
            "kube-controller-manager /healthz",
            READY_TIMEOUT_S,
            process=processes[-1],
        )
        plane = ControlPlane(server, kubeconfig, certs, work_dir, processes)
        plane.ensure_namespace("default", timeout=READY_TIMEOUT_S)
        return plane
    except BaseException:
        for process in reversed(processes):
            process.stop()
        raise


def main() -> None:
    """Start a control plane (and optionally a node agent) and keep it up until Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, help="state, certs and logs (default: a new temp dir)")
    parser.add_argument("--node-agent", action="store_true", help="also run the fake GPU node agent")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop cleanly on `kill` as on Ctrl-C
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="datacredit-cp-"))
    started = time.monotonic()
    with start_control_plane(work_dir) as plane:
        agent = None
        if args.node_agent:
            from .nodeagent import NodeAgent

            agent = NodeAgent(plane.api_client, log_dir=work_dir / "pods").start()
        print(f"control plane ready in {time.monotonic() - started:.1f}s; logs in {work_dir}")
        print(f"export KUBECONFIG={plane.kubeconfig}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            if agent is not None:
                agent.stop()


if __name__ == "__main__":
    main()
