"""A user's property: ``spec.property.name: mypackage.props:sharpness`` calls ``sharpness(images, context)``.

The function receives the generated images (N, C, H, W) float in [-1, 1] and a :class:`PropertyContext`
(reference images, labels, a cache folder, the manifest's ``spec.property.options``, the seed) and returns a
float, higher is better. The module must be importable where the workers run: installed in the worker image
or on ``PYTHONPATH`` (``datacredit run`` also looks in the current directory).
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datacredit.spec import SpecError

REFERENCE_FILE = "custom-reference.npz"


@dataclass
class PropertyContext:
    """What a custom property function gets besides the images."""

    reference: torch.Tensor | None  # real images in [-1, 1]: spec.property.reference, else the training images
    labels: np.ndarray | None  # class of each reference image (from class subfolders), or None
    cache_dir: Path  # a run-local folder for anything the function wants to compute once
    options: dict[str, str] = field(default_factory=dict)  # spec.property.options
    seed: int = 0


def load_function(target: str) -> Callable[..., Any]:
    """Import ``module:function``; errors name ``spec.property.name`` and say what to check."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise SpecError("manifest", [("spec.property.name", f"{target!r}: expected module:function")])
    if "" not in sys.path:
        sys.path.insert(0, "")  # the current directory, as `python -c` would have it
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SpecError("manifest", [("spec.property.name", f"cannot import {module_name!r} ({e}); install it "
                                      "in the worker image or put it on PYTHONPATH")]) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise SpecError("manifest", [("spec.property.name", f"{module_name!r} has no function {attr!r}")])
    return fn


class CustomProperty:
    """Adapts ``function(images, context) -> float`` to the property protocol."""

    def __init__(self, target: str, options: dict[str, str] | None = None):
        self.name = target
        self.function = load_function(target)
        self.options = dict(options or {})
        self.context: PropertyContext | None = None

    @classmethod
    def from_spec(cls, target: str, options: dict[str, str] | None = None) -> CustomProperty:
        """The factory :func:`property_for` calls."""
        return cls(target, options)

    def fit(self, reference_images: torch.Tensor | None, labels: np.ndarray | None, cache_dir: Path,
            seed: int = 0) -> dict[str, Any]:
        """Store the reference images in ``cache_dir`` (uint8) so coalition workers get the same context."""
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        path = cache_dir / REFERENCE_FILE
        if reference_images is not None:
            u8 = ((reference_images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
            np.savez_compressed(path, images=u8, labels=np.asarray(labels if labels is not None else []))
        elif not path.exists():
            raise FileNotFoundError(f"{path}: fit the property with reference images first")
        with np.load(path) as z:
            ref = torch.from_numpy(z["images"]).float().div(127.5).sub(1.0)
            lab = z["labels"] if len(z["labels"]) else None
        self.context = PropertyContext(ref, lab, cache_dir, self.options, seed)
        return {"function": self.name, "reference": len(ref)}

    def score(self, samples: torch.Tensor) -> float:
        if self.context is None:
            raise RuntimeError(f"property {self.name!r}: call fit() before score()")
        value = self.function(samples, self.context)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"property {self.name!r} returned {type(value).__name__}, expected a float") from None
        if not math.isfinite(value):
            raise ValueError(f"property {self.name!r} returned {value}")
        return value
