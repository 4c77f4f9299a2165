"""`datacredit evaluate` on a tiny run: retrained ground truth is stored once and reused on the next call."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from datacredit import evaluation as ev
from datacredit.cli import app
from datacredit.jobs.properties.custom import PropertyContext
from datacredit.local import execute
from datacredit.runstate import open_run, planner_for
from datacredit.seeds import Seeds
from datacredit.shapley import estimate_from_table
from datacredit.spec import parse_manifest
from datacredit.storage import read_json
from tests.tiny import CONTRIBUTORS, TinyData, tiny_manifest

pytestmark = pytest.mark.workload


def test_evaluate_stores_and_reuses_ground_truth(tiny_data: TinyData, tmp_path: Path) -> None:
    from datacredit.jobs.evaluate import EvalSettings, GroundTruth, evaluate

    manifest = tiny_manifest("tiny-eval", str(tiny_data.images), str(tiny_data.reference),
                             {"uri": str(tmp_path / "runs")}, estimator="kernel", budget=8)
    manifest["spec"]["model"]["train"].update(steps=12, batchSize=16)  # every retrain trains this from scratch
    run = parse_manifest(manifest)
    execute(run)
    ref = open_run(run)
    settings = EvalSettings(alphas=(0.5,), subsets=3, seeds=2, fraction=0.25,
                            baselines=("loo", "ft-shapley", "retrain-shapley", "pixel", "embedding", "banzhaf",
                                       "datamodel", "d-trak"), trak_dim=256, trak_timesteps=3)
    seen: list[GroundTruth] = []
    first = evaluate(ref.uri, settings, on_truth=seen.append)

    n = len(CONTRIBUTORS)
    assert first["retrainedNow"] > 0
    assert {"sparsified-FT Shapley", "LOO (retrain)", "FT-Shapley", "pixel-max", "embedding-mean"} <= set(first["lds"])
    # pro-rata beside them: 24 images each (bob's corrupt one skipped) rank no subset, so it has no LDS row
    assert first["values"][ev.PRO_RATA] == [24.0] * n and ev.PRO_RATA not in first["lds"]
    assert ev.PRO_RATA not in first["counterfactual"]  # LDS only: no retrains of its own
    # Banzhaf and the datamodel fit the run's own stored utilities: no training, the run's budget, LDS only
    rows = [json.loads(line) for line in ref.store.read_bytes("results/utilities.jsonl").decode().splitlines()]
    assert first["values"][ev.BANZHAF_RUN] == pytest.approx(
        list(estimate_from_table(rows, n, method="banzhaf").values))
    assert first["values"][ev.DATAMODEL_RUN] == pytest.approx(
        list(ev.datamodel_scores([r["members"] for r in rows], [r["utility"] for r in rows], n)))
    for name in (ev.BANZHAF_RUN, ev.DATAMODEL_RUN):
        assert name in first["lds"] and name not in first["counterfactual"]
        assert first["budget"][name]["work"] == first["budget"]["sparsified-FT Shapley"]["work"]
    assert first["budget"]["retrain Shapley"]["coalitions"] >= 1
    # D-TRAK on the full model: one score per contributor, LDS and counterfactual rows, its counted work is one
    # forward and backward pass (3 forward passes) per image and draw, no coalitions
    assert len(first["values"][ev.DTRAK]) == n and np.isfinite(first["values"][ev.DTRAK]).all()
    assert ev.DTRAK in first["lds"] and ev.DTRAK in first["counterfactual"]
    images = read_json(ref.store, "prepare/result.json")["images"] + run.spec.property.samples
    assert first["budget"][ev.DTRAK]["coalitions"] == 0
    assert first["budget"][ev.DTRAK]["work"] == pytest.approx(3 * 3 * images, abs=0.1)
    # equal compute is counted work (forward passes x model size), the same rule for every ranker
    spent = first["budget"]
    budget = spent["sparsified-FT Shapley"]["work"]
    work = ev.WorkModel.from_run(run, read_json(ref.store, "prepare/result.json"))
    sizes = [int(c.sum()) for c in planner_for(run, n).plan.sequence]
    for name, kind in (("FT-Shapley", "ft-full"), ("retrain Shapley", "retrain")):
        assert 0 < spent[name]["work"] <= budget and spent[name]["seconds"] > 0
        assert spent[name]["coalitions"] == ev.equal_budget_plan(work, kind, sizes, budget)
    assert spent["retrain Shapley"]["coalitions"] <= spent["FT-Shapley"]["coalitions"] <= len(sizes)
    for by_alpha in first["lds"].values():
        d = by_alpha["0.5"]
        assert len(d["perSeed"]) == 2 and d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    # LOO is v(N) - v(N \ i) of the stored seed-0 retrains
    truth = seen[0].rows["retrain"]
    cfg = seen[0].configs["retrain"]
    full = truth[ev.truth_key("retrain", range(n), run.spec.seed, cfg)].utility
    without0 = truth[ev.truth_key("retrain", range(1, n), run.spec.seed, cfg)].utility
    assert first["values"]["LOO (retrain)"][0] == pytest.approx(full - without0)
    # the counterfactuals remove the ranking's best and worst contributor (fraction 0.25 of 4)
    values = dict(zip(CONTRIBUTORS, first["values"]["sparsified-FT Shapley"], strict=True))
    cf = first["counterfactual"]["sparsified-FT Shapley"]
    assert cf["top"]["removed"] == [max(values, key=values.__getitem__)]
    assert cf["bottom"]["removed"] == [min(values, key=values.__getitem__)]
    assert len(cf["top"]["perSeed"]) == 2
    assert np.isfinite(first["agreement"]["pearsonSparsifiedVsRetrain"])
    assert ref.store.exists("evaluation/retrain.jsonl") and ref.store.exists("evaluation/report.json")

    # a second call retrains nothing and reproduces the report from storage
    again = evaluate(ref.uri, settings, on_truth=seen.append)
    assert seen[1].trained == 0 and again["retrainedNow"] == 0
    assert again["lds"] == first["lds"] and again["counterfactual"] == first["counterfactual"]

    # the CLI prints the tables from the same stored ground truth
    res = CliRunner().invoke(app, ["evaluate", ref.uri, "--alphas", "0.5", "--subsets", "3", "--seeds", "2",
                                   "--fraction", "0.25", "--trak-dim", "256", "--trak-timesteps", "3"])
    # default --baselines: all nine (the proxy skipped: ddpm is unconditional), D-TRAK as in the first call (so its
    # counterfactual needs no retrain)
    assert res.exit_code == 0, res.output
    assert "LDS" in res.output and "retrained now: 0" in res.output and ev.DTRAK in res.output
    assert "as many images" in " ".join(res.output.split())  # why the pro-rata row is missing
    assert "proxy: skipped, the model is unconditional" in " ".join(res.output.split())
    assert "equal counted work" in " ".join(res.output.split())


def test_evaluate_an_ldm_run_retrains_on_latents(tiny_data: TinyData, tmp_path: Path) -> None:
    """ldm: retraining from scratch trains a UNet on the VQ latents of a subset; FT-Shapley fine-tunes the unpruned
    latent UNet prepare saved; samples are decoded before the property scores them; D-TRAK works in latent space."""
    from datacredit.jobs.evaluate import EvalSettings, GroundTruth, evaluate
    from datacredit.jobs.truth_models import UNetTruth
    from tests.tiny_models import save_tiny_vqmodel

    vq = save_tiny_vqmodel(tmp_path / "vqvae")
    manifest = tiny_manifest("tiny-ldm-eval", str(tiny_data.images), str(tiny_data.reference),
                             {"uri": str(tmp_path / "runs")}, estimator="kernel", budget=8)
    spec = manifest["spec"]
    spec["model"] = {"family": "ldm", "autoencoder": str(vq), "architecture": {"sampleSize": 8,
                     "blockOutChannels": [16, 32]}, "train": {"steps": 6, "learningRate": 2e-3, "batchSize": 16}}
    spec["property"]["samples"] = 8
    spec["method"] = {"prune": {"ratio": 0.5, "finetuneSteps": 3},
                      "finetune": {"steps": 3, "learningRate": 1e-3, "batchSize": 8}, "sampler": {"steps": 3}}
    run = parse_manifest(manifest)
    execute(run)
    ref = open_run(run)
    settings = EvalSettings(alphas=(0.5,), subsets=3, seeds=1, fraction=0.25,
                            baselines=("loo", "ft-shapley", "retrain-shapley", "pixel", "d-trak"), trak_dim=64,
                            trak_timesteps=2)
    seen: list[GroundTruth] = []
    report = evaluate(ref.uri, settings, on_truth=seen.append)
    gt = seen[0]
    model = gt.model
    assert isinstance(model, UNetTruth)
    assert model.train.shape[1:] == (3, 8, 8) and model.images.shape[1:] == (1, 16, 16)  # latents; 16 px images
    assert model.full_generated().shape[1:] == (3, 8, 8) and model.full_samples().shape[1:] == (1, 16, 16)
    assert report["retrainedNow"] > 0 and {"sparsified-FT Shapley", "LOO (retrain)", "FT-Shapley", "pixel-max",
                                           ev.DTRAK} <= set(report["lds"])
    n = len(CONTRIBUTORS)
    for name in ("LOO (retrain)", "FT-Shapley", ev.DTRAK):
        assert len(report["values"][name]) == n and np.isfinite(report["values"][name]).all(), name
    rows = list(gt.rows["retrain"].values())
    assert rows and all(np.isfinite(r.utility) for r in rows)
    assert len({round(r.utility, 6) for r in rows}) > 1  # subsets trained on different latents score differently


COLOURS = {"ann": (220, 40, 40), "bob": (40, 40, 220), "cy": (40, 200, 40), "dee": (230, 230, 230)}


def brightness(images: torch.Tensor, context: PropertyContext) -> float:
    """The sd-lora test's property: mean brightness of the samples."""
    return float(images.mean())


def _painting(colour: tuple[int, int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(np.clip(np.asarray(colour) + rng.integers(-30, 30, (16, 16, 3)), 0, 255).astype(np.uint8))


def test_evaluate_an_sd_lora_run_retrains_the_lora_and_scores_the_caption_proxy(tmp_path: Path) -> None:
    """sd-lora: retraining from scratch trains a fresh LoRA on the frozen base pipeline; FT-Shapley fine-tunes the
    unpruned LoRA prepare saved; the caption proxy samples that LoRA on a coalition's captions only (∅: the empty
    prompt) and trains nothing; D-TRAK attributes the LoRA; the embedding similarity is skipped with a reason; the
    run's pruned LoRA is back in place afterwards, so its coalitions give what they gave before."""
    from datacredit.jobs.evaluate import EvalSettings, GroundTruth, evaluate
    from datacredit.jobs.families import get_family
    from datacredit.jobs.lora import lora_state
    from datacredit.jobs.truth_models import LoraTruth
    from datacredit.jobs.worker import prepared_run
    from datacredit.storage import S3Options
    from tests.tiny_models import save_tiny_sd_pipeline

    sd = save_tiny_sd_pipeline(tmp_path / "sd")
    for k, name in enumerate(COLOURS):
        (tmp_path / "images" / name).mkdir(parents=True)
        for j in range(2):
            _painting(COLOURS[name], 10 * k + j).save(tmp_path / "images" / name / f"{j}.png")
            (tmp_path / "images" / name / f"{j}.txt").write_text(f"a {name} painting\n")
    manifest = {"apiVersion": "datacredit.dev/v1alpha1", "kind": "ValuationRun", "metadata": {"name": "sd-eval"},
                "spec": {"model": {"family": "sd-lora", "checkpoint": str(sd), "prompt": "a painting",
                                   "lora": {"rank": 4}, "train": {"steps": 4, "learningRate": 1e-3, "batchSize": 4}},
                         "dataset": {"images": str(tmp_path / "images"), "channels": 3, "captions": "sidecar"},
                         "property": {"name": f"{__name__}:brightness", "samples": 4},
                         "method": {"prune": {"ratio": 0.5, "finetuneSteps": 2},
                                    "finetune": {"steps": 3, "learningRate": 1e-2, "batchSize": 2},
                                    "sampler": {"steps": 2, "guidanceScale": 3.0}},
                         "estimator": {"name": "exact", "budget": 16}, "storage": {"uri": str(tmp_path / "runs")}}}
    run = parse_manifest(manifest)
    execute(run, workers=1)
    ref = open_run(run)
    settings = EvalSettings(alphas=(0.5,), subsets=3, seeds=1, fraction=0.25)  # every baseline
    seen: list[GroundTruth] = []
    report = evaluate(ref.uri, settings, on_truth=seen.append)
    gt = seen[0]
    model = gt.model
    assert isinstance(model, LoraTruth)
    n = len(COLOURS)
    for name in ("LOO (retrain)", "FT-Shapley", "retrain Shapley", ev.PROXY, "pixel-max"):
        assert name in report["lds"] and len(report["values"][name]) == n, name
        assert np.isfinite(report["values"][name]).all(), name
    # D-TRAK on the unpruned LoRA's gradients; the embedding similarity needs a classifier property: skipped, with why
    assert ev.DTRAK in report["lds"] and np.isfinite(report["values"][ev.DTRAK]).all()
    assert report["skipped"] == {"embedding": "the property has no classifier features to compare images with"}
    # the proxy trains nothing: its counted work is sampling only, so it fits more coalitions than FT-Shapley
    spent = report["budget"]
    assert spent[ev.PROXY]["coalitions"] >= spent["FT-Shapley"]["coalitions"]
    assert spent[ev.PROXY]["work"] < spent["FT-Shapley"]["work"] or spent[ev.PROXY]["coalitions"] > \
        spent["FT-Shapley"]["coalitions"]
    assert np.isfinite(report["agreement"]["pearsonProxyVsRetrain"])
    # D-TRAK's counted work: a forward and backward pass (3 passes) per image and draw, through the full UNet
    assert spent[ev.DTRAK]["work"] == pytest.approx(3 * settings.trak_timesteps * (8 + 4), abs=0.1)
    # prompts: each sample a caption of the coalition's images; ∅ the empty prompt
    assert set(model.proxy_prompts((1, 3), 7)) <= {"a bob painting", "a dee painting"}
    assert model.proxy_prompts((), 7) == [""] * 4
    # subsets score differently under all three kinds of ground truth
    for kind in ("retrain", "ft-full", "proxy"):
        rows = list(gt.rows[kind].values())
        assert rows and len({round(r.utility, 6) for r in rows}) > 1, kind
    # a retrained LoRA starts fresh: on no data it is the base model, as the run's ∅ coalition samples it
    p = prepared_run(ref.uri, S3Options())
    base, _ = get_family("sd-lora").coalition(run, p.state, np.zeros(len(p.owner), dtype=bool), Seeds(5, 5))
    torch.testing.assert_close(model.retrain((), 5), base)
    # the run's pruned LoRA is back in place, so later coalitions of this process start from it
    assert all(torch.equal(v, p.state.lora[k]) for k, v in lora_state(p.state.pipe.unet).items())
    again, _ = get_family("sd-lora").coalition(run, p.state, np.isin(p.owner, [0, 1]), Seeds(9, 9))
    first, _ = get_family("sd-lora").coalition(run, p.state, np.isin(p.owner, [0, 1]), Seeds(9, 9))
    torch.testing.assert_close(again, first)
