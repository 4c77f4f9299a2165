"""Locate the pinned third-party binaries that hack/build-binaries.sh builds into the cache."""

from __future__ import annotations

import os
from pathlib import Path

BUILD_SCRIPT = "hack/build-binaries.sh"


class MissingBinaryError(RuntimeError):
    """A binary the integration fixtures need has not been built."""


def cache_dir() -> Path:
    """The cache the build script writes to: $DATACREDIT_CACHE, default ~/.cache/datacredit."""
    return Path(os.environ.get("DATACREDIT_CACHE") or Path.home() / ".cache" / "datacredit")


def bin_dir() -> Path:
    """Where the built binaries live (`<name>` symlinks to `<name>-<version>`)."""
    return cache_dir() / "bin"


def find_binary(name: str) -> Path:
    """Return the path of binary `name` from the build cache, or explain how to build it."""
    path = bin_dir() / name
    if path.is_file() and os.access(path, os.X_OK):
        return path.resolve()
    raise MissingBinaryError(
        f"{name} not found at {path}; build the pinned test binaries with `{BUILD_SCRIPT} {name}` "
        f"(or `{BUILD_SCRIPT}` for all of them; set DATACREDIT_CACHE to use another cache directory)"
    )
