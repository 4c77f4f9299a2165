"""The embedded executor: prepare, then coalitions from the planner in a process pool, all on this machine."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import layout
from .packing import batches, coalitions_per_job
from .planner import Planner
from .progress import console as adaptive_console
from .progress import progress_for
from .runloop import Coalition, finish, walk, write_run_json
from .runstate import RunRef, open_run, planner_for, read_manifest, replicate_utilities
from .spec import ValuationRun
from .storage import Storage, read_json


class RunFailed(RuntimeError):
    """The run cannot go on (prepare failed, or too many coalitions failed for good)."""


@dataclass
class Outcome:
    """What a local run produced."""

    run: RunRef
    results: dict[str, Any]


def _init_worker(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = os.environ["DATACREDIT_THREADS"] = str(threads)


def _batch_task(run_uri: str, s3: dict[str, Any], batch: list[list[int]], attempts: list[int]) -> list[dict[str, Any]]:
    from .jobs.worker import run_coalitions
    from .storage import S3Options

    return run_coalitions(run_uri, batch, attempts=attempts, options=S3Options(**s3))


def _memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _top_line(planner: Planner, names: list[str], k: int = 3) -> str:
    try:
        est = planner.estimate()
    except (ValueError, np.linalg.LinAlgError):
        return ""
    order = np.argsort(-est.values)[:k]
    return "top: " + ", ".join(f"{names[i]} {est.values[i]:+.3f}" for i in order)


def coalition_label(coalition: np.ndarray, names: list[str], limit: int = 8) -> str:
    """A coalition for a log line: ``{ann, bob}``, ``{} (∅)``, ``all 4``, ``all but {noise}``, or for large
    coalitions the size and the first ``limit`` names: ``{120 of 258: a, b, …}``. Names are never shortened."""
    members = [names[i] for i in np.flatnonzero(coalition)]
    n, k = len(names), len(members)
    if k == 0:
        return "{} (∅)"
    if k == n:
        return f"all {n}"
    if k <= limit:
        return "{" + ", ".join(members) + "}"
    if n - k <= limit:
        return "all but {" + ", ".join(names[i] for i in np.flatnonzero(~coalition)) + "}"
    return "{" + f"{k} of {n}: " + ", ".join(members[:limit]) + ", …}"


def _earlier_wall_seconds(store: Storage, config_hash: str) -> float | None:
    """``wallClockSeconds`` of results an earlier invocation left for this configuration, if any."""
    key = f"{layout.RESULTS}/shapley.json"
    if not store.exists(key):
        return None
    try:
        doc = read_json(store, key)
    except ValueError:  # unreadable: new results replace it
        return None
    if doc.get("configHash", config_hash) != config_hash or not isinstance(doc.get("wallClockSeconds"), int | float):
        return None
    return float(doc["wallClockSeconds"])


def execute(run: ValuationRun, *, workers: int | None = None, console: Console | None = None) -> Outcome:
    """Run (or resume) a valuation locally and write its results; coalitions already in storage are skipped.

    Progress goes to ``console`` (default: stderr): a live bar in a terminal, else one line per finished
    coalition (:class:`~datacredit.progress.PlainProgress`). ``wallClockSeconds`` of the results adds this
    invocation's time to the earlier results' (a finished run resumed with nothing left to do keeps its own).
    """
    console = console or adaptive_console(stderr=True)
    started = time.monotonic()
    ref = open_run(run)
    store = ref.store
    earlier_wall = _earlier_wall_seconds(store, ref.config_hash)
    prepared_now = False
    existing = not write_run_json(store, run)
    console.print(f"[bold]run[/] {escape(ref.uri)} ({'resuming' if existing else 'new'})")

    if not store.exists(layout.PREPARE_RESULT):
        from .jobs.worker import run_prepare

        console.print("[bold]prepare[/]: load data, train or load the model, prune, fine-tune on all data")
        run_prepare(ref.uri, options=ref.options, progress=True)
        prepared_now = True
    prep = read_json(store, layout.PREPARE_RESULT)
    console.print(f"prepare done: {escape(str(prep.get('summary', '')))}")

    manifest = read_manifest(store)
    names = [c["name"] for c in manifest["contributors"]]
    ids = [c["id"] for c in manifest["contributors"]]
    planner = planner_for(run, len(names))
    parallel = max(1, min(workers or run.spec.execution.parallelism, os.cpu_count() or 1))
    threads = max(1, (os.cpu_count() or 1) // parallel)
    s3 = {"endpoint": ref.options.endpoint, "region": ref.options.region, "path_style": ref.options.path_style}
    pack = coalitions_per_job(run, prep, _memory_bytes() // parallel)
    console.print(f"workers: {parallel} x {threads} thread(s), up to {pack} coalition(s) packed per worker")
    max_attempts = run.spec.execution.max_attempts_per_coalition
    attempts: dict[str, int] = {}
    failed: list[str] = []
    pending: dict[Future[list[dict[str, Any]]], tuple[list[Coalition], float]] = {}
    utilities: dict[str, float] = {}
    replicates: dict[str, list[float]] = {}

    def keep(cid: str, result: dict[str, Any]) -> tuple[float, list[float]]:
        utilities[cid], replicates[cid] = float(result["utility"]), replicate_utilities(result)
        return utilities[cid], replicates[cid]

    def stored(cid: str) -> tuple[float, list[float]] | None:
        key = layout.coalition_result(cid)
        return keep(cid, read_json(store, key)) if store.exists(key) else None

    columns = [TextColumn("[bold]coalitions"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[top]}")]
    ctx = mp.get_context("spawn")
    pool = ProcessPoolExecutor(parallel, mp_context=ctx, initializer=_init_worker, initargs=(threads,))
    done_before = 0
    try:
        with progress_for(console, *columns) as bar:  # a line per coalition when stderr is not a terminal
            task = bar.add_task("coalition", total=len(planner.sequence), top="")
            finished_count = 0

            def submit(batch: list[Coalition]) -> None:
                for coalition in batch:
                    attempts[coalition.id] = attempts.get(coalition.id, 0) + 1
                fut = pool.submit(_batch_task, ref.uri, s3, [list(c.members) for c in batch],
                                  [attempts[c.id] for c in batch])
                pending[fut] = (batch, time.monotonic())

            def told(coalition: Coalition, res: dict[str, Any], submitted: float) -> None:
                nonlocal finished_count
                utility, extra = keep(coalition.id, res)
                planner.tell(coalition.mask, utility, extra)
                finished_count += 1
                bar.update(task, advance=1, top=_top_line(planner, names),
                           note=f"{coalition_label(coalition.mask, names)} utility {utility:.4f}",
                           seconds=time.monotonic() - submitted)

            while True:
                free = parallel - len(pending)
                step = walk(planner, ids, ref.config_hash, free * pack, stored)
                done_before += len(step.told)
                finished_count += len(step.told)
                bar.update(task, advance=len(step.told), quiet=True)
                for batch in batches(step.start, pack):  # cut in plan order: the same packs whatever the timing
                    submit(batch)
                if not pending:
                    break
                finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for fut in finished:
                    batch, submitted = pending.pop(fut)
                    try:
                        results = fut.result()
                    except Exception as e:  # noqa: BLE001 - a failed attempt is reported and retried
                        error = e
                    else:
                        for coalition, res in zip(batch, results, strict=True):
                            told(coalition, res, submitted)
                        continue
                    for coalition in batch:  # the batch failed: keep what it stored, retry the rest one by one
                        cid, label = coalition.id, coalition_label(coalition.mask, names)
                        key = layout.coalition_result(cid)
                        if store.exists(key):
                            told(coalition, read_json(store, key), submitted)
                            continue
                        console.print(f"[yellow]coalition {cid} attempt {attempts[cid]} failed:[/] "
                                      f"{escape(str(error))}")
                        if attempts[cid] < max_attempts:
                            submit([coalition])
                            continue
                        failed.append(cid)
                        planner.skip(coalition.mask)  # left out of the estimate; the run goes on without it
                        if len(failed) > run.spec.execution.max_failed_coalitions:
                            raise RunFailed(
                                f"{len(failed)} coalitions failed after {max_attempts} attempts "
                                f"(execution.maxFailedCoalitions={run.spec.execution.max_failed_coalitions}); "
                                f"finished coalitions are kept in {ref.uri}: fix the cause and rerun to resume"
                            ) from error
                        finished_count += 1
                        bar.update(task, advance=1, note=f"{label} failed after {attempts[cid]} attempt(s)",
                                   seconds=time.monotonic() - submitted)
            bar.update(task, total=finished_count)  # a run that converged early ends before its plan does
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        console.print(f"\n[yellow]interrupted[/]: finished coalitions are stored; rerun the same command to resume "
                      f"({ref.uri})")
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

    if done_before:
        console.print(f"reused {done_before} coalition result(s) already in storage")
    elapsed = time.monotonic() - started
    if earlier_wall is not None:  # resumed after results were written: keep their time
        elapsed = earlier_wall + elapsed if prepared_now or attempts else earlier_wall  # else nothing ran now
    doc = finish(store, run, planner, manifest["contributors"], utilities, replicates, elapsed)
    return Outcome(ref, doc)
