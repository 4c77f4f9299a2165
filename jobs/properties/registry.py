"""The property protocol and a registry of properties by name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class Property(Protocol):
    """A global property F of a model, computed from its samples; higher is better.

    ``fit`` runs once per run (the prepare step) and again in every coalition worker: it must cache what it
    builds in ``cache_dir`` (a run-local directory) and load it from there when present, so later calls are
    cheap and all workers score with identical state; ``fit(None, None, cache_dir)`` must load a state
    fitted before without the reference images. ``score`` takes samples (N, C, H, W) in [-1, 1].
    """

    name: str

    def fit(
        self, reference_images: torch.Tensor | None, labels: np.ndarray | None, cache_dir: Path, seed: int = 0
    ) -> dict[str, Any]: ...

    def score(self, samples: torch.Tensor) -> float: ...


PropertyFactory = Callable[..., Property]
_REGISTRY: dict[str, PropertyFactory] = {}


def register_property(name: str, factory: PropertyFactory, *, replace: bool = False) -> None:
    """Register ``factory(**options) -> Property`` under ``name``."""
    if name in _REGISTRY and not replace:
        raise ValueError(f"property {name!r} is already registered")
    _REGISTRY[name] = factory


def get_property(name: str, **options: Any) -> Property:
    """A fresh property instance by name; ``options`` go to its factory."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown property {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None
    return factory(**options)


def available_properties() -> list[str]:
    """Registered property names."""
    return sorted(_REGISTRY)
