"""Family ``ddpm``: a pixel-space diffusers UNet2DModel, channel-pruned with torch-pruning (the paper's
CIFAR setting)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datacredit.errors import ModelError
from datacredit.seeds import Seeds, derived_seed
from datacredit.spec import ValuationRun

from ..packed import PackItem, PackOptions, finetune_and_sample_packed
from ..pipeline import Prepared, finetune_and_sample, prepare_sparsified, sample_untrained
from ..train import Checkpoint
from .base import Assets, TrainData

FULL_DIR = "full"  # below prepare/sparsified: the unpruned full model (model/ + ema/)


def load_full_unet(uri: str, assets: Assets, field: str = "spec.model.checkpoint") -> torch.nn.Module:
    """A diffusers UNet2DModel folder (or a pipeline folder with unet/), or one saved by datacredit."""
    try:
        return Checkpoint.load(assets.get(uri, field)).inference_model
    except FileNotFoundError as e:
        raise ModelError(f"{field}: {e}") from None


def unet_arch(run: ValuationRun) -> dict[str, Any]:
    """:func:`build_unet` options from ``spec.model.architecture`` (sizes come from the data)."""
    a = run.spec.model.architecture
    return {"block_out_channels": tuple(a.block_out_channels), "layers_per_block": a.layers_per_block,
            "attention": a.attention, "norm_num_groups": a.norm_num_groups,
            "attention_blocks": None if a.attention_blocks is None else tuple(a.attention_blocks)}


def sparsify(run: ValuationRun, images: torch.Tensor, full: torch.nn.Module | None, progress: bool = False,
             **arch: Any) -> Prepared:
    """:func:`prepare_sparsified` with the manifest's architecture, training, pruning and fine-tuning settings
    (shared by ddpm and ldm); ``arch`` adds UNet options such as ``attention_head_dim``."""
    s = run.spec
    t = s.model.train
    return prepare_sparsified(
        images,
        full=full,
        arch={**unet_arch(run), **arch},
        train_steps=t.steps,
        train_lr=t.learning_rate,
        batch_size=t.batch_size,
        prune_ratio=s.method.prune.ratio,
        importance=s.method.prune.importance,
        finetune_steps=s.method.prune.finetune_steps,
        finetune_lr=s.method.finetune.learning_rate,
        seed=s.seed,
        progress=progress,
    )


def unet_coalition(run: ValuationRun, sparsified: Checkpoint, images: torch.Tensor, mask: np.ndarray, seeds: Seeds,
                   clip_sample: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """A coalition of a UNet family (shared by ddpm and ldm): fine-tune on ``images[mask]`` and sample, or for
    ∅ sample untrained initialisations of the full architecture (``method.nullInits`` of them). They are drawn
    from the noise seed, so replicate seeds of ∅ measure their spread as well as the sampling noise."""
    s = run.spec
    if not mask.any():
        return sample_untrained(sparsified.model, init_seed=derived_seed(seeds.noise, "null-init"),
                                n_samples=s.property.samples, ddim_steps=s.method.sampler.steps, seed=seeds.noise,
                                inits=s.method.null_inits, clip_sample=clip_sample)
    ft = s.method.finetune
    samples, seconds, _ = finetune_and_sample(
        sparsified, images[torch.from_numpy(mask)], steps=ft.steps, lr=ft.learning_rate, batch_size=ft.batch_size,
        n_samples=s.property.samples, ddim_steps=s.method.sampler.steps, seed=seeds.data, noise_seed=seeds.noise,
        clip_sample=clip_sample)
    return samples, seconds


def unet_coalitions(run: ValuationRun, sparsified: Checkpoint, images: torch.Tensor, masks: Sequence[np.ndarray],
                    seeds: Sequence[Seeds], clip_sample: bool = True) -> list[tuple[torch.Tensor, dict[str, float]]]:
    """:func:`unet_coalition` for several coalitions: the non-empty ones fine-tuned and sampled as one pack
    (:mod:`~datacredit.jobs.packed`; each is given an equal share of its seconds), ∅ alone (it samples fresh
    initialisations, not the checkpoint)."""
    s = run.spec
    ft = s.method.finetune
    out: dict[int, tuple[torch.Tensor, dict[str, float]]] = {}
    packed = [i for i, mask in enumerate(masks) if mask.any()]
    for i in (i for i, mask in enumerate(masks) if not mask.any()):
        out[i] = unet_coalition(run, sparsified, images, masks[i], seeds[i], clip_sample)
    if packed:
        options = PackOptions(steps=ft.steps, lr=ft.learning_rate, batch_size=ft.batch_size,
                              n_samples=s.property.samples, ddim_steps=s.method.sampler.steps, clip_sample=clip_sample,
                              bf16=s.execution.precision == "bf16", compile=s.execution.compile)
        items = [PackItem(images[torch.from_numpy(masks[i])], seeds[i].data, seeds[i].noise) for i in packed]
        samples, took = finetune_and_sample_packed(sparsified, items, options)
        share = {stage: value / len(packed) for stage, value in took.items()}
        out.update((i, (sample, dict(share))) for i, sample in zip(packed, samples, strict=True))
    return [out[i] for i in range(len(masks))]


class DDPMFamily:
    """prepare: [train] -> prune the EMA weights -> fine-tune; coalition: fine-tune (EMA continued) -> DDIM."""

    name = "ddpm"

    def resolution(self, run: ValuationRun, assets: Assets) -> int:
        return run.spec.dataset.resolution or run.spec.model.architecture.sample_size

    def prepare(self, run: ValuationRun, data: TrainData, out_dir: Path, assets: Assets,
                progress: bool = False) -> dict[str, Any]:
        s = run.spec
        full = load_full_unet(s.model.checkpoint, assets) if s.model.checkpoint else None
        prepared = sparsify(run, data.images, full, progress)
        prepared.sparsified.save(out_dir)
        prepared.full.save(out_dir / FULL_DIR)  # the unpruned model: `datacredit evaluate` fine-tunes it
        return prepared.info

    def load(self, run: ValuationRun, out_dir: Path, data: TrainData, assets: Assets) -> Any:
        return Checkpoint.load(out_dir), data

    def coalition(self, run: ValuationRun, state: Any, mask: np.ndarray, seeds: Seeds
                  ) -> tuple[torch.Tensor, dict[str, float]]:
        sparsified, data = state
        return unet_coalition(run, sparsified, data.images, mask, seeds)

    def coalitions(self, run: ValuationRun, state: Any, masks: Sequence[np.ndarray], seeds: Sequence[Seeds]
                   ) -> list[tuple[torch.Tensor, dict[str, float]]]:
        sparsified, data = state
        return unet_coalitions(run, sparsified, data.images, masks, seeds)


FAMILY = DDPMFamily()
