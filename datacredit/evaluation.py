"""Scoring contributor values against retrained ground truth (paper §5): LDS, counterfactuals, rankings.

Pure logic (numpy/scipy). The torch side that retrains models lives in ``datacredit.jobs.evaluate``.

* LDS (linear datamodeling score): test coalitions of fixed size ⌊α·n⌋ drawn uniformly; each is retrained
  from scratch with several seeds; per seed, Spearman ρ × 100 between Σ_{i∈S} φ_i and the observed property;
  reported as the mean over seeds with a 95% interval (1.96·sd/√k as in the paper, or a seed bootstrap).
* Counterfactual: drop the top (or bottom) k% of a ranking, retrain, relative change of F vs. the full set.
* Ground truth: every retrained utility is one JSON line ``{kind, members, seed, config, utility, seconds}``
  in ``evaluation/<kind>.jsonl`` of the run, so later estimators are scored without retraining.
* Correlations with 95% Fisher-z intervals (calibration's fidelity of sparsified-FT utilities to retrained ones).
* Counted work: the equal compute budget of the rankers, in full-model forward passes from the settings
  (:class:`WorkModel`), not in seconds measured in processes with different thread counts.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats

#: retrain from scratch; fine-tune the unpruned full model (FT-Shapley); sample the full model conditioned on a
#: coalition's captions only (the proxy: no training)
TRUTH_KINDS = ("retrain", "ft-full", "proxy")


def truth_key(kind: str, members: Iterable[int], seed: int, config: str) -> str:
    """Where a ground-truth utility lives: the object ``evaluation/<kind>.jsonl`` and this row key."""
    return f"{kind}:{','.join(str(m) for m in sorted(members))}:{seed}:{config}"


def truth_file(kind: str) -> str:
    """The run-storage key of a kind's ground-truth table."""
    if kind not in TRUTH_KINDS:
        raise ValueError(f"ground-truth kind {kind!r}: expected one of {', '.join(TRUTH_KINDS)}")
    return f"evaluation/{kind}.jsonl"


def config_digest(settings: dict[str, Any]) -> str:
    """A short stable hash of the settings that change a retrained utility (steps, lr, samples, ...)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class TruthRow:
    """One retrained (or fine-tuned) utility: the ground truth estimators are scored against."""

    kind: str
    members: tuple[int, ...]
    seed: int
    config: str
    utility: float
    seconds: float = 0.0

    @property
    def key(self) -> str:
        return truth_key(self.kind, self.members, self.seed, self.config)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "members": list(self.members)})


def parse_truth(text: str, source: str = "evaluation table") -> dict[str, TruthRow]:
    """Rows of a ground-truth JSONL table by key (a later duplicate wins); errors name the line."""
    rows: dict[str, TruthRow] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            row = TruthRow(str(d["kind"]), tuple(sorted(int(m) for m in d["members"])), int(d["seed"]),
                           str(d["config"]), float(d["utility"]), float(d.get("seconds", 0.0)))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{source} line {n}: not a ground-truth row ({e}); delete the line to retrain it") \
                from None
        rows[row.key] = row
    return rows


def format_truth(rows: Iterable[TruthRow]) -> str:
    """The JSONL text of a ground-truth table."""
    return "".join(r.to_json() + "\n" for r in rows)


# ---------------------------------------------------------------- test coalitions and rankings


def datamodel_subsets(n: int, alpha: float, count: int, seed: int = 0) -> list[tuple[int, ...]]:
    """``count`` coalitions of exactly ⌊α·n⌋ players drawn uniformly (the paper's datamodel distribution),
    distinct while there are enough of them; sorted member tuples."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha}: must be in (0, 1)")
    size = max(1, math.floor(alpha * n))
    available = math.comb(n, size)
    rng = np.random.default_rng([seed, size, n])
    out: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    while len(out) < count:
        s = tuple(sorted(int(i) for i in rng.choice(n, size, replace=False)))
        if s in seen and len(seen) < available:
            continue
        seen.add(s)
        out.append(s)
    return out


def ranking(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Player indices from the highest score to the lowest (ties by index)."""
    return np.argsort(-np.asarray(scores, dtype=float), kind="stable")


def counterfactual_members(scores: Sequence[float] | np.ndarray, fraction: float, which: str) -> tuple[int, ...]:
    """The coalition left after removing the ``top`` (or ``bottom``) ``fraction`` of players by score
    (at least one player is removed)."""
    if which not in ("top", "bottom"):
        raise ValueError(f"which={which!r}: expected 'top' or 'bottom'")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction={fraction}: must be in (0, 1)")
    order = ranking(scores)
    k = max(1, round(fraction * len(order)))
    removed = order[:k] if which == "top" else order[len(order) - k:]
    return tuple(sorted(int(i) for i in set(range(len(order))) - {int(r) for r in removed}))


def relative_change(observed: float, full: float) -> float:
    """ΔF in percent of |F(full)|, the paper's counterfactual number."""
    if full == 0:
        raise ValueError("F(full) is 0: the relative change is undefined")
    return 100.0 * (observed - full) / abs(full)


# ---------------------------------------------------------------- scores with intervals


@dataclass
class Interval:
    """A mean over seeds with a 95% interval and the per-seed numbers."""

    mean: float
    low: float
    high: float
    per_seed: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "ci95": [self.low, self.high], "perSeed": self.per_seed}

    def __str__(self) -> str:
        return f"{self.mean:+.1f} ± {(self.high - self.low) / 2:.1f}" if math.isfinite(self.mean) else "n/a"


def interval(per_seed: Sequence[float], method: str = "normal", resamples: int = 1000, seed: int = 0) -> Interval:
    """Mean and 95% interval over seeds: ``normal`` is the paper's 1.96·sd/√k, ``t`` a Student-t interval,
    ``bootstrap`` a percentile bootstrap over seeds. NaN seeds (constant predictions) are left out."""
    x = np.asarray([v for v in per_seed if math.isfinite(v)], dtype=float)
    vals = [float(v) for v in per_seed]
    if len(x) == 0:
        return Interval(float("nan"), float("nan"), float("nan"), vals)
    m = float(x.mean())
    if len(x) == 1:
        return Interval(m, m, m, vals)
    if method == "bootstrap":
        rng = np.random.default_rng(seed)
        means = x[rng.integers(0, len(x), (resamples, len(x)))].mean(axis=1)
        lo, hi = np.percentile(means, [2.5, 97.5])
        return Interval(m, float(lo), float(hi), vals)
    if method not in ("normal", "t"):
        raise ValueError(f"interval method {method!r}: expected normal, t or bootstrap")
    z = 1.96 if method == "normal" else float(stats.t.ppf(0.975, len(x) - 1))
    half = z * float(x.std(ddof=1)) / math.sqrt(len(x))
    return Interval(m, m - half, m + half, vals)


def spearman100(predicted: Sequence[float], observed: Sequence[float]) -> float:
    """Spearman ρ × 100; NaN when either side is constant or there are fewer than 3 pairs."""
    p, o = np.asarray(predicted, dtype=float), np.asarray(observed, dtype=float)
    if len(p) != len(o):
        raise ValueError(f"{len(p)} predictions vs {len(o)} observations")
    if len(p) < 3 or np.ptp(p) == 0 or np.ptp(o) == 0:
        return float("nan")
    return 100.0 * float(stats.spearmanr(p, o).statistic)


def lds(values: Sequence[float] | np.ndarray, subsets: Sequence[Sequence[int]],
        observed: dict[int, Sequence[float]], method: str = "normal") -> Interval:
    """LDS of ``values`` (one per player): per seed, Spearman ×100 between Σ_{i∈S} φ_i over ``subsets`` and
    ``observed[seed]`` (the retrained utilities of the same subsets in order); mean and 95% interval."""
    v = np.asarray(values, dtype=float)
    predicted = [float(v[list(s)].sum()) for s in subsets]
    return interval([spearman100(predicted, observed[s]) for s in sorted(observed)], method)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson r; NaN when a side is constant or there are fewer than 3 pairs."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


# ---------------------------------------------------------------- what payers use today


PRO_RATA = "pro-rata (image count)"


def pro_rata_scores(contributors: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Each contributor's image count, in player order: the attribution of paying by volume
    (`datacredit payout --rule pro-rata`). As a ranker it predicts a subset's utility by its image count, so
    with equal counts its LDS is undefined (every test subset of a size has the same count)."""
    return np.asarray([float(c.get("images", 0)) for c in contributors], dtype=float)


#: Rankers fitted on the run's own stored coalitions: no training of their own.
BANZHAF_RUN = "Banzhaf (run's coalitions)"
DATAMODEL_RUN = "datamodel (run's coalitions)"


def datamodel_scores(members: Sequence[Sequence[int]], utilities: Sequence[float], n_players: int,
                     ridge: float = 1e-3) -> np.ndarray:
    """A linear datamodel (Ilyas et al., 2022) fitted on evaluated coalitions, v(S) ≈ b + Σ_{i∈S} w_i, by least
    squares with a ridge of ``ridge`` × rows on w (not the intercept); returns w in player order."""
    x = np.zeros((len(members), n_players))
    for row, m in enumerate(members):
        x[row, list(m)] = 1.0
    design = np.hstack([np.ones((len(x), 1)), x])
    penalty = ridge * len(x) * np.diag([0.0] + [1.0] * n_players)
    coef = np.linalg.solve(design.T @ design + penalty, design.T @ np.asarray(utilities, dtype=float))
    return coef[1:]


#: Gradient attribution on the full model (jobs/trak.py), summed over a contributor's images.
DTRAK = "D-TRAK"


def trak_scores(train: np.ndarray, generated: np.ndarray, owner: np.ndarray, n_players: int,
                ridge: float = 0.5) -> np.ndarray:
    """TRAK-family contributor scores from projected features (rows): a training image j scores
    φ(g)ᵀ (ΦᵀΦ + ``ridge``·I)⁻¹ φ(j) for a generated sample g, with Φ the training features; averaged over the
    generated samples and summed over each contributor's images (paper: ridge 0.5). 0 for a contributor
    without images."""
    phi = np.asarray(train, dtype=np.float64)
    kernel = phi.T @ phi + ridge * np.eye(phi.shape[1])
    per_image = phi @ np.linalg.solve(kernel, np.asarray(generated, dtype=np.float64).mean(axis=0))
    return np.bincount(np.asarray(owner), weights=per_image, minlength=n_players)[:n_players]


def lds_by_ranker(rankers: Mapping[str, np.ndarray], tests: Mapping[float, Sequence[Sequence[int]]],
                  observed: Mapping[float, dict[int, Sequence[float]]], method: str = "normal"
                  ) -> dict[str, dict[str, Any]]:
    """LDS of every ranker at every alpha (:func:`lds`); rankers with a non-finite score are left out, and so is
    pro-rata when every contributor has as many images (it ranks no test subset: its LDS is undefined)."""
    return {name: {str(a): lds(v, tests[a], observed[a], method).to_dict() for a in tests}
            for name, v in rankers.items()
            if np.isfinite(v).all() and not (name == PRO_RATA and np.ptp(v) == 0)}


# ---------------------------------------------------------------- similarity baselines


def similarity_scores(queries: np.ndarray, train: np.ndarray, owner: np.ndarray, n_players: int,
                      aggregate: str = "max") -> np.ndarray:
    """Per-contributor similarity (paper's pixel / CLIP baselines): cosine between every query (generated)
    vector and every training vector (rows, mean-centred per vector), aggregated over each contributor's
    images by ``max`` or ``mean``, then averaged over the queries."""
    if aggregate not in ("max", "mean"):
        raise ValueError(f"aggregate={aggregate!r}: expected 'max' or 'mean'")

    def unit(x: np.ndarray) -> np.ndarray:
        x = x.reshape(len(x), -1).astype(np.float64)
        x = x - x.mean(axis=1, keepdims=True)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    sim = unit(queries) @ unit(train).T  # (queries, train images)
    out = np.full(n_players, np.nan)
    for p in range(n_players):
        cols = sim[:, owner == p]
        if cols.shape[1]:
            out[p] = float((cols.max(axis=1) if aggregate == "max" else cols.mean(axis=1)).mean())
    return out


# ---------------------------------------------------------------- correlation with intervals


@dataclass(frozen=True)
class Correlation:
    """A correlation coefficient over ``n`` pairs with a 95% Fisher-z interval (NaN where undefined)."""

    value: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: NaN becomes None."""
        return {"value": _finite_or_none(self.value), "ci95": [_finite_or_none(self.low), _finite_or_none(self.high)],
                "n": self.n}


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def fisher_interval(r: float, n: int, *, rank: bool = False, level: float = 0.95) -> tuple[float, float]:
    """The Fisher z interval of a correlation ``r`` over ``n`` pairs: tanh(atanh r ± z·se), se = 1/√(n−3)
    for Pearson and √(1.06/(n−3)) for Spearman (``rank``; Fieller, Hartley and Pearson 1957). NaN when n < 4,
    r is NaN or |r| = 1 (atanh is infinite there: a perfect rank order of a few coalitions says little)."""
    if n < 4 or not math.isfinite(r) or abs(r) >= 1.0:
        return float("nan"), float("nan")
    se = math.sqrt((1.06 if rank else 1.0) / (n - 3))
    z = float(stats.norm.ppf(0.5 + level / 2))
    centre = math.atanh(r)
    return math.tanh(centre - z * se), math.tanh(centre + z * se)


def pearson_ci(x: Sequence[float], y: Sequence[float]) -> Correlation:
    """Pearson r with its 95% Fisher-z interval."""
    r = pearson(x, y)
    return Correlation(r, *fisher_interval(r, len(x)), n=len(x))


def spearman_ci(x: Sequence[float], y: Sequence[float]) -> Correlation:
    """Spearman ρ with its 95% Fisher-z interval (rank variance 1.06/(n−3))."""
    rho = spearman100(x, y) / 100.0
    return Correlation(rho, *fisher_interval(rho, len(x), rank=True), n=len(x))


def pearson_within(x: Sequence[float], y: Sequence[float], groups: Sequence[Any]) -> float:
    """Pearson r after removing each group's mean from both sides (e.g. groups = coalition sizes: how well
    x tracks y beyond what the coalition size alone predicts). NaN when nothing varies within the groups or
    there are fewer than 3 pairs more than groups."""
    a, b, g = np.asarray(x, dtype=float), np.asarray(y, dtype=float), np.asarray(groups)
    if len(a) != len(b) or len(a) != len(g):
        raise ValueError(f"{len(a)} x, {len(b)} y and {len(g)} groups: expected equal lengths")
    for k in np.unique(g):
        a[g == k] -= a[g == k].mean()
        b[g == k] -= b[g == k].mean()
    if len(a) - len(np.unique(g)) < 3 or np.ptp(a) < 1e-12 or np.ptp(b) < 1e-12:
        return float("nan")  # under 3 residual degrees of freedom the correlation is ±1 by construction
    return float(np.corrcoef(a, b)[0, 1])


# ---------------------------------------------------------------- counted work (equal compute budgets)

#: A training step costs a forward and a backward pass; the backward is about twice the forward's
#: multiply-adds, so one training image counts as 3 forward passes (the usual 6N-vs-2N FLOP rule).
TRAIN_PASS_COST = 3.0


def pass_work(*, train_steps: int, batch_size: int, sampler_steps: int, samples: int, params: int,
              params_full: int) -> float:
    """Counted work of one model: ``train_steps × batch_size`` training images (each 3 forward passes) plus
    ``sampler_steps × samples`` sampling passes, on a model of ``params`` parameters; in units of forward
    passes of the full model (``params / params_full`` per pass). Device, threads and machine load do not
    change it, so rankers timed in different processes are compared fairly."""
    if params <= 0 or params_full <= 0:
        raise ValueError(f"params={params}, params_full={params_full}: parameter counts must be positive "
                         f"(prepare/result.json paramsFull / paramsPruned)")
    passes = TRAIN_PASS_COST * max(train_steps, 0) * batch_size + max(sampler_steps, 0) * samples
    return float(passes) * params / params_full


def coalitions_within_budget(costs: Sequence[float], budget: float) -> int:
    """How many coalitions, taken in plan order with these counted costs, fit in ``budget``: the largest k
    with cost[0] + … + cost[k−1] ≤ budget (no coalition past the budget, so no ranker gets more than its
    equal share)."""
    spent, k = 0.0, 0
    for c in costs:
        if c < 0:
            raise ValueError(f"coalition cost {c}: must be ≥ 0")
        if spent + c > budget * (1 + 1e-12):
            break
        spent += c
        k += 1
    return k


RANKER_KINDS = ("sparsified", "ft-full", "retrain", "proxy")  # what one coalition of each Shapley ranker runs
PROXY = "caption proxy (no training)"  # Shapley of the full model sampled on a coalition's captions only


@dataclass(frozen=True)
class WorkModel:
    """Counted work per coalition of each ranker, from a run's settings and parameter counts (see
    :func:`pass_work`): ``sparsified`` fine-tunes the pruned model ``finetune_steps`` (plus a one-off
    ``prune_finetune_steps`` on all data), ``ft-full`` fine-tunes the unpruned model as many steps,
    ``retrain`` trains the unpruned architecture ``train_steps`` from scratch; all sample ``samples`` images
    with ``sampler_steps``. ∅ only samples (an untrained or unchanged full-size model)."""

    params_full: int
    params_pruned: int
    samples: int
    sampler_steps: int
    finetune_steps: int
    finetune_batch: int
    prune_finetune_steps: int
    prune_batch: int
    train_steps: int
    train_batch: int

    @classmethod
    def from_run(cls, run: Any, prepare: dict[str, Any]) -> WorkModel:
        """From a ValuationRun and its prepare/result.json (``paramsFull``, ``paramsPruned``)."""
        try:
            full, pruned = int(prepare["paramsFull"]), int(prepare["paramsPruned"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("prepare/result.json: no paramsFull / paramsPruned; delete prepare/ and rerun the "
                             "run to record them") from None
        s = run.spec
        return cls(full, pruned, s.property.samples, s.method.sampler.steps, s.method.finetune.steps,
                   s.method.finetune.batch_size, s.method.prune.finetune_steps, s.model.train.batch_size,
                   s.model.train.steps, s.model.train.batch_size)

    def coalition(self, kind: str, size: int, *, steps: int | None = None, params: int | None = None) -> float:
        """Work of one coalition of ``size`` contributors for ``kind``; ``steps`` / ``params`` override the
        fine-tuning steps and the model size (calibration sweeps them)."""
        if kind not in RANKER_KINDS:
            raise ValueError(f"ranker kind {kind!r}: expected one of {', '.join(RANKER_KINDS)}")
        sample = {"sampler_steps": self.sampler_steps, "samples": self.samples, "params_full": self.params_full}
        if size == 0 or kind == "proxy":  # these only sample, on a full-size model
            return pass_work(train_steps=0, batch_size=0, params=self.params_full, **sample)
        if kind == "retrain":
            return pass_work(train_steps=self.train_steps, batch_size=self.train_batch, params=self.params_full,
                             **sample)
        model = self.params_pruned if kind == "sparsified" else self.params_full
        return pass_work(train_steps=self.finetune_steps if steps is None else steps, batch_size=self.finetune_batch,
                         params=model if params is None else params, **sample)

    def one_off(self, kind: str, params: int | None = None) -> float:
        """Work a ranker spends once per run beyond the full model: sparsified-FT's fine-tuning of the pruned
        model on all data (training passes only); 0 for the others."""
        if kind != "sparsified":
            return 0.0
        return pass_work(train_steps=self.prune_finetune_steps, batch_size=self.prune_batch, sampler_steps=0,
                         samples=0, params=self.params_pruned if params is None else params,
                         params_full=self.params_full)


def sparsified_run_work(work: WorkModel, evaluated: Iterable[tuple[int, int]]) -> float:
    """The counted work of a sparsified-FT run: the one-off pruned fine-tuning plus every evaluation of its
    coalitions, given as ``(size, evaluations)`` (evaluations = 1 + replicate seeds)."""
    return work.one_off("sparsified") + sum(work.coalition("sparsified", size) * evals for size, evals in evaluated)


def equal_budget_plan(work: WorkModel, kind: str, sizes: Sequence[int], budget: float) -> int:
    """How many of the plan's coalitions (their ``sizes`` in plan order) ranker ``kind`` gets within
    ``budget`` (the sparsified-FT run's counted work)."""
    return coalitions_within_budget([work.coalition(kind, s) for s in sizes], budget)
