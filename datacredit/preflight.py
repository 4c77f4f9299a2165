"""Checks a manifest passes before any training: local files exist, the property takes the fields it is given.

Pydantic checks each field on its own; these check the manifest against the machine it runs on (a local folder
named in `dataset.images` must exist) and against the property registry (an unknown property or a field the
property ignores is an error naming the field, found by `datacredit validate` rather than an hour into prepare).
S3 URIs are checked by the worker, which has the credentials; the registry check needs the `jobs` extra.
"""

from __future__ import annotations

from pathlib import Path

from .spec import ValuationRun

Problem = tuple[str, str]  # (field, what is wrong)


def _local_paths(run: ValuationRun) -> list[tuple[str, str | None]]:
    s = run.spec
    return [
        ("spec.dataset.images", s.dataset.images),
        ("spec.dataset.contributors.manifest", s.dataset.contributors.manifest),
        ("spec.property.reference", s.property.reference),
        ("spec.property.weights", s.property.weights),
        ("spec.property.head", s.property.head),
        *s.model.uris(),
    ]


def missing_paths(run: ValuationRun, base: Path | None = None) -> list[Problem]:
    """Local paths (not s3://) in the manifest that do not exist, relative to `base` (default: the cwd)."""
    problems = []
    for field, value in _local_paths(run):
        if not value or value.startswith("s3://"):
            continue
        path = Path(value.removeprefix("file://")).expanduser()
        if not path.is_absolute() and base is not None:
            path = base / path
        if not path.exists():
            problems.append((field, f"{value} does not exist"))
    return problems


def preflight(run: ValuationRun, base: Path | None = None, *, paths: bool = True) -> list[Problem]:
    """Every problem found before training: missing local paths (unless `paths` is false), then the property's
    name and fields."""
    problems = missing_paths(run, base) if paths else []
    try:
        from .jobs.properties import check_property  # the package registers the built-in properties
    except ImportError:  # no `jobs` extra here (an operator-only install): the worker checks it
        return problems
    return problems + check_property(run.spec.property)
