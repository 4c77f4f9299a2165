"""Find training images and assign them to contributors (no image decoding here: that is the worker's)."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from .errors import DatasetError
from .spec import DatasetSpec
from .storage import S3Options, Storage, open_storage

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class Discovery:
    """Images per contributor (keys relative to the images URI) and files that were left out."""

    contributors: dict[str, list[str]]
    ignored: list[dict[str, str]] = field(default_factory=list)
    texts: frozenset[str] = frozenset()  # .txt keys of the same listing (sidecar captions)


def _by_folder(keys: list[str]) -> tuple[dict[str, list[str]], list[dict[str, str]]]:
    groups: dict[str, list[str]] = {}
    ignored = []
    for k in keys:
        parts = PurePosixPath(k).parts
        if len(parts) < 2:
            ignored.append({"path": k, "reason": "not inside a contributor folder"})
            continue
        groups.setdefault(parts[0], []).append(k)
    return groups, ignored


def _by_prefix(keys: list[str], sep: str) -> tuple[dict[str, list[str]], list[dict[str, str]]]:
    groups: dict[str, list[str]] = {}
    ignored = []
    for k in keys:
        name = PurePosixPath(k).name
        if sep not in name:
            ignored.append({"path": k, "reason": f"file name has no {sep!r} separating contributor and file"})
            continue
        groups.setdefault(name.split(sep, 1)[0], []).append(k)
    return groups, ignored


def _by_manifest(keys: list[str], text: str, source: str) -> tuple[dict[str, list[str]], list[dict[str, str]]]:
    present = set(keys)
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or not {"path", "contributor"} <= set(rows[0]):
        raise DatasetError(f"{source}: expected a CSV with a header row 'path,contributor'")
    groups: dict[str, list[str]] = {}
    ignored = []
    for i, row in enumerate(rows, start=2):
        path, who = (row.get("path") or "").strip().lstrip("/"), (row.get("contributor") or "").strip()
        if not path or not who:
            raise DatasetError(f"{source}: line {i}: empty path or contributor")
        if path not in present:
            ignored.append({"path": path, "reason": f"listed in {source} line {i} but not found"})
            groups.setdefault(who, [])
            continue
        groups.setdefault(who, []).append(path)
    return groups, ignored


def _read_text(uri: str, options: S3Options) -> str:
    parent, _, name = uri.rstrip("/").rpartition("/")
    try:
        return open_storage(parent or ".", options).read_bytes(name).decode("utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"contributors manifest {uri} not found") from None


def discover(spec: DatasetSpec, options: S3Options, store: Storage | None = None) -> Discovery:
    """List the images and group them by contributor; raise DatasetError naming what is wrong."""
    store = store or open_storage(spec.images, options)
    listing = store.list()
    keys = [k for k in listing if k.lower().endswith(IMAGE_SUFFIXES)]
    if not keys:
        raise DatasetError(f"dataset.images: no PNG or JPEG images under {spec.images}")
    by = spec.contributors.by
    if by == "folder":
        groups, ignored = _by_folder(keys)
    elif by == "filename-prefix":
        groups, ignored = _by_prefix(keys, spec.contributors.separator)
    else:
        text = _read_text(spec.contributors.manifest or "", options)
        groups, ignored = _by_manifest(keys, text, spec.contributors.manifest or "")
    empty = sorted(name for name, imgs in groups.items() if not imgs)
    if empty:
        raise DatasetError(f"contributor(s) with no images: {', '.join(empty)}")
    if len(groups) < 2:
        raise DatasetError(f"dataset.images: found {len(groups)} contributor(s) under {spec.images}; need at least 2")
    texts = frozenset(k for k in listing if k.endswith(".txt"))
    return Discovery({k: sorted(groups[k]) for k in sorted(groups)}, ignored, texts)
