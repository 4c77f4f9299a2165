"""Family sd-lora on a tiny Stable Diffusion pipeline built from configs: LoRA magnitude pruning, save/load of
the pruned LoRA, and prepare + coalitions end to end through the worker with sidecar captions."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from PIL import Image  # noqa: E402

from datacredit import layout  # noqa: E402
from datacredit.errors import ModelError  # noqa: E402
from datacredit.jobs.families import Assets, Family, get_family  # noqa: E402
from datacredit.jobs.families.sdlora import (  # noqa: E402
    CAPTIONS_FILE,
    Encoded,
    State,
    load_pipeline,
    sample,
    text_embeddings,
)
from datacredit.jobs.lora import (  # noqa: E402
    ADAPTER,
    attach_lora,
    count_lora_params,
    load_lora,
    lora_layers,
    lora_state,
    prune_lora,
    save_lora,
    set_lora_state,
)
from datacredit.jobs.properties.custom import PropertyContext  # noqa: E402
from datacredit.jobs.worker import run_coalition, run_prepare  # noqa: E402
from datacredit.seeds import Seeds  # noqa: E402
from datacredit.spec import ValuationRun, parse_manifest  # noqa: E402
from datacredit.storage import open_storage, read_json, write_json  # noqa: E402
from tests.tiny_models import save_tiny_sd_pipeline  # noqa: E402

pytestmark = pytest.mark.workload

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CAPTIONS = {"ann": "a red painting", "bob": "a blue painting", "cy": "a green painting"}
COLOURS = {"ann": (220, 40, 40), "bob": (40, 40, 220), "cy": (40, 200, 40)}
PROMPT = "a post impressionist painting"


def brightness(images: torch.Tensor, context: PropertyContext) -> float:
    """The test property: mean brightness of the samples."""
    return float(images.mean())


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny StableDiffusionPipeline saved with save_pretrained: UNet latents 8x8, VAE factor 2 (16 px)."""
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("sd"))


def _unet(sd_folder: Path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(str(sd_folder / "unet")).eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 16, 32, generator=g)


@torch.no_grad()
def _out(unet: UNet2DConditionModel) -> torch.Tensor:
    x, t, e = _inputs()
    return unet(x, t, e).sample


def _set_known_magnitudes(unet: UNet2DConditionModel) -> dict[tuple[str, int], float]:
    """Give component i of each layer |A[i]| = a distinct random importance and |B[:, i]| = 1; return them."""
    rng = np.random.default_rng(5)
    layers = lora_layers(unet)
    rank = next(iter(layers.values())).r[ADAPTER]
    values = rng.permutation(len(layers) * rank) + 1.0
    known = {}
    with torch.no_grad():
        for k, (name, layer) in enumerate(layers.items()):
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            direction = torch.randn(a.shape[1], generator=torch.Generator().manual_seed(k))
            for i in range(rank):
                imp = float(values[k * rank + i]) / 100
                a[i] = direction / direction.norm() * imp
                signs = torch.randint(2, (b.shape[0],), generator=torch.Generator().manual_seed(100 * k + i))
                b[:, i] = (signs * 2 - 1) / b.shape[0] ** 0.5  # unit norm
                known[(name, i)] = imp
    return known


def test_prune_keeps_ratio_and_removes_lowest_magnitude(sd_folder: Path) -> None:
    unet = _unet(sd_folder)
    attach_lora(unet, 4, 8.0, TARGETS)
    known = _set_known_magnitudes(unet)
    sizes = {name: layer.lora_A[ADAPTER].in_features + layer.lora_B[ADAPTER].out_features
             for name, layer in lora_layers(unet).items()}
    total = count_lora_params(unet)
    assert total == sum(sizes.values()) * 4
    before = lora_state(unet)

    config, stats = prune_lora(unet, 0.4)

    assert count_lora_params(unet) == stats.params_after <= 0.4 * total
    assert stats.params_before == total and stats.components_after < stats.components_before
    # the kept components are recognised by |A[i]|; every kept one outranks every removed one
    kept = set()
    for name, layer in lora_layers(unet).items():
        for norm in layer.lora_A[ADAPTER].weight.norm(dim=1).tolist():
            kept.add(min((k for k in known if k[0] == name), key=lambda k: abs(known[k] - norm)))
    removed = set(known) - kept
    assert removed and kept
    assert min(known[k] for k in kept) > max(known[k] for k in removed)
    # greedy: putting back the most important removed component would exceed the keep ratio
    best_removed = max(removed, key=known.get)
    assert stats.params_after + sizes[best_removed[0]] > 0.4 * total
    # per-layer ranks in the config and scaling kept: the pruned UNet equals the full LoRA with removed B columns zeroed
    assert config.rank_pattern == {name: sum(1 for k in kept if k[0] == name) for name in config.rank_pattern}
    reference = _unet(sd_folder)
    attach_lora(reference, 4, 8.0, TARGETS)
    zeroed = dict(before)
    for name, i in removed:
        zeroed[f"{name}.lora_B.weight"] = zeroed[f"{name}.lora_B.weight"].clone()
        zeroed[f"{name}.lora_B.weight"][:, i] = 0
    set_lora_state(reference, zeroed, "test")
    torch.testing.assert_close(_out(unet), _out(reference), rtol=1e-4, atol=1e-5)


def _randomize_lora(unet: UNet2DConditionModel) -> None:
    """Non-zero LoRA weights (a fresh LoRA's B is zero, which would make every comparison trivial)."""
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)


def test_pruned_lora_saves_and_loads_identically(sd_folder: Path, tmp_path: Path) -> None:
    unet = _unet(sd_folder)
    attach_lora(unet, 4, None, TARGETS)
    _randomize_lora(unet)
    prune_lora(unet, 0.5)
    save_lora(unet, tmp_path / "lora")
    again = _unet(sd_folder)
    load_lora(again, tmp_path / "lora")
    assert count_lora_params(again) == count_lora_params(unet)
    assert torch.equal(_out(again), _out(unet))
    assert sum(p.numel() for p in again.parameters() if p.requires_grad) == count_lora_params(unet)

    # diffusers LoRA weights (what StableDiffusionPipeline.save_lora_weights writes) load too
    full = _unet(sd_folder)
    attach_lora(full, 4, None, TARGETS)
    _randomize_lora(full)
    StableDiffusionPipeline.save_lora_weights(str(tmp_path / "diffusers"), unet_lora_layers=lora_state(full))
    from_diffusers = _unet(sd_folder)
    load_lora(from_diffusers, tmp_path / "diffusers")
    torch.testing.assert_close(_out(from_diffusers), _out(full))

    with pytest.raises(ModelError, match="spec.model.lora.checkpoint"):
        load_lora(_unet(sd_folder), tmp_path)


def _png(colour: tuple[int, int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.asarray(colour) + rng.integers(-30, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _manifest(images: Path, sd: Path, storage: Path) -> dict:
    return {
        "apiVersion": "datacredit.dev/v1alpha1",
        "kind": "ValuationRun",
        "metadata": {"name": "sd-tiny"},
        "spec": {
            "model": {"family": "sd-lora", "checkpoint": str(sd), "prompt": PROMPT,
                      "lora": {"rank": 4, "targetModules": TARGETS},
                      "train": {"steps": 4, "learningRate": 1e-3, "batchSize": 4}},
            "dataset": {"images": str(images), "channels": 3, "captions": "sidecar"},
            "property": {"name": f"{__name__}:brightness", "samples": 4},
            "method": {"prune": {"ratio": 0.5, "finetuneSteps": 2},
                       "finetune": {"steps": 3, "learningRate": 1e-2, "batchSize": 2},
                       "sampler": {"steps": 2, "guidanceScale": 3.0}},
            "estimator": {"name": "exact", "budget": 8},
            "storage": {"uri": str(storage)},
        },
    }


@pytest.fixture(scope="module")
def prepared(sd_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict, dict]:
    """A run prepared by the worker: 3 contributors x 2 images with sidecar captions (one image without)."""
    root = tmp_path_factory.mktemp("sdrun")
    for k, name in enumerate(CAPTIONS):
        (root / "images" / name).mkdir(parents=True)
        for j in range(2):
            (root / "images" / name / f"{j}.png").write_bytes(_png(COLOURS[name], 10 * k + j))
            if (name, j) != ("cy", 1):
                (root / "images" / name / f"{j}.txt").write_text(CAPTIONS[name] + "\n")
    run = parse_manifest(_manifest(root / "images", sd_folder, root / "store"))
    run_uri = str(root / "store" / "run")
    write_json(open_storage(run_uri), layout.RUN, {"manifest": run.to_manifest(), "configHash": run.config_hash()})
    result = run_prepare(run_uri)
    return run_uri, result, run.to_manifest()


def test_resolution_from_pipeline_configs(sd_folder: Path, tmp_path: Path) -> None:
    family, assets = get_family("sd-lora"), Assets(lambda uri, field: Path(uri))
    run = parse_manifest(_manifest(tmp_path, sd_folder, tmp_path))
    assert family.resolution(run, assets) == 16  # unet sample_size 8 x VAE factor 2
    pinned = parse_manifest({**run.to_manifest(), "spec": {**run.to_manifest()["spec"],
                                                           "dataset": {"images": "x", "resolution": 24}}})
    assert family.resolution(pinned, assets) == 24
    bad = parse_manifest(_manifest(tmp_path, tmp_path, tmp_path))
    with pytest.raises(ModelError, match="spec.model.checkpoint"):
        family.resolution(bad, assets)
    with pytest.raises(ModelError, match="spec.model.checkpoint"):
        load_pipeline(bad, assets)


def test_prepare_and_coalitions_end_to_end(prepared: tuple[str, dict, dict]) -> None:
    run_uri, result, _ = prepared
    assert result["family"] == "sd-lora" and result["resolution"] == 16
    assert 0 < result["paramsPruned"] <= 0.5 * result["paramsFull"]
    assert result["prune"]["keep_ratio"] == 0.5
    assert {"encode", "train", "prune", "prune_finetune"} <= set(result["seconds"])
    saved = {k.rsplit("/", 1)[-1] for k in open_storage(run_uri).list(layout.SPARSIFIED)}
    assert {"adapter_config.json", "adapter_model.safetensors", "encoded.safetensors", CAPTIONS_FILE} <= saved
    assert not any(k.endswith("diffusion_pytorch_model.safetensors") for k in saved)  # never the base model

    first = run_coalition(run_uri, [0, 2])
    second = run_coalition(run_uri, [1])
    for r in (first, second):
        assert np.isfinite(r["utility"]) and -1 <= r["utility"] <= 1
        assert r["seconds"]["finetune"] > 0 and r["seconds"]["sample"] > 0
    assert first["utility"] != second["utility"]
    assert open_storage(run_uri).exists(f"{layout.attempt_dir(first['id'], 1)}/samples.png")


@pytest.fixture(scope="module")
def loaded(prepared: tuple[str, dict, dict]) -> tuple[ValuationRun, Family, State]:
    """The family's coalition state loaded from the prepared run (what the worker caches per process); every
    coalition starts from the pruned LoRA, so the tests share it."""
    run_uri, _, manifest = prepared
    run = parse_manifest(manifest)
    family = get_family("sd-lora")
    state = family.load(run, open_storage(run_uri).root / layout.SPARSIFIED, None,
                        Assets(lambda uri, field: Path(uri)))
    return run, family, state


def test_sidecar_captions_reach_training(loaded: tuple[ValuationRun, Family, State]) -> None:
    run, family, state = loaded
    enc: Encoded = state.encoded
    assert sorted(enc.captions) == sorted([*CAPTIONS.values(), PROMPT])  # cy/1.png has no sidecar: the prompt
    assert [enc.captions[i] for i in enc.caption.tolist()] == [CAPTIONS["ann"]] * 2 + [CAPTIONS["bob"]] * 2 + \
        [CAPTIONS["cy"], PROMPT]
    fresh = text_embeddings(state.pipe, enc.captions)
    torch.testing.assert_close(enc.embeddings, fresh)
    assert len({tuple(e.flatten().tolist()) for e in enc.embeddings}) == len(enc.captions)  # distinct per caption

    seen: list[torch.Tensor] = []
    hook = state.pipe.unet.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((args[2] if len(args) > 2 else kwargs["encoder_hidden_states"])
                                                 .detach().clone()) if m.training else None, with_kwargs=True)
    try:
        family.coalition(run, state, np.array([False, False, True, True, False, False]), seeds=Seeds(7, 7))  # bob only
    finally:
        hook.remove()
    assert len(seen) == run.spec.method.finetune.steps
    bob = fresh[enc.captions.index(CAPTIONS["bob"])]
    for batch in seen:
        for row in batch:
            torch.testing.assert_close(row, bob)


def test_empty_coalition_does_not_train_and_coalitions_are_deterministic(
        loaded: tuple[ValuationRun, Family, State]) -> None:
    run, family, state = loaded

    def lora_changed() -> bool:
        now = lora_state(state.pipe.unet)
        return any(not torch.equal(now[k], v) for k, v in state.lora.items())

    empty, seconds = family.coalition(run, state, np.zeros(6, dtype=bool), seeds=Seeds(11, 11))
    assert not lora_changed()
    assert empty.shape == (4, 3, 16, 16) and empty.min() >= -1 and empty.max() <= 1
    assert seconds["finetune"] < seconds["sample"]

    mask = np.array([True, True, False, False, True, True])
    a, _ = family.coalition(run, state, mask, seeds=Seeds(11, 11))
    assert lora_changed()
    b, _ = family.coalition(run, state, mask, seeds=Seeds(11, 11))
    assert torch.equal(a, b)
    assert not torch.equal(a, empty)
    again, _ = family.coalition(run, state, np.zeros(6, dtype=bool), seeds=Seeds(11, 11))
    assert torch.equal(again, empty)  # each coalition starts from the pruned LoRA
    # ∅ samples the base model without the LoRA (the paper's null model), not the pruned LoRA untrained
    set_lora_state(state.pipe.unet, state.lora, "test")
    s = run.spec
    with_lora = sample(state.pipe, s.model.prompt, s.property.samples, s.method.sampler.steps,
                       s.method.sampler.guidance_scale, state.resolution, 11)
    assert not torch.allclose(with_lora, empty, atol=1e-4)


def test_single_channel_samples_are_averaged(loaded: tuple[ValuationRun, Family, State]) -> None:
    run, family, state = loaded
    manifest = run.to_manifest()
    grey = parse_manifest({**manifest, "spec": {**manifest["spec"],
                                                "dataset": {**manifest["spec"]["dataset"], "channels": 1}}})
    colour, _ = family.coalition(run, state, np.zeros(6, dtype=bool), seeds=Seeds(5, 5))
    mono, _ = family.coalition(grey, state, np.zeros(6, dtype=bool), seeds=Seeds(5, 5))
    assert mono.shape == (4, 1, 16, 16)
    torch.testing.assert_close(mono, colour.mean(dim=1, keepdim=True))


def test_prepare_loads_a_given_lora_checkpoint(sd_folder: Path, tmp_path: Path) -> None:
    unet = _unet(sd_folder)
    attach_lora(unet, 2, None, ["to_q", "to_v"])
    save_lora(unet, tmp_path / "given")
    for k, name in enumerate(("ann", "bob")):
        (tmp_path / "images" / name).mkdir(parents=True)
        (tmp_path / "images" / name / "0.png").write_bytes(_png(COLOURS[name], k))
    manifest = _manifest(tmp_path / "images", sd_folder, tmp_path / "store")
    manifest["spec"]["model"]["lora"] = {"rank": 4, "checkpoint": str(tmp_path / "given")}
    manifest["spec"]["dataset"]["captions"] = "none"
    run = parse_manifest(manifest)
    run_uri = str(tmp_path / "store" / "run")
    write_json(open_storage(run_uri), layout.RUN, {"manifest": run.to_manifest(), "configHash": run.config_hash()})
    result = run_prepare(run_uri)
    assert result["paramsFull"] == count_lora_params(unet)  # the given LoRA (rank 2, to_q/to_v), not a new one
    assert "train" not in result["seconds"]
    assert read_json(open_storage(run_uri), layout.PREPARE_RESULT)["paramsPruned"] <= result["paramsFull"] // 2
