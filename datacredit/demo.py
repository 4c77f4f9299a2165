"""The demo: handwritten digits split among contributors, three of them planted bad."""

from __future__ import annotations

from pathlib import Path

import yaml

# Sizes measured on a 2-core CPU (one torch thread per worker). The full demo: 6 contributors (3 clean, 3 planted),
# exact Shapley over all 64 coalitions, so its intervals are the between-seed noise alone; --quick: 4 contributors
# (16 coalitions) at toy size.
FULL = {
    "blocks": [32, 64],
    "train": {"steps": 800, "learningRate": 2e-3, "batchSize": 64},
    "prune": {"ratio": 0.3, "finetuneSteps": 200},
    "finetune": {"steps": 40, "learningRate": 2e-3, "batchSize": 32},
    "samples": 128,
    "samplerSteps": 16,
    "estimator": {"name": "exact", "budget": 64, "seed": 0},
    "clean": 3,
    "bad": ("noise", "blank", "duplicate"),
}
QUICK = {
    "blocks": [16, 32],
    "train": {"steps": 150, "learningRate": 2e-3, "batchSize": 32},
    "prune": {"ratio": 0.3, "finetuneSteps": 50},
    "finetune": {"steps": 20, "learningRate": 2e-3, "batchSize": 32},
    "samples": 64,
    "samplerSteps": 10,
    "estimator": {"name": "exact", "budget": 16, "seed": 0},
    "clean": 2,
    "bad": ("noise", "blank"),
}


def demo_manifest(root: Path, *, quick: bool) -> dict:
    """The ValuationRun the demo runs (also a template for your own manifest)."""
    s = QUICK if quick else FULL
    data = root / ("data-quick" if quick else "data")
    return {
        "apiVersion": "datacredit.dev/v1alpha1",
        "kind": "ValuationRun",
        "metadata": {"name": "digits-quick" if quick else "digits-quality"},
        "spec": {
            "model": {"family": "ddpm", "architecture": {"sampleSize": 8, "blockOutChannels": s["blocks"]},
                      "train": s["train"]},
            "dataset": {"images": str(data / "images"), "contributors": {"by": "folder"}, "channels": 1},
            "property": {"name": "quality", "samples": s["samples"], "reference": str(data / "reference")},
            "method": {"prune": s["prune"], "finetune": s["finetune"], "sampler": {"name": "ddim",
                                                                                  "steps": s["samplerSteps"]}},
            "estimator": s["estimator"],
            "execution": {"parallelism": 2},
            "storage": {"uri": str(root / "runs")},
        },
    }


def build_demo(root: Path, *, quick: bool = False) -> Path:
    """Write the digits data set (contributors + held-out reference) and the manifest; return its path."""
    from .jobs.digits import demo_data

    root = root.resolve()
    s = QUICK if quick else FULL
    folder = root / ("data-quick" if quick else "data")
    if not (folder / "images").exists():
        data = demo_data(n_clean=s["clean"], bad=s["bad"], seed=0)
        for name, blobs in data.contributors.items():
            d = folder / "images" / name
            d.mkdir(parents=True, exist_ok=True)
            for i, b in enumerate(blobs):
                (d / f"{i:04d}.png").write_bytes(b)
        for i, (b, label) in enumerate(zip(data.reference, data.reference_labels, strict=True)):
            d = folder / "reference" / str(int(label))
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:04d}.png").write_bytes(b)
    manifest = root / ("digits-quick.yaml" if quick else "digits-quality.yaml")
    manifest.write_text(yaml.safe_dump(demo_manifest(root, quick=quick), sort_keys=False))
    return manifest
