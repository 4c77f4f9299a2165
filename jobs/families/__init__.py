"""Model families: how prepare builds the sparsified model and how a coalition fine-tunes and samples from it.

The worker owns storage, the data set and the property; a family owns the models. Built in: ``ddpm``
(pixel-space UNet), ``ldm`` (UNet on VQ-VAE latents) and ``sd-lora`` (Stable Diffusion plus a LoRA).
"""

from __future__ import annotations

import importlib

from .base import Assets, Family, TrainData

_MODULES = {"ddpm": ".ddpm", "ldm": ".ldm", "sd-lora": ".sdlora"}


def get_family(name: str) -> Family:
    """The family named in ``spec.model.family`` (imported on first use: each pulls in its own libraries)."""
    try:
        module = importlib.import_module(_MODULES[name], __name__)
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(sorted(_MODULES))}") from None
    return module.FAMILY


__all__ = ["Assets", "Family", "TrainData", "get_family"]
