"""The demo: handwritten digits split among contributors, three of them planted bad."""

from __future__ import annotations

from pathlib import Path

import yaml

# Sizes measured on a 2-core CPU: the full demo fits in a few minutes, --quick in about a minute.
FULL = {
    "train": {"steps": 1500, "learningRate": 2e-3, "batchSize": 64},
    "prune": {"ratio": 0.3, "finetuneSteps": 300},
    "finetune": {"steps": 120, "learningRate": 1e-3, "batchSize": 64},
    "samples": 256,
    "samplerSteps": 20,
    "budget": 48,
}
QUICK = {
    "train": {"steps": 300, "learningRate": 2e-3, "batchSize": 64},
    "prune": {"ratio": 0.3, "finetuneSteps": 60},
    "finetune": {"steps": 30, "learningRate": 1e-3, "batchSize": 64},
    "samples": 96,
    "samplerSteps": 10,
    "budget": 12,
}


def demo_manifest(root: Path, *, quick: bool) -> dict:
    """The ValuationRun the demo runs (also a template for your own manifest)."""
    s = QUICK if quick else FULL
    return {
        "apiVersion": "datacredit.dev/v1alpha1",
        "kind": "ValuationRun",
        "metadata": {"name": "digits-quick" if quick else "digits-quality"},
        "spec": {
            "model": {"family": "ddpm", "architecture": {"sampleSize": 8, "blockOutChannels": [32, 64]},
                      "train": s["train"]},
            "dataset": {"images": str(root / "data" / "images"), "contributors": {"by": "folder"}, "channels": 1},
            "property": {"name": "quality", "samples": s["samples"], "reference": str(root / "data" / "reference")},
            "method": {"prune": s["prune"], "finetune": s["finetune"], "sampler": {"name": "ddim",
                                                                                  "steps": s["samplerSteps"]}},
            "estimator": {"name": "kernel", "budget": s["budget"], "tolerance": 0.02, "seed": 0},
            "execution": {"parallelism": 2},
            "storage": {"uri": str(root / "runs")},
        },
    }


def build_demo(root: Path, *, quick: bool = False) -> Path:
    """Write the digits data set (contributors + held-out reference) and the manifest; return its path."""
    from .jobs.digits import demo_data

    root = root.resolve()
    images = root / "data" / "images"
    if not images.exists():
        data = demo_data(seed=0)
        for name, blobs in data.contributors.items():
            d = images / name
            d.mkdir(parents=True, exist_ok=True)
            for i, b in enumerate(blobs):
                (d / f"{i:04d}.png").write_bytes(b)
        for i, (b, label) in enumerate(zip(data.reference, data.reference_labels, strict=True)):
            d = root / "data" / "reference" / str(int(label))
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:04d}.png").write_bytes(b)
    manifest = root / ("digits-quick.yaml" if quick else "digits-quality.yaml")
    manifest.write_text(yaml.safe_dump(demo_manifest(root, quick=quick), sort_keys=False))
    return manifest
