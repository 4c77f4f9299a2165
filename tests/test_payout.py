"""`datacredit payout`: exact apportionment, the four rules, floor and carry-over, and the robustness checks."""

from __future__ import annotations

import csv
import io
import itertools
import json
import random
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from datacredit import layout, payout_run
from datacredit.cli import app
from datacredit.finish import finish_run
from datacredit.payout import (
    PayoutError,
    apportion,
    auto_alpha,
    carry_from,
    compute_payout,
    currency_exponent,
    decimal_text,
    format_minor,
    parse_amount,
)
from datacredit.payout_checks import (
    DUP_DISTANCE,
    dhash,
    duplicate_check,
    exact_shapley,
    hamming,
    near_duplicates,
    split_check,
    split_game,
    split_report,
)
from datacredit.results import build_results, save_results
from datacredit.runstate import member_indices, open_run, planner_for, utility_row
from datacredit.spec import load_manifest, parse_manifest
from datacredit.storage import Storage, open_storage, read_json, write_json

runner = CliRunner()


def row(name: str, value: float, half: float = 0.0, images: int = 10) -> dict[str, Any]:
    """A results row with a symmetric 95% interval of half-width ``half``."""
    return {"name": name, "id": f"id-{name}", "images": images, "value": value, "stderr": half / 1.96,
            "ci95": [value - half, value + half]}


def amounts(result: dict[str, Any]) -> dict[str, int]:
    """Minor units paid per contributor."""
    return {e["name"]: e["amountMinor"] for e in result["contributors"]}


def by_name(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Entries of a payout keyed by contributor."""
    return {e["name"]: e for e in result["contributors"]}


# ---------------------------------------------------------------- money and rounding


def test_amounts_parse_and_print_exactly_in_minor_units() -> None:
    assert currency_exponent("USD") == 2 and currency_exponent("jpy") == 0 and currency_exponent("KWD") == 3
    assert parse_amount("10000.01", 2) == 1_000_001
    assert parse_amount("10000", 0) == 10_000
    assert parse_amount("1.5", 3) == 1500
    with pytest.raises(PayoutError, match="more than 2 decimal"):
        parse_amount("10000.001", 2)
    with pytest.raises(PayoutError, match="more than 0 decimal"):
        parse_amount("10.5", 0)
    with pytest.raises(PayoutError, match="not a decimal"):
        parse_amount("ten", 2)
    with pytest.raises(PayoutError, match="ISO 4217"):
        currency_exponent("dollars")
    assert format_minor(1_000_001, 2) == "10000.01" and format_minor(7, 2) == "0.07"
    assert format_minor(10_000, 0) == "10000" and format_minor(1500, 3) == "1.500"
    assert decimal_text(Fraction(637, 1000)) == "0.637" and decimal_text(Fraction(1, 3)) == "1/3"


def test_hamilton_rounding_sums_to_the_pool_and_breaks_ties_by_remainder_then_name() -> None:
    equal = apportion(1_000_001, {"carol": Fraction(1), "alice": Fraction(1), "bob": Fraction(1)})
    assert equal == {"alice": 333_334, "bob": 333_334, "carol": 333_333}  # equal remainders: names sorting first
    # quotas 0.5, 0.3, 0.2 of 9 units: 4.5, 2.7, 1.8 -> floors 4, 2, 1; the 2 left go to .8 (c) then .7 (b)
    assert apportion(9, {"a": Fraction(5), "b": Fraction(3), "c": Fraction(2)}) == {"a": 4, "b": 3, "c": 2}
    rng = random.Random(0)
    for _ in range(200):
        weights = {f"p{i}": Fraction(rng.randint(0, 1000), rng.randint(1, 97)) for i in range(rng.randint(1, 9))}
        weights["p0"] += 1
        total = rng.randint(1, 10**9)
        got = apportion(total, weights)
        assert sum(got.values()) == total
        s = sum(weights.values())
        for k, w in weights.items():  # Hamilton: every amount is its quota rounded down or up
            assert abs(got[k] - total * w / s) < 1
    with pytest.raises(PayoutError):
        apportion(10, {"a": Fraction(0)})


def test_awkward_pool_split_three_ways_is_exact_to_the_cent() -> None:
    rows = [row("a", 1.0), row("b", 1.0), row("c", 1.0)]
    for rule in ("shapley", "pro-rata", "blend", "lower-bound"):
        res = compute_payout(rows, pool_minor=parse_amount("10000.01", 2), rule=rule)
        assert res["paidMinor"] + res["escrowMinor"] == 1_000_001
        if rule != "lower-bound":
            assert amounts(res) == {"a": 333_334, "b": 333_334, "c": 333_333}
            assert by_name(res)["a"]["amount"] == "3333.34" and by_name(res)["c"]["amount"] == "3333.33"


def test_jpy_has_no_minor_unit() -> None:
    rows = [row("a", 2.0), row("b", 2.0), row("c", 2.0)]
    res = compute_payout(rows, pool_minor=parse_amount("10000", currency_exponent("JPY")), rule="shapley",
                         exponent=0)
    assert amounts(res) == {"a": 3334, "b": 3333, "c": 3333}
    assert by_name(res)["a"]["amount"] == "3334"


# ---------------------------------------------------------------- rules


def test_shapley_clips_negatives_and_flags_intervals_that_cross_zero() -> None:
    rows = [row("good", 6.0, 1.0), row("weak", 2.0, 3.0), row("harmful", -4.0, 1.0), row("unsure", -0.5, 2.0)]
    res = compute_payout(rows, pool_minor=800_00, rule="shapley")
    assert amounts(res) == {"good": 600_00, "weak": 200_00, "harmful": 0, "unsure": 0}  # 6 : 2 of 800.00
    assert res["clipped"] == ["harmful", "unsure"]
    assert res["crossesZero"] == ["unsure", "weak"]
    entries = by_name(res)
    assert entries["harmful"]["why"].startswith("clipped: negative value; not charged")
    assert all(e["amountMinor"] >= 0 for e in res["contributors"])  # never charged
    assert "95% interval crosses zero" in entries["weak"]["why"] and "crosses" not in entries["good"]["why"]
    with pytest.raises(PayoutError, match="no contributor has a positive value"):
        compute_payout([row("a", -1.0), row("b", 0.0)], pool_minor=100, rule="shapley")


def test_pro_rata_pays_by_image_count_whatever_the_values() -> None:
    rows = [row("a", -3.0, images=30), row("b", 9.0, images=10), row("c", 1.0, images=60)]
    res = compute_payout(rows, pool_minor=1000_00, rule="pro-rata")
    assert amounts(res) == {"a": 300_00, "b": 100_00, "c": 600_00}
    assert res["clipped"] == ["a"] and "image share only" in by_name(res)["a"]["why"]


def test_blend_mixes_image_and_value_shares_with_alpha_from_the_interval_widths() -> None:
    rows = [row("a", 3.0, 1.0, images=10), row("b", 1.0, 1.0, images=30), row("c", 0.0, 1.0, images=0)]
    # median half-width 1, median |value| 1 -> alpha = 1 (pure pro-rata)
    assert auto_alpha(rows) == 1
    narrow = [row("a", 3.0, 0.25, images=10), row("b", 1.0, 0.25, images=30)]
    assert auto_alpha(narrow) == Fraction(1, 8)  # 0.25 / median(3, 1) = 0.125
    res = compute_payout(narrow, pool_minor=8000, rule="blend")
    assert res["alpha"] == "0.125"
    # a: 1/8 * 10/40 + 7/8 * 3/4 = 22/32 of 8000 = 5500
    assert amounts(res) == {"a": 5500, "b": 2500}
    half = compute_payout(narrow, pool_minor=8000, rule="blend", alpha=Fraction(1, 2))
    assert amounts(half) == {"a": 4000, "b": 4000}  # 1/2 (1/4 + 3/4)
    assert amounts(compute_payout(narrow, pool_minor=8000, rule="blend", alpha=Fraction(0))) == amounts(
        compute_payout(narrow, pool_minor=8000, rule="shapley"))
    assert amounts(compute_payout(narrow, pool_minor=8000, rule="blend", alpha=Fraction(1))) == amounts(
        compute_payout(narrow, pool_minor=8000, rule="pro-rata"))
    with pytest.raises(PayoutError, match="outside"):
        compute_payout(narrow, pool_minor=8000, rule="blend", alpha=Fraction(3, 2))


def test_lower_bound_pays_on_the_lower_bound_and_holds_the_rest_in_escrow_exactly() -> None:
    rows = [row("a", 6.0, 3.0), row("b", 4.0, 3.0), row("c", 1.0, 2.0), row("d", -1.0, 0.5)]
    res = compute_payout(rows, pool_minor=110_00, rule="lower-bound")
    # Σ v⁺ = 11; paid on lower bounds 3, 1, 0 (c's interval crosses zero); escrow v⁺ − lb⁺ = 3, 3, 1
    assert amounts(res) == {"a": 30_00, "b": 10_00, "c": 0, "d": 0}
    assert {n: e["escrowMinor"] for n, e in by_name(res).items()} == {"a": 30_00, "b": 30_00, "c": 10_00, "d": 0}
    assert res["escrowMinor"] == 70_00 and res["paidMinor"] == 40_00
    point = compute_payout(rows, pool_minor=110_00, rule="shapley")
    assert res["escrowMinor"] == point["paidMinor"] - res["paidMinor"]  # what the point values would pay on top
    assert "lower bound ≤ 0" in by_name(res)["c"]["why"] and "in escrow" in by_name(res)["c"]["why"]
    awkward = compute_payout([row("x", 1.0, 0.3), row("y", 2.0, 0.7), row("z", 0.5, 0.1)], pool_minor=1_000_001,
                             rule="lower-bound")
    assert awkward["paidMinor"] + awkward["escrowMinor"] == 1_000_001
    everything_unsure = compute_payout([row("x", 1.0, 2.0), row("y", 1.0, 2.0)], pool_minor=500, rule="lower-bound")
    assert everything_unsure["paidMinor"] == 0 and everything_unsure["escrowMinor"] == 500


def test_payouts_do_not_depend_on_row_order() -> None:
    rows = [row(f"c{i}", v, h, images=k) for i, (v, h, k) in enumerate(
        [(0.1, 0.05, 7), (0.2, 0.3, 3), (0.3, 0.1, 11), (0.1, 0.05, 7), (-0.2, 0.1, 5)])]
    for rule in ("shapley", "blend", "lower-bound", "pro-rata"):
        first = compute_payout(rows, pool_minor=1_000_001, rule=rule, floor_minor=50_000)
        for seed in range(5):
            shuffled = rows[:]
            random.Random(seed).shuffle(shuffled)
            again = compute_payout(shuffled, pool_minor=1_000_001, rule=rule, floor_minor=50_000)
            assert again == first
    tie = compute_payout([row("zed", 1.0), row("amy", 1.0)], pool_minor=1, rule="shapley")
    assert amounts(tie) == {"amy": 1, "zed": 0}


# ---------------------------------------------------------------- floor and carry-over


def test_floor_carries_small_amounts_over_and_redistributes_them_across_two_periods() -> None:
    rows = [row("a", 50.0), row("b", 30.0), row("c", 15.0), row("d", 5.0)]
    first = compute_payout(rows, pool_minor=100_00, rule="shapley", floor_minor=10_00)
    # d's 5.00 is below the floor: carried over; the pool is re-apportioned 50 : 30 : 15 over a, b, c
    assert first["carriedOver"] == {"d": 5_00}
    assert amounts(first) == {"a": 52_63, "b": 31_58, "c": 15_79, "d": 0}
    assert first["paidMinor"] == 100_00
    d = by_name(first)["d"]
    assert d["carriedOutMinor"] == 5_00 and "below floor: carried over 5.00" in d["why"]
    doc = {"currency": "USD", "carriedOver": first["carriedOver"]}
    second = compute_payout(rows, pool_minor=100_00, rule="shapley", floor_minor=10_00,
                            carry_in=carry_from(doc, "USD"))
    # d: 5.00 carried in + 5% of the 95.00 left = 9.75, still below 10.00: carried again, in full
    assert second["carriedOver"] == {"d": 9_75}
    assert second["paidMinor"] == 100_00 and second["carriedInMinor"] == 5_00
    third = compute_payout(rows, pool_minor=100_00, rule="shapley", floor_minor=10_00,
                           carry_in=second["carriedOver"])
    # 9.75 paid first, then 5% of 90.25 = 4.5125 -> d gets 14.26 or 14.27 in total, the pool still exact
    assert third["carriedOver"] == {} and amounts(third)["d"] in (14_26, 14_27)
    assert third["paidMinor"] == 100_00 and "includes 9.75 carried in" in by_name(third)["d"]["why"]
    assert amounts(third)["d"] - 9_75 == apportion(90_25, {k: Fraction(v) for k, v in
                                                           {"a": 50, "b": 30, "c": 15, "d": 5}.items()})["d"]


def test_floor_drops_the_smallest_first_and_carry_checks() -> None:
    rows = [row("a", 1.0), row("b", 1.0), row("c", 1.0)]
    res = compute_payout(rows, pool_minor=100_00, rule="shapley", floor_minor=40_00)
    assert amounts(res) == {"a": 50_00, "b": 50_00, "c": 0}  # 33.33 each: dropping c alone lifts a and b
    assert res["carriedOver"] == {"c": 33_33}
    carried_only = compute_payout(rows, pool_minor=100_00, rule="shapley", carry_in={"gone": 7_00})
    assert amounts(carried_only)["gone"] == 7_00 and "not in this run" in by_name(carried_only)["gone"]["why"]
    assert carried_only["paidMinor"] == 100_00
    with pytest.raises(PayoutError, match="exceed the pool"):
        compute_payout(rows, pool_minor=100, rule="shapley", carry_in={"a": 101})
    with pytest.raises(PayoutError, match="floor"):
        compute_payout(rows, pool_minor=100, rule="shapley", floor_minor=101)
    with pytest.raises(PayoutError, match="in 'JPY'"):
        carry_from({"currency": "JPY", "carriedOver": {}}, "USD")


# ---------------------------------------------------------------- robustness checks


def game_of(table: dict[str, float], names: str) -> dict[frozenset[int], float]:
    """A game from ``{"ab": v}`` keys of player letters."""
    return {frozenset(names.index(p) for p in key): v for key, v in table.items()}


def test_splitting_into_substitute_halves_gains_under_shapley_and_is_neutral_under_pro_rata() -> None:
    # a and b overlap (each alone 6, together 8); c adds 3 to anyone
    game = game_of({"": 0, "a": 6, "b": 6, "c": 3, "ab": 8, "ac": 9, "bc": 9, "abc": 11}, "abc")
    assert np.allclose(exact_shapley(game, 3), [4, 4, 3])
    split = split_game(game, 3, 0)
    assert split[frozenset({0, 3})] == split[frozenset({0})] == split[frozenset({3})] == 6
    res = split_check(game, ["a", "b", "c"], [100, 100, 50], player=0)
    assert res["shapleyBefore"] == pytest.approx(4.0)
    assert res["shapleyHalf"] == pytest.approx(7 / 3)  # each half gets less than the whole had ...
    assert res["shapleyHalf"] < res["shapleyBefore"]
    assert res["shapleyHalvesTotal"] == pytest.approx(14 / 3)  # ... but the halves together get more,
    assert res["othersAfter"]["b"] == pytest.approx(10 / 3)  # taken from b, whose data overlaps a's
    assert res["othersAfter"]["c"] == pytest.approx(res["othersBefore"]["c"])
    assert res["proRataShareBefore"] == res["proRataShareHalvesTotal"] == "2/5"  # pro-rata: neutral
    additive = game_of({"".join(s): 4 * ("a" in s) + 2 * ("b" in s) + ("c" in s) for r in range(4)
                        for s in itertools.combinations("abc", r)}, "abc")
    neutral = split_check(additive, ["a", "b", "c"], [3, 1, 1], player=0)
    assert neutral["shapleyHalf"] == pytest.approx(2.0) and neutral["shapleyGain"] == pytest.approx(0.0, abs=1e-12)
    assert Fraction(neutral["proRataShareHalvesTotal"]) == Fraction(3, 5)  # 3 images split 1 + 2


def test_split_report_needs_every_coalition() -> None:
    game = game_of({"": 0, "a": 6, "b": 6, "c": 3, "ab": 8, "ac": 9, "bc": 9, "abc": 11}, "abc")
    rows = [{"members": sorted(s), "utility": v} for s, v in game.items()]
    rep = split_report(rows + rows[:1], ["a", "b", "c"], [1, 1, 1])  # a repeated coalition is averaged
    assert rep["status"] == "ok"
    assert rep["contributors"]["a"]["shapleyGain"] == pytest.approx(2 / 3)
    assert rep["contributors"]["c"]["shapleyGain"] == pytest.approx(0.0, abs=1e-12)
    assert split_report(rows[:-1], ["a", "b", "c"], [1, 1, 1])["status"] == "skipped"


def write_dataset(store: Storage, images: np.ndarray, owner: list[int]) -> None:
    """prepare/dataset.npz as prepare writes it."""
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images, owner=np.asarray(owner, dtype=np.int32),
                        captions=np.asarray([""] * len(images), dtype=str))
    store.write_bytes(layout.DATASET, buf.getvalue())


def test_near_duplicates_shared_by_contributors_are_found_in_the_prepared_dataset(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(6, 3, 32, 32)).astype(np.uint8)
    # alice: 0, 1, 2; bob: 3, 4 and a brighter copy of alice's 0; carol: an exact copy of alice's 1 and bob's 3
    brighter = np.clip(base[0].astype(int) + 6, 0, 255).astype(np.uint8)
    images = np.stack([base[0], base[1], base[2], base[3], base[4], brighter, base[1], base[3]])
    owner = [0, 0, 0, 1, 1, 1, 2, 2]
    hashes = dhash(images)
    assert hashes.shape == (8, 2) and hashes.dtype == np.uint64
    assert hamming(hashes[0], hashes[5]) <= DUP_DISTANCE  # brightness does not change the gradients
    assert min(int(hamming(hashes[i], hashes[j])) for i in range(5) for j in range(i + 1, 5)) > 20
    noisy = np.clip(base[:5].astype(int) + rng.integers(-3, 4, size=base[:5].shape), 0, 255).astype(np.uint8)
    assert (hamming(dhash(noisy), hashes[:5]) <= DUP_DISTANCE).all()  # nor does a little noise
    store = open_storage(str(tmp_path / "run"))
    missing = duplicate_check(store, ["alice", "bob", "carol"])
    assert missing["status"] == "missing" and "prepare/dataset.npz not found" in missing["note"]
    write_dataset(store, images, owner)
    write_json(store, layout.MANIFEST, {"contributors": [{"name": n} for n in ("alice", "bob", "carol")]})
    rep = duplicate_check(store, ["carol", "bob", "alice"])
    assert rep["status"] == "ok" and rep["namesFrom"] == layout.MANIFEST and rep["images"] == 8
    pairs = {(p["a"], p["b"]): p for p in rep["pairs"]}
    assert set(pairs) == {("alice", "bob"), ("alice", "carol"), ("bob", "carol")}
    assert pairs[("alice", "bob")]["imagePairs"] == 1 and pairs[("alice", "carol")]["imagePairs"] == 1
    assert pairs[("bob", "carol")] == {"a": "bob", "b": "carol", "imagePairs": 1, "imagesOfA": 1, "imagesOfB": 1}
    assert rep["perContributor"] == {"alice": 2, "bob": 2, "carol": 2}
    assert rep["imagesWithDuplicateElsewhere"] == 6 and rep["pairsWithin"] == {}
    assert (dhash(images, chunk=3) == hashes).all()
    chunked = near_duplicates(hashes, np.asarray(owner), ["alice", "bob", "carol"], cells=5)  # one hash a step
    assert {k: chunked[k] for k in ("pairs", "perContributor", "pairsWithin")} == {
        k: rep[k] for k in ("pairs", "perContributor", "pairsWithin")}
    write_dataset(store, np.stack([base[0], base[0], base[0], base[2]]), [0, 0, 0, 1])  # one image copied 3 times
    within = duplicate_check(store, ["alice", "bob", "carol"])
    assert within["pairsWithin"] == {"alice": 3} and within["pairs"] == []
    store.write_bytes(layout.DATASET, b"not a zip")
    assert duplicate_check(store, ["alice"])["status"] == "unreadable"


# ---------------------------------------------------------------- the command


def finished_run(store: Storage, values: list[float], stderr: list[float], images: list[int]) -> None:
    """results/shapley.json (+ .csv, .png), run.json, manifest.json and an exact utilities table, as a run leaves."""
    names = ["alice", "bob", "[red]carol[/]"][: len(values)]
    contributors = [{"name": n, "id": f"id{i}", "images": k} for i, (n, k) in enumerate(zip(names, images,
                                                                                            strict=True))]
    doc = build_results(contributors, np.asarray(values), np.asarray(stderr), run_name="tiny", property_name="quality",
                        method="exact", v_empty=0.0, v_full=float(sum(values)), evaluations=2 ** len(values),
                        converged=True, stop_reason="all_coalitions", wall_seconds=1.0)
    save_results(store, doc)
    write_json(store, layout.RUN, {"configHash": "cfg123", "manifest": {}})
    write_json(store, layout.MANIFEST, {"contributors": contributors, "configHash": "cfg123"})
    subsets = [s for r in range(len(values) + 1) for s in itertools.combinations(range(len(values)), r)]
    store.write_bytes(layout.UTILITIES, "".join(json.dumps({"members": list(s), "utility": sum(values[i] for i in s)})
                                                + "\n" for s in subsets).encode())


def test_cli_pays_a_finished_run_and_writes_json_csv_png(tmp_path: Path) -> None:
    store = open_storage(str(tmp_path / "run"))
    finished_run(store, [5.0, 3.0, -1.0], [0.5, 2.0, 0.2], [100, 50, 10])
    res = runner.invoke(app, ["payout", store.uri, "--pool", "10000.01", "--period", "2025-01"])
    assert res.exit_code == 0, res.output
    for ext in ("json", "csv", "png"):
        assert store.exists(f"payouts/2025-01.{ext}")
    doc = read_json(store, "payouts/2025-01.json")
    assert sum(e["amountMinor"] for e in doc["contributors"]) + doc["escrowMinor"] == 1_000_001
    assert doc["pool"] == "10000.01" and doc["configHash"] == "cfg123" and doc["run"] == "tiny"
    assert doc["rule"] == "shapley" and doc["clipped"] == ["[red]carol[/]"] and doc["crossesZero"] == ["bob"]
    assert {e["name"]: e["amount"] for e in doc["contributors"]} == {"alice": "6250.01", "bob": "3750.00",
                                                                       "[red]carol[/]": "0.00"}
    assert doc["checks"]["duplicates"]["status"] == "missing"
    assert doc["checks"]["split"]["status"] == "ok"  # additive table: nobody gains by splitting
    assert all(abs(c["shapleyGain"]) < 1e-9 for c in doc["checks"]["split"]["contributors"].values())
    table = list(csv.DictReader(io.StringIO(store.read_bytes("payouts/2025-01.csv").decode())))
    assert sum(int(r["amount_minor"]) for r in table) == 1_000_001
    assert "[red]carol[/]" in res.output  # printed literally, not as markup
    assert "prepare/dataset.npz not found" in res.output
    again = runner.invoke(app, ["payout", store.uri, "--pool", "10000.01", "--period", "2025-01"])
    assert again.exit_code == 0  # the same payout again: the same record
    other = runner.invoke(app, ["payout", store.uri, "--pool", "5000", "--period", "2025-01"])
    assert other.exit_code == 3 and "already exists" in other.output
    assert runner.invoke(app, ["payout", store.uri, "--pool", "5000", "--period", "2025-01",
                               "--overwrite"]).exit_code == 0


def test_cli_floor_carry_and_rules_through_a_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "run.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "datacredit.dev/v1alpha1", "kind": "ValuationRun", "metadata": {"name": "tiny"},
        "spec": {"dataset": {"images": str(tmp_path / "images")}, "storage": {"uri": str(tmp_path / "store")}}}))
    store = open_run(load_manifest(manifest)).store
    finished_run(store, [9.0, 0.5], [0.5, 0.1], [10, 90])
    base = ["payout", str(manifest), "--pool", "100", "--floor", "10", "--currency", "EUR"]
    first = runner.invoke(app, [*base, "--period", "p1"])
    assert first.exit_code == 0, first.output
    doc1 = read_json(store, "payouts/p1.json")
    assert doc1["carriedOver"] == {"bob": 526} and doc1["paidMinor"] == 100_00 and doc1["currency"] == "EUR"
    second = runner.invoke(app, [*base, "--period", "p2", "--carry", "p1"])
    assert second.exit_code == 0, second.output
    doc2 = read_json(store, "payouts/p2.json")
    assert doc2["parameters"]["carryFrom"] == "payouts/p1.json" and doc2["carriedInMinor"] == 526
    # 5.26 carried in is paid first; bob's 0.5/9.5 of the 94.74 left rounds to 4.99: 10.25 reaches the floor
    assert doc2["carriedOver"] == {} and {e["name"]: e["amountMinor"] for e in doc2["contributors"]} == {
        "alice": 89_75, "bob": 10_25}
    lb = runner.invoke(app, ["payout", str(manifest), "--pool", "100", "--rule", "lower-bound", "--period", "lb"])
    assert lb.exit_code == 0 and read_json(store, "payouts/lb.json")["escrowMinor"] > 0
    blend = runner.invoke(app, ["payout", str(manifest), "--pool", "100", "--rule", "blend", "--alpha", "0.25",
                                "--period", "bl"])
    assert blend.exit_code == 0 and read_json(store, "payouts/bl.json")["parameters"]["alpha"] == "0.25"


@pytest.mark.parametrize("args, message", [
    (["--pool", "0"], "must be positive"),
    (["--pool", "-5"], "must be positive"),
    (["--pool", "1.001"], "more than 2 decimal"),
    (["--pool", "100", "--rule", "equal"], "unknown --rule"),
    (["--pool", "100", "--rule", "blend", "--alpha", "1.5"], "outside [0, 1]"),
    (["--pool", "100", "--alpha", "0.5"], "only applies to --rule blend"),
    (["--pool", "100", "--period", "../x"], "--period"),
    (["--pool", "100", "--carry", "nope"], "no such file"),
    (["--pool", "100", "--currency", "JPY", "--floor", "0.5"], "more than 0 decimal"),
])
def test_cli_refuses_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    store = open_storage(str(tmp_path / "run"))
    finished_run(store, [1.0, 2.0], [0.1, 0.1], [1, 1])
    res = runner.invoke(app, ["payout", store.uri, *args])
    assert res.exit_code == 3 and message in " ".join(res.output.split()), res.output
    assert not store.list("payouts")


def test_cli_without_results_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["payout", str(tmp_path / "empty"), "--pool", "100"])
    assert res.exit_code == 3 and "no results/shapley.json" in res.output
    assert runner.invoke(app, ["payout", str(tmp_path / "nowhere"), "--pool", "100"]).exit_code == 3


# ---------------------------------------------------------------- spec.payout: made when the run finishes


def finish_exact(tmp_path: Path, payout: dict[str, Any] | None, values: tuple[float, ...] = (3.0, 1.0, -0.5)
                 ) -> tuple[Storage, dict[str, Any]]:
    """A hand-made exact run of three additive contributors finished through the shared finish path (no
    training): manifest.json, then :func:`finish_run` as both executors call it."""
    run = parse_manifest({
        "apiVersion": "datacredit.dev/v1alpha1", "kind": "ValuationRun", "metadata": {"name": "tiny"},
        "spec": {"dataset": {"images": str(tmp_path / "images")},
                 "estimator": {"name": "exact", "budget": 8, "replicates": {"seeds": 0}},
                 "storage": {"uri": str(tmp_path / "runs")}, **({"payout": payout} if payout else {})}})
    store = open_run(run).store
    contributors = [{"name": n, "id": f"id-{n}", "images": k} for n, k in (("alice", 10), ("bob", 30),
                                                                           ("carol", 60))][: len(values)]
    write_json(store, layout.RUN, {"manifest": run.to_manifest(), "configHash": run.config_hash()})
    write_json(store, layout.MANIFEST, {"contributors": contributors, "configHash": run.config_hash()})
    planner = planner_for(run, len(values))
    rows = []
    for coalition in planner.sequence:
        members = member_indices(coalition)
        utility = sum(values[i] for i in members)
        planner.tell(coalition, utility)
        rows.append(utility_row(members, utility, []))
    return store, finish_run(store, run, planner, contributors, rows, 1.0)


def test_spec_payout_is_written_by_the_finish_path_as_the_cli_writes_it(tmp_path: Path) -> None:
    store, doc = finish_exact(tmp_path, {"pool": "100.00", "period": "2025-06"})
    outcome = doc["payout"]
    assert outcome["written"][:2] == ["payouts/2025-06.json", "payouts/2025-06.csv"]
    assert store.exists("payouts/2025-06.json") and store.exists("payouts/2025-06.csv")
    paid = read_json(store, "payouts/2025-06.json")
    assert paid == outcome["document"]
    assert {e["name"]: e["amount"] for e in paid["contributors"]} == {"alice": "75.00", "bob": "25.00",
                                                                        "carol": "0.00"}
    assert paid["pool"] == "100.00" and paid["rule"] == "shapley" and paid["clipped"] == ["carol"]
    assert paid["checks"]["split"]["status"] == "ok"  # every coalition of an exact run: the split test ran
    assert "payout" not in read_json(store, "results/shapley.json")  # the values are saved as they were
    before = store.read_bytes("payouts/2025-06.json")
    same = runner.invoke(app, ["payout", store.uri, "--pool", "100.00", "--period", "2025-06"])
    assert same.exit_code == 0, same.output  # the command makes the very same record: one code path
    assert store.read_bytes("payouts/2025-06.json") == before


def test_spec_payout_pays_the_completion_date_once_and_a_refusal_keeps_the_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(payout_run, "today_utc", lambda: "2030-01-01")
    store, doc = finish_exact(tmp_path, {"pool": "90", "rule": "pro-rata", "currency": "JPY"})
    assert doc["payout"]["document"]["period"] == "2030-01-01"
    assert {e["name"]: e["amountMinor"] for e in doc["payout"]["document"]["contributors"]} == {
        "alice": 9, "bob": 27, "carol": 54}
    monkeypatch.setattr(payout_run, "today_utc", lambda: "2030-01-02")  # resumed the next day: the same period
    store, again = finish_exact(tmp_path, {"pool": "90", "rule": "pro-rata", "currency": "JPY"})
    assert again["payout"]["document"]["period"] == "2030-01-01"
    assert sorted(store.list("payouts")) == ["payouts/2030-01-01.csv", "payouts/2030-01-01.json",
                                             "payouts/2030-01-01.png", "payouts/_spec-period.json"]
    store, changed = finish_exact(tmp_path, {"pool": "120", "rule": "pro-rata", "currency": "JPY"})
    assert "already exists" in changed["payout"]["error"] and "spec.payout.period" in changed["payout"]["error"]
    assert read_json(store, "payouts/2030-01-01.json")["pool"] == "90"  # not overwritten
    store, harmful = finish_exact(tmp_path / "other", {"pool": "10", "period": "p1"}, values=(-1.0, -2.0))
    assert harmful["payout"] == {"error": "nothing to pay on: no contributor has a positive value", "period": "p1"}
    assert read_json(store, "results/shapley.json")["contributors"]  # the run's values are kept
    assert not store.exists("payouts/p1.json")
    _, none = finish_exact(tmp_path / "none", None)
    assert "payout" not in none


def test_the_near_duplicate_check_of_spec_payout_reads_only_small_datasets(tmp_path: Path) -> None:
    store = open_storage(str(tmp_path / "run"))
    write_dataset(store, np.zeros((4, 1, 8, 8), dtype=np.uint8), [0, 0, 1, 1])
    write_json(store, layout.MANIFEST, {"contributors": [{"name": "a"}, {"name": "b"}],
                                        "manifest": {"spec": {"dataset": {"channels": 1}}}})
    assert duplicate_check(store, ["a", "b"], max_bytes=1000)["status"] == "skipped"  # the size is unknown
    write_json(store, layout.PREPARE_RESULT, {"images": 4, "resolution": 8})
    assert duplicate_check(store, ["a", "b"], max_bytes=256)["status"] == "ok"  # 4 x 1 x 8 x 8 = 256 bytes
    big = duplicate_check(store, ["a", "b"], max_bytes=255)
    assert big["status"] == "skipped" and "datacredit payout" in big["note"]
    images = np.random.default_rng(1).integers(0, 256, size=(5, 3, 40, 40)).astype(np.uint8)
    assert (dhash(images, max_floats=3 * 40 * 40) == dhash(images)).all()  # one image a chunk: the same hashes
