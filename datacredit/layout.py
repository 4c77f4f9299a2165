"""Where everything of a run lives in storage (DESIGN §5)."""

from __future__ import annotations

from .ids import run_dir_name

RUN = "run.json"  # spec snapshot written when the run starts
MANIFEST = "manifest.json"  # written by prepare: contributor table, skipped images, planner seed
PREPARE_RESULT = "prepare/result.json"
DATASET = "prepare/dataset.npz"  # decoded images + contributor index, shared by every coalition
SPARSIFIED = "prepare/sparsified"  # the pruned, fine-tuned model
PROPERTY_CACHE = "prepare/property"  # what a property fits once per run (classifier, reference stats)
RESULTS = "results"
UTILITIES = "results/utilities.jsonl"


def coalition_result(cid: str) -> str:
    """The commit marker of a coalition: it is done when this exists."""
    return f"coalitions/{cid}/result.json"


def coalition_failure(cid: str, attempt: int) -> str:
    """Why an attempt failed (written by the worker when it can)."""
    return f"coalitions/{cid}/attempt-{attempt}/error.json"


def attempt_dir(cid: str, attempt: int) -> str:
    """Checkpoints and sample grids of one attempt, kept for audit."""
    return f"coalitions/{cid}/attempt-{attempt}"


def run_prefix(namespace: str, name: str, uid: str) -> str:
    """`<namespace>/<run>-<uid8>` below the storage URI."""
    return f"{namespace}/{run_dir_name(name, uid)}"


def join_uri(base: str, *parts: str) -> str:
    """Join a storage URI (path, file:// or s3://) with relative parts."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])
