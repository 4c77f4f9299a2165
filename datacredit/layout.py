"""Where everything of a run lives in storage: the keys both executors and the workers read and write."""

from __future__ import annotations

import re

from .ids import run_dir_name

# s3://<bucket>[/<prefix>] with an S3 bucket name; no '?' or '#' anywhere (urlparse would cut the run's suffix
# off as a query or fragment). The CRD checks the same expression (RE2 syntax).
S3_URI_PATTERN = r"^s3://[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?(/[^?#]*)?$"

RUN = "run.json"  # spec snapshot written when the run starts
MANIFEST = "manifest.json"  # written by prepare: contributor table, skipped images, planner seed
PREPARE_RESULT = "prepare/result.json"
DATASET = "prepare/dataset.npz"  # decoded images + contributor index, shared by every coalition
SPARSIFIED = "prepare/sparsified"  # the pruned, fine-tuned model
PROPERTY_CACHE = "prepare/property"  # what a property fits once per run (classifier, reference stats)
RESULTS = "results"
UTILITIES = "results/utilities.jsonl"
COALITIONS = "coalitions"  # one folder per coalition id: result.json and its attempts


def coalition_result(cid: str) -> str:
    """The commit marker of a coalition: it is done when this exists."""
    return f"{COALITIONS}/{cid}/result.json"


def attempt_dir(cid: str, attempt: int) -> str:
    """Checkpoints and sample grids of one attempt, kept for audit."""
    return f"{COALITIONS}/{cid}/attempt-{attempt}"


PREPARE_STEP = "prepare"  # the attempt owner of the prepare step (coalitions own theirs by id)
FAILED_MARKER = "failed.json"  # written by the operator: attempt k of a coalition (or prepare) failed
CREATED_MARKER = "created.json"  # written by the operator just before it creates the Job of attempt k


def attempt_marker(owner: str, attempt: int, name: str) -> str:
    """A marker file of attempt ``attempt`` of ``owner`` (:data:`PREPARE_STEP` or a coalition id)."""
    base = PREPARE_STEP if owner == PREPARE_STEP else f"coalitions/{owner}"
    return f"{base}/attempt-{attempt}/{name}"


def parse_attempt_marker(key: str) -> tuple[str, int, str] | None:
    """(owner, attempt, marker name) of a failed/created marker key, else None."""
    parts = key.split("/")
    if len(parts) < 3 or parts[-1] not in (FAILED_MARKER, CREATED_MARKER) or not parts[-2].startswith("attempt-"):
        return None
    try:
        attempt = int(parts[-2].removeprefix("attempt-"))
    except ValueError:
        return None
    if parts[0] == PREPARE_STEP and len(parts) == 3:
        return PREPARE_STEP, attempt, parts[-1]
    if parts[0] == "coalitions" and len(parts) == 4:
        return parts[1], attempt, parts[-1]
    return None


def parse_coalition_result(key: str) -> str | None:
    """The coalition id of a ``coalitions/<id>/result.json`` key, else None."""
    parts = key.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == "coalitions" and parts[2] == "result.json" else None


def run_prefix(namespace: str, name: str, uid: str) -> str:
    """`<namespace>/<run>-<uid8>` below the storage URI."""
    return f"{namespace}/{run_dir_name(name, uid)}"


def check_uri(uri: str) -> str:
    """``uri`` if it is a usable storage URI (local path, file://<path> or s3://<bucket>[/<prefix>]), else
    ValueError saying what is wrong."""
    if "?" in uri or "#" in uri:
        raise ValueError(f"{uri!r}: '?' and '#' are not allowed in a storage URI")
    if uri.startswith("s3://"):
        if not re.match(S3_URI_PATTERN, uri):
            raise ValueError(f"{uri!r}: expected s3://<bucket>[/<prefix>] with a bucket name "
                             "(up to 63 of a-z, 0-9, '.', '-')")
    elif uri.startswith("file://"):
        if not uri.removeprefix("file://").strip("/"):
            raise ValueError(f"{uri!r}: file:// needs a path")
    elif "://" in uri:
        raise ValueError(f"unsupported scheme in {uri!r}: use a local path, file:// or s3://")
    return uri


def join_uri(base: str, *parts: str) -> str:
    """Join a storage URI (path, file:// or s3://) with relative parts, segment by segment: the scheme and
    bucket of ``base`` are kept, and a part may not hold an empty, '.' or '..' segment, '?' or '#'."""
    check_uri(base)
    scheme, sep, rest = base.partition("://") if "://" in base else ("", "", base)
    segments = []
    for part in parts:
        for segment in part.strip("/").split("/") if part else []:
            if segment in ("", ".", "..") or "?" in segment or "#" in segment:
                raise ValueError(f"bad storage key segment {segment!r} in {part!r}")
            segments.append(segment)
    if not segments:
        return base
    return f"{scheme}{sep}" + "/".join([rest.rstrip("/"), *segments])  # base "/" gives "/<segments>"
