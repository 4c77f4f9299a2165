"""The whole method end to end on one machine: tiny model, 4 contributors, exact Shapley."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datacredit import layout
from datacredit.local import execute
from datacredit.runstate import open_run
from datacredit.spec import parse_manifest
from datacredit.storage import read_json
from tests.tiny import CONTRIBUTORS, TinyData, tiny_manifest, with_change

pytestmark = pytest.mark.workload


def _values(doc: dict) -> dict[str, float]:
    return {r["name"]: r["value"] for r in doc["contributors"]}


def test_local_run_exact_resume_and_determinism(tiny_data: TinyData, tmp_path: Path) -> None:
    manifest = tiny_manifest("tiny", str(tiny_data.images), str(tiny_data.reference), {"uri": str(tmp_path / "a")})
    run = parse_manifest(manifest)
    first = execute(run).results

    assert sorted(_values(first)) == sorted(CONTRIBUTORS)
    assert first["evaluations"] == 16
    total = sum(_values(first).values())
    assert total == pytest.approx(first["vFull"] - first["vEmpty"], abs=1e-6)

    assert first["sumOfValues"] == pytest.approx(total) and "untrained" in first["sumMeans"]

    store = open_run(run).store
    results = [read_json(store, k) for k in store.list("coalitions") if k.endswith("result.json")]
    # common random numbers: every coalition shares one noise seed and has its own data seed
    assert len({r["seeds"]["noise"] for r in results}) == 1 and len({r["seeds"]["data"] for r in results}) == 16
    # ∅ and 4 others were evaluated under 2 replicate seeds too: the intervals hold the between-seed noise
    replicated = [r for r in results if r["replicates"]]
    assert len(replicated) == 5 and [] in [r["members"] for r in replicated]
    assert all(len(r["replicates"]) == 2 for r in replicated)
    assert first["seedNoise"]["seeds"] == 3 and first["seedNoise"]["coalitions"] == 4
    assert all(r["stderr"] >= r["seedStderr"] > 0 for r in first["contributors"])  # exact, yet an interval
    lines = store.read_bytes(layout.UTILITIES).decode().splitlines()
    assert sum('"replicates"' in line for line in lines) == 5

    skipped = read_json(store, layout.MANIFEST)["skipped"]
    assert [s["path"] for s in skipped] == [tiny_data.corrupt]
    written = {k.split("/")[-1] for k in store.list("results")}
    assert {"shapley.json", "shapley.csv", "values.png", "report.html"} <= written

    # a rerun evaluates nothing again and gives the same values
    stamps = {k: (store.root / k).stat().st_mtime_ns for k in store.list("coalitions") if k.endswith("result.json")}
    assert len(stamps) == 16
    again = execute(run).results
    assert _values(again) == _values(first)
    assert {k: (store.root / k).stat().st_mtime_ns for k in stamps} == stamps
    assert again["wallClockSeconds"] == first["wallClockSeconds"] > 0  # nothing ran: the run's own time is kept
    assert first["configHash"] == run.config_hash() and first["version"]
    assert first["estimator"] == {"budget": 16, "seed": 0, "tolerance": run.spec.estimator.tolerance}
    (store.root / sorted(stamps)[0]).unlink()  # one coalition to evaluate again: its time is added
    assert execute(run).results["wallClockSeconds"] > first["wallClockSeconds"]

    # the same seed in a fresh storage gives the same values
    fresh = parse_manifest({**manifest, "spec": {**manifest["spec"], "storage": {"uri": str(tmp_path / "b")}}})
    third = execute(fresh).results
    np.testing.assert_allclose(list(_values(third).values()), list(_values(first).values()), atol=1e-9)


def test_null_game_is_the_untrained_model_and_crn_can_be_off(tiny_data: TinyData, tmp_path: Path) -> None:
    manifest = tiny_manifest("tiny-off", str(tiny_data.images), str(tiny_data.reference), {"uri": str(tmp_path)})
    manifest = with_change(manifest, "spec.method.commonRandomNumbers", False)
    manifest = with_change(manifest, "spec.estimator.replicates", {"coalitions": 0, "seeds": 0})
    run = parse_manifest(manifest)
    doc = execute(run).results
    store = open_run(run).store
    results = {tuple(r["members"]): r for r in (read_json(store, k) for k in store.list("coalitions")
                                                if k.endswith("result.json"))}
    assert len({r["seeds"]["noise"] for r in results.values()}) == 16  # independent noise per coalition
    assert doc["seedNoise"] is None and not any(r["replicates"] for r in results.values())
    assert results[()]["seconds"]["finetune"] == 0.0
    # v(∅) is the property of untrained initialisations of the full architecture (method.nullInits of them, drawn
    # from ∅'s noise seed), sampled with ∅'s noise seed
    from datacredit.jobs.pipeline import sample_untrained
    from datacredit.jobs.unet import untrained_like
    from datacredit.jobs.worker import prepared_run
    from datacredit.seeds import derived_seed

    p = prepared_run(open_run(run).uri, open_run(run).options)
    sparsified, _ = p.state
    noise = results[()]["seeds"]["noise"]
    null = untrained_like(sparsified.model, derived_seed(noise, "null-init"))
    assert sum(x.numel() for x in null.parameters()) > sum(x.numel() for x in sparsified.model.parameters())
    assert run.spec.method.null_inits > 1
    samples, _ = sample_untrained(sparsified.model, init_seed=derived_seed(noise, "null-init"),
                                  n_samples=run.spec.property.samples, ddim_steps=run.spec.method.sampler.steps,
                                  seed=noise, inits=run.spec.method.null_inits)
    assert doc["vEmpty"] == results[()]["utility"] == pytest.approx(float(p.prop.score(samples)))
