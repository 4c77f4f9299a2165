"""The two workload stages end to end, on tensors (the worker adds storage and the run spec around them).

prepare:   [train full model] -> prune (the EMA weights) -> fine-tune the pruned model on all data
coalition: copy the sparsified checkpoint -> fine-tune k steps on S (EMA continued) -> DDIM -> property
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DModel

from datacredit.seeds import derived_seed

from .prune import prune_unet
from .sample import sample_ddim
from .train import Checkpoint, EMAState, Progress, train_ddpm
from .unet import build_unet, count_params, untrained_like


@dataclass
class Prepared:
    """The sparsified checkpoint plus what prepare measured."""

    sparsified: Checkpoint
    full: Checkpoint
    info: dict[str, Any] = field(default_factory=dict)


def prepare_sparsified(
    images: torch.Tensor,
    *,
    full: Checkpoint | UNet2DModel | None = None,
    arch: dict[str, Any] | None = None,
    train_steps: int = 800,
    train_lr: float = 2e-3,
    batch_size: int = 64,
    prune_ratio: float = 0.3,
    importance: str = "magnitude",
    finetune_steps: int = 200,
    finetune_lr: float = 2e-3,
    seed: int = 0,
    progress: Progress | bool | None = None,
) -> Prepared:
    """Train (unless ``full`` is given) the full model, prune a copy of its EMA weights, fine-tune it.

    Defaults are the measured digits-demo sizes (8x8, blocks (32, 64)); the paper used lr 1e-4, batch 128.

    ``arch`` goes to :func:`build_unet` (``sample_size`` and ``in_channels`` default to the images').
    The pruned model's fine-tuning starts a fresh EMA; its step count carries into every coalition.
    """
    seconds: dict[str, float] = {}
    if full is None:
        torch.manual_seed(seed)
        kw = {"sample_size": images.shape[-1], "in_channels": images.shape[1], **(arch or {})}
        t0 = time.perf_counter()
        full = train_ddpm(build_unet(**kw), images, train_steps, train_lr, batch_size, seed=seed,
                          progress=progress, desc="train full model")
        seconds["train"] = time.perf_counter() - t0
    elif isinstance(full, UNet2DModel):
        full = Checkpoint(full)
    t0 = time.perf_counter()
    pruned, stats = prune_unet(copy.deepcopy(full.inference_model), prune_ratio, importance, seed=seed)
    seconds["prune"] = time.perf_counter() - t0
    if progress is True:  # a callback reports training steps only
        print(f"prune: ratio {prune_ratio:g} ({importance}): params {count_params(full.model):,} -> "
              f"{count_params(pruned):,} in {seconds['prune']:.1f} s", flush=True)
    t0 = time.perf_counter()
    result = train_ddpm(pruned, images, finetune_steps, finetune_lr, batch_size, seed=seed + 1,
                        progress=progress, desc="fine-tune pruned")
    seconds["prune_finetune"] = time.perf_counter() - t0
    info = {"params_full": count_params(full.model), "params_pruned": count_params(pruned),
            "prune": stats.to_dict(), "seconds": seconds}
    return Prepared(Checkpoint(result.model, result.ema), full, info)


@dataclass
class CoalitionResult:
    utility: float
    samples: torch.Tensor
    seconds: dict[str, float]
    checkpoint: Checkpoint


def finetune_and_sample(
    sparsified: Checkpoint,
    images: torch.Tensor,
    *,
    steps: int = 60,
    lr: float = 2e-3,
    batch_size: int = 32,
    n_samples: int = 256,
    ddim_steps: int = 20,
    seed: int = 0,
    sample_batch: int = 512,
    clip_sample: bool = True,
    noise_seed: int | None = None,
) -> tuple[torch.Tensor, dict[str, float], Checkpoint]:
    """Fine-tune a copy of ``sparsified`` on ``images`` (no training when empty), then sample from the EMA
    weights (the raw ones without EMA); ``clip_sample=False`` for latents (see :func:`sample_ddim`).
    ``seed`` draws the batches; ``noise_seed`` (default: ``seed``) the fine-tuning timesteps and ε and the
    sampling noise, so coalitions given one ``noise_seed`` share them (common random numbers).
    Returns samples, stage seconds and the fine-tuned checkpoint."""
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    start = Checkpoint(copy.deepcopy(sparsified.model), sparsified.ema)
    ema: EMAState | bool | None = start.ema if start.ema is not None else None
    result = train_ddpm(start.model, images, steps, lr, batch_size, seed=seed, ema=ema, noise_seed=noise_seed)
    seconds["finetune"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sample_seed = seed if noise_seed is None else noise_seed
    samples = sample_ddim(result.inference_model, n_samples, ddim_steps, seed=sample_seed, batch_size=sample_batch,
                          clip_sample=clip_sample)
    seconds["sample"] = time.perf_counter() - t0
    return samples, seconds, Checkpoint(result.model, result.ema)


def sample_untrained(like: UNet2DModel, *, init_seed: int, n_samples: int, ddim_steps: int, seed: int, inits: int = 1,
                     sample_batch: int = 512, clip_sample: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """Samples of the model trained on no data, v(∅) as in the paper's code: fresh initialisations of ``like``'s
    (unpruned) architecture. The ``n_samples`` are split as evenly as possible over ``inits`` initialisations
    (the j-th seeded with ``derived_seed(init_seed, j)``), so the untrained architecture, not one draw of it, is
    measured; ``seed`` is the sampling noise."""
    t0 = time.perf_counter()
    inits = max(1, min(inits, n_samples))
    chunks = []
    for j, count in enumerate(np.array_split(np.arange(n_samples), inits)):
        model = untrained_like(like, derived_seed(init_seed, j) if inits > 1 else init_seed)
        chunks.append(sample_ddim(model, len(count), ddim_steps, seed=derived_seed(seed, j) if inits > 1 else seed,
                                  batch_size=sample_batch, clip_sample=clip_sample))
    return torch.cat(chunks), {"finetune": 0.0, "sample": time.perf_counter() - t0}


def coalition_utility(sparsified: Checkpoint, images: torch.Tensor, prop: Any, **kw: Any) -> CoalitionResult:
    """v(S): :func:`finetune_and_sample` on S's ``images`` (keyword arguments go to it), scored with the
    fitted property ``prop``."""
    samples, seconds, checkpoint = finetune_and_sample(sparsified, images, **kw)
    t0 = time.perf_counter()
    utility = float(prop.score(samples))
    seconds["property"] = time.perf_counter() - t0
    return CoalitionResult(utility, samples, seconds, checkpoint)
