"""Robustness checks reported with a payout: near-duplicate images shared by contributors, and splitting.

**Near duplicates.** Every image of ``prepare/dataset.npz`` gets a 128-bit difference hash (dHash): grayscale,
area-averaged down to 8 × 9 and 9 × 8, one bit per horizontal and per vertical neighbour pair (brightness falls
by more than :data:`DHASH_MARGIN` of 255). Two images whose hashes differ in at most :data:`DUP_DISTANCE` bits are
near duplicates; the check counts them per pair of contributors (the same data sold twice) and within each.

**Splitting.** :func:`split_check` replaces one contributor by two halves that are perfect substitutes (either
half alone adds what the whole did, as duplicated or highly redundant data does) and recomputes exact Shapley
values. Pro-rata is split-neutral by construction; Shapley gives each half less than the whole had, but the two
halves together get at least as much, more when the contributor's data overlaps another's.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from . import layout
from .storage import Storage, StorageError, read_json

DUP_DISTANCE = 6  # bits of 128
DHASH_MARGIN = 4.0  # a neighbour pair sets its bit only when brightness falls by more than this (of 255)
HASH = (f"dHash 128 bits: grayscale area-averaged to 8x9 and 9x8, one bit per neighbour pair whose brightness "
        f"falls by more than {DHASH_MARGIN:g} of 255")
SPLIT_MAX_PLAYERS = 10  # the split game of n players has 2^(n+1) coalitions


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights averaging pixels into ``n_out`` equal bins, fractional overlaps included."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    pix = np.arange(n_in)
    w = np.clip(np.minimum(edges[1:, None], pix + 1) - np.maximum(edges[:-1, None], pix), 0, None)
    return w / w.sum(axis=1, keepdims=True)


def _gradient_bits(small: np.ndarray, axis: int) -> np.ndarray:
    """(n, 64) bits: brightness falls by more than :data:`DHASH_MARGIN` to the next cell along ``axis``."""
    diff = np.diff(small, axis=axis)
    return (-diff > DHASH_MARGIN).reshape(len(small), 64)


def dhash(images: np.ndarray, chunk: int = 1024, max_floats: int = 1 << 22) -> np.ndarray:
    """(N, 2) uint64 difference hashes of (N, C, H, W) or (N, H, W) uint8 images of any size: the row gradients
    of an 8 x 9 and the column gradients of a 9 x 8 area-averaged grayscale copy. The dead zone of
    :data:`DHASH_MARGIN` keeps flat regions from flipping bits on noise. At most ``chunk`` images, and at most
    ``max_floats`` pixel values, are converted to float at a time (large images: fewer a chunk)."""
    if images.ndim == 3:
        images = images[:, None]
    n, c, h, w = images.shape
    chunk = max(1, min(chunk, max_floats // max(c * h * w, 1)))
    luma = np.array([0.299, 0.587, 0.114]) if c == 3 else np.full(c, 1.0 / c)
    rows8, cols9 = _area_matrix(h, 8), _area_matrix(w, 9).T
    rows9, cols8 = _area_matrix(h, 9), _area_matrix(w, 8).T
    out = np.empty((n, 2), dtype=np.uint64)
    for start in range(0, n, chunk):
        gray = np.einsum("nchw,c->nhw", images[start:start + chunk].astype(np.float64), luma)
        bits = np.concatenate([_gradient_bits(rows8 @ gray @ cols9, 2), _gradient_bits(rows9 @ gray @ cols8, 1)],
                              axis=1)
        out[start:start + chunk] = np.packbits(bits, axis=1).view(">u8").reshape(-1, 2)
    return out


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between (..., 2) uint64 hashes, broadcast."""
    return (np.bitwise_count(a[..., 0] ^ b[..., 0]) + np.bitwise_count(a[..., 1] ^ b[..., 1])).astype(np.int64)


def near_duplicates(hashes: np.ndarray, owner: np.ndarray, names: Sequence[str], threshold: int = DUP_DISTANCE,
                    cells: int = 2**22) -> dict[str, Any]:
    """Near-duplicate image pairs (Hamming distance ≤ ``threshold``) between and within contributors; distances
    are computed between distinct hashes, ``cells`` at a time."""
    uniq, inv = np.unique(hashes, axis=0, return_inverse=True)
    k, m = len(names), len(uniq)
    counts = np.zeros((m, k))
    np.add.at(counts, (inv.ravel(), owner), 1)
    pairs, near_any = np.zeros((k, k)), np.zeros((m, k), dtype=bool)
    step = max(1, cells // max(m, 1))
    for start in range(0, m, step):
        near = (hamming(uniq[start:start + step, None], uniq[None, :]) <= threshold).astype(np.float64)
        nc = near @ counts  # images of each contributor near each hash of the chunk
        pairs += counts[start:start + step].T @ nc
        near_any[start:start + step] = nc > 0
    elsewhere = {}
    for a in range(k):
        others = np.delete(near_any, a, axis=1).any(axis=1)
        elsewhere[names[a]] = int(counts[others, a].sum())
    shared = counts.T @ near_any  # [a, b]: images of a with a near duplicate at b
    between = [{"a": names[a], "b": names[b], "imagePairs": int(pairs[a, b]), "imagesOfA": int(shared[a, b]),
                "imagesOfB": int(shared[b, a])} for a in range(k) for b in range(a + 1, k) if pairs[a, b] > 0]
    between.sort(key=lambda p: (-p["imagePairs"], p["a"], p["b"]))
    per = counts.sum(axis=0)
    within = {names[a]: int((pairs[a, a] - per[a]) // 2) for a in range(k) if pairs[a, a] > per[a]}
    return {"status": "ok", "hash": HASH, "threshold": threshold, "images": int(len(hashes)), "contributors": k,
            "imagesWithDuplicateElsewhere": sum(elsewhere.values()),
            "perContributor": {n: c for n, c in elsewhere.items() if c}, "pairs": between, "pairsWithin": within}


def contributor_names(store: Storage, fallback: Sequence[str]) -> tuple[list[str], str]:
    """Player / owner-index order of the run: manifest.json's contributors, else ``fallback`` sorted (the order
    prepare gives them); with where the names came from."""
    if store.exists(layout.MANIFEST):
        return [c["name"] for c in read_json(store, layout.MANIFEST)["contributors"]], layout.MANIFEST
    return sorted(fallback), "results (sorted by name, no manifest.json)"


def decoded_bytes(store: Storage) -> int | None:
    """The size of the run's decoded images (images x channels x resolution², from prepare/result.json and
    manifest.json) without reading the dataset; None when the run does not say."""
    try:
        prep = read_json(store, layout.PREPARE_RESULT)
        channels = read_json(store, layout.MANIFEST)["manifest"]["spec"]["dataset"].get("channels", 3)
        return int(prep["images"]) * int(channels) * int(prep["resolution"]) ** 2
    except (FileNotFoundError, ValueError, KeyError, TypeError, StorageError):
        return None


def duplicate_check(store: Storage, fallback_names: Sequence[str], threshold: int = DUP_DISTANCE,
                    max_bytes: int | None = None) -> dict[str, Any]:
    """:func:`near_duplicates` on the run's ``prepare/dataset.npz``; a ``status`` and ``note`` when it cannot run.
    With ``max_bytes``, a dataset whose decoded images may be larger (or whose size the run does not say) is not
    read: the check is ``skipped`` (a small process such as the operator's must not load a large dataset)."""
    if not store.exists(layout.DATASET):
        return {"status": "missing", "note": f"{layout.DATASET} not found in {store.uri}: near duplicates not checked"}
    if max_bytes is not None and ((size := decoded_bytes(store)) is None or size > max_bytes):
        about = "of unknown size" if size is None else f"about {size / 2**20:.0f} MiB decoded"
        return {"status": "skipped", "note": f"{layout.DATASET} is {about}, more than the {max_bytes / 2**20:.0f} "
                                             "MiB checked here: run `datacredit payout` where memory allows"}
    try:
        with np.load(io.BytesIO(store.read_bytes(layout.DATASET))) as z:
            images, owner = z["images"], np.asarray(z["owner"], dtype=np.int64)
    except (OSError, ValueError, KeyError, StorageError) as e:
        return {"status": "unreadable", "note": f"{layout.DATASET}: {type(e).__name__}: {e}"}
    names, source = contributor_names(store, fallback_names)
    if len(images) != len(owner) or (len(owner) and (owner.min() < 0 or owner.max() >= len(names))):
        return {"status": "unreadable", "note": f"{layout.DATASET}: owner index does not match {len(names)} "
                                                f"contributors of {source}"}
    return {**near_duplicates(dhash(images), owner, names, threshold), "namesFrom": source}


def _subsets(n: int) -> list[frozenset[int]]:
    """All 2^n coalitions of players 0..n-1."""
    return [frozenset(s) for r in range(n + 1) for s in itertools.combinations(range(n), r)]


def exact_shapley(game: Mapping[frozenset[int], float], n: int) -> np.ndarray:
    """Exact Shapley values of a complete game with :mod:`datacredit.shapley`'s ``exact`` estimator."""
    from .shapley import estimate_from_table

    rows = [{"members": sorted(s), "utility": float(game[s])} for s in _subsets(n)]
    return np.asarray(estimate_from_table(rows, n_players=n, method="exact").values)


def split_game(game: Mapping[frozenset[int], float], n: int, player: int) -> dict[frozenset[int], float]:
    """``player`` replaced by two perfect substitutes, ``player`` and the new player ``n``: a coalition is worth what
    it was worth with ``player`` if it holds either half."""
    return {s: game[(s - {n}) | ({player} if n in s else frozenset())] for s in _subsets(n + 1)}


def split_check(game: Mapping[frozenset[int], float], names: Sequence[str], images: Sequence[int],
                player: int) -> dict[str, Any]:
    """Shapley and pro-rata totals before and after ``names[player]`` splits into two substitute halves."""
    n = len(names)
    before, after = exact_shapley(game, n), exact_shapley(split_game(game, n, player), n + 1)
    half_a = images[player] // 2
    halves = [*images[:player], half_a, *images[player + 1:], images[player] - half_a]
    share, share_after = Fraction(images[player], sum(images)), Fraction(halves[player] + halves[n], sum(halves))
    return {"contributor": names[player], "shapleyBefore": float(before[player]),
            "shapleyHalf": float(after[player]), "shapleyHalvesTotal": float(after[player] + after[n]),
            "shapleyGain": float(after[player] + after[n] - before[player]),
            "othersBefore": {names[i]: float(before[i]) for i in range(n) if i != player},
            "othersAfter": {names[i]: float(after[i]) for i in range(n) if i != player},
            "proRataShareBefore": str(share), "proRataShareHalvesTotal": str(share_after)}


def split_report(utilities: Sequence[Mapping[str, Any]], names: Sequence[str],
                 images: Sequence[int]) -> dict[str, Any]:
    """:func:`split_check` for every contributor of a run whose stored utilities hold all 2^n coalitions."""
    n = len(names)
    sums: dict[frozenset[int], list[float]] = {}
    for row in utilities:
        sums.setdefault(frozenset(int(i) for i in row["members"]), []).append(float(row["utility"]))
    if n > SPLIT_MAX_PLAYERS or len(sums) != 2**n or any(len(s) != 0 and max(s) >= n for s in sums):
        return {"status": "skipped", "note": f"needs every one of the 2^n coalitions of at most "
                                             f"{SPLIT_MAX_PLAYERS} contributors (estimator exact); this run has "
                                             f"{len(sums)} coalitions of {n} contributors"}
    game = {s: float(np.mean(u)) for s, u in sums.items()}
    checks = [split_check(game, names, images, i) for i in range(n)]
    return {"status": "ok", "assumption": "each half alone adds what the whole did (perfect substitutes)",
            "contributors": {c["contributor"]: {k: c[k] for k in ("shapleyBefore", "shapleyHalf",
                                                                  "shapleyHalvesTotal", "shapleyGain")}
                             for c in checks},
            "proRata": "split-neutral: the halves' image shares add up to the whole's"}
