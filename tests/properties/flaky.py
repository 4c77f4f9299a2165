"""A test property that fails once, on a chosen call: how a coalition failing inside a pack is exercised.

``spec.property.options.counter`` names a file that counts calls (one worker process at a time);
``options.fail_at`` is the call that raises (1-based).
"""

from __future__ import annotations

from pathlib import Path

import torch

from datacredit.jobs.properties.custom import PropertyContext


def fails_once(images: torch.Tensor, context: PropertyContext) -> float:
    """Mean pixel value of the samples; raises on call ``fail_at``."""
    counter = Path(context.options["counter"])
    calls = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(calls))
    if calls == int(context.options["fail_at"]):
        raise RuntimeError(f"injected failure on call {calls}")
    return float(images.mean())
