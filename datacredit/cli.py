"""The `datacredit` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core
from rich.markup import escape

from .progress import console
from .shapley import method_names
from .spec import SpecError, ValuationRun, load_manifest
from .vocabulary import ExitCode

EXIT_FAILED, EXIT_USAGE, EXIT_BAD_INPUT = ExitCode.FAILED, ExitCode.USAGE, ExitCode.BAD_INPUT
EXIT_STORAGE, EXIT_INTERRUPTED = ExitCode.STORAGE, ExitCode.INTERRUPTED

EXIT_CODES = (
    "**Exit codes:** 0 done; 1 failed (e.g. too many coalitions failed, or no results yet); 2 usage "
    "(unknown option, bad argument); 3 bad input (invalid manifest, data, table, or no run at the path); "
    "4 storage unavailable (unreachable past the patience, or `report` without usable S3 credentials); "
    "130 interrupted (Ctrl-C: finished work is kept, rerun to resume)."
)

app = typer.Typer(
    help=(
        "Credit the data contributors of a diffusion model with Shapley values.\n\n"
        "Start with `datacredit demo --quick`, then `datacredit run examples/digits-local.yaml`."
    ),
    epilog=EXIT_CODES,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)
worker = typer.Typer(help="GPU steps, run inside a Job's container or by the local executor.", no_args_is_help=True)
app.add_typer(worker, name="worker")
out = console()  # not wrapped or cut at 80 columns when redirected
err = console(stderr=True)


def _flag_type(self: typer.core.TyperOption, ctx: Any) -> str | None:
    """No type column for on/off flags in --help: typer shows ``<bool>`` there, which reads as if the flag
    took a value (``--quick true``), and click refuses one."""
    return None if self.is_flag and not self.count else _option_type(self, ctx)


_option_type = typer.core.TyperOption.display_type_rich
typer.core.TyperOption.display_type_rich = _flag_type  # type: ignore[method-assign]


def _version(value: bool) -> None:
    if value:
        from . import package_version

        sys.stdout.write(f"datacredit {package_version()}\n")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Credit the data contributors of a diffusion model with Shapley values."""


def _load(path: Path) -> ValuationRun:
    try:
        return load_manifest(path)
    except SpecError as e:
        err.print(f"[red]invalid manifest[/] {escape(str(e))}")
        raise typer.Exit(EXIT_BAD_INPUT) from None


@app.command()
def validate(
    manifests: Annotated[list[Path], typer.Argument(help="ValuationRun YAML file(s).")],
    paths: Annotated[bool, typer.Option("--paths/--no-paths", help="Check that local folders and files the "
                                        "manifest names exist here (--no-paths for a manifest written for another "
                                        "machine or a cluster).")] = True,
) -> None:
    """Check manifests and name every invalid field with the reason.

    Besides the schema: local folders and files the manifest names must exist (relative paths from the current
    directory, as `run` reads them), and the property must exist and use every spec.property field given.
    """
    from .preflight import preflight

    bad = 0
    for m in manifests:
        try:
            run = load_manifest(m)
            problems = preflight(run, paths=paths)
            if problems:
                raise SpecError(str(m), problems)
            out.print(f"[green]ok[/] {m}: {run.metadata.name} ({run.spec.model.family}, {run.spec.property.name}, "
                      f"{run.spec.estimator.name} budget {run.spec.estimator.budget})")
        except SpecError as e:
            bad += 1
            err.print(f"[red]invalid[/] {escape(str(e))}")
    if bad:
        raise typer.Exit(EXIT_BAD_INPUT)


@app.command()
def run(
    manifest: Annotated[Path, typer.Argument(help="ValuationRun YAML (the same file you would kubectl apply).")],
    workers: Annotated[int | None, typer.Option(help="Coalitions at once (default: spec.execution.parallelism, "
                                                     "at most the CPU count).")] = None,
    storage: Annotated[str | None, typer.Option(help="Override spec.storage.uri (path or s3://).")] = None,
    mlflow: Annotated[str | None, typer.Option(
        "--mlflow", metavar="URI", help="Also log the finished run to this MLflow tracking URI (for example "
                                        "sqlite:///mlflow.db): settings, every coalition's utility, the values "
                                        "(needs the tracking extra).")] = None,
) -> None:
    """Run a valuation on this machine; rerun the same command to resume after a stop or Ctrl-C."""
    from . import layout
    from .errors import BadInput
    from .local import RunFailed, execute
    from .preflight import preflight
    from .results import results_table
    from .runstate import open_run
    from .storage import StorageError

    vr = _load(manifest)
    if storage:
        vr = vr.model_copy(update={"spec": vr.spec.model_copy(
            update={"storage": vr.spec.storage.model_copy(update={"uri": storage})})})
    try:
        if not open_run(vr).store.exists(layout.PREPARE_RESULT):  # before any training (a resume needs no data)
            problems = preflight(vr)
            if problems:
                raise SpecError(str(manifest), problems)
        outcome = execute(vr, workers=workers)
    except BadInput as e:  # SpecError is one too
        err.print(f"[red]bad input:[/] {escape(str(e))}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except (RunFailed, StorageError) as e:
        err.print(f"[red]run failed:[/] {escape(str(e))}")
        raise typer.Exit(EXIT_FAILED) from None
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    out.print(results_table(outcome.results))
    for warning in outcome.results.get("warnings", []):
        err.print(f"[yellow]warning:[/] {escape(str(warning))}")
    out.print(f"results: {outcome.run.uri}/results/ (report.html, shapley.json, shapley.csv, values.png)")
    if mlflow:
        from .tracking import TrackingError, log_run

        try:
            out.print(f"mlflow: logged as run {log_run(mlflow, vr, outcome.run.store, outcome.results)} in {mlflow}")
        except TrackingError as e:
            err.print(f"[red]not logged to MLflow:[/] {escape(str(e))} (the results above are stored)")
            raise typer.Exit(EXIT_FAILED) from None
    paid = outcome.results.get("payout")
    if paid and "document" in paid:
        _print_payout(paid["document"], outcome.run.uri, paid["written"])
    elif paid:
        err.print(f"[yellow]payout (spec.payout) not made, the values are kept:[/] {escape(paid['error'])}")


@app.command()
def report(
    target: Annotated[str, typer.Argument(help="A run URI (path or s3://) or the manifest that made it.")],
) -> None:
    """Print the Shapley table of a finished run again.

    A manifest finds its run whichever executor made it: this machine's folder, or the operator's run of the
    same name and settings in the manifest's storage. Exit 3 when there is no run at the path, 1 when the run
    has no results yet, 4 when its storage cannot be read (for s3://: no credentials, wrong ones, or unreachable).
    """
    from . import layout
    from .catalog import AmbiguousRun, open_target
    from .report_html import REPORT
    from .results import load_results, results_table
    from .storage import StorageError, StorageUnavailable

    local = "://" not in target or target.startswith("file://")
    if local and not Path(target.removeprefix("file://")).exists():
        err.print(f"[red]no run at {escape(target)}:[/] no such file or folder; give the run folder that "
                  "`datacredit run` printed (`results: <run>/results/`) or the manifest that made it")
        raise typer.Exit(EXIT_BAD_INPUT)
    try:
        store = open_target(target)
        if not store.exists(layout.RUN) and not store.exists(f"{layout.RESULTS}/shapley.json"):
            hint = ""
            parent = Path(target).parent
            if local and (parent / layout.RUN).is_file():
                hint = f"; did you mean {escape(str(parent))}?"
            err.print(f"[red]no run at {escape(str(store.uri))}:[/] it holds no {layout.RUN}; give the run "
                      f"folder that `datacredit run` printed or the manifest that made it{hint}")
            raise typer.Exit(EXIT_BAD_INPUT)
        doc = load_results(store)
    except FileNotFoundError:
        err.print(f"[red]no results yet[/] in {escape(str(store.uri))}: the run has not finished "
                  "(`datacredit run` on its manifest resumes it)")
        raise typer.Exit(EXIT_FAILED) from None
    except SpecError as e:
        err.print(f"[red]invalid manifest[/] {escape(str(e))}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except AmbiguousRun as e:
        err.print(f"[red]which run?[/] {escape(str(e))}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except StorageUnavailable as e:
        err.print(f"[red]storage unavailable:[/] {escape(str(e))}")
        raise typer.Exit(EXIT_STORAGE) from None
    except StorageError as e:
        err.print(f"[red]cannot read the run:[/] {escape(str(e))}")
        if "s3://" in str(e):  # an s3:// target, or a manifest whose storage is on S3
            err.print("S3 credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE); "
                      "for MinIO and other S3-compatible stores also set AWS_ENDPOINT_URL_S3")
        raise typer.Exit(EXIT_STORAGE) from None
    out.print(results_table(doc))
    if store.exists(REPORT):
        out.print(f"report: {store.uri}/{REPORT} (one self-contained page: open it in a browser)")


def _bad(message: str) -> typer.Exit:
    """Print a bad-input error and return the exit to raise."""
    err.print(f"[red]cannot pay out:[/] {escape(message)}")
    return typer.Exit(EXIT_BAD_INPUT)


@app.command()
def payout(
    target: Annotated[str, typer.Argument(help="A finished run's URI (path or s3://) or the manifest that made it.")],
    pool: Annotated[str, typer.Option(help="What to pay out this period, in currency units: 10000 or 10000.01.")],
    currency: Annotated[str, typer.Option(help="ISO 4217 code; sets the minor unit (USD 2 decimals, JPY 0, "
                                               "KWD 3).")] = "USD",
    rule: Annotated[str, typer.Option(help="shapley | blend | lower-bound | pro-rata")] = "shapley",
    alpha: Annotated[float | None, typer.Option(help="blend only: weight in [0, 1] of the image-count share "
                                                     "(default: from the interval widths).")] = None,
    floor: Annotated[str, typer.Option(help="Minimum payout in currency units; smaller amounts are carried over "
                                            "to the next period.")] = "0",
    period: Annotated[str | None, typer.Option(help="Name of this payout (default: today's UTC date, "
                                                    "YYYY-MM-DD).")] = None,
    carry: Annotated[str | None, typer.Option(help="The previous payout: its JSON file, or its period in this "
                                                   "run's payouts/. What it carried over is paid first.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite/--no-overwrite", help="Replace an existing "
                                            "payouts/PERIOD.json that differs.")] = False,
) -> None:
    """Split a pool among the contributors of a finished run, exact to the minor unit; write `payouts/PERIOD.*`.

    Rules (negative values are clipped to 0 and reported, never charged):
    **shapley** pays the share of the positive values; **pro-rata** the share of images; **blend**
    α · image share + (1 − α) · value share, with α = clip(median half-width of the 95% intervals / median
    |value|, 0, 1) unless `--alpha`; **lower-bound** pays on max(ci95 low, 0) and holds the rest of what the
    values would pay in escrow. Amounts are integers of the minor unit, rounded by largest remainder so they
    sum to the pool exactly. Below `--floor` a contributor gets nothing this period, its amount is carried over
    (`--carry` adds it next period) and its share goes to the others. Reports contributors whose interval crosses
    zero, near-duplicate images shared by contributors (prepare/dataset.npz) and, for exact runs, what splitting
    into two halves would gain. Writes `payouts/PERIOD.json`, `.csv` and `.png` in the run. A manifest's
    `spec.payout` makes the same payout when the run finishes.
    """
    import dataclasses

    from .catalog import AmbiguousRun, open_target
    from .payout import PayoutError
    from .payout_run import PayoutExists, PayoutParams, check_params, make_payout
    from .storage import StorageError

    params = PayoutParams(pool=pool, currency=currency, rule=rule, alpha=alpha, floor=floor, period=period,
                          carry=carry, overwrite=overwrite)
    try:
        params = dataclasses.replace(params, period=check_params(params).period)  # one date throughout
    except PayoutError as e:
        raise _bad(str(e)) from None
    if "://" not in target and not Path(target).exists():
        raise _bad(f"no such manifest or run folder: {target}")
    try:
        store = open_target(target)
    except (SpecError, AmbiguousRun, StorageError) as e:
        raise _bad(str(e)) from None
    try:
        record = make_payout(store, params)
    except PayoutExists as e:
        raise _bad(f"{e}: choose another --period or pass --overwrite") from None
    except PayoutError as e:
        raise _bad(str(e)) from None
    except StorageError as e:
        err.print(f"[red]cannot pay out (storage):[/] {escape(str(e))}")
        raise typer.Exit(1) from None
    _print_payout(record.doc, store.uri, record.written)


def _print_payout(doc: dict[str, Any], uri: str, written: list[str]) -> None:
    """The payout table, its flags and checks, and where it was written."""
    from .payout_report import PAYOUTS, payout_table

    out.print(payout_table(doc))
    _print_checks(doc)
    out.print(f"payout: {escape(uri)}/{PAYOUTS}/ ({', '.join(k.rsplit('/', 1)[1] for k in written)})")


def _print_checks(doc: dict[str, Any]) -> None:
    """Flags and robustness checks of a payout, a line each."""
    if doc["clipped"]:
        err.print(f"[yellow]clipped to 0 (negative values, not charged):[/] {escape(', '.join(doc['clipped']))}")
    if doc["crossesZero"]:
        err.print(f"[yellow]95% interval crosses zero:[/] {escape(', '.join(doc['crossesZero']))}")
    dup = doc["checks"]["duplicates"]
    if dup["status"] != "ok":
        err.print(f"[yellow]near duplicates not checked:[/] {escape(dup['note'])}")
    else:
        pairs = "; ".join(f"{p['a']} ~ {p['b']}: {p['imagePairs']} image pair(s)" for p in dup["pairs"][:5])
        out.print(escape(f"near duplicates (dHash, ≤ {dup['threshold']} bits): {dup['imagesWithDuplicateElsewhere']}"
                         f" of {dup['images']} images have one at another contributor" + (f" — {pairs}" if pairs
                                                                                           else "")))
    split = doc["checks"]["split"]
    if split["status"] == "ok":
        name, gain = max(((n, c["shapleyGain"]) for n, c in split["contributors"].items()), key=lambda x: x[1])
        out.print(escape(f"split test: splitting into two substitute halves would change {name}'s Shapley total "
                         f"by {gain:+.4g} (the most of any contributor); pro-rata is split-neutral"))


@app.command()
def estimate(
    table: Annotated[Path, typer.Option(help="utilities.jsonl of a run: one {members, utility} per line.")],
    method: Annotated[str, typer.Option(help=" | ".join(method_names()))] = "kernel",
    players: Annotated[int | None, typer.Option(help="Number of contributors (default: from the names, else "
                                                     "the table).")] = None,
    names: Annotated[str | None, typer.Option(help="Contributor names (and the run's plan) from this run: its "
                                                   "folder or URI, or its results/shapley.json (default: the "
                                                   "shapley.json next to a table in a run's results/).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of the table.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV instead of the table.")] = False,
) -> None:
    """Re-estimate values offline from stored coalition utilities, without re-running GPUs.

    The method is computed as asked or refused with the reason: **exact** needs all 2^n coalitions, **loo**
    every leave-one-out coalition, **permutation** all 2^n coalitions or the permutation chains of the run that
    made the table (`--names` with that run); **kernel** and **banzhaf** regress over what the table holds.
    Utilities under replicate seeds add the between-seed noise to the intervals.
    """
    from rich.table import Table

    from .reestimate import CannotEstimate, read_rows, reestimate, run_info, run_info_near, to_csv, to_json
    from .storage import StorageError

    if as_json and as_csv:
        raise typer.BadParameter("choose one of --json and --csv", param_hint="--json/--csv")
    if not table.is_file():
        err.print(f"[red]no such file[/] {escape(str(table))}")
        raise typer.Exit(EXIT_BAD_INPUT)
    try:
        run = run_info(names) if names else run_info_near(table)
        result = reestimate(read_rows(table), method, n_players=players, run=run)
    except CannotEstimate as e:
        err.print(f"[red]cannot estimate[/] {escape(str(method))} from {escape(str(table))}: {escape(str(e))}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except StorageError as e:
        err.print(f"[red]cannot read --names:[/] {escape(str(e))}")
        raise typer.Exit(EXIT_STORAGE) from None
    if as_json:
        sys.stdout.write(to_json(result, str(table)))
        return
    if as_csv:
        sys.stdout.write(to_csv(result))
        return
    est = result.estimate
    t = Table(title=f"{method}: {result.computed}, from {result.rows} rows of {escape(str(table))}",
              title_justify="left")
    t.add_column("player", justify="right")
    if result.names:
        t.add_column("contributor")
    t.add_column("value", justify="right")
    t.add_column("stderr", justify="right")
    t.add_column("± 95%", justify="right")
    for i in range(result.n_players):
        cells = [str(i), *([escape(result.names[i])] if result.names else [])]
        t.add_row(*cells, f"{est.values[i]:+.5f}", f"{est.stderr[i]:.5f}", f"{1.96 * est.stderr[i]:.5f}")
    if run is not None and result.names:
        t.caption = f"names from {escape(run.source)}"
    out.print(t)


@app.command()
def demo(
    quick: Annotated[bool, typer.Option("--quick/--no-quick", help="Toy size, about a minute: a first look.")]
    = False,
    directory: Annotated[Path, typer.Option("--dir", help="Where data, manifest and run go.")] = Path("demo-run"),
    data_only: Annotated[bool, typer.Option("--data-only/--no-data-only", help="Only write the data set and "
                                                                                "manifest.")] = False,
) -> None:
    """Value 6 contributors of handwritten digits (3 planted bad) for image quality, exactly, on CPU.

    Three contributors hold real digits; `noise` holds uniform noise, `blank` near-blank images and
    `duplicate` one digit copied many times. They should rank last. 4-7 minutes on 2 cores; `--quick`
    values 4 contributors at toy size in about a minute.
    """
    from .demo import build_demo

    manifest = build_demo(directory, quick=quick)
    out.print(f"demo data and manifest: {manifest}")
    if not data_only:
        run(manifest, workers=None, storage=None)


@app.command()
def evaluate(
    target: Annotated[str, typer.Argument(help="A finished run's URI (path or s3://) or the manifest that made it.")],
    alphas: Annotated[str, typer.Option(help="LDS test-coalition sizes as fractions of the contributors.")]
    = "0.25,0.5,0.75",
    subsets: Annotated[int, typer.Option(min=3, help="LDS test coalitions per alpha.")] = 10,
    seeds: Annotated[int, typer.Option(min=1, help="Retraining seeds per test coalition (the paper: 3).")] = 3,
    fraction: Annotated[float, typer.Option(min=0.01, max=0.99, help="Counterfactual: remove this top / bottom "
                                                                     "fraction of each ranking.")] = 0.4,
    baselines: Annotated[str, typer.Option(help="Comma-separated: loo, ft-shapley, retrain-shapley, pixel, "
                                                "embedding, banzhaf, datamodel, d-trak, proxy ('' for none); "
                                                "those that do not apply to the run are skipped, and the "
                                                "table says why.")]
    = "loo,ft-shapley,retrain-shapley,pixel,embedding,banzhaf,datamodel,d-trak,proxy",
    interval: Annotated[str, typer.Option(help="95% interval over seeds: normal (the paper's), t or bootstrap.")]
    = "normal",
    trak_dim: Annotated[int, typer.Option(min=1, help="D-TRAK: random projection dimension.")] = 1024,
    trak_timesteps: Annotated[int, typer.Option(min=1, help="D-TRAK: (timestep, noise) draws per image "
                                                             "(the paper: 100).")] = 10,
) -> None:
    """Score the run's Shapley values against models **retrained from scratch**: LDS, counterfactuals, baselines.

    Every retrained utility is stored under `evaluation/` in the run and reused by later calls, so a second
    call (or another estimator) costs no retraining. Writes `evaluation/report.json`. Families: `ddpm`, `ldm`
    (retrains the UNet on VQ latents) and `sd-lora` (retrains the LoRA from the base model; adds the caption
    proxy: the full model sampled on a coalition's captions only, no training).
    """
    from .jobs.evaluate import EvalSettings, EvaluationError, report_tables
    from .jobs.evaluate import evaluate as run_evaluation
    from .runstate import open_run

    try:
        alpha_list = tuple(float(a) for a in alphas.split(",") if a.strip())
    except ValueError:
        err.print(f"[red]bad --alphas {escape(repr(alphas))}[/]: expected comma-separated fractions "
                  "such as 0.25,0.5,0.75")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    ref = open_run(_load(Path(target))) if Path(target).is_file() else None
    settings = EvalSettings(alphas=alpha_list, subsets=subsets, seeds=seeds, fraction=fraction,
                            baselines=tuple(b.strip() for b in baselines.split(",") if b.strip()), interval=interval,
                            trak_dim=trak_dim, trak_timesteps=trak_timesteps)
    try:
        report = run_evaluation(ref.uri if ref else target, settings, options=ref.options if ref else None)
    except (EvaluationError, ValueError) as e:  # BadInput and SpecError are ValueErrors
        err.print(f"[red]cannot evaluate:[/] {escape(str(e))}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    for table in report_tables(report):
        out.print(table)
    agree = report["agreement"]
    out.print(f"sparsified-FT vs retrained utilities on the test coalitions: Pearson "
              f"{agree['pearsonSparsifiedVsRetrain']:.2f} over {agree['pairs']} coalitions; "
              f"retrained now: {report['retrainedNow']}; report: {report['run']}/evaluation/report.json")


@app.command()
def calibrate(
    target: Annotated[str, typer.Argument(help="The manifest of the run to calibrate (or a prepared run's URI).")],
    coalitions: Annotated[int, typer.Option(min=4, help="Coalitions retrained from scratch (sizes ⌊α·n⌋, α = 0.25, "
                                                        "0.5, 0.75, as evaluate's LDS draws them).")] = 8,
    steps: Annotated[str, typer.Option(help="Fine-tuning steps k to try: `0.5x` is a multiple of "
                                            "spec.method.finetune.steps, a plain integer a step count.")]
    = "0.25x,0.5x,1x,2x",
    ratios: Annotated[str, typer.Option(help="Prune ratios to try (default: the manifest's, one lower and one "
                                             "higher, e.g. 0.2,0.3,0.5).")] = "",
    seeds: Annotated[int, typer.Option(min=1, help="Retraining seeds per coalition (their mean is the truth).")] = 1,
) -> None:
    """Measure how well sparsified-FT utilities track **retraining**, over prune ratios × fine-tuning steps k.

    Retrains `--coalitions` coalitions from scratch (stored in `evaluation/retrain.jsonl`, shared with
    `datacredit evaluate`), evaluates them with sparsified fine-tuning at every (ratio, k) of the grid (stored in
    `calibration/sweep.jsonl`; the manifest's own setting is always in it) and prints, per setting, Pearson r and
    Spearman ρ with the retrained utilities, each with a 95% **Fisher-z** interval (se 1/√(n−3); Spearman
    √(1.06/(n−3))), and the cost per coalition in counted work and seconds (fine-tuning + sampling).
    Recommends the **cheapest setting (counted work per coalition) whose Pearson r ≥ 0.8** (else the one with the
    highest r) as a manifest snippet. Writes `calibration/report.json`; results of the run then carry the fidelity
    of its own setting. Runs prepare first when it has not run yet. Only the `ddpm` family.
    """
    if "://" not in target and not Path(target).exists():
        err.print(f"[red]no such manifest or run folder:[/] {escape(str(target))}")
        raise typer.Exit(EXIT_BAD_INPUT)
    from . import layout
    from .errors import BadInput
    from .jobs.calibrate import CALIBRATED_FAMILIES, CalibrationSettings, recommendation_text, report_table
    from .jobs.calibrate import calibrate as run_calibration
    from .jobs.evaluate import EvaluationError
    from .runstate import open_run
    from .storage import StorageError, open_storage, read_json, write_json

    options = None
    uri = target
    if Path(target).is_file():
        vr = _load(Path(target))
        if vr.spec.model.family not in CALIBRATED_FAMILIES:
            family = escape(repr(vr.spec.model.family))
            err.print(f"[red]cannot calibrate:[/] spec.model.family {family} is not supported yet "
                      f"(supported: {', '.join(CALIBRATED_FAMILIES)})")
            raise typer.Exit(EXIT_BAD_INPUT)
        ref = open_run(vr)
        uri, options = ref.uri, ref.options
        if not ref.store.exists(layout.RUN):
            write_json(ref.store, layout.RUN, {"manifest": vr.to_manifest(), "configHash": vr.config_hash()})
        if not ref.store.exists(layout.PREPARE_RESULT):
            from .jobs.worker import run_prepare

            err.print("[bold]prepare[/]: load data, train or load the model, prune, fine-tune on all data")
            try:
                run_prepare(ref.uri, options=ref.options, progress=True)
            except BadInput as e:  # SpecError is one too
                err.print(f"[red]bad input:[/] {escape(str(e))}")
                raise typer.Exit(EXIT_BAD_INPUT) from None
    settings = CalibrationSettings(coalitions=coalitions, steps=steps, ratios=ratios, seeds=seeds)
    try:
        report = run_calibration(uri, settings, options=options)
    except (EvaluationError, ValueError) as e:  # BadInput, SpecError and CalibrationError are ValueErrors
        err.print(f"[red]cannot calibrate:[/] {escape(str(e))}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except StorageError as e:
        err.print(f"[red]calibration failed:[/] {escape(str(e))}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("\n[yellow]interrupted[/]: finished retrains and sweep utilities are stored; rerun to resume")
        raise typer.Exit(130) from None
    out.print(report_table(report))
    out.print(recommendation_text(report))
    out.print(f"retrained now: {report['retrainedNow']}; sparsified-FT evaluated now: {report['sweptNow']}; "
              f"report: {report['run']}/calibration/report.json")
    results, key = open_storage(uri, options), f"{layout.RESULTS}/shapley.json"
    fidelity = (read_json(results, key).get("fidelity") or {}) if results.exists(key) else None
    if fidelity is not None and fidelity.get("pearson") != report["manifest"]["pearson"]:  # results predate it
        out.print("the run's results predate this calibration: rerun `datacredit run` on the manifest (it reuses "
                  "every coalition) to put the fidelity into results/shapley.json")


@worker.command("prepare")
def worker_prepare(
    run_uri: Annotated[str, typer.Option("--run", help="Run URI holding run.json.")],
    endpoint: Annotated[str, typer.Option(help="S3 endpoint URL (else AWS_ENDPOINT_URL_S3).")] = "",
    region: Annotated[str, typer.Option()] = "",
) -> None:
    """Load data, train or load the full model, prune, fine-tune on all data; write `prepare/result.json`.

    Prints a plain line per stage and about ten per training to stdout, so the log of a prepare Job shows
    where it is.
    """
    from .errors import BadInput
    from .jobs.worker import run_prepare
    from .storage import S3Options, StorageUnavailable

    try:
        run_prepare(run_uri, options=S3Options(endpoint=endpoint, region=region), progress=True)
    except BadInput as e:  # SpecError is one too
        err.print(f"[red]bad input:[/] {escape(str(e))}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except StorageUnavailable as e:
        err.print(f"[red]storage unavailable:[/] {escape(str(e))}")
        raise typer.Exit(EXIT_STORAGE) from None


@worker.command("coalition")
def worker_coalition(
    run_uri: Annotated[str, typer.Option("--run", help="Run URI holding manifest.json and prepare/.")],
    members: Annotated[list[str], typer.Option(help="Comma-separated contributor indices of a coalition; '' for the "
                                                    "empty set. Repeat it to evaluate a batch as one pack.")],
    attempt: Annotated[list[int] | None, typer.Option(min=1, help="The attempt of each --members (one value: all "
                                                                  "of them).")] = None,
    endpoint: Annotated[str, typer.Option(help="S3 endpoint URL (else AWS_ENDPOINT_URL_S3).")] = "",
    region: Annotated[str, typer.Option()] = "",
) -> None:
    """Fine-tune the sparsified model on each coalition, sample, score; write `coalitions/<id>/result.json`.

    Several `--members` are packed: fine-tuned and sampled together as one program on the device, each with its
    own data, seeds, optimiser and EMA, then scored and stored one by one (stored coalitions are skipped).
    """
    from .errors import BadInput, NotReady
    from .jobs.worker import run_coalitions
    from .storage import S3Options, StorageUnavailable

    try:
        batch = [[int(x) for x in m.split(",") if x.strip()] for m in members]
    except ValueError:
        err.print(f"[red]bad --members {escape(repr(members))}[/]: expected comma-separated integers")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    attempts = list(attempt or [1])
    if len(attempts) == 1:
        attempts = attempts * len(batch)
    try:
        results = run_coalitions(run_uri, batch, attempts=attempts,
                                 options=S3Options(endpoint=endpoint, region=region))
    except BadInput as e:  # SpecError is one too
        err.print(f"[red]bad input:[/] {escape(str(e))}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except NotReady as e:
        err.print(f"[yellow]not ready:[/] {escape(str(e))}")
        raise typer.Exit(EXIT_FAILED) from None
    except StorageUnavailable as e:
        err.print(f"[red]storage unavailable:[/] {escape(str(e))}")
        raise typer.Exit(EXIT_STORAGE) from None
    for res in results:
        out.print(f"coalition {res['id']}: utility {res['utility']:.5f} ({res.get('deviceSeconds', 0):.1f} "
                  f"device-s, packed with {res.get('packedWith', 1)})")


@app.command("operator")
def operator_cmd(
    namespace: Annotated[list[str] | None, typer.Option("--namespace", "-n", help="Watch only these namespaces "
                                                           "(repeatable; default: DATACREDIT_WATCH_NAMESPACES "
                                                           "or cluster-wide).")] = None,
    metrics_port: Annotated[int, typer.Option(help="Prometheus /metrics port.")] = 8080,
    liveness_port: Annotated[int, typer.Option(help="kopf liveness /healthz port (0: off).")] = 8081,
) -> None:
    """Run the Kubernetes operator (kopf): reconcile ValuationRuns into Jobs, status, metrics and events."""
    from .operator.main import run_operator

    run_operator(namespaces=namespace or [], metrics_port=metrics_port, liveness_port=liveness_port)


@app.command()
def crd() -> None:
    """Print the ValuationRun CustomResourceDefinition generated from the spec model."""
    from .crd import crd_yaml

    sys.stdout.write(crd_yaml())


from . import cli_runs  # noqa: E402,F401  (registers `runs` and `compare` on the app)


def main() -> None:
    """Entry point."""
    app()


if __name__ == "__main__":
    main()
