"""Stable, path-safe identifiers for contributors, coalitions and runs."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

_UNSAFE = re.compile(r"[^a-z0-9]+")


def contributor_id(name: str) -> str:
    """A path-safe id for a user-given contributor name: a readable slug plus a hash (no traversal, no collisions)."""
    slug = _UNSAFE.sub("-", name.lower()).strip("-")[:40] or "c"
    return f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


MAX_LABEL = 63  # a Prometheus label or status field stays readable (and the status bounded) at this length


def display_name(name: str, limit: int = MAX_LABEL) -> str:
    """``name`` itself when short enough, else its start, '~' and 8 hex of its hash (distinct, at most ``limit``)."""
    if len(name) <= limit:
        return name
    return f"{name[: limit - 9]}~{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def coalition_id(member_ids: Iterable[str], config_hash: str) -> str:
    """A stable id of a coalition: hash of its sorted member ids and the run's config hash."""
    key = config_hash + "|" + ",".join(sorted(member_ids))
    return "c" + hashlib.sha256(key.encode()).hexdigest()[:15]


def run_dir_name(name: str, uid: str) -> str:
    """`<run>-<uid8>`: the run's folder in storage."""
    return f"{name}-{uid.replace('-', '')[:8]}"
