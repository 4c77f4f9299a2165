"""Run the operator: kopf in standalone mode, metrics on their own port, a liveness endpoint."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import kopf

NAMESPACES_ENV = "DATACREDIT_WATCH_NAMESPACES"
PREFIX = "datacredit.dev"


def watch_namespaces(namespaces: Sequence[str]) -> list[str]:
    """The namespaces to watch: the argument, else $DATACREDIT_WATCH_NAMESPACES (comma-separated); [] = all."""
    chosen = [n.strip() for n in namespaces if n.strip()]
    if not chosen:
        chosen = [n.strip() for n in os.environ.get(NAMESPACES_ENV, "").split(",") if n.strip()]
    return chosen


def _load_kube_config() -> None:
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf settings: our own finalizer and annotations (nothing under status), quiet Jobs, modest retries."""
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration")
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    settings.execution.max_workers = 16


def run_operator(namespaces: Sequence[str], metrics_port: int, liveness_port: int) -> None:
    """Reconcile ValuationRuns until stopped (SIGINT/SIGTERM)."""
    from . import handlers, metrics

    watched = watch_namespaces(namespaces)

    @kopf.on.startup()
    def _startup(settings: kopf.OperatorSettings, logger: logging.Logger, **_: Any) -> None:
        configure(settings)
        _load_kube_config()
        metrics.start(metrics_port)
        logger.info("datacredit operator: watching %s, metrics on :%s, reconcile every %.1fs",
                    ", ".join(watched) or "all namespaces", metrics_port or "-", handlers.RECONCILE_INTERVAL)

    kopf.configure(log_format=kopf.LogFormat.PLAIN, log_prefix=True)
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # not "Timer succeeded" every few seconds
    kopf.run(
        standalone=True,
        clusterwide=not watched,
        namespaces=watched,
        liveness_endpoint=f"http://0.0.0.0:{liveness_port}/healthz" if liveness_port else None,
    )
