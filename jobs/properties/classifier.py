"""A small CNN image classifier trained by us: the feature extractor of the demo properties.

It is trained once per run (seeded, on CPU in seconds for 8x8 digits) and cached in the run's cache
directory as ``classifier-<key>.safetensors`` + ``.json``; every worker then loads the same weights.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


class SmallCNN(nn.Module):
    """(conv-bn-relu) x2, max-pool, conv-bn-relu, 2x2 average pool, fc(feature_dim)-relu, fc(classes).

    ``features`` is the penultimate layer (post-ReLU, like Inception's pool features)."""

    def __init__(self, channels: int, n_classes: int, width: int = 16, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            *_conv(channels, width), *_conv(width, width), nn.MaxPool2d(2),
            *_conv(width, 2 * width), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(8 * width, feature_dim), nn.ReLU(),
        )
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.body(x)))


@dataclass(frozen=True)
class ClassifierSpec:
    """Everything that determines a trained classifier (its cache key)."""

    size: int
    channels: int
    n_classes: int
    data: str = "digits"  # "digits" (sklearn load_digits) or "reference" (the labelled reference images)
    width: int = 16
    feature_dim: int = 64
    epochs: int = 8
    seed: int = 0
    data_hash: str = ""

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def adapt(x: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """Resize (bilinear, antialiased) and convert channels (gray <-> RGB) to what the classifier takes."""
    x = x.float()
    if x.shape[1] != channels:
        x = x.mean(dim=1, keepdim=True) if channels == 1 else x.expand(-1, channels, -1, -1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def tensor_hash(x: torch.Tensor | np.ndarray) -> str:
    """Short content hash of a tensor or array."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return hashlib.sha256(np.ascontiguousarray(a).tobytes() + str(a.shape).encode()).hexdigest()[:16]


def digits_tensor() -> tuple[torch.Tensor, np.ndarray]:
    """sklearn's 1797 digits as (N, 1, 8, 8) in [-1, 1] (the same scaling as the demo's PNGs) and labels."""
    from ..digits import digit_arrays

    imgs, labels = digit_arrays()
    return torch.from_numpy(imgs.astype(np.float32) / 127.5 - 1.0)[:, None], labels


def train_classifier(
    images: torch.Tensor, labels: np.ndarray, spec: ClassifierSpec, val_fraction: float = 0.15,
    batch_size: int = 64, lr: float = 3e-3,
) -> tuple[SmallCNN, dict[str, Any]]:
    """Train on a seeded split of (images, labels) with random 1-pixel shifts; report held-out accuracy."""
    t0 = time.perf_counter()
    gen = torch.Generator("cpu").manual_seed(spec.seed)
    torch.manual_seed(spec.seed)
    x = adapt(images, spec.size, spec.channels)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    perm = torch.randperm(len(x), generator=gen)
    n_val = int(round(len(x) * val_fraction))
    val, tr = perm[:n_val], perm[n_val:]
    model = SmallCNN(spec.channels, spec.n_classes, spec.width, spec.feature_dim)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.epochs)
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    s = spec.size
    for _ in range(spec.epochs):
        model.train()
        order = tr[torch.randperm(len(tr), generator=gen)]
        for lo in range(0, len(order), batch_size):
            b = order[lo : lo + batch_size]
            dy, dx = torch.randint(0, 3, (2,), generator=gen).tolist()
            loss = F.cross_entropy(model(padded[b, :, dy : dy + s, dx : dx + s]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(x[val]).argmax(1) == y[val]).float().mean()) if n_val else float("nan")
    info = {"accuracy": acc, "n_train": len(tr), "n_val": n_val, "seconds": time.perf_counter() - t0}
    return model, info


def load_or_train_classifier(
    cache_dir: Path,
    spec: ClassifierSpec,
    images: torch.Tensor | None = None,
    labels: np.ndarray | None = None,
) -> tuple[SmallCNN, dict[str, Any]]:
    """Load ``classifier-<key>`` from ``cache_dir`` or train it (on ``images``/``labels``, or on sklearn
    digits when ``spec.data == "digits"``) and save it there."""
    cache_dir = Path(cache_dir)
    stem = cache_dir / f"classifier-{spec.key()}"
    weights, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    model = SmallCNN(spec.channels, spec.n_classes, spec.width, spec.feature_dim)
    if weights.exists() and meta.exists():
        model.load_state_dict(load_file(str(weights)))
        model.eval()
        return model, {**json.loads(meta.read_text())["info"], "cached": True}
    if spec.data == "digits":
        images, labels = digits_tensor()
    elif images is None or labels is None:
        raise ValueError("a classifier on reference data needs labelled reference images")
    model, info = train_classifier(images, labels, spec)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp_meta = meta.with_suffix(".json.tmp")
    tmp_meta.write_text(json.dumps({"spec": asdict(spec), "info": info}, indent=1))
    tmp_meta.replace(meta)
    tmp.replace(weights)
    return model, {**info, "cached": False}
