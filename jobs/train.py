"""DDPM training / fine-tuning (epsilon prediction, 1000-step linear betas) with an optional EMA.

Matches the paper's optimiser: Adam with a constant learning rate, gradient clipping at 1.0, antithetic
timestep sampling, and an EMA with diffusers' default schedule (decay (1+t)/(10+t), capped at 0.9999).
For coalition fine-tuning pass the sparsified checkpoint's :class:`EMAState`: its weights *and* step
count continue, so the EMA keeps part of its pre-coalition memory, as in the paper.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel

from datacredit.seeds import derived_seed

from .device import pick_device
from .unet import load_unet, read_meta, save_unet

NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": True,
}

Progress = Callable[[int, float], None]


@dataclass
class EMAState:
    """EMA weights (a model with the trained model's structure) and the EMA's optimisation step count."""

    model: UNet2DModel
    step: int = 0
    decay: float = 0.9999

    def save(self, directory: str | Path) -> Path:
        """Save as a UNet directory with the step count and decay in its meta."""
        return save_unet(self.model, directory, meta={"ema_step": self.step, "ema_decay": self.decay})

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> EMAState:
        """Load what :meth:`save` wrote."""
        meta = read_meta(directory)
        step, decay = int(meta.get("ema_step", 0)), float(meta.get("ema_decay", 0.9999))
        return cls(load_unet(directory, device), step, decay)


@dataclass
class Checkpoint:
    """A model to keep training (raw weights) and its EMA (or None), saved as ``model/`` + ``ema/``."""

    model: UNet2DModel
    ema: EMAState | None = None

    @property
    def inference_model(self) -> UNet2DModel:
        """The EMA weights when there is an EMA, else the raw model: what to sample from."""
        return self.ema.model if self.ema is not None else self.model

    def save(self, directory: str | Path, meta: dict | None = None) -> Path:
        """Write ``directory/model`` and, with an EMA, ``directory/ema``."""
        directory = Path(directory)
        save_unet(self.model, directory / "model", meta=meta)
        if self.ema is not None:
            self.ema.save(directory / "ema")
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> Checkpoint:
        """Load what :meth:`save` wrote (a bare UNet directory loads as a model without EMA)."""
        directory = Path(directory)
        if not (directory / "model").is_dir():
            return cls(load_unet(directory, device))
        ema = EMAState.load(directory / "ema", device) if (directory / "ema").is_dir() else None
        return cls(load_unet(directory / "model", device), ema)


@dataclass
class TrainResult(Checkpoint):
    """The trained model (trained in place), its EMA (or None), per-step losses and wall seconds."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def noise_scheduler() -> DDPMScheduler:
    """The training noise schedule shared by training and sampling."""
    return DDPMScheduler(**NOISE_SCHEDULE)


def progress_reporter(progress: Progress | bool | None, steps: int, desc: str) -> Progress | None:
    """A ``callback(step, loss)``: the one given, ten printed lines labelled ``desc`` for True, else None."""
    if callable(progress):
        return progress
    if progress:
        every = max(1, steps // 10)
        label = f"{desc}: " if desc else ""

        def report(step: int, loss: float) -> None:
            if step % every == 0 or step == steps:
                print(f"{label}step {step}/{steps} loss {loss:.4f}", flush=True)

        return report
    return None


def draw_batch(data: torch.Tensor, batch_size: int, gen: torch.Generator, noise_gen: torch.Generator, n_t: int,
               antithetic: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training batch: images drawn with replacement by ``gen`` (on ``data``'s device), then timesteps
    (antithetic pairs t, T-1-t) and noise ε by ``noise_gen`` (on CPU), in this order."""
    idx = torch.randint(len(data), (batch_size,), generator=gen)
    x0 = data[idx.to(data.device)]
    if antithetic:
        half = torch.randint(n_t, ((batch_size + 1) // 2,), generator=noise_gen)
        t = torch.cat([half, n_t - 1 - half])[:batch_size]
    else:
        t = torch.randint(n_t, (batch_size,), generator=noise_gen)
    return x0, t, torch.randn(x0.shape, generator=noise_gen)


def train_ddpm(
    model: UNet2DModel,
    images: torch.Tensor,
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 128,
    seed: int = 0,
    ema: EMAState | bool | None = True,
    progress: Progress | bool | None = None,
    grad_clip: float = 1.0,
    antithetic: bool = True,
    device: torch.device | str | None = None,
    desc: str = "",
    noise_seed: int | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``steps`` Adam steps on ``images`` (N, C, H, W) in [-1, 1].

    Each batch draws ``batch_size`` images uniformly *with replacement*, so tiny coalitions work.
    ``ema``: ``True`` starts a fresh EMA from the current weights, an :class:`EMAState` continues it (a
    copy; the argument is not modified), ``None``/``False`` trains without one. With no images or no steps
    the model is returned unchanged. Two CPU generators hold all randomness, so a run is reproducible on
    the same device and thread count: ``seed`` draws which images each batch holds, ``noise_seed`` (default
    derived from ``seed``) the timesteps and the noise ε. Kept apart, the timesteps and ε of step t are the
    same for every data set given one ``noise_seed``: common random numbers across coalitions.
    ``progress``: a ``callback(step, loss)``, or True to print ten lines labelled ``desc``. Sample from
    ``result.inference_model``.
    """
    t0 = time.perf_counter()
    device = pick_device(str(device) if device else None)
    model.to(device)
    if ema is True:
        state: EMAState | None = EMAState(copy.deepcopy(model).eval(), 0)
    elif isinstance(ema, EMAState):
        state = EMAState(copy.deepcopy(ema.model).to(device).eval(), ema.step, ema.decay)
    else:
        state = None
    losses: list[float] = []
    if steps <= 0 or len(images) == 0:
        return TrainResult(model, state, losses, time.perf_counter() - t0)

    gen = torch.Generator("cpu").manual_seed(seed)
    noise_gen = torch.Generator("cpu").manual_seed(derived_seed(seed, "train-noise") if noise_seed is None
                                                   else noise_seed)
    sched = noise_scheduler()
    data = images.to(device, torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    averager = None
    if state is not None:
        averager = EMAModel(state.model.parameters(), decay=state.decay, use_ema_warmup=False)
        averager.optimization_step = state.step
    report = progress_reporter(progress, steps, desc)
    n_t = sched.config.num_train_timesteps
    model.train()
    for step in range(1, steps + 1):
        x0, t, noise = draw_batch(data, batch_size, gen, noise_gen, n_t, antithetic)
        noise, t = noise.to(device), t.to(device)
        xt = sched.add_noise(x0, noise, t)
        loss = F.mse_loss(model(xt, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        if averager is not None:
            averager.step(model.parameters())
        losses.append(float(loss.detach()))
        if report:
            report(step, losses[-1])
    if averager is not None and state is not None:
        averager.copy_to(state.model.parameters())
        state.step = int(averager.optimization_step)
    model.eval()
    return TrainResult(model, state, losses, time.perf_counter() - t0)
