"""Coalition-size combinatorics shared by the designs and estimators.

Coalitions are grouped into *size classes*: class ``c`` holds the sizes ``c`` and ``n - c``, so a
coalition and its complement always fall in the same class. Class 0 holds ∅ and the full set.
"""

from __future__ import annotations

from math import comb

import numpy as np
from scipy.special import gammaln

#: Largest number of size-curve basis functions used by the regression adjustment.
MAX_SIZE_BASIS = 6


def size_class(sizes: np.ndarray, n: int) -> np.ndarray:
    """Class index ``min(s, n - s)`` of each coalition size."""
    sizes = np.asarray(sizes)
    return np.minimum(sizes, n - sizes)


def n_classes(n: int) -> int:
    """Number of classes with non-trivial coalitions (classes 1 .. n // 2)."""
    return n // 2


def pairs_in_class(n: int, c: int) -> int:
    """Number of complement pairs {S, N \\ S} in class ``c`` (exact integer)."""
    return comb(n, c) // 2 if 2 * c == n else comb(n, c)


def log_binom(n: int, k: np.ndarray) -> np.ndarray:
    """log C(n, k), elementwise."""
    k = np.asarray(k, dtype=float)
    return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)


def shapley_class_mass(n: int, classes: np.ndarray) -> np.ndarray:
    """Total Shapley-kernel weight of each class (sizes c and n - c), unnormalised.

    The kernel puts weight (n-1) / (C(n,s) s (n-s)) on every coalition of size s, so a whole size
    carries (n-1) / (s (n-s)).
    """
    c = np.asarray(classes, dtype=float)
    per_size = (n - 1) / (c * (n - c))
    return np.where(2 * c == n, per_size, 2 * per_size)


def uniform_class_mass(n: int, classes: np.ndarray) -> np.ndarray:
    """Probability of each class under the uniform measure on all 2^n coalitions."""
    c = np.asarray(classes)
    log_p = log_binom(n, c) - n * np.log(2.0)
    return np.where(2 * c == n, 1.0, 2.0) * np.exp(log_p)


def size_basis(sizes: np.ndarray, n: int, powers: np.ndarray) -> np.ndarray:
    """Columns ``x(1-x) u^k`` (x = s/n, u = 2x - 1) for k in ``powers``: size curves vanishing at 0 and n."""
    x = np.asarray(sizes, dtype=float)[:, None] / n
    return x * (1 - x) * (2 * x - 1) ** np.asarray(powers, dtype=float)[None, :]


def banzhaf_of_size_basis(n: int, powers: np.ndarray) -> np.ndarray:
    """Banzhaf value (identical for every player) of each size-basis column."""
    s = np.arange(n)
    p = np.exp(log_binom(n - 1, s) - (n - 1) * np.log(2.0))
    return p @ (size_basis(s + 1, n, powers) - size_basis(s, n, powers))
