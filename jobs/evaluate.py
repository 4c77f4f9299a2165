"""`datacredit evaluate`: score a run's values against models retrained from scratch (paper §5).

Ground truth (stored in the run under ``evaluation/``, reused by every later call; what each family trains is in
:mod:`datacredit.jobs.truth_models`):

* ``retrain``: a model trained from scratch on the subset with ``spec.model.train`` (ddpm: a UNet on its images;
  ldm: on their VQ latents; sd-lora: a fresh LoRA on the frozen base pipeline), sampled with the run's sampler
  and scored with the run's fitted property, per optimisation seed.
* ``ft-full``: the unpruned full model prepare saved fine-tuned on the subset for ``spec.method.finetune.steps``:
  the utility of FT-Shapley (fine-tuning without pruning).
* ``proxy`` (text-conditional families): the unpruned full model sampled on the subset's captions only, with no
  training, as SurrogateSHAP does; a proxy, labelled so in every table.

Rankers compared: the run's sparsified-FT Shapley values, FT-Shapley, retraining Shapley and the caption proxy's
Shapley values at the same compute budget as the sparsified-FT run (counted work: forward passes weighted by model
size, see ``BUDGET_RULE``; seconds are reported beside it), leave-one-out by retraining, pixel / embedding
similarity of each contributor's images to the full model's samples, D-TRAK (projected gradients of the unpruned
full model, summed per contributor, :mod:`datacredit.jobs.trak`; ddpm and ldm), and pro-rata: each contributor's
image count, what payers use today (LDS only: its ranking needs no compute, and its counterfactual would cost
retrains of its own). Baselines that do not apply to a run are listed in the report's ``skipped``, with why.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from datacredit import evaluation as ev
from datacredit import layout
from datacredit.progress import ProgressBar, progress_for
from datacredit.progress import console as adaptive_console
from datacredit.results import load_results
from datacredit.runstate import planner_for
from datacredit.seeds import Seeds
from datacredit.shapley import estimate_from_table
from datacredit.shapley.table import as_row
from datacredit.storage import S3Options, open_storage, read_json, write_json

from .device import set_threads
from .families import get_family
from .properties.digits import ClassifierProperty
from .truth_models import TRUTH_MODELS, EvaluationError, truth_model
from .worker import load_run, prepared_run, run_coalition

REPORT = "evaluation/report.json"
BUDGET_RULE = ("equal counted work: forward passes of training (steps × batch, 3 passes per image for forward and "
               "backward) and sampling (DDIM steps × samples), weighted by the parameters of the model they run on, in "
               "full-model forward passes; FT-Shapley and retrain Shapley take the plan's coalitions in order while "
               "their summed work stays within sparsified-FT's (pruned fine-tuning plus all its coalition evaluations)")
BASELINES = ("loo", "ft-shapley", "retrain-shapley", "pixel", "embedding", "banzhaf", "datamodel", "d-trak",
             "proxy")
#: rankers without a counterfactual: they train nothing themselves, and it would retrain for them alone
LDS_ONLY = (ev.PRO_RATA, ev.BANZHAF_RUN, ev.DATAMODEL_RUN)


@dataclass
class EvalSettings:
    """What to evaluate and how much to retrain."""

    alphas: tuple[float, ...] = (0.25, 0.5, 0.75)
    subsets: int = 10  # test coalitions per alpha
    seeds: int = 3  # optimisation seeds per retrained test coalition
    fraction: float = 0.4  # counterfactual: remove the top / bottom fraction of a ranking
    baselines: tuple[str, ...] = BASELINES
    interval: str = "normal"  # normal (paper) | t | bootstrap
    trak_dim: int = 1024  # D-TRAK projection dimension (the paper's for unconditional models)
    trak_timesteps: int = 10  # D-TRAK (t, noise) draws per image (the paper: 100)
    trak_ridge: float = 0.5  # λ of the kernel (ΦᵀΦ + λI)⁻¹ (the paper's)


class GroundTruth:
    """Retrained / fine-tuned utilities of a run, read from and appended to ``evaluation/<kind>.jsonl``."""

    def __init__(self, run_uri: str, options: S3Options, progress: ProgressBar | None = None):
        self.store = open_storage(run_uri, options)
        family = load_run(self.store).spec.model.family
        if family not in TRUTH_MODELS:  # before the run's models are loaded
            raise EvaluationError(f"evaluate: not supported for family {family!r} (supported: "
                                  f"{', '.join(TRUTH_MODELS)})")
        self.p = prepared_run(run_uri, options)
        self.family = family
        self.model = truth_model(self.p, self.store)
        self.progress = progress
        self.trained = 0  # utilities computed (not reused) by this object
        s = self.p.run.spec
        shared = {"samples": s.property.samples, "sampler": s.method.sampler.steps, "property": s.property.name,
                  "run": self.p.manifest["configHash"]}
        self.configs = {
            "retrain": ev.config_digest({**shared, "train": s.model.train.model_dump(), "arch": (
                s.model.architecture.model_dump() if hasattr(s.model, "architecture")  # ddpm, ldm
                else s.model.model_dump(exclude={"train", "family"}))}),  # sd-lora: base model, LoRA, prompt
            "ft-full": ev.config_digest({**shared, "finetune": s.method.finetune.model_dump()}),
            "proxy": ev.config_digest({**shared, "guidance": s.method.sampler.guidance_scale}),
        }
        self.rows = {k: self._read(k) for k in ev.TRUTH_KINDS}

    def _read(self, kind: str) -> dict[str, ev.TruthRow]:
        key = ev.truth_file(kind)
        if not self.store.exists(key):
            return {}
        return ev.parse_truth(self.store.read_bytes(key).decode(), f"{self.store.uri}/{key}")

    def _lookup(self, kind: str, members: tuple[int, ...], seed: int) -> ev.TruthRow | None:
        return self.rows[kind].get(ev.truth_key(kind, members, seed, self.configs[kind]))

    def get(self, kind: str, requests: list[tuple[tuple[int, ...], int]], label: str) -> list[ev.TruthRow]:
        """The rows for ``(members, seed)`` requests, training only those not stored yet (then saved)."""
        todo = list(dict.fromkeys(r for r in requests if self._lookup(kind, *r) is None))
        task = self.progress.add_task(label, total=len(todo)) if self.progress and todo else None
        for members, seed in todo:
            utility, seconds = self._compute(kind, members, seed)
            row = ev.TruthRow(kind, members, seed, self.configs[kind], utility, seconds)
            self.rows[kind][row.key] = row
            self.trained += 1
            self.store.write_bytes(ev.truth_file(kind), ev.format_truth(self.rows[kind].values()).encode())
            if task is not None and self.progress:
                self.progress.advance(task)
        out = [self._lookup(kind, *r) for r in requests]
        return [r for r in out if r is not None]

    def score(self, samples: torch.Tensor, what: str) -> float:
        """The run's fitted property of ``samples``; a non-finite value is an error naming ``what``."""
        u = float(self.p.prop.score(samples))
        if not np.isfinite(u):
            raise RuntimeError(f"property {self.p.run.spec.property.name!r} returned {u} for {what}")
        return u

    def _compute(self, kind: str, members: tuple[int, ...], seed: int) -> tuple[float, float]:
        if kind == "proxy":
            t0 = time.perf_counter()
            samples = self.model.proxy(members, seed)
            return self.score(samples, f"proxy of {list(members)}"), time.perf_counter() - t0
        return (self.retrain if kind == "retrain" else self.finetune_full)(members, seed)

    def retrain(self, members: tuple[int, ...], seed: int) -> tuple[float, float]:
        """Utility and seconds of a model trained from scratch on ``members`` (not stored)."""
        t0 = time.perf_counter()
        samples = self.model.retrain(members, seed)
        return self.score(samples, f"retrained {list(members)}"), time.perf_counter() - t0

    def finetune_full(self, members: tuple[int, ...], seed: int) -> tuple[float, float]:
        """Utility and seconds of the unpruned full model fine-tuned on ``members`` (not stored)."""
        t0 = time.perf_counter()
        samples = self.model.finetune_full(members, seed)
        return self.score(samples, f"fine-tuned full model on {list(members)}"), time.perf_counter() - t0


def side_by_side(gt: GroundTruth, repeats: int = 3) -> dict[str, float]:
    """Median seconds of one full retrain, one fine-tuning of the unpruned model and one sparsified-FT coalition
    on all contributors, measured alternately in this process (so machine load hits all three alike)."""
    run = gt.p.run
    mask = np.ones(len(gt.p.owner), dtype=bool)
    full = tuple(range(len(gt.p.manifest["contributors"])))
    family = get_family(run.spec.model.family)
    times: dict[str, list[float]] = {"retrain": [], "ftFull": [], "sparsified": []}
    for k in range(repeats):
        seed = run.spec.seed + 10_000 + k
        times["retrain"].append(gt.retrain(full, seed)[1])
        times["ftFull"].append(gt.finetune_full(full, seed)[1])
        t0 = time.perf_counter()
        gt.p.prop.score(family.coalition(run, gt.p.state, mask, Seeds(data=seed, noise=seed))[0])
        times["sparsified"].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def _sparsified_cost(prepare: dict[str, Any], coalitions: list[dict[str, Any]]) -> float:
    """Seconds the sparsified-FT run spent beyond the full model: pruning, its fine-tuning, all coalitions
    (measured in the run's worker processes: reported, not used as the budget)."""
    sec = prepare.get("seconds", {})
    return float(sec.get("prune", 0.0) + sec.get("prune_finetune", 0.0)
                 + sum(c["seconds"].get("total", 0.0) for c in coalitions))


def _sparsified_work(work: ev.WorkModel, coalitions: list[dict[str, Any]]) -> float:
    """Counted work of the sparsified-FT run: the pruned model's fine-tuning and every coalition evaluation
    (replicate seeds included)."""
    return ev.sparsified_run_work(work, [(len(c["members"]), 1 + len(c.get("replicates") or []))
                                         for c in coalitions])


def _budgeted_shapley(gt: GroundTruth, kind: str, work: ev.WorkModel, budget: float, label: str
                      ) -> tuple[np.ndarray, dict[str, Any]]:
    """Shapley values from ``kind`` utilities of the run's planner coalitions, in plan order, as many as fit in
    the sparsified-FT run's counted work ``budget`` (:func:`datacredit.evaluation.equal_budget_plan`)."""
    run, n = gt.p.run, len(gt.p.manifest["contributors"])
    seed = run.spec.seed
    plan = [tuple(int(i) for i in np.flatnonzero(coal)) for coal in planner_for(run, n).plan.sequence]
    share = plan[:ev.equal_budget_plan(work, kind, [len(m) for m in plan], budget)]
    truth = gt.get(kind, [(m, seed) for m in share], label)
    rows = [{"members": list(m), "utility": r.utility} for m, r in zip(share, truth, strict=True)]
    info = {"coalitions": len(rows), "seconds": round(sum(r.seconds for r in truth), 1),
            "work": round(sum(work.coalition(kind, len(m)) for m in share), 1)}
    try:
        est = estimate_from_table(rows, n_players=n, method=run.spec.estimator.name)
    except (ValueError, np.linalg.LinAlgError) as e:
        info["error"] = str(e)
        return np.full(n, np.nan), info
    return np.asarray(est.values, dtype=float), info


def _similarity(gt: GroundTruth, n: int, which: str) -> dict[str, np.ndarray]:
    """Pixel or embedding similarity (max and mean) of each contributor's images to the full model's samples."""
    samples, train = gt.model.full_samples(), gt.model.images
    if which == "embedding":
        if not isinstance(gt.p.prop, ClassifierProperty):
            return {}
        # the property's classifier features stand in for CLIP at digit scale
        samples_f, train_f = gt.p.prop.features_and_probs(samples)[0], gt.p.prop.features_and_probs(train)[0]
    else:
        samples_f, train_f = samples.numpy(), train.numpy()
    return {f"{which}-{agg}": ev.similarity_scores(samples_f, train_f, gt.p.owner, n, agg) for agg in ("max", "mean")}


def _dtrak(gt: GroundTruth, n: int, settings: EvalSettings, work: ev.WorkModel) -> tuple[np.ndarray, dict[str, Any]]:
    """D-TRAK scores on the unpruned full model for its samples (:func:`datacredit.evaluation.trak_scores`), and
    their spend: counted work of one forward and backward pass per image and draw (no coalitions)."""
    t0 = time.perf_counter()
    train, generated, items = gt.model.dtrak_features(settings.trak_dim, settings.trak_timesteps, gt.p.run.spec.seed)
    scores = ev.trak_scores(train, generated, gt.p.owner, n, settings.trak_ridge)
    spent = ev.pass_work(train_steps=settings.trak_timesteps, batch_size=items, sampler_steps=0, samples=0,
                         params=work.params_full, params_full=work.params_full)
    return scores, {"coalitions": 0, "seconds": round(time.perf_counter() - t0, 1), "work": round(spent, 1)}


def _run_rows(store: Any) -> list[Any]:
    """The run's coalition utilities (results/utilities.jsonl) as rows."""
    if not store.exists(layout.UTILITIES):
        raise EvaluationError(f"{store.uri}: no {layout.UTILITIES}; finish the run first (`datacredit run`)")
    return [as_row(json.loads(line)) for line in store.read_bytes(layout.UTILITIES).decode().splitlines() if line]


def _values_of_run(store: Any, names: list[str]) -> np.ndarray:
    try:
        doc = load_results(store)
    except FileNotFoundError:
        raise EvaluationError(f"{store.uri}: no results/shapley.json; finish the run first (`datacredit run`)") \
            from None
    by_name = {r["name"]: r["value"] for r in doc["contributors"]}
    return np.asarray([by_name[nm] for nm in names], dtype=float)


def evaluate(run_uri: str, settings: EvalSettings, *, options: S3Options | None = None,
             console: Console | None = None, on_truth: Callable[[GroundTruth], None] | None = None
             ) -> dict[str, Any]:
    """Evaluate a finished run: LDS per ranker and alpha, counterfactuals, cost; writes ``evaluation/report.json``
    in the run and returns it. ``on_truth`` sees the ground-truth object at the end (tests count retrains)."""
    unknown = set(settings.baselines) - set(BASELINES)
    if unknown:
        raise EvaluationError(f"--baselines: unknown {', '.join(sorted(unknown))}; choose from {', '.join(BASELINES)}")
    options = options or S3Options()
    console = console or adaptive_console(stderr=True)
    set_threads()
    store = open_storage(run_uri, options)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn()]
    with progress_for(console, *columns) as bar:  # plain lines when not a terminal
        gt = GroundTruth(run_uri, options, bar)
        run, manifest = gt.p.run, gt.p.manifest
        names = [c["name"] for c in manifest["contributors"]]
        n, seed0 = len(names), run.spec.seed
        seeds = [seed0 + k for k in range(settings.seeds)]
        rankers: dict[str, np.ndarray] = {"sparsified-FT Shapley": _values_of_run(store, names),
                                          ev.PRO_RATA: ev.pro_rata_scores(manifest["contributors"])}
        budgets: dict[str, dict[str, Any]] = {}
        planned = {tuple(r.members) for r in _run_rows(store)}  # the run's own coalitions, not evaluate's
        coalitions = [c for c in (read_json(store, k) for k in store.list("coalitions") if k.endswith("/result.json"))
                      if tuple(c["members"]) in planned]
        prepare = read_json(store, layout.PREPARE_RESULT)
        work = gt.model.work_model(ev.WorkModel.from_run(run, prepare))
        budget = _sparsified_work(work, coalitions)
        budgets["sparsified-FT Shapley"] = {"coalitions": len(coalitions),
                                            "seconds": round(_sparsified_cost(prepare, coalitions), 1),
                                            "work": round(budget, 1)}

        full = tuple(range(n))
        if "loo" in settings.baselines:
            loo = gt.get("retrain", [(full, seed0)] + [(full[:i] + full[i + 1:], seed0) for i in range(n)],
                         "LOO retrains")
            rankers["LOO (retrain)"] = np.asarray([loo[0].utility - r.utility for r in loo[1:]])
            budgets["LOO (retrain)"] = {"coalitions": n + 1, "seconds": round(sum(r.seconds for r in loo), 1),
                                        "work": round(work.coalition("retrain", n)
                                                      + n * work.coalition("retrain", n - 1), 1)}
        for name, kind, flag in (("FT-Shapley", "ft-full", "ft-shapley"),
                                 ("retrain Shapley", "retrain", "retrain-shapley")):
            if flag in settings.baselines:
                rankers[name], budgets[name] = _budgeted_shapley(gt, kind, work, budget, f"{name} (equal budget)")
        skipped: dict[str, str] = {}  # asked-for baselines that do not apply to this run, and why
        for which in ("pixel", "embedding"):
            if which in settings.baselines:
                found = _similarity(gt, n, which)
                rankers.update(found)
                if not found:
                    skipped[which] = "the property has no classifier features to compare images with"
        if "proxy" in settings.baselines:
            if gt.model.conditional:
                rankers[ev.PROXY], budgets[ev.PROXY] = _budgeted_shapley(gt, "proxy", work, budget,
                                                                         "caption proxy (equal budget)")
            else:
                skipped["proxy"] = "the model is unconditional: no captions or labels to condition on"
        run_rows = _run_rows(store)  # the run's own utilities: these two fit them, no training of their own
        if "banzhaf" in settings.baselines:
            rankers[ev.BANZHAF_RUN] = np.asarray(estimate_from_table(run_rows, n, method="banzhaf").values)
            budgets[ev.BANZHAF_RUN] = {**budgets["sparsified-FT Shapley"]}
        if "datamodel" in settings.baselines:
            rankers[ev.DATAMODEL_RUN] = ev.datamodel_scores([r.members for r in run_rows],
                                                            [r.utility for r in run_rows], n)
            budgets[ev.DATAMODEL_RUN] = {**budgets["sparsified-FT Shapley"]}
        if "d-trak" in settings.baselines:
            rankers[ev.DTRAK], budgets[ev.DTRAK] = _dtrak(gt, n, settings, work)

        # LDS test coalitions, retrained with every seed
        tests = {a: ev.datamodel_subsets(n, a, settings.subsets, seed=seed0) for a in settings.alphas}
        observed: dict[float, dict[int, list[float]]] = {}
        for a, subs in tests.items():
            rows = gt.get("retrain", [(s, sd) for sd in seeds for s in subs], f"LDS α={a} retrains")
            observed[a] = {sd: [r.utility for r in rows[k * len(subs):(k + 1) * len(subs)]]
                           for k, sd in enumerate(seeds)}
        lds = ev.lds_by_ranker(rankers, tests, observed, settings.interval)

        # counterfactual: remove top / bottom fraction, retrain with every seed, vs. the full set
        full_rows = gt.get("retrain", [(full, sd) for sd in seeds], "full-set retrains")
        counterfactual: dict[str, Any] = {}
        for name, v in rankers.items():
            if not np.isfinite(v).all() or name in LDS_ONLY:
                continue
            counterfactual[name] = {}
            for which in ("top", "bottom"):
                kept = ev.counterfactual_members(v, settings.fraction, which)
                rows = gt.get("retrain", [(kept, sd) for sd in seeds], f"counterfactual {which}")
                change = [ev.relative_change(r.utility, f.utility) for r, f in zip(rows, full_rows, strict=True)]
                counterfactual[name][which] = {"removed": [names[i] for i in sorted(set(full) - set(kept))],
                                               **ev.interval(change, settings.interval).to_dict()}

        # how well sparsified-FT utilities track retrained ones on the test coalitions (paper Appendix D)
        pairs = []
        for a in settings.alphas:
            for k, members in enumerate(tests[a]):
                sparse = run_coalition(run_uri, list(members), options=options)["utility"]
                pairs.append((sparse, float(np.mean([obs[k] for obs in observed[a].values()]))))
        ft_rows = gt.get("ft-full", [(s, seed0) for a in settings.alphas for s in tests[a]], "FT (full) on tests") \
            if "ft-shapley" in settings.baselines else []
        proxy_rows = gt.get("proxy", [(s, seed0) for a in settings.alphas for s in tests[a]], "proxy on tests") \
            if ev.PROXY in rankers else []

    retrain_s = [r.seconds for r in gt.rows["retrain"].values() if len(r.members) == n]
    sparse_s = [c["seconds"]["total"] for c in coalitions if "total" in c.get("seconds", {})]
    ft_s = [r.seconds for r in gt.rows["ft-full"].values()]
    cost = {"retrainSeconds": float(np.median(retrain_s)) if retrain_s else None,
            "sparsifiedCoalitionSeconds": float(np.median(sparse_s)) if sparse_s else None,
            "ftFullCoalitionSeconds": float(np.median(ft_s)) if ft_s else None,
            "paramsFull": prepare.get("paramsFull"), "paramsPruned": prepare.get("paramsPruned")}
    if cost["retrainSeconds"] and cost["sparsifiedCoalitionSeconds"]:
        cost["speedup"] = cost["retrainSeconds"] / cost["sparsifiedCoalitionSeconds"]
    agreement = {"pairs": len(pairs),
                 "pearsonSparsifiedVsRetrain": ev.pearson(*zip(*pairs, strict=True)) if pairs else None,
                 "spearmanSparsifiedVsRetrain": ev.spearman100(*zip(*pairs, strict=True)) / 100 if pairs else None}
    if ft_rows:
        retrained = [p[1] for p in pairs]
        agreement["pearsonFTFullVsRetrain"] = ev.pearson([r.utility for r in ft_rows], retrained)
    if proxy_rows:
        agreement["pearsonProxyVsRetrain"] = ev.pearson([r.utility for r in proxy_rows], [p[1] for p in pairs])
    report = {
        "run": run_uri,
        "property": run.spec.property.name,
        "contributors": names,
        "settings": {**asdict(settings), "seedList": seeds},
        "values": {k: [float(x) for x in v] for k, v in rankers.items()},
        "budget": budgets,
        "budgetRule": BUDGET_RULE,
        "lds": lds,
        "counterfactual": counterfactual,
        "fullUtility": ev.interval([r.utility for r in full_rows], settings.interval).to_dict(),
        "agreement": agreement,
        "cost": cost,
        "retrainedNow": gt.trained,
        "skipped": skipped,
    }
    write_json(store, REPORT, report)
    if on_truth:
        on_truth(gt)
    return report


def report_tables(report: dict[str, Any]) -> list[Any]:
    """Rich tables of a report: LDS per ranker and alpha, and the counterfactuals."""
    from rich.table import Table

    alphas = report["settings"]["alphas"]
    t = Table(title=f"LDS (Spearman × 100, 95% CI over {report['settings']['seeds']} seeds), property "
                    f"{report['property']}")
    t.add_column("ranker")
    for a in alphas:
        t.add_column(f"α={a}", justify="right")
    t.add_column("coalitions", justify="right")
    t.add_column("work (full-model passes)", justify="right")
    t.add_column("seconds", justify="right")
    for name, by_alpha in report["lds"].items():
        b = report["budget"].get(name, {})
        spend = [str(b["coalitions"]), f"{b['work']:,.0f}" if "work" in b else "-", f"{b['seconds']:.0f}"] \
            if b else ["-", "-", "-"]
        t.add_row(name, *(str(ev.Interval(d["mean"], *d["ci95"])) for d in (by_alpha[str(a)] for a in alphas)),
                  *spend)
    t.caption = "budget: equal counted work (training image = 3 forward passes), not seconds"
    for name, why in report.get("skipped", {}).items():
        t.caption += f"\n{name}: skipped, {why}"
    if ev.PRO_RATA in report["values"] and ev.PRO_RATA not in report["lds"]:
        t.caption += f"\n{ev.PRO_RATA}: every contributor has as many images, so it ranks no subset (no LDS)"
    c = Table(title=f"Counterfactual ΔF (%) vs. the full set, removing {report['settings']['fraction']:.0%}")
    c.add_column("ranker")
    c.add_column("remove top", justify="right")
    c.add_column("remove bottom", justify="right")
    for name, d in report["counterfactual"].items():
        c.add_row(name, *(str(ev.Interval(d[w]["mean"], *d[w]["ci95"])) for w in ("top", "bottom")))
    return [t, c]

