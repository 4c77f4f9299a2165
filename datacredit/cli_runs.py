"""`datacredit runs` and `datacredit compare`: find the runs in a storage and set two runs' values side by side."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from .catalog import AmbiguousRun, compare, list_runs, open_target
from .cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_STORAGE, app, err, out
from .results import load_results
from .runstate import s3_options
from .spec import SpecError, load_manifest
from .storage import Storage, StorageError, StorageUnavailable, open_storage


@contextmanager
def _exits() -> Iterator[None]:
    """Bad manifests and ambiguous targets exit 3, unreadable storage 4, each with a line saying why."""
    try:
        yield
    except (SpecError, AmbiguousRun) as e:
        err.print(f"[red]{'invalid manifest' if isinstance(e, SpecError) else 'which run?'}[/] {escape(str(e))}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except StorageUnavailable as e:
        err.print(f"[red]storage unavailable:[/] {escape(str(e))}")
        raise typer.Exit(EXIT_STORAGE) from None
    except StorageError as e:
        err.print(f"[red]cannot read the storage:[/] {escape(str(e))}")
        raise typer.Exit(EXIT_STORAGE) from None


def _results(target: str) -> dict:
    store: Storage = open_target(target)
    try:
        return load_results(store)
    except FileNotFoundError:
        err.print(f"[red]no results[/] in {escape(store.uri)}: not a finished run (`datacredit runs <storage>` "
                  "lists the runs there)")
        raise typer.Exit(EXIT_FAILED) from None


@app.command()
def runs(
    target: Annotated[str, typer.Argument(help="A storage URI (folder or s3://bucket/prefix, a manifest's "
                                                "spec.storage.uri) or a manifest, whose storage is listed.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False,
) -> None:
    """List the runs in a storage, local and operator ones alike: name, state, property, coalitions, URI.

    A run made by `datacredit run` is named by its config hash, one made by the operator by its uid; both
    can be given to `report`, `compare`, `payout` and `estimate`.
    """
    with _exits():
        path = Path(target)
        if "://" not in target and path.is_file():  # a manifest: its storage, with its S3 settings
            run = load_manifest(path)
            uri, options = run.spec.storage.uri, s3_options(run)
        else:
            uri, options = target, None
        found = list_runs(open_storage(uri, options))
    if as_json:
        sys.stdout.write(json.dumps([e.to_dict() for e in found], indent=2) + "\n")
        return
    if not found:
        err.print(f"no runs in {escape(uri)} (a run folder holds run.json, below <namespace>/<run>-<id>/)")
        return
    t = Table(title=f"runs in {escape(uri)}", title_justify="left")
    for col in ("namespace", "run", "state", "property", "method", "coalitions", "contributors", "uri"):
        t.add_column(col, overflow="fold")
    for e in found:
        t.add_row(e.namespace, e.name, "finished" if e.finished else "unfinished", e.property, e.method,
                  "" if e.evaluations is None else str(e.evaluations),
                  "" if e.contributors is None else str(e.contributors), e.uri)
    out.print(t)


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:+.4f}"


@app.command("compare")
def compare_cmd(
    a: Annotated[str, typer.Argument(help="The first run: its URI or the manifest that made it.")],
    b: Annotated[str, typer.Argument(help="The second run: its URI or the manifest that made it.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
) -> None:
    """Set the values of two finished runs side by side, by contributor name: both values, the change, both
    ranks, and how well the two agree (Pearson, Spearman). A change larger than both intervals allow is
    marked `*`."""
    with _exits():
        doc = compare(_results(a), _results(b))
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    t = Table(title=f"A = {escape(doc['a']['run'])} ({doc['a']['evaluations']} coalitions), "
                    f"B = {escape(doc['b']['run'])} ({doc['b']['evaluations']} coalitions)", title_justify="left")
    for col, just in (("contributor", "left"), ("A", "right"), ("B", "right"), ("B − A", "right"),
                      ("rank A", "right"), ("rank B", "right")):
        t.add_column(col, justify=just, overflow="fold")
    for r in doc["contributors"]:
        t.add_row(r["name"], _fmt(r["a"]), _fmt(r["b"]), _fmt(r["delta"]) + (" *" if r["significant"] else ""),
                  "" if r["rankA"] is None else str(r["rankA"]), "" if r["rankB"] is None else str(r["rankB"]))
    corr = ("" if doc["pearson"] is None else
            f"Pearson {doc['pearson']:.3f}, Spearman {doc['spearman']:.3f} over {doc['common']} contributors")
    t.caption = corr or f"{doc['common']} contributors in common: too few (or constant values) to correlate"
    if any(r["significant"] for r in doc["contributors"]):
        t.caption += "\n* the change exceeds 1.96 × the combined standard error of both runs"
    out.print(t)
