"""The 8x8 digits demo: sklearn's digits as PNG bytes, split into contributors, plus planted bad ones.

Pixels are 0 (background, black) .. 255 (ink); sklearn's 0..16 levels are scaled by 255/16.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

BAD_KINDS = ("noise", "blank", "duplicate")


def digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 sklearn digits as uint8 (N, 8, 8) and their labels (N,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return imgs, d.target.astype(np.int64)


def to_png(arr: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) array -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def noise_images(n: int, rng: np.random.Generator, size: int = 8) -> np.ndarray:
    """Uniform noise images, uint8 (n, size, size)."""
    return rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)


def blank_images(n: int, rng: np.random.Generator, size: int = 8, level: int = 12) -> np.ndarray:
    """Near-blank images: background with faint noise in [0, level], uint8 (n, size, size)."""
    return rng.integers(0, level + 1, size=(n, size, size), dtype=np.uint8)


def bad_images(kind: str, n: int, rng: np.random.Generator, pool: np.ndarray) -> np.ndarray:
    """Planted harmful images of ``kind`` (noise | blank | duplicate: one digit from ``pool`` n times)."""
    size = pool.shape[-1]
    if kind == "noise":
        return noise_images(n, rng, size)
    if kind == "blank":
        return blank_images(n, rng, size)
    if kind == "duplicate":
        return np.repeat(pool[rng.integers(len(pool))][None], n, axis=0)
    raise ValueError(f"unknown bad contributor kind {kind!r}; expected one of {BAD_KINDS}")


@dataclass
class DemoData:
    """Contributors' images (PNG bytes) and a held-out labelled reference set."""

    contributors: dict[str, list[bytes]]
    reference: list[bytes]
    reference_labels: np.ndarray
    bad: list[str] = field(default_factory=list)
    labels: dict[str, np.ndarray] = field(default_factory=dict)


def demo_data(
    n_clean: int = 7,
    bad: tuple[str, ...] = BAD_KINDS,
    split: str = "random",
    holdout: int = 300,
    bad_size: int | None = None,
    seed: int = 0,
) -> DemoData:
    """Split sklearn digits into ``n_clean`` clean contributors plus planted ``bad`` ones.

    ``split="random"`` deals images at random; ``split="class"`` gives each clean contributor whole digit
    classes (round-robin). ``holdout`` stratified images become the reference set. A bad contributor gets
    ``bad_size`` images (default: the mean clean contributor size). Names are ``clean-<i>`` and ``<kind>``.
    """
    rng = np.random.default_rng(seed)
    imgs, labels = digit_arrays()
    order = rng.permutation(len(imgs))
    # stratified hold-out of exactly `holdout` images: take the smallest within-class fractional ranks
    rank = np.empty(len(imgs))
    for c in np.unique(labels):
        of_c = order[labels[order] == c]
        rank[of_c] = (np.arange(len(of_c)) + 0.5) / len(of_c)
    ref_idx = np.sort(np.argsort(rank[order], kind="stable")[:holdout])
    ref_idx = order[ref_idx]
    ref_mask = np.zeros(len(imgs), bool)
    ref_mask[ref_idx] = True
    train_idx = order[~ref_mask[order]]

    if split == "random":
        groups = np.array_split(train_idx, n_clean)
    elif split == "class":
        groups = [train_idx[np.isin(labels[train_idx], np.arange(10)[i::n_clean])] for i in range(n_clean)]
    else:
        raise ValueError(f"split must be 'random' or 'class', got {split!r}")

    out = DemoData(contributors={}, reference=[to_png(imgs[i]) for i in ref_idx],
                   reference_labels=labels[ref_idx])
    for i, g in enumerate(groups):
        name = f"clean-{i}"
        out.contributors[name] = [to_png(imgs[j]) for j in g]
        out.labels[name] = labels[g]
    size = bad_size or round(len(train_idx) / n_clean)
    for kind in bad:
        out.contributors[kind] = [to_png(a) for a in bad_images(kind, size, rng, imgs[train_idx])]
        out.bad.append(kind)
    return out
