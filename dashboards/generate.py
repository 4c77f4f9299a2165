"""Generate the datacredit Grafana dashboards (grafana-foundation-sdk) into charts/datacredit/dashboards/.

    python dashboards/generate.py           # write the JSON files
    python dashboards/generate.py --check   # exit 1 if the committed files differ from a fresh render

Every query uses the `${datasource}` variable; the metric names are the operator's contract
(`datacredit_*`) plus prometheus-client's `process_*` defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from grafana_foundation_sdk.builders import bargauge, dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders.common import (
    ReduceDataOptions,
    StackingConfig,
    TableSortByFieldState,
    VizLegendOptions,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUT_DIR = Path(__file__).resolve().parent.parent / "charts" / "datacredit" / "dashboards"
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
TAG = "datacredit"
RUN = 'namespace=~"$namespace", name=~"$run"'
NS = 'namespace=~"$namespace"'
JOB = 'job=~"$job"'
PER_RUN = "{{namespace}}/{{name}}"
LAST = ReduceDataOptions().calcs(["lastNotNull"]).values(False)

Panel = timeseries.Panel | stat.Panel | table.Panel | bargauge.Panel


def query(expr: str, legend: str = "", *, instant: bool = False, as_table: bool = False) -> prometheus.Dataquery:
    """A Prometheus query on the `${datasource}` variable."""
    q = prometheus.Dataquery().expr(expr).datasource(DATASOURCE)
    if legend:
        q = q.legend_format(legend)
    if instant:
        q = q.instant()
    if as_table:
        q = q.format(PromQueryFormat.TABLE)
    return q


def quantiles(metric: str, selector: str = "", by: str = "", legend: str = "") -> list[prometheus.Dataquery]:
    """p50 and p95 of histogram `metric`, grouped by the label `by` (if any)."""
    group = f"le, {by}" if by else "le"
    rate = (
        f"rate({metric}_bucket{{{selector}}}[$__rate_interval])"
        if selector
        else f"rate({metric}_bucket[$__rate_interval])"
    )
    return [
        query(f"histogram_quantile({q}, sum by ({group}) ({rate}))", f"p{round(q * 100)}{legend}") for q in (0.5, 0.95)
    ]


def finish(
    panel: Panel,
    title: str,
    description: str,
    unit: str,
    width: int,
    height: int,
    queries: list[prometheus.Dataquery],
) -> Panel:
    """Set the common panel fields and attach `queries` with refIds A, B, ..."""
    panel = panel.title(title).description(description).datasource(DATASOURCE).unit(unit).span(width).height(height)
    for ref, q in zip("ABCDEFGH", queries, strict=False):
        panel = panel.with_target(q.ref_id(ref))
    return panel


def graph(
    title: str,
    description: str,
    unit: str,
    queries: list[prometheus.Dataquery],
    *,
    width: int = 12,
    stacked: bool = False,
) -> timeseries.Panel:
    """A time series panel with a table legend below it."""
    legend = VizLegendOptions().display_mode(common.LegendDisplayMode.TABLE).placement(common.LegendPlacement.BOTTOM)
    panel = timeseries.Panel().min(0).line_width(1).fill_opacity(60 if stacked else 10).legend(legend.show_legend(True))
    if stacked:
        panel = panel.stacking(StackingConfig().mode(common.StackingMode.NORMAL))
    return finish(panel, title, description, unit, width, 8, queries)


def single(
    title: str,
    description: str,
    unit: str,
    q: prometheus.Dataquery,
    *,
    width: int = 8,
    height: int = 6,
    text: common.BigValueTextMode = common.BigValueTextMode.VALUE_AND_NAME,
) -> stat.Panel:
    """A stat panel with the current value of each series."""
    panel = stat.Panel().graph_mode(common.BigValueGraphMode.NONE).text_mode(text).reduce_options(LAST)
    return finish(panel, title, description, unit, width, height, [q.instant()])


def per_run(title: str, description: str, unit: str, expr: str, *, maximum: float | None = None) -> bargauge.Panel:
    """A horizontal bar gauge with one bar per run."""
    panel = bargauge.Panel().min(0).orientation(common.VizOrientation.HORIZONTAL).reduce_options(LAST)
    panel = panel.display_mode(common.BarGaugeDisplayMode.BASIC)
    if maximum is not None:
        panel = panel.max(maximum)
    return finish(panel, title, description, unit, 8, 8, [query(expr, PER_RUN, instant=True)])


def top_contributors() -> table.Panel:
    """The current top-10 Shapley values of the selected runs as a table."""
    organize = model.DataTransformerConfig(
        id_val="organize",
        options={
            "excludeByName": {"Time": True},
            "indexByName": {"namespace": 0, "name": 1, "rank": 2, "contributor": 3, "Value": 4},
            "renameByName": {"name": "run", "Value": "Shapley value"},
        },
    )
    panel = table.Panel().with_transformation(organize)
    panel = panel.sort_by([TableSortByFieldState().display_name("Shapley value").desc(True)])
    expr = f"max by (namespace, name, rank, contributor) (datacredit_run_top_value{{{RUN}}})"
    description = "The ten largest Shapley values of each selected run, as in its status."
    return finish(panel, "Top contributors", description, "short", 16, 10, [query(expr, instant=True, as_table=True)])


def variable(name: str, label: str, expr: str) -> dashboard.QueryVariable:
    """A multi-value query variable whose "All" matches every value."""
    return (
        dashboard.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(expr)
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )


def base(uid: str, title: str, description: str) -> dashboard.Dashboard:
    """A dashboard tagged `datacredit`, linked to its siblings, with the `datasource` variable."""
    siblings = dashboard.DashboardLink("datacredit").type(model.DashboardLinkType.DASHBOARDS).tags([TAG])
    return (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags([TAG])
        .editable()
        .time("now-6h", "now")
        .refresh("30s")
        .timezone("browser")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .link(siblings.as_dropdown(True).include_vars(True).keep_time(True))
        .with_variable(dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    )


def runs_dashboard() -> dashboard.Dashboard:
    """ValuationRuns: phases, progress, throughput, failures, latency and the top contributors."""
    completed = f"datacredit_coalitions_completed_total{{{NS}}}"
    failed = f'datacredit_coalitions_completed_total{{{NS}, result="failed"}}'
    retries = f'datacredit_coalition_attempts_total{{{NS}, reason!="Started"}}'
    overview = [
        single(
            "Runs by phase",
            "ValuationRuns in each phase.",
            "short",
            query(f"sum by (phase) (datacredit_runs{{{NS}}})", "{{phase}}"),
        ),
        graph(
            "Coalitions by phase",
            "Coalitions of the selected runs in each phase.",
            "short",
            [query(f"sum by (phase) (datacredit_coalitions{{{RUN}}})", "{{phase}}")],
            width=16,
            stacked=True,
        ),
        per_run(
            "Progress",
            "Evaluated / planned coalitions of each run.",
            "percentunit",
            f"max by (namespace, name) (datacredit_run_progress_ratio{{{RUN}}})",
            maximum=1,
        ),
        per_run(
            "ETA",
            "Estimated time to completion at the recent completion rate.",
            "s",
            f"max by (namespace, name) (datacredit_run_eta_seconds{{{RUN}}})",
        ),
        per_run(
            "Since success",
            "Time since the run succeeded (finished runs only).",
            "s",
            f"time() - max by (namespace, name) (datacredit_run_last_success_timestamp_seconds{{{RUN}}})",
        ),
    ]
    throughput = [
        graph(
            "Coalitions completed per hour",
            "Coalitions finished in the preceding hour, by result.",
            "short",
            [query(f"sum by (result) (increase({completed}[1h]))", "{{result}}")],
            width=8,
        ),
        graph(
            "Failures and retries per hour",
            "Failed or retried coalition attempts, by reason.",
            "short",
            [query(f"sum by (reason) (increase({retries}[1h]))", "{{reason}}")],
            width=8,
        ),
        graph(
            "Failure ratio",
            "Failed / completed coalitions in the preceding hour.",
            "percentunit",
            [query(f"sum(increase({failed}[1h])) / sum(increase({completed}[1h]))", "failed")],
            width=8,
        ),
    ]
    latency = [
        graph(
            "Coalition duration by stage",
            "p50 and p95 of each coalition stage (finetune, sample, property) and of the whole coalition.",
            "s",
            quantiles("datacredit_coalition_duration_seconds", by="stage", legend=" {{stage}}"),
        ),
        graph(
            "Queue wait",
            "p50 and p95 from Job creation to a running pod (scheduling, Kueue, image pulls).",
            "s",
            quantiles("datacredit_coalition_queue_wait_seconds"),
        ),
    ]
    results = [
        top_contributors(),
        single(
            "Largest standard error",
            "The largest standard error of the run's Shapley estimates.",
            "short",
            query(f"max by (namespace, name) (datacredit_run_max_stderr{{{RUN}}})", PER_RUN),
            height=10,
        ),
        single(
            "Device seconds",
            "Device seconds the run's coalitions took (deviceSeconds of each result.json; a packed Job's time is "
            "shared among its coalitions). Divided by the contributors: the cost per contributor.",
            "s",
            query(f"sum by (namespace, name) (datacredit_run_device_seconds_total{{{RUN}}})", PER_RUN),
            height=10,
        ),
    ]
    board = base("datacredit-runs", "datacredit / Runs", "ValuationRuns: progress, throughput, latency, results.")
    board = board.with_variable(variable("namespace", "Namespace", "label_values(datacredit_runs, namespace)"))
    board = board.with_variable(variable("run", "Run", f"label_values(datacredit_run_progress_ratio{{{NS}}}, name)"))
    rows = [
        ("Overview", overview),
        ("Throughput and failures", throughput),
        ("Latency (all namespaces)", latency),
        ("Results", results),
    ]
    for title, panels in rows:
        board = board.with_row(dashboard.Row(title))
        for panel in panels:
            board = board.with_panel(panel)
    return board


def operator_dashboard() -> dashboard.Dashboard:
    """The operator process: availability, reconcile rate, errors and latency, memory and CPU."""
    active = f'datacredit_runs{{{JOB}, phase=~"Pending|Preparing|Evaluating"}}'
    panels = [
        single("Targets up", "Operator scrape targets that are up.", "short", query(f"sum(up{{{JOB}}})", "up")),
        single(
            "Version",
            "The operator's build.",
            "short",
            query(f"max by (version) (datacredit_build_info{{{JOB}}})", "{{version}}"),
            text=common.BigValueTextMode.NAME,
        ),
        single(
            "Active runs",
            "ValuationRuns pending, preparing or evaluating.",
            "short",
            query(f"sum({active})", "active"),
        ),
        graph(
            "Reconciles by result",
            "Reconcile passes per second.",
            "ops",
            [
                query(
                    f"sum by (result) (rate(datacredit_reconcile_total{{{JOB}}}[$__rate_interval]))",
                    "{{result}}",
                )
            ],
            width=8,
        ),
        graph(
            "Reconcile errors",
            "Reconcile errors per second.",
            "ops",
            [query(f'sum(rate(datacredit_reconcile_total{{{JOB},result="error"}}[$__rate_interval]))', "errors")],
            width=8,
        ),
        graph(
            "Reconcile latency",
            "p50 and p95 of one reconcile pass.",
            "s",
            quantiles("datacredit_reconcile_duration_seconds", JOB),
            width=8,
        ),
        graph(
            "Memory (RSS)",
            "Resident memory of the operator process.",
            "bytes",
            [query(f"process_resident_memory_bytes{{{JOB}}}", "{{instance}}")],
        ),
        graph(
            "CPU",
            "CPU cores used by the operator process.",
            "short",
            [query(f"rate(process_cpu_seconds_total{{{JOB}}}[$__rate_interval])", "{{instance}}")],
        ),
    ]
    board = base("datacredit-operator", "datacredit / Operator", "Health of the datacredit operator (kopf).")
    board = board.with_variable(variable("job", "Job", "label_values(datacredit_build_info, job)"))
    for panel in panels:
        board = board.with_panel(panel)
    return board


DASHBOARDS: dict[str, Callable[[], dashboard.Dashboard]] = {
    "datacredit-runs.json": runs_dashboard,
    "datacredit-operator.json": operator_dashboard,
}


def render() -> dict[str, str]:
    """The file name and JSON text of every dashboard (panels and rows numbered 1, 2, ...)."""
    rendered = {}
    for name, build in DASHBOARDS.items():
        board = build().build()
        for index, panel in enumerate(board.panels or [], start=1):
            panel.id_val = index
        rendered[name] = json.dumps(board, cls=JSONEncoder, sort_keys=True, indent=2) + "\n"
    return rendered


def stale_files(out_dir: Path) -> list[str]:
    """Names of the dashboards in `out_dir` that are missing, differ from a fresh render, or are extra."""
    rendered = render()
    differ = [n for n, text in rendered.items() if not (out_dir / n).is_file() or (out_dir / n).read_text() != text]
    return differ + sorted(p.name for p in out_dir.glob("*.json") if p.name not in rendered)


def main(argv: list[str] | None = None) -> int:
    """Write the dashboards, or with --check list the files that are out of date."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 if out of date")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output directory")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.out)
        for name in stale:
            print(f"{args.out / name}: out of date; run `python dashboards/generate.py`", file=sys.stderr)
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (args.out / name).write_text(text)
        print(f"wrote {args.out / name} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
