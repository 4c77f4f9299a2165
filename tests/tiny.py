"""A tiny data set and manifest that runs the whole method on CPU in seconds (tests only)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CONTRIBUTORS = ("ann", "bob", "cy", "noise")


@dataclass
class TinyData:
    """Where the tiny images and reference set are."""

    root: Path
    images: Path
    reference: Path
    corrupt: str  # the path (relative to images) of the corrupt file


def make_tiny_data(root: Path) -> TinyData:
    """Write 4 contributors x 24 digits (the last is uniform noise) + 1 corrupt PNG + 60 reference digits."""
    from datacredit.jobs.digits import digit_arrays, noise_images, to_png

    rng = np.random.default_rng(0)
    imgs, labels = digit_arrays()
    order = rng.permutation(len(imgs))
    images, reference = root / "images", root / "reference"
    for i, name in enumerate(CONTRIBUTORS):
        d = images / name
        d.mkdir(parents=True)
        arrs = noise_images(24, rng) if name == "noise" else imgs[order[i * 24 : (i + 1) * 24]]
        for j, a in enumerate(arrs):
            (d / f"{j:03d}.png").write_bytes(to_png(a))
    corrupt = "bob/corrupt.png"
    (images / corrupt).write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    for j, idx in enumerate(order[200:260]):
        d = reference / str(int(labels[idx]))
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{j:03d}.png").write_bytes(to_png(imgs[idx]))
    return TinyData(root, images, reference, corrupt)


def tiny_manifest(name: str, images: str, reference: str, storage: dict[str, Any],
                  estimator: str = "exact", budget: int = 16) -> dict[str, Any]:
    """A ValuationRun small enough for tests: tiny UNet, few steps, few samples."""
    return {
        "apiVersion": "datacredit.dev/v1alpha1",
        "kind": "ValuationRun",
        "metadata": {"name": name},
        "spec": {
            "model": {"architecture": {"sampleSize": 8, "blockOutChannels": [16, 32]},
                      "train": {"steps": 30, "learningRate": 2e-3, "batchSize": 32}},
            "dataset": {"images": images},
            "property": {"name": "quality", "samples": 32, "reference": reference},
            "method": {"prune": {"ratio": 0.3, "finetuneSteps": 10},
                       "finetune": {"steps": 8, "learningRate": 1e-3, "batchSize": 16},
                       "sampler": {"steps": 4}},
            "estimator": {"name": estimator, "budget": budget, "seed": 0},
            "execution": {"parallelism": 2},
            "storage": storage,
        },
    }


def with_change(doc: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    """A deep copy of the manifest ``doc`` with one field set (dotted path; ``None`` deletes it)."""
    doc = copy.deepcopy(doc)
    *parents, leaf = path.split(".")
    node = doc
    for p in parents:
        node = node.setdefault(p, {})
    if value is None:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return doc
