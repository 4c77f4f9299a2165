"""Tests of the ask/tell planner (datacredit.planner)."""

from __future__ import annotations

import numpy as np
import pytest

from datacredit.planner import Estimate, Planner, StopReason
from datacredit.shapley import estimate, read_jsonl, write_jsonl


def game(n: int):
    """Deterministic per-row utility (row-by-row, so batching cannot change a single bit)."""
    rng = np.random.default_rng(n)
    a = rng.gamma(0.7, 1.0, size=(4, n)) * (rng.random((4, n)) < 0.6)

    def v(Z: np.ndarray) -> np.ndarray:
        return np.array([float(np.sum(1 - np.exp(-a @ z.astype(float))) - 0.2 * z[0]) for z in Z])

    return v


def noisy_lookup(v, sd: float, seed: int):
    """A noisy utility whose noise is a fixed function of the coalition (same for every executor)."""

    def u(Z: np.ndarray) -> np.ndarray:
        noise = [np.random.default_rng([seed, *np.flatnonzero(z)]).normal() for z in Z]
        return v(Z) + sd * np.array(noise)

    return u


def finish(planner: Planner, utility) -> Planner:
    """Ask and tell in big batches until done (bounded, so a stuck planner fails instead of hanging)."""
    for _ in range(10_000):
        if planner.done:
            return planner
        batch = planner.ask(1000)
        planner.tell_many(batch, utility(batch))
    raise AssertionError("planner never finished")


def run_shuffled(planner: Planner, utility, seed: int) -> Estimate:
    """Ask in random batch sizes, tell in random order with random delays, until done."""
    rng = np.random.default_rng(seed)
    in_flight: list[np.ndarray] = []
    for _ in range(100_000):
        if planner.done:
            break
        in_flight.extend(planner.ask(int(rng.integers(1, 9))))
        rng.shuffle(in_flight)
        k = int(rng.integers(0, len(in_flight) + 1))
        for z in in_flight[:k]:
            planner.tell(z, utility(z[None])[0])
        in_flight = in_flight[k:]
    assert len(planner.ask(5)) == 0 and len(planner.pending) == 0
    return planner.estimate()


def same(a: Estimate, b: Estimate) -> bool:
    return (
        np.array_equal(a.values, b.values)
        and np.array_equal(a.stderr, b.stderr)
        and a.n_evaluations == b.n_evaluations
        and a.stop_reason == b.stop_reason
    )


def test_sequence_layout() -> None:
    p = Planner(n_players=8, budget=64, method="kernel", seed=0)
    seq = p.sequence
    assert seq.shape[1] == 8 and len(seq) <= 64
    assert not seq[0].any() and seq[1].all()
    assert len({z.tobytes() for z in seq}) == len(seq)
    assert len(Planner(5, 32, "exact").sequence) == 32
    assert np.array_equal(p.ask(2), seq[:2])


@pytest.mark.parametrize("method", ["kernel", "permutation", "banzhaf", "loo"])
@pytest.mark.parametrize("tolerance", [None, 0.05])
def test_shuffled_ask_tell_equals_estimate(method: str, tolerance: float | None) -> None:
    n = 9
    u = noisy_lookup(game(n), 0.02, seed=1)
    kwargs = dict(n_players=n, budget=30 * n, method=method, seed=3, tolerance=tolerance)
    direct = estimate(u, **kwargs)
    for order_seed in range(3):
        assert same(run_shuffled(Planner(**kwargs), u, order_seed), direct)


def test_converged_planner_stops_at_checkpoint() -> None:
    n = 8
    p = finish(Planner(n, 40 * n, tolerance=0.3, check_every=n), game(n))
    res = p.estimate()
    assert res.converged and res.stop_reason == StopReason.CONVERGED
    assert res.n_evaluations < 40 * n and len(p.ask(1)) == 0


def test_ask_waits_at_checkpoint_until_prefix_is_told() -> None:
    n = 6
    p = Planner(n, 20 * n, tolerance=1e-9, min_evaluations=4 * n + 2, check_every=n)
    first = p.ask(1000)
    assert len(first) == 4 * n + 2  # nothing past the first checkpoint
    assert len(p.ask(1)) == 0 and not p.done
    u = game(n)
    p.tell_many(first[:-1], u(first[:-1]))
    assert len(p.ask(1)) == 0
    p.tell(first[-1], u(first[-1:])[0])
    assert len(p.ask(1)) == 1


def test_tell_validates_and_averages_duplicates() -> None:
    n = 6
    p = Planner(n, 20, seed=0)
    seq = p.sequence
    with pytest.raises(ValueError, match="∅"):
        p.estimate()
    p.tell(seq[0], 1.0)
    p.tell(list(range(n)), 3.0)  # member indices work too
    p.tell(np.flatnonzero(seq[1]), 5.0)  # repeat of the full set: averaged to 4.0
    res = p.estimate()
    assert np.isclose(res.values.sum(), 3.0) and res.stop_reason == StopReason.RUNNING
    assert res.n_evaluations == 3
    every = (np.arange(2**n)[:, None] >> np.arange(n) & 1).astype(bool)
    missing = next(z for z in every if not (seq == z).all(axis=1).any())
    with pytest.raises(KeyError):
        p.tell(missing, 1.0)
    with pytest.raises(ValueError):
        p.tell(seq[2], float("nan"))


def test_from_table_resumes_to_the_same_estimate(tmp_path) -> None:
    n = 8
    u = noisy_lookup(game(n), 0.02, seed=2)
    kwargs = dict(n_players=n, budget=12 * n, method="kernel", seed=1, tolerance=0.01)
    reference = run_shuffled(Planner(**kwargs), u, seed=0)

    first = Planner(**kwargs)
    batch = first.ask(30)
    rows = [(z, u(z[None])[0]) for z in batch[:20]]  # 10 results lost / still running
    path = tmp_path / "utilities.jsonl"
    write_jsonl(path, rows)

    resumed = Planner.from_table(read_jsonl(path), pending=batch[20:25], **kwargs)
    assert len(resumed.pending) == 5
    again = resumed.ask(1000)
    assert not any((again == z).all(axis=1).any() for z in batch[:25])  # told or pending: not re-asked
    assert any((again == z).all(axis=1).any() for z in batch[25:])  # lost ones are asked again
    for z in resumed.pending:  # the 5 still running plus everything just asked
        resumed.tell(z, u(z[None])[0])
    assert same(finish(resumed, u).estimate(), reference)
    assert same(
        Planner.from_table([(z, u(z[None])[0]) for z in reference_rows(kwargs, u)], **kwargs).estimate(), reference
    )


def reference_rows(kwargs: dict, u) -> np.ndarray:
    """The coalitions an uninterrupted run evaluates."""
    p = finish(Planner(**kwargs), u)
    return p.sequence[: p.estimate().n_evaluations]


def test_done_requires_all_asked_told() -> None:
    n = 4
    p = Planner(n, 16, method="exact")
    batch = p.ask(100)
    assert len(batch) == 16 and not p.done
    u = game(n)
    p.tell_many(batch[:-1], u(batch[:-1]))
    assert not p.done and p.estimate().stop_reason == StopReason.RUNNING
    p.tell(batch[-1], u(batch[-1:])[0])
    assert p.done and p.estimate().stop_reason == StopReason.ALL_COALITIONS


def test_skipped_coalition_unblocks_checkpoint_and_done() -> None:
    n = 6
    u = game(n)
    p = Planner(n, 10 * n, tolerance=1e-9, check_every=n)
    first = p.ask(1000)
    p.tell_many(first[:-1], u(first[:-1]))
    assert len(p.ask(1)) == 0  # the last one before the checkpoint failed
    p.skip(first[-1])
    assert len(p.pending) == 0
    res = finish(p, u).estimate()
    assert res.stop_reason == StopReason.BUDGET and res.n_coalitions == len(p.sequence) - 1


def test_a_fork_is_independent_of_its_planner_and_estimates_the_same() -> None:
    """What a fork is asked, told or skipped stays in it; the original goes on as if nothing happened."""
    planner = Planner(5, 40, "kernel", seed=2, tolerance=0.01)
    for _ in range(10):
        batch = planner.ask(1)
        planner.tell(batch[0], float(batch[0] @ np.arange(5.0)))
    fork = planner.fork()
    np.testing.assert_array_equal(fork.estimate().values, planner.estimate().values)
    asked = fork.ask(3)
    fork.tell(asked[0], 7.0)
    fork.skip(asked[1])
    assert fork.n_told == planner.n_told + 1
    assert len(asked) == 3 and len(planner.pending) == 0 and len(fork.pending) == 1 and len(fork.skipped) == 1
    assert len(planner.skipped) == 0
    np.testing.assert_array_equal(planner.ask(3), asked)  # the original hands out the same coalitions again


@pytest.mark.parametrize("question", ["topK", "sign"])
def test_a_planner_told_out_of_order_stops_on_a_question_where_estimate_does(question: str) -> None:
    n, k = 8, 2
    weights = np.linspace(-2.0, 3.0, n) + 0.1

    def utility(z: np.ndarray) -> float:
        return float(z @ weights + 0.2 * np.sin(7.0 * z.sum() + z @ np.arange(n)))

    reference = estimate(lambda b: [utility(z) for z in b], n, 200, "kernel", seed=4, question=question, k=k)
    planner = Planner(n, 200, "kernel", seed=4, question=question, k=k)
    rng = np.random.default_rng(0)
    held: list[np.ndarray] = []
    while not planner.done:
        held.extend(planner.ask(3))
        if held:
            z = held.pop(int(rng.integers(len(held))))
            planner.tell(z, utility(z))
    ours = planner.estimate()
    assert ours.converged and reference.converged and ours.n_evaluations == reference.n_evaluations < 200
    np.testing.assert_allclose(ours.values, reference.values, atol=1e-12)
