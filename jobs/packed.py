"""Packed coalitions: K fine-tunings and samplings of one sparsified checkpoint run as one program.

Every coalition starts from the same sparsified checkpoint, so all K share one architecture: their weights are
stacked along a new leading axis and the UNet runs once per step under ``torch.func.vmap(functional_call)``
(HFTA's idea: fuse the models, not the processes). Each coalition keeps its own data stream, timesteps and
noise (its two seeds), its gradient clipping (per-model norm), Adam moments and EMA; Adam and the EMA are
element-wise, so on stacked tensors they do exactly what K separate ones do. The result of a coalition packed
with others equals its result alone within float tolerance (``tests/test_packed.py``).

``bf16=True`` runs the UNet's forward under bf16 autocast and ``compile=True`` wraps the vmapped forward in
``torch.compile``: what pays off on a GPU (``execution.precision`` / ``execution.compile``). Both work on CPU too,
where the tests check bf16 against fp32; no GPU has run them here.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor
from diffusers.training_utils import EMAModel
from torch.func import functional_call, vmap

from .sample import ddim_scheduler
from .train import Checkpoint, draw_batch, noise_scheduler


@dataclass(frozen=True)
class PackItem:
    """One coalition of a pack: its training images (N_k, C, H, W) and its two seeds (batches; noise)."""

    images: torch.Tensor
    seed: int
    noise_seed: int


@dataclass(frozen=True)
class PackOptions:
    """How a pack runs: the fine-tuning and sampling settings all its coalitions share."""

    steps: int
    lr: float
    batch_size: int
    n_samples: int
    ddim_steps: int
    grad_clip: float = 1.0
    clip_sample: bool = True
    sample_batch: int = 512
    bf16: bool = False  # the UNet's forward under bf16 autocast (for GPUs; values move within bf16 rounding)
    compile: bool = False  # torch.compile the vmapped forward (for long runs on GPUs)


def _stacked(model: torch.nn.Module, k: int, device: torch.device, grad: bool) -> dict[str, torch.Tensor]:
    """``k`` copies of ``model``'s parameters stacked on a new leading axis (leaf tensors)."""
    return {name: p.detach().to(device).unsqueeze(0).repeat(k, *([1] * p.dim())).requires_grad_(grad)
            for name, p in model.named_parameters()}


def _forward(model: UNet2DModel, options: PackOptions) -> Callable[..., torch.Tensor]:
    """``f(params, x, t) -> ε`` over stacked params (K, ...), inputs (K, B, ...) and timesteps (K, B) or a scalar."""

    def one(params: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (x, t)).sample

    def fused(params: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dims = (0, 0, 0 if t.dim() > 0 else None)
        cast = torch.autocast(x.device.type, torch.bfloat16) if options.bf16 else nullcontext()
        with cast:
            return vmap(one, in_dims=dims, randomness="different")(params, x, t).float()

    return torch.compile(fused) if options.compile else fused


def _clip(grads: list[torch.Tensor], max_norm: float) -> None:
    """Per-model :func:`torch.nn.utils.clip_grad_norm_` on stacked gradients (model k is index k of each)."""
    k = grads[0].shape[0]
    norms = torch.stack([g.reshape(k, -1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(k, *([1] * (g.dim() - 1))))


def finetune_packed(sparsified: Checkpoint, items: Sequence[PackItem], options: PackOptions,
                    device: torch.device) -> tuple[UNet2DModel, dict[str, torch.Tensor], list[list[float]]]:
    """Fine-tune K copies of ``sparsified`` together, each on its item's images, as :func:`~.train.train_ddpm`
    does one (Adam, per-model clipping, antithetic timesteps, the checkpoint's EMA continued).

    Returns the module the stacked weights run in, the stacked weights to sample from (the EMAs, else the raw
    weights) and each coalition's per-step losses."""
    k = len(items)
    model = copy.deepcopy(sparsified.model).to(device).train()
    for module in model.modules():  # SDPA has no vmap batching rule on CPU: it would loop over the models
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())
            module.scale = (module.to_k.out_features // module.heads) ** -0.5  # SDPA's scale, after pruning too
    params = _stacked(model, k, device, grad=True)
    ema = sparsified.ema
    ema_params = _stacked(ema.model, k, device, grad=False) if ema is not None else None
    losses: list[list[float]] = [[] for _ in items]
    if options.steps <= 0:
        return model.eval(), ema_params if ema_params is not None else params, losses
    forward = _forward(model, options)
    sched = noise_scheduler()
    n_t = sched.config.num_train_timesteps
    b = options.batch_size
    data = [item.images.to(device, torch.float32) for item in items]
    gens = [torch.Generator("cpu").manual_seed(item.seed) for item in items]
    noise_gens = [torch.Generator("cpu").manual_seed(item.noise_seed) for item in items]
    opt = torch.optim.Adam(list(params.values()), lr=options.lr)
    averager = None
    if ema is not None and ema_params is not None:
        averager = EMAModel(list(ema_params.values()), decay=ema.decay, use_ema_warmup=False)
        averager.optimization_step = ema.step
    for _ in range(options.steps):
        draws = [draw_batch(d, b, gen, ngen, n_t) for d, gen, ngen in zip(data, gens, noise_gens, strict=True)]
        x0_all, t_all, eps = (torch.stack(part).to(device) for part in zip(*draws, strict=True))
        xt = sched.add_noise(x0_all.flatten(0, 1), eps.flatten(0, 1), t_all.flatten()).view_as(x0_all)
        per_model = (forward(params, xt, t_all) - eps).pow(2).flatten(1).mean(1)
        opt.zero_grad(set_to_none=True)
        per_model.sum().backward()  # the models are independent: each gets its own loss's gradient
        if options.grad_clip:
            _clip([p.grad for p in params.values() if p.grad is not None], options.grad_clip)
        opt.step()
        if averager is not None:
            averager.step(list(params.values()))
        for i, value in enumerate(per_model.detach().cpu().tolist()):
            losses[i].append(value)
    if averager is None or ema_params is None:
        return model.eval(), {n: p.detach() for n, p in params.items()}, losses
    averager.copy_to(list(ema_params.values()))
    return model.eval(), ema_params, losses


@torch.no_grad()
def sample_packed(model: UNet2DModel, params: dict[str, torch.Tensor], seeds: Sequence[int], options: PackOptions,
                  device: torch.device) -> list[torch.Tensor]:
    """DDIM samples of each stacked model, drawn as :func:`~.sample.sample_ddim` draws them (noise per image from
    the model's seed, up front), so model k's samples equal ``sample_ddim`` of model k with ``seeds[k]``."""
    c, s, n = int(model.config.in_channels), int(model.config.sample_size), options.n_samples
    x_all = torch.stack([torch.randn(n, c, s, s, generator=torch.Generator("cpu").manual_seed(seed)) for seed in seeds])
    sched = ddim_scheduler(options.clip_sample)
    sched.set_timesteps(options.ddim_steps)
    forward = _forward(model, options)
    out = []
    for lo in range(0, n, options.sample_batch):
        x = x_all[:, lo : lo + options.sample_batch].to(device)
        for t in sched.timesteps:
            eps = forward(params, x, t.to(device))
            x = sched.step(eps.flatten(0, 1), t, x.flatten(0, 1)).prev_sample.view_as(x)
        out.append((x.clamp(-1, 1) if options.clip_sample else x).float().cpu())
    samples = torch.cat(out, dim=1) if out else torch.empty(len(seeds), 0, c, s, s)
    return list(samples.unbind(0))


def finetune_and_sample_packed(sparsified: Checkpoint, items: Sequence[PackItem], options: PackOptions,
                               device: torch.device | str | None = None) -> tuple[list[torch.Tensor], dict[str, float]]:
    """:func:`~.pipeline.finetune_and_sample` for K coalitions at once: each item's samples, and the pack's stage
    seconds (shared by its K coalitions). Sampling noise comes from each item's ``noise_seed``."""
    device = torch.device(device) if device else next(sparsified.model.parameters()).device
    t0 = time.perf_counter()
    model, params, _ = finetune_packed(sparsified, items, options, device)
    seconds = {"finetune": time.perf_counter() - t0}
    t0 = time.perf_counter()
    samples = sample_packed(model, params, [item.noise_seed for item in items], options, device)
    seconds["sample"] = time.perf_counter() - t0
    return samples, seconds

