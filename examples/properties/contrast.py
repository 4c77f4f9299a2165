"""An example custom property: how far generated images are from a flat grey, relative to the reference.

Name it in a manifest as ``spec.property.name: contrast:relative_contrast`` and make this folder importable
(``PYTHONPATH=examples/properties datacredit run ...``, or install the module in the worker image).
"""

from __future__ import annotations

import torch

from datacredit.jobs.properties.custom import PropertyContext


def relative_contrast(images: torch.Tensor, context: PropertyContext) -> float:
    """Mean per-image pixel standard deviation of the samples over the reference images' (1 = as contrasted
    as the real data). ``spec.property.options.cap`` (a string, default "2") caps the ratio, so washed-out
    samples score low and noise cannot score arbitrarily high."""
    cap = float(context.options.get("cap", "2"))
    spread = images.flatten(1).std(dim=1).mean()
    if context.reference is None:
        return float(spread)
    return float(torch.clamp(spread / context.reference.flatten(1).std(dim=1).mean(), max=cap))
