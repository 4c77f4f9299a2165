"""Family ``sd-lora``: a frozen Stable Diffusion pipeline plus a LoRA (peft) on its UNet (the paper's ArtBench
setting). The full model is the LoRA trained on all contributors; pruning removes LoRA rank components by
magnitude; each coalition fine-tunes a copy of the pruned LoRA on its images and captions, then samples with DDIM.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from datacredit.errors import ModelError
from datacredit.seeds import Seeds, derived_seed
from datacredit.spec import ValuationRun

from ..device import pick_device
from ..lora import (
    attach_lora,
    count_lora_params,
    load_lora,
    lora_parameters,
    lora_state,
    prune_lora,
    save_lora,
    set_lora_state,
)
from ..train import Progress, progress_reporter
from .base import Assets, TrainData, one_by_one

FIELD = "spec.model.checkpoint"
LORA_DIR = "lora"  # the pruned, fine-tuned LoRA (peft folder) in prepare's output
FULL_LORA_DIR = "lora-full"  # the unpruned LoRA trained on all contributors: `datacredit evaluate` fine-tunes it
CACHE_FILE = "encoded.safetensors"  # VAE latents of the training images and text embeddings of their captions
CAPTIONS_FILE = "captions.json"  # the unique captions, in the order of the cached text embeddings
WEIGHT_DECAY = 1e-6  # AdamW, as in the paper's LoRA training
GRAD_CLIP = 1.0
ENCODE_BATCH = 32
SAMPLE_BATCH = 16


def _read_config(folder: Path, part: str) -> dict[str, Any]:
    path = folder / part / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{FIELD}: {folder} is not a Stable Diffusion pipeline folder ({path}: {e}); save one "
                           "with StableDiffusionPipeline.save_pretrained (unet, vae, text_encoder, tokenizer, "
                           "scheduler)") from None


def _vae_factor(vae_config: dict[str, Any]) -> int:
    return 2 ** (len(vae_config.get("block_out_channels", [0])) - 1)


def load_pipeline(run: ValuationRun, assets: Assets) -> StableDiffusionPipeline:
    """The Stable Diffusion pipeline of ``spec.model.checkpoint`` (no safety checker), frozen, on the device,
    with a DDIM scheduler over its noise schedule."""
    folder = assets.get(run.spec.model.checkpoint, FIELD)
    for part in ("unet", "vae"):
        _read_config(folder, part)
    if not (folder / "model_index.json").is_file():
        raise ModelError(f"{FIELD}: {folder} has no model_index.json; it must be a diffusers "
                           "StableDiffusionPipeline folder (StableDiffusionPipeline.save_pretrained)")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False,
                                                       dtype=torch.float32)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ModelError(f"{FIELD}: cannot load the Stable Diffusion pipeline in {folder}: {e}") from None
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False).eval()
    return pipe.to(pick_device())


@dataclass
class Encoded:
    """What training reads instead of pixels and text: VAE latent distributions (already multiplied by the
    VAE's scaling factor) and one text embedding per unique caption."""

    mean: torch.Tensor  # (N, c, h, w)
    std: torch.Tensor  # (N, c, h, w)
    caption: torch.Tensor  # (N,) index into embeddings
    embeddings: torch.Tensor  # (U, L, D)
    captions: list[str]  # (U,) the unique captions

    def save(self, out_dir: Path) -> None:
        save_file({"mean": self.mean.contiguous(), "std": self.std.contiguous(), "caption": self.caption,
                   "embeddings": self.embeddings.contiguous()}, str(out_dir / CACHE_FILE))
        (out_dir / CAPTIONS_FILE).write_text(json.dumps(self.captions))

    @classmethod
    def load(cls, out_dir: Path) -> Encoded:
        t = load_file(str(out_dir / CACHE_FILE))
        captions = json.loads((out_dir / CAPTIONS_FILE).read_text())
        return cls(t["mean"], t["std"], t["caption"], t["embeddings"], captions)


@torch.no_grad()
def text_embeddings(pipe: StableDiffusionPipeline, captions: list[str]) -> torch.Tensor:
    """The text encoder's last hidden states (U, L, D) of each caption, padded to the tokenizer's length."""
    tok = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt")
    device = pipe.text_encoder.device
    return pipe.text_encoder(tok.input_ids.to(device))[0].float().cpu()


@torch.no_grad()
def encode(pipe: StableDiffusionPipeline, data: TrainData) -> Encoded:
    """Encode every training image with the VAE (once) and every unique caption with the text encoder (once)."""
    vae, device = pipe.vae, pipe.vae.device
    sf = float(vae.config.scaling_factor)
    means, stds = [], []
    for lo in range(0, len(data.images), ENCODE_BATCH):
        x = data.images[lo : lo + ENCODE_BATCH].to(device, torch.float32)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        dist = vae.encode(x).latent_dist
        means.append(dist.mean.cpu() * sf)
        stds.append(dist.std.cpu() * sf)
    unique = sorted(set(data.captions))
    caption = torch.tensor([unique.index(c) for c in data.captions], dtype=torch.int64)
    return Encoded(torch.cat(means), torch.cat(stds), caption, text_embeddings(pipe, unique), unique)


def train_lora(pipe: StableDiffusionPipeline, enc: Encoded, indices: np.ndarray, steps: int, lr: float,
               batch_size: int, seed: int, progress: Progress | bool | None = None, desc: str = "",
               noise_seed: int | None = None) -> list[float]:
    """Train the UNet's LoRA in place for ``steps`` AdamW steps on the encoded items ``indices`` (batches drawn
    with replacement, latents sampled from their VAE distribution, the pipeline's noise schedule and prediction
    type). No items or no steps: nothing changes. ``seed`` draws the batches, ``noise_seed`` (default derived
    from ``seed``) the VAE sampling, ε and timesteps, so they do not shift with the data (common random numbers)."""
    losses: list[float] = []
    if steps <= 0 or len(indices) == 0:
        return losses
    unet, device = pipe.unet, pipe.unet.device
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    params = lora_parameters(unet)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)
    gen = torch.Generator("cpu").manual_seed(seed)
    noise_gen = torch.Generator("cpu").manual_seed(derived_seed(seed, "train-noise") if noise_seed is None
                                                   else noise_seed)
    items = torch.from_numpy(np.asarray(indices, dtype=np.int64))
    n_t = sched.config.num_train_timesteps
    report = progress_reporter(progress, steps, desc)
    unet.train()
    for step in range(1, steps + 1):
        idx = items[torch.randint(len(items), (batch_size,), generator=gen)]
        latents = enc.mean[idx] + enc.std[idx] * torch.randn(enc.mean[idx].shape, generator=noise_gen)
        noise = torch.randn(latents.shape, generator=noise_gen)
        t = torch.randint(n_t, (batch_size,), generator=noise_gen)
        latents, noise, t = latents.to(device), noise.to(device), t.to(device)
        target = sched.get_velocity(latents, noise, t) if sched.config.prediction_type == "v_prediction" else noise
        pred = unet(sched.add_noise(latents, noise, t), t, enc.embeddings[enc.caption[idx]].to(device)).sample
        loss = F.mse_loss(pred.float(), target.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        losses.append(float(loss.detach()))
        if report:
            report(step, losses[-1])
    unet.eval()
    return losses


def sample(pipe: StableDiffusionPipeline, prompt: str | Sequence[str], n: int, steps: int, guidance_scale: float,
           resolution: int, seed: int) -> torch.Tensor:
    """``n`` images (n, 3, H, W) in [-1, 1] from ``prompt`` (or one prompt per image) with DDIM (eta 0). The initial
    latents come from a CPU generator seeded with ``seed``, drawn up front, so the result does not depend on the
    batch size."""
    prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} images")
    side = resolution // pipe.vae_scale_factor
    gen = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn(n, pipe.unet.config.in_channels, side, side, generator=gen)
    out = []
    for lo in range(0, n, SAMPLE_BATCH):
        chunk = latents[lo : lo + SAMPLE_BATCH].to(pipe.unet.device)
        images = pipe(prompts[lo : lo + len(chunk)], height=resolution, width=resolution, num_inference_steps=steps,
                      guidance_scale=guidance_scale, latents=chunk, output_type="pt").images
        out.append(images.float().cpu() * 2 - 1)
    return torch.cat(out).clamp(-1, 1)


@dataclass
class State:
    """What every coalition of a process reuses: the pipeline with the pruned LoRA attached, its weights (each
    coalition starts from them), the encoded training set and the image side."""

    pipe: StableDiffusionPipeline
    lora: dict[str, torch.Tensor]
    encoded: Encoded
    resolution: int


class SDLoraFamily:
    """prepare: [train LoRA on all] -> prune rank components -> fine-tune; coalition: fine-tune LoRA on S -> DDIM."""

    name = "sd-lora"

    def resolution(self, run: ValuationRun, assets: Assets) -> int:
        if run.spec.dataset.resolution:
            return run.spec.dataset.resolution
        folder = assets.get(run.spec.model.checkpoint, FIELD)
        unet, vae = _read_config(folder, "unet"), _read_config(folder, "vae")
        if not isinstance(unet.get("sample_size"), int):
            raise ModelError(f"{FIELD}: {folder / 'unet' / 'config.json'} has no integer sample_size; set "
                               "spec.dataset.resolution")
        return unet["sample_size"] * _vae_factor(vae)

    def prepare(self, run: ValuationRun, data: TrainData, out_dir: Path, assets: Assets,
                progress: bool = False) -> dict[str, Any]:
        s = run.spec
        lora, t = s.model.lora, s.model.train
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        pipe = load_pipeline(run, assets)
        enc = encode(pipe, data)
        seconds["encode"] = time.perf_counter() - t0
        everyone = np.arange(len(data.images))
        if lora.checkpoint:
            load_lora(pipe.unet, assets.get(lora.checkpoint, "spec.model.lora.checkpoint"))
        else:
            t0 = time.perf_counter()
            attach_lora(pipe.unet, lora.rank, lora.alpha, lora.target_modules, seed=s.seed)
            train_lora(pipe, enc, everyone, t.steps, t.learning_rate, t.batch_size, s.seed, progress, "train LoRA")
            seconds["train"] = time.perf_counter() - t0
        params_full = count_lora_params(pipe.unet)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_lora(pipe.unet, out_dir / FULL_LORA_DIR)
        t0 = time.perf_counter()
        _, stats = prune_lora(pipe.unet, 1.0 - s.method.prune.ratio)
        seconds["prune"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        train_lora(pipe, enc, everyone, s.method.prune.finetune_steps, s.method.finetune.learning_rate, t.batch_size,
                   s.seed + 1, progress, "fine-tune pruned LoRA")
        seconds["prune_finetune"] = time.perf_counter() - t0
        save_lora(pipe.unet, out_dir / LORA_DIR)
        enc.save(out_dir)
        return {"params_full": params_full, "params_pruned": count_lora_params(pipe.unet), "prune": stats.to_dict(),
                "seconds": seconds}

    def load(self, run: ValuationRun, out_dir: Path, data: TrainData, assets: Assets) -> State:
        pipe = load_pipeline(run, assets)
        load_lora(pipe.unet, out_dir / LORA_DIR, f"prepare output {out_dir / LORA_DIR}")
        return State(pipe, lora_state(pipe.unet), Encoded.load(out_dir), self.resolution(run, assets))

    def coalition(self, run: ValuationRun, state: State, mask: np.ndarray, seeds: Seeds
                  ) -> tuple[torch.Tensor, dict[str, float]]:
        s = run.spec
        ft, sampler = s.method.finetune, s.method.sampler
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        set_lora_state(state.pipe.unet, state.lora, "the pruned LoRA")
        null = not mask.any()  # the model trained on no data: the base pipeline without the LoRA
        if null:
            state.pipe.unet.disable_adapters()
        train_lora(state.pipe, state.encoded, np.flatnonzero(mask), ft.steps, ft.learning_rate, ft.batch_size,
                   seeds.data, noise_seed=seeds.noise)
        seconds["finetune"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            images = sample(state.pipe, s.model.prompt, s.property.samples, sampler.steps, sampler.guidance_scale,
                            state.resolution, seeds.noise)
        finally:
            if null:
                state.pipe.unet.enable_adapters()
        seconds["sample"] = time.perf_counter() - t0
        if s.dataset.channels == 1:
            images = images.mean(dim=1, keepdim=True)
        return images, seconds

    def coalitions(self, run: ValuationRun, state: State, masks: Sequence[np.ndarray], seeds: Sequence[Seeds]
                   ) -> list[tuple[torch.Tensor, dict[str, float]]]:
        """One coalition after another: the LoRA is trained inside the peft-wrapped pipeline (adapter layers
        in place, a text encoder beside it), which does not stack as the plain UNets do."""
        return one_by_one(self, run, state, masks, seeds)


FAMILY = SDLoraFamily()
