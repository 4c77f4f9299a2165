"""Family ``ldm``: a diffusers UNet2DModel on the latents of a VQ-VAE (diffusers ``VQModel``), channel-pruned
with torch-pruning with attention heads kept consistent (the paper's CelebA-HQ setting).

prepare encodes every image once (scaling factor 1, as in the paper) and stores the latents next to the
sparsified UNet; coalitions fine-tune on their images' latents, DDIM-sample latents and decode them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import VQModel
from diffusers.models.attention_processor import Attention

from datacredit.errors import BadInput, ModelError
from datacredit.seeds import Seeds
from datacredit.spec import ValuationRun

from ..device import pick_device
from ..train import Checkpoint
from .base import Assets, TrainData
from .ddpm import FULL_DIR, load_full_unet, sparsify, unet_coalition, unet_coalitions

LATENTS = "latents.npy"  # (N, latent_channels, h, w) float32, in the order of prepare/dataset.npz
AUTOENCODER = "autoencoder.json"  # the VQModel's URI and config the latents were encoded with
HEAD_DIM = 32  # attention head width of the LDM CelebA-HQ UNet (CompVis/ldm-celebahq-256)
BATCH = 64  # images per VQ encode / decode call


def vq_folder(uri: str, assets: Assets, field: str = "spec.model.autoencoder") -> Path:
    """The local diffusers VQModel folder for ``uri`` (a VQModel folder, or a pipeline folder with vqvae/)."""
    path = assets.get(uri, field)
    for folder in (path, path / "vqvae"):
        config = folder / "config.json"
        if config.is_file():
            try:
                cls = json.loads(config.read_text()).get("_class_name")
            except json.JSONDecodeError as e:
                raise ModelError(f"{field}: {config} is not valid JSON ({e})") from None
            if cls != "VQModel":
                raise ModelError(f"{field}: {folder} holds a {cls or 'model without _class_name'}, not a diffusers "
                                   "VQModel; point it at a VQModel.save_pretrained folder")
            return folder
    raise ModelError(f"{field}: {uri} has no config.json (nor vqvae/config.json); expected a diffusers VQModel "
                       "folder written by VQModel.save_pretrained")


def vq_config(folder: Path) -> dict[str, Any]:
    """The VQModel's config.json without diffusers' bookkeeping keys."""
    return {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")}


def downsampling(config: dict[str, Any]) -> int:
    """Image side / latent side of a VQModel: 2 ** (number of encoder blocks - 1)."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def load_vqmodel(uri: str, assets: Assets, field: str = "spec.model.autoencoder") -> VQModel:
    """The frozen VQModel (eval mode, no gradients) on the worker's device."""
    folder = vq_folder(uri, assets, field)
    try:
        vq = VQModel.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise ModelError(f"{field}: cannot load the VQModel in {folder}: {e}") from None
    return vq.to(pick_device()).eval().requires_grad_(False)


def head_dim(widths: list[int]) -> int:
    """Attention head width for a UNet with these block widths: :data:`HEAD_DIM`, or less so that every
    attention layer (all blocks but the first) has at least two heads; it divides every attention width."""
    g = math.gcd(*widths[1:]) if len(widths) > 1 else widths[0]
    return max(d for d in range(1, min(HEAD_DIM, max(1, g // 2)) + 1) if g % d == 0)


def check_heads(model: torch.nn.Module) -> dict[str, list[int]]:
    """``{attention: [heads, q/k/v width]}``; raises when q, k, v differ in width or heads do not divide it."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, Attention):
            widths = {m.to_q.out_features, m.to_k.out_features, m.to_v.out_features}
            width = widths.pop()
            if widths or width % m.heads:
                raise RuntimeError(f"{name}: q/k/v widths {m.to_q.out_features}/{m.to_k.out_features}/"
                                   f"{m.to_v.out_features} do not split into {m.heads} equal heads")
            out[name] = [m.heads, width]
    return out


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Images with ``channels`` channels: grayscale repeated to RGB, RGB averaged to grayscale."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.repeat(1, channels, 1, 1)
    if channels == 1:
        return x.mean(dim=1, keepdim=True)
    raise ValueError(f"cannot turn {x.shape[1]}-channel images into {channels}-channel ones")


@torch.no_grad()
def encode(vq: VQModel, images: torch.Tensor, batch: int = BATCH) -> torch.Tensor:
    """Unquantised latents (scaling factor 1) of images in [-1, 1], on CPU as float32."""
    device = next(vq.parameters()).device
    x = to_channels(images, int(vq.config.in_channels))
    out = [vq.encode(x[lo : lo + batch].to(device, torch.float32)).latents.float().cpu()
           for lo in range(0, len(x), batch)]
    return torch.cat(out)


@torch.no_grad()
def decode(vq: VQModel, latents: torch.Tensor, channels: int, batch: int = BATCH) -> torch.Tensor:
    """Images in [-1, 1] with ``channels`` channels from latents (quantised by the decoder), on CPU."""
    device = next(vq.parameters()).device
    out = [vq.decode(latents[lo : lo + batch].to(device, torch.float32)).sample.float().cpu()
           for lo in range(0, len(latents), batch)]
    return to_channels(torch.cat(out), channels).clamp(-1, 1)


@dataclass
class LDMState:
    """What every coalition of a process reuses: the sparsified UNet, all latents and the VQModel."""

    sparsified: Checkpoint
    latents: torch.Tensor  # (N, C, h, w), row i encodes image i of the data set
    vq: VQModel
    channels: int  # spec.dataset.channels: the channels of decoded samples


class LDMFamily:
    """prepare: encode once -> [train on latents] -> prune (heads kept) -> fine-tune; coalition: fine-tune
    (EMA continued) -> DDIM in latent space -> VQ decode."""

    name = "ldm"

    def resolution(self, run: ValuationRun, assets: Assets) -> int:
        s = run.spec
        if s.dataset.resolution:
            return s.dataset.resolution
        factor = downsampling(vq_config(vq_folder(s.model.autoencoder or "", assets)))
        return s.model.architecture.sample_size * factor

    def prepare(self, run: ValuationRun, data: TrainData, out_dir: Path, assets: Assets,
                progress: bool = False) -> dict[str, Any]:
        s = run.spec
        uri = s.model.autoencoder or ""
        config = vq_config(vq_folder(uri, assets))
        factor, side = downsampling(config), int(data.images.shape[-1])
        if side % factor:
            raise BadInput(f"spec.dataset.resolution: {side} is not a multiple of the autoencoder's "
                               f"downsampling factor {factor}")
        t0 = time.perf_counter()
        latents = encode(load_vqmodel(uri, assets), data.images)
        encode_seconds = time.perf_counter() - t0
        full = load_full_unet(s.model.checkpoint, assets) if s.model.checkpoint else None
        if full is not None:
            want = (int(latents.shape[1]), int(latents.shape[-1]))
            got = (int(full.config.in_channels), int(full.config.sample_size))
            if got != want:
                raise ModelError(f"spec.model.checkpoint: the UNet takes {got[0]} channels at {got[1]}x{got[1]} "
                                   f"but the autoencoder's latents are {want[0]} channels at {want[1]}x{want[1]}")
        heads_dim = head_dim(list(s.model.architecture.block_out_channels))
        prepared = sparsify(run, latents, full, progress, attention_head_dim=heads_dim)
        heads = check_heads(prepared.sparsified.model)
        out_dir.mkdir(parents=True, exist_ok=True)
        prepared.sparsified.save(out_dir)
        prepared.full.save(out_dir / FULL_DIR)  # the unpruned UNet: `datacredit evaluate` fine-tunes it
        np.save(out_dir / LATENTS, latents.numpy())
        (out_dir / AUTOENCODER).write_text(json.dumps(
            {"uri": uri, "config": config, "scaling_factor": 1.0, "latent_shape": list(latents.shape[1:])},
            indent=1))
        info = prepared.info
        info["prune"]["attention"] = heads
        info["seconds"] = {"encode": encode_seconds, **info["seconds"]}
        return info

    def load(self, run: ValuationRun, out_dir: Path, data: TrainData, assets: Assets) -> LDMState:
        s = run.spec
        uri = s.model.autoencoder or ""
        saved = json.loads((out_dir / AUTOENCODER).read_text())
        if vq_config(vq_folder(uri, assets)) != saved["config"]:
            raise ModelError(f"spec.model.autoencoder: the VQModel at {uri} differs from the one prepare "
                               f"encoded the latents with ({out_dir / AUTOENCODER}); run prepare again")
        latents = torch.from_numpy(np.load(out_dir / LATENTS))
        if len(latents) != len(data.images):
            raise ModelError(f"{out_dir / LATENTS}: {len(latents)} latents for {len(data.images)} images; "
                               "run prepare again")
        return LDMState(Checkpoint.load(out_dir), latents, load_vqmodel(uri, assets), s.dataset.channels)

    def coalition(self, run: ValuationRun, state: LDMState, mask: np.ndarray, seeds: Seeds
                  ) -> tuple[torch.Tensor, dict[str, float]]:
        latents, seconds = unet_coalition(run, state.sparsified, state.latents, mask, seeds, clip_sample=False)
        t0 = time.perf_counter()
        images = decode(state.vq, latents, state.channels)
        seconds["decode"] = time.perf_counter() - t0
        return images, seconds

    def coalitions(self, run: ValuationRun, state: LDMState, masks: Sequence[np.ndarray], seeds: Sequence[Seeds]
                   ) -> list[tuple[torch.Tensor, dict[str, float]]]:
        out = []
        for latents, seconds in unet_coalitions(run, state.sparsified, state.latents, masks, seeds, clip_sample=False):
            t0 = time.perf_counter()
            images = decode(state.vq, latents, state.channels)
            out.append((images, {**seconds, "decode": time.perf_counter() - t0}))
        return out


FAMILY = LDMFamily()
