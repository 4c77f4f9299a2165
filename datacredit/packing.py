"""How many coalitions one worker packs (fine-tunes and samples together), and cutting work into batches.

Both executors hand a worker batches of up to :func:`coalitions_per_job` coalitions; the worker packs them into
one program (``datacredit.jobs.packed``). ``execution.coalitionsPerJob`` sets the size; unset, it is chosen from
the pruned model's size and the worker's memory with the estimate below, capped at :data:`MAX_PACK`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from .spec import ValuationRun

T = TypeVar("T")

MAX_PACK = 16  # beyond this a pack gains little and a failure costs more coalitions
BYTES_PER_PARAM = 24  # fp32 weights, gradient, Adam's two moments, the EMA and the sampling copy: 6 x 4 bytes
ACTIVATION_BYTES = 96  # per image pixel and channel of the widths: fp32, about 24 tensors kept for backward
MEMORY_SHARE = 0.5  # of the worker's memory, packs may plan to use


def pack_bytes(params: int, batch_size: int, pixels: int, widths: int) -> int:
    """Estimated memory of one packed coalition: its optimiser state plus its activations."""
    return params * BYTES_PER_PARAM + batch_size * pixels * widths * ACTIVATION_BYTES


def coalitions_per_job(run: ValuationRun, prepared: dict[str, Any], memory_bytes: int) -> int:
    """``execution.coalitionsPerJob``, else as many coalitions as fit in :data:`MEMORY_SHARE` of
    ``memory_bytes`` by :func:`pack_bytes` (at least 1, at most :data:`MAX_PACK`). ``prepared``: the prepare
    step's result (``paramsPruned``, ``resolution``)."""
    s = run.spec
    if s.execution.coalitions_per_job:
        return s.execution.coalitions_per_job
    arch = getattr(s.model, "architecture", None)
    widths = sum(arch.block_out_channels) if arch is not None else 0
    side = int(prepared.get("resolution") or 0)
    per = pack_bytes(int(prepared.get("paramsPruned") or 0), s.method.finetune.batch_size, side * side, widths)
    if per <= 0:
        return 1
    return max(1, min(MAX_PACK, int(memory_bytes * MEMORY_SHARE // per)))


def batches(items: Sequence[T], size: int) -> list[list[T]]:
    """``items`` in order, cut into lists of at most ``size``."""
    size = max(1, size)
    return [list(items[lo : lo + size]) for lo in range(0, len(items), size)]
