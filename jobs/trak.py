"""D-TRAK features (Zheng et al., 2024): randomly projected gradients of a diffusion model's output function.

For an image x the output function is D-TRAK's mean squared L2 norm of the model output,
f(x) = mean_d mean(ε_θ(x_t_d, t_d)²) with x_t_d = √ᾱ·x + √(1−ᾱ)·ε_d, averaged over ``timesteps`` fixed
(t_d, ε_d) draws that every image shares; its feature is φ(x) = Pᵀ ∇_θ f(x) with P a seeded Gaussian
matrix (entries N(0, 1/dim); as fast to draw as Rademacher signs on CPU). P is never held whole: each
parameter block's rows are regenerated in chunks from the seed for every batch of gradients, so features
cost memory for ``batch`` gradients and one chunk of P. :func:`datacredit.evaluation.trak_scores` turns
features into per-contributor scores. A text-conditional model (sd-lora) is attributed on its LoRA parameters,
each image with its caption's embedding (:class:`Conditioning`), as D-TRAK does for Stable Diffusion.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, vmap

from datacredit.seeds import derived_seed

from .train import noise_scheduler

#: rows of P generated at once (rows × dim floats: 64 MiB at dim 1,024)
CHUNK_ROWS = 16_384


def draws(timesteps: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared (t, ε) draws: ``timesteps`` evenly spaced training timesteps and seeded noise of ``shape``."""
    n_t = noise_scheduler().config.num_train_timesteps
    t = torch.linspace(0, n_t - 1, timesteps).round().long()
    noise = torch.randn((timesteps, *shape), generator=torch.Generator("cpu").manual_seed(
        derived_seed(seed, "trak-noise")))
    return t, noise


@dataclass
class Conditioning:
    """What a conditional model takes besides the noisy input: one ``encoder_hidden_states`` (L, D) per image
    (text embeddings), the parameters attributed (``trainable``: LoRA only, say; others are held fixed) and the
    model's own noise schedule (``alphas_cumprod``)."""

    embeddings: torch.Tensor  # (N, L, D), row i for image i
    trainable: Callable[[str], bool] = lambda name: True
    alphas_cumprod: torch.Tensor | None = None


def _attributed(model: torch.nn.Module, cond: Conditioning | None) -> dict[str, torch.Tensor]:
    keep = cond.trainable if cond else (lambda name: True)
    return {k: v.detach() for k, v in model.named_parameters() if keep(k)}


def output_gradients(model: torch.nn.Module, images: torch.Tensor, timesteps: int, seed: int, batch: int = 64,
                     cond: Conditioning | None = None) -> Iterator[torch.Tensor]:
    """∇_θ f(x) of the images in order, ``batch`` rows at a time (per-sample gradients by ``vmap``), flattened
    over the attributed parameters (all of ``model``'s, or ``cond.trainable``'s) in ``named_parameters()`` order.
    With ``cond`` the model is called with each image's ``encoder_hidden_states`` and its noise schedule."""
    device = next(model.parameters()).device
    params = _attributed(model, cond)
    fixed = {**{k: v.detach() for k, v in model.named_parameters() if k not in params}, **dict(model.named_buffers())}
    t, noise = draws(timesteps, tuple(images.shape[1:]), seed)
    cumprod = cond.alphas_cumprod if cond is not None and cond.alphas_cumprod is not None \
        else noise_scheduler().alphas_cumprod
    alpha = cumprod[t].view(-1, *[1] * (images.dim() - 1))
    t, noise, alpha = t.to(device), noise.to(device), alpha.to(device)
    model.eval()

    def f(p: dict[str, torch.Tensor], x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        xt = alpha.sqrt() * x.unsqueeze(0) + (1 - alpha).sqrt() * noise
        kwargs = {} if c is None else {"encoder_hidden_states": c.expand(timesteps, *c.shape)}
        return functional_call(model, (p, fixed), (xt, t), kwargs).sample.pow(2).mean()

    per_sample = vmap(grad(f), in_dims=(None, 0, 0 if cond is not None else None))
    with warnings.catch_warnings():  # attention has no batching rule on CPU: slower, still exact
        warnings.filterwarnings("ignore", message="There is a performance drop")
        for lo in range(0, len(images), batch):
            c = cond.embeddings[lo:lo + batch].to(device, torch.float32) if cond is not None else None
            grads = per_sample(params, images[lo:lo + batch].to(device, torch.float32), c)
            yield torch.cat([g.reshape(len(g), -1) for g in grads.values()], dim=1).cpu()


def project(grads: torch.Tensor, sizes: list[int], dim: int, seed: int) -> torch.Tensor:
    """``grads`` (B, Σ sizes) times the seeded Gaussian P (Σ sizes, dim) / √dim, built per block and chunk."""
    out = torch.zeros(len(grads), dim, dtype=torch.float64)
    start = 0
    for block, size in enumerate(sizes):
        for lo in range(0, size, CHUNK_ROWS):
            rows = min(CHUNK_ROWS, size - lo)
            gen = torch.Generator("cpu").manual_seed(derived_seed(seed, "trak-projection", block, lo))
            p = torch.randn(rows, dim, generator=gen)
            out += (grads[:, start + lo:start + lo + rows] @ p).double()
        start += size
    return out / dim ** 0.5


def dtrak_features(model: torch.nn.Module, images: torch.Tensor, *, dim: int = 1024, timesteps: int = 10,
                   seed: int = 0, batch: int = 512, cond: Conditioning | None = None) -> torch.Tensor:
    """φ of every image (N, dim), float64: projected output-function gradients, ``batch`` gradients per
    projection pass (each pass regenerates P: larger is faster, and holds batch × parameters floats). ``cond``:
    a conditional model's per-image embeddings and attributed parameters (:class:`Conditioning`)."""
    sizes = [p.numel() for p in _attributed(model, cond).values()]
    feats, pending, held = [], [], 0
    for g in output_gradients(model, images, timesteps, seed, cond=cond):
        pending.append(g)
        held += len(g)
        if held >= batch:
            feats.append(project(torch.cat(pending), sizes, dim, seed))
            pending, held = [], 0
    if pending:
        feats.append(project(torch.cat(pending), sizes, dim, seed))
    return torch.cat(feats) if feats else torch.empty(0, dim, dtype=torch.float64)
