"""Packed coalitions: a coalition fine-tuned and sampled in a pack equals its result alone (ddpm, ldm), per-model
clipping equals torch's, and the worker writes one result per coalition of a batch, skipping stored ones."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("torch_pruning")

from datacredit import layout  # noqa: E402
from datacredit.jobs.families import get_family  # noqa: E402
from datacredit.jobs.packed import _clip  # noqa: E402
from datacredit.jobs.worker import prepared_run, run_coalition, run_coalitions, run_prepare  # noqa: E402
from datacredit.seeds import Seeds  # noqa: E402
from datacredit.spec import parse_manifest  # noqa: E402
from datacredit.storage import (  # noqa: E402
    S3Options,  # noqa: E402
    open_storage,
    read_json,
    write_json,
)
from tests.tiny import TinyData, tiny_manifest  # noqa: E402
from tests.tiny_models import save_tiny_vqmodel  # noqa: E402

pytestmark = pytest.mark.workload

#: Float tolerance of a packed coalition against the same one alone: batched convolutions sum in another order,
#: as another thread count does (both differ by about 1e-5 on these samples after fine-tuning).
ATOL = 1e-3


def _prepared(manifest: dict, folder: Path) -> str:
    run = parse_manifest(manifest)
    store = open_storage(str(folder))
    write_json(store, layout.RUN, {"manifest": run.to_manifest(), "configHash": run.config_hash()})
    run_prepare(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def ddpm_run(tiny_data: TinyData, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("packed-ddpm")
    m = tiny_manifest("packed", str(tiny_data.images), str(tiny_data.reference), {"uri": str(root / "run")})
    m["spec"]["model"]["architecture"]["attention"] = True  # the attention blocks run unpacked processors too
    return _prepared(m, root / "run")


def _ldm_run(tiny_data: TinyData, root: Path) -> str:
    vq = save_tiny_vqmodel(root / "vqvae")
    m = tiny_manifest("packed-ldm", str(tiny_data.images), str(tiny_data.reference), {"uri": str(root / "run")})
    spec = m["spec"]
    spec["model"] = {"family": "ldm", "autoencoder": str(vq), "architecture": {"sampleSize": 8, "blockOutChannels":
                     [16, 32]}, "train": {"steps": 6, "learningRate": 2e-3, "batchSize": 16}}
    spec["property"]["samples"] = 8
    spec["method"] = {"prune": {"ratio": 0.5, "finetuneSteps": 3},
                      "finetune": {"steps": 4, "learningRate": 1e-3, "batchSize": 8}, "sampler": {"steps": 3}}
    return _prepared(m, root / "run")


def _masks(owner: np.ndarray) -> list[np.ndarray]:
    return [np.isin(owner, m) for m in ([0, 1], [2], [], [1, 2, 3], [0, 1])]


def _seeds() -> list[Seeds]:  # the last repeats coalition 0 under other seeds: a replicate in the same pack
    return [Seeds(11, 7), Seeds(12, 7), Seeds(13, 7), Seeds(14, 7), Seeds(99, 8)]


def _assert_pack_equals_alone(run_uri: str) -> None:
    p = prepared_run(run_uri, S3Options())
    family = get_family(p.run.spec.model.family)
    masks, seeds = _masks(p.owner), _seeds()
    evaluated = family.coalitions(p.run, p.state, masks, seeds)
    packed = [x for x, _ in evaluated]
    assert len(packed) == len(masks) and all(took["sample"] > 0 for _, took in evaluated)
    assert evaluated[2][1]["finetune"] == 0 and evaluated[0][1]["finetune"] > 0  # ∅ is not fine-tuned
    alone = [family.coalition(p.run, p.state, m, s)[0] for m, s in zip(masks, seeds, strict=True)]
    gap = 0.0
    for i, (a, b) in enumerate(zip(alone, packed, strict=True)):
        assert a.shape == b.shape, i
        assert float((a - b).abs().max()) < ATOL, (i, float((a - b).abs().max()))
        assert abs(float(p.prop.score(a)) - float(p.prop.score(b))) < 1e-3 * max(1.0, abs(float(p.prop.score(a))))
        gap = max(gap, float((a - b).abs().mean()))
    # the pack is not one model: coalitions with other data (and the replicate, other seeds) sample differently
    for other in (1, 4):
        assert float((packed[0] - packed[other]).abs().mean()) > 10 * gap, other


def test_ddpm_pack_equals_alone(ddpm_run: str) -> None:
    _assert_pack_equals_alone(ddpm_run)


def test_ldm_pack_equals_alone(tiny_data: TinyData, tmp_path: Path) -> None:
    _assert_pack_equals_alone(_ldm_run(tiny_data, tmp_path))


def test_per_model_clipping_equals_torch() -> None:
    torch.manual_seed(0)
    grads = [torch.randn(3, 4, 5) * 2, torch.randn(3, 7) * 0.01]
    stacked = [g.clone() for g in grads]
    _clip(stacked, 1.0)
    for k in range(3):
        params = [torch.nn.Parameter(torch.zeros_like(g[k])) for g in grads]
        for p, g in zip(params, grads, strict=True):
            p.grad = g[k].clone()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for p, g in zip(params, stacked, strict=True):
            torch.testing.assert_close(g[k], p.grad)


def test_worker_batch_writes_each_result_and_skips_stored(ddpm_run: str, tmp_path: Path) -> None:
    copy_uri = str(tmp_path / "copy")
    shutil.copytree(ddpm_run, copy_uri)
    shutil.rmtree(Path(copy_uri) / layout.COALITIONS, ignore_errors=True)
    alone = run_coalition(copy_uri, [0, 2])
    assert alone["packedWith"] == 1 + len(alone["replicates"]) and alone["deviceSeconds"] > 0  # replicates pack too

    batch = [[0, 2], [1], [], [1, 2, 3]]
    results = run_coalitions(copy_uri, batch, attempts=[1, 2, 1, 1])
    assert [r["members"] for r in results] == [sorted(b) for b in batch]
    assert results[0] == alone  # stored: returned as is, not evaluated again
    evaluations = sum(1 + len(r["replicates"]) for r in results[1:])
    assert {r["packedWith"] for r in results[1:]} == {evaluations} and results[1]["attempt"] == 2
    store = open_storage(copy_uri)
    for r in results:
        assert read_json(store, layout.coalition_result(r["id"])) == r
        assert r["deviceSeconds"] > 0 and r["device"] == "cpu"
    assert store.exists(f"{layout.attempt_dir(results[1]['id'], 2)}/samples.png")

    # the same coalition in another pack gets the same utility, within float tolerance
    fresh = str(tmp_path / "fresh")
    shutil.copytree(copy_uri, fresh)
    shutil.rmtree(Path(fresh) / layout.COALITIONS)
    again = run_coalitions(fresh, [[1, 2, 3], [0, 1, 2], [1]])
    by_members = {tuple(r["members"]): r["utility"] for r in again}
    for r in results[1:]:
        if r["members"]:
            assert by_members[tuple(r["members"])] == pytest.approx(r["utility"], rel=1e-3, abs=1e-4)
    bad = copy.deepcopy(batch)
    bad.append([0, 9])
    with pytest.raises(Exception, match="indices must be distinct"):
        run_coalitions(fresh, bad)


def test_bf16_pack_stays_close_to_fp32(ddpm_run: str) -> None:
    """execution.precision: bf16 autocasts the packed UNet (on CPU here): values move within bf16 rounding."""
    from datacredit.jobs.packed import PackItem, PackOptions, finetune_and_sample_packed

    p = prepared_run(ddpm_run, S3Options())
    sparsified, data = p.state
    items = [PackItem(data.images[torch.from_numpy(m)], s.data, s.noise)
             for m, s in zip(_masks(p.owner)[:2], _seeds()[:2], strict=True)]
    base = {"steps": 4, "lr": 1e-3, "batch_size": 16, "n_samples": 16, "ddim_steps": 4}
    fp32, _ = finetune_and_sample_packed(sparsified, items, PackOptions(**base))
    bf16, _ = finetune_and_sample_packed(sparsified, items, PackOptions(**base, bf16=True))
    for a, b in zip(fp32, bf16, strict=True):
        assert b.dtype == torch.float32 and torch.isfinite(b).all()
        gap = float((a - b).abs().mean())
        assert 0 < gap < 0.05, gap  # not the fp32 program, and not far from it


def test_a_pack_that_fails_stores_its_other_results_and_retries_the_failed_one_alone(
        tiny_data: TinyData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datacredit.local import execute
    from datacredit.runstate import open_run

    folder = Path(__file__).parent / "properties"
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", str(folder))  # the spawned worker imports it too
    doc = tiny_manifest("flaky-pack", str(tiny_data.images), str(tiny_data.reference), {"uri": str(tmp_path / "r")})
    spec = doc["spec"]
    spec["property"] = {"name": "flaky:fails_once", "samples": 8,
                        "options": {"counter": str(tmp_path / "calls"), "fail_at": "3"}}
    spec["estimator"]["replicates"] = {"coalitions": 0, "seeds": 0}
    spec["execution"].update({"coalitionsPerJob": 6, "maxAttemptsPerCoalition": 2})
    run = parse_manifest(doc)
    execute(run, workers=1)  # one worker: the calls are counted in order
    store = open_run(run).store
    results = [read_json(store, k) for k in store.list(layout.COALITIONS) if k.endswith("/result.json")]
    assert len(results) == 16
    first_pack = [r for r in results if r["attempt"] == 1 and r["packedWith"] == 6]
    retried = [r for r in results if r["attempt"] == 2]
    # call 3 failed one coalition of the first pack: the pack still stored its other 5, and only that one ran
    # again, alone
    assert len(retried) == 1 and {r["packedWith"] for r in retried} == {1}, [(r["attempt"], r["packedWith"])
                                                                             for r in results]
    assert len(first_pack) == 5 + 6  # the five it stored, and the second pack of 6
    assert [r["packedWith"] for r in results if r["attempt"] == 1 and r not in first_pack] == [4] * 4  # the last


def test_compiled_pack_equals_eager() -> None:
    """execution.compile: torch.compile of the vmapped forward (inductor, here on CPU) gives the eager pack's
    samples within float tolerance. About a minute: most of it compiling."""
    from datacredit.jobs.packed import PackItem, PackOptions, finetune_and_sample_packed
    from datacredit.jobs.train import Checkpoint, EMAState
    from datacredit.jobs.unet import build_unet

    torch.manual_seed(0)
    model = build_unet(sample_size=8, in_channels=1, block_out_channels=(16, 32))
    start = Checkpoint(model, EMAState(copy.deepcopy(model).eval(), 10))
    images = torch.rand(40, 1, 8, 8) * 2 - 1
    items = [PackItem(images[:20], 1, 7), PackItem(images[20:], 2, 7)]
    base = {"steps": 3, "lr": 1e-3, "batch_size": 8, "n_samples": 8, "ddim_steps": 3}
    eager, _ = finetune_and_sample_packed(start, items, PackOptions(**base))
    compiled, _ = finetune_and_sample_packed(start, items, PackOptions(**base, compile=True))
    for a, b in zip(eager, compiled, strict=True):
        assert float((a - b).abs().max()) < ATOL
    assert float((eager[0] - eager[1]).abs().mean()) > 1e-2
