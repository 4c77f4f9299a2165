"""Device, dtype and seeding helpers for the GPU workloads (CPU fallback)."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def pick_device(prefer: str | None = None) -> torch.device:
    """Return ``prefer`` if given, else CUDA when available, else CPU."""
    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a CPU generator seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return torch.Generator("cpu").manual_seed(seed)


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads (default: ``DATACREDIT_THREADS``, else 1); return it.

    One thread is the default because OpenMP's spinning barriers make multi-threaded CPU training many
    times slower as soon as another process competes for the cores (parallel coalitions, the control
    plane in tests); on a GPU the CPU thread count hardly matters.
    """
    if n is None:
        n = int(os.environ.get("DATACREDIT_THREADS", "0")) or 1
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()
