"""The property protocol and a registry of properties by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from datacredit.spec import PropertySpec, SpecError


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


def unregister_property(name: str) -> None:
    """Remove a property added with :func:`register_property` (a plugin unloaded, a test cleaned up)."""
    _REGISTRY.pop(name, None)


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


def _factory_of(spec: PropertySpec) -> PropertyFactory:
    if ":" in spec.name:
        from .custom import CustomProperty

        return CustomProperty.from_spec
    try:
        return _REGISTRY[spec.name]
    except KeyError:
        raise SpecError("manifest", [("spec.property.name", f"unknown property {spec.name!r}; known: "
                                      f"{', '.join(sorted(_REGISTRY))}, or module:function")]) from None


def _unused(spec: PropertySpec, factory: PropertyFactory) -> list[str]:
    accepted = inspect.signature(factory).parameters
    given = {"weights": spec.weights, "head": spec.head, "quantile": spec.quantile, "clusters": spec.clusters,
             "options": spec.options or None}
    return [k for k, v in given.items() if v is not None and k not in accepted]


def check_property(spec: PropertySpec) -> list[tuple[str, str]]:
    """(field, problem) for an unknown property name or spec.property fields it does not use; builds nothing."""
    try:
        factory = _factory_of(spec)
    except SpecError as e:
        return list(e.problems)
    return [(f"spec.property.{k}", f"property {spec.name!r} does not use it") for k in _unused(spec, factory)]


def property_for(spec: PropertySpec, fetch: Callable[[str, str], Path]) -> Property:
    """The property a manifest names, with the ``spec.property`` fields its factory accepts.

    ``weights`` and ``head`` are URIs resolved to local paths with ``fetch(uri, field)``. A field set in the
    manifest that the property does not take is an error naming the field, not silently ignored.
    """
    factory = _factory_of(spec)
    unused = _unused(spec, factory)
    if unused:
        raise SpecError("manifest", [(f"spec.property.{k}", f"property {spec.name!r} does not use it") for k in unused])
    given = {
        "weights": fetch(spec.weights, "spec.property.weights") if spec.weights else None,
        "head": fetch(spec.head, "spec.property.head") if spec.head else None,
        "quantile": spec.quantile,
        "clusters": spec.clusters,
        "options": dict(spec.options) if spec.options else None,
    }
    kwargs = {k: v for k, v in given.items() if v is not None}
    return factory(spec.name, **kwargs) if ":" in spec.name else factory(**kwargs)
