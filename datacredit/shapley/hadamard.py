"""Hadamard matrices: orthogonal ±1 designs for the middle of the coalition-size range.

Rows of a Hadamard matrix H (H H^T = m I) read as coalitions (+1 = member) are as informative as
coalitions can be for a linear game, and any n of its columns stay exactly orthogonal. The kernel
design draws part of its complement pairs from them (see :mod:`datacredit.shapley.design`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy.linalg import hadamard as sylvester


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q**0.5) + 1))


def paley(q: int) -> np.ndarray:
    """Paley construction I: a Hadamard matrix of order q + 1 for a prime q ≡ 3 (mod 4)."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if x in residues else -1 for x in range(1, q)])
    S = np.zeros((q + 1, q + 1), dtype=int)
    S[0, 1:], S[1:, 0] = 1, -1
    S[1:, 1:] = chi[(np.arange(q)[None, :] - np.arange(q)[:, None]) % q]
    return S + np.eye(q + 1, dtype=int)


def hadamard_for(n: int) -> np.ndarray:
    """The smallest Sylvester or Paley-I Hadamard matrix of order m > n, normalised: row 0 and column 0 all +1."""
    m = 4 * (n // 4 + 1)
    while True:
        if m & (m - 1) == 0:
            H = sylvester(m)
            break
        if _is_prime(m - 1) and (m - 1) % 4 == 3:
            H = paley(m - 1)
            break
        m += 4
    H = H * H[:, :1]  # sign flips of rows and columns keep a Hadamard matrix Hadamard
    return H * H[:1]


def orthogonal_coalitions(n: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless blocks of coalitions from n >= 2 random non-constant columns of a Hadamard matrix.

    Within a block every player is in half the rows and every two players' ±1 columns are
    orthogonal; a random choice of columns makes each row a uniformly random coalition of its
    size. Rows come in random order; row 0 (the full set) and rows trivial on the chosen columns
    are skipped.
    """
    if n < 2:
        raise ValueError("orthogonal coalitions need at least 2 players")
    H = hadamard_for(n)
    m = len(H)
    while True:
        block = H[:, 1 + rng.choice(m - 1, n, replace=False)] > 0
        for row in block[1:][rng.permutation(m - 1)]:
            if 0 < row.sum() < n:
                yield row
