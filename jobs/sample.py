"""Deterministic DDIM sampling from a UNet (diffusers ``DDIMScheduler``)."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, UNet2DModel

from .train import NOISE_SCHEDULE


def ddim_scheduler(clip_sample: bool = True) -> DDIMScheduler:
    """DDIM over the training noise schedule (final alpha 1, leading spacing); x0 is clipped to [-1, 1]
    unless ``clip_sample`` is False (latents, which are not bounded)."""
    return DDIMScheduler(**{**NOISE_SCHEDULE, "clip_sample": clip_sample}, set_alpha_to_one=True)


@torch.inference_mode()
def sample_ddim(
    model: UNet2DModel,
    n: int,
    steps: int = 25,
    seed: int = 0,
    batch_size: int = 256,
    eta: float = 0.0,
    device: torch.device | str | None = None,
    clip_sample: bool = True,
) -> torch.Tensor:
    """Generate ``n`` images (n, C, H, W) on CPU in [-1, 1] with ``steps`` DDIM steps (``clip_sample=False``:
    unbounded samples such as latents, neither x0 nor the result clipped).

    All noise comes from a CPU generator seeded with ``seed`` and is drawn per image up front, so for
    ``eta=0`` the result does not depend on ``batch_size``.
    """
    device = torch.device(device) if device else next(model.parameters()).device
    model = model.to(device).eval()
    c, s = int(model.config.in_channels), int(model.config.sample_size)
    gen = torch.Generator("cpu").manual_seed(seed)
    x_all = torch.randn(n, c, s, s, generator=gen)
    sched = ddim_scheduler(clip_sample)
    sched.set_timesteps(steps)
    extra = torch.randn(len(sched.timesteps), n, c, s, s, generator=gen) if eta > 0 else None
    out = []
    for lo in range(0, n, batch_size):
        x = x_all[lo : lo + batch_size].to(device)
        for i, t in enumerate(sched.timesteps):
            eps = model(x, t.to(device)).sample
            noise = extra[i, lo : lo + batch_size].to(device) if extra is not None else None
            x = sched.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        out.append((x.clamp(-1, 1) if clip_sample else x).float().cpu())
    return torch.cat(out) if out else torch.empty(0, c, s, s)
