"""Demo properties computed with our small CNN classifier: Fréchet quality and class-entropy diversity."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .classifier import ClassifierSpec, SmallCNN, adapt, load_or_train_classifier, tensor_hash
from .frechet import feature_stats, frechet_distance


class ClassifierProperty:
    """Shared machinery: fit (or load) the classifier in ``cache_dir``, then embed / classify samples.

    Options: ``classifier_data`` "digits" (train on sklearn's digits, the default) or "reference" (train on
    the labelled reference images); ``n_classes`` (default: 10 for digits, else max label + 1);
    ``feature_dim``, ``epochs``; ``batch_size`` for inference.
    """

    name = "classifier"

    def __init__(self, classifier_data: str = "digits", n_classes: int | None = None, feature_dim: int = 64,
                 epochs: int = 8, batch_size: int = 1024):
        if classifier_data not in ("digits", "reference"):
            raise ValueError(f"classifier_data must be 'digits' or 'reference', got {classifier_data!r}")
        self.classifier_data = classifier_data
        self.n_classes = n_classes
        self.feature_dim = feature_dim
        self.epochs = epochs
        self.batch_size = batch_size
        self.classifier: SmallCNN | None = None
        self.spec: ClassifierSpec | None = None
        self.info: dict[str, Any] = {}
        self.state: dict[str, Any] = {}

    def _fit_classifier(self, reference: torch.Tensor | None, labels: np.ndarray | None, cache_dir: Path,
                        seed: int) -> None:
        pointer = cache_dir / f"{self.name}.json"
        if reference is None:  # a worker after prepare: everything comes from the cache
            if not pointer.exists():
                raise FileNotFoundError(f"{pointer}: fit the property with reference images first")
            self.state = json.loads(pointer.read_text())
            self.spec = ClassifierSpec(**self.state["classifier"])
        else:
            data_hash = ""
            n_classes = self.n_classes or 10
            if self.classifier_data == "reference":
                if labels is None:
                    raise ValueError(f"property {self.name!r} with classifier_data='reference' needs labels")
                n_classes = self.n_classes or int(np.max(labels)) + 1
                data_hash = tensor_hash(reference) + tensor_hash(np.asarray(labels))
            self.spec = ClassifierSpec(
                size=int(reference.shape[-1]), channels=int(reference.shape[1]), n_classes=n_classes,
                data=self.classifier_data, feature_dim=self.feature_dim, epochs=self.epochs, seed=seed,
                data_hash=data_hash,
            )
            self.state = {"classifier": asdict(self.spec), "reference_hash": tensor_hash(reference)}
        self.classifier, info = load_or_train_classifier(cache_dir, self.spec, reference, labels)
        self.info["classifier"] = info

    def _write_pointer(self, cache_dir: Path) -> None:
        """Record the fitted state so ``fit(None, None, cache_dir)`` can load it without the references."""
        path = cache_dir / f"{self.name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(path)

    @torch.no_grad()
    def features_and_probs(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Penultimate features and class probabilities of images in [-1, 1]."""
        if self.classifier is None or self.spec is None:
            raise RuntimeError(f"property {self.name!r}: call fit() before score()")
        feats, probs = [], []
        for lo in range(0, len(x), self.batch_size):
            b = adapt(x[lo : lo + self.batch_size].cpu(), self.spec.size, self.spec.channels)
            f = self.classifier.features(b)
            feats.append(f.double().numpy())
            probs.append(torch.softmax(self.classifier.head(f), dim=1).double().numpy())
        return np.concatenate(feats), np.concatenate(probs)

    def fit(self, reference_images: torch.Tensor | None, labels: np.ndarray | None, cache_dir: Path,
            seed: int = 0) -> dict[str, Any]:
        """Train or load the classifier; ``reference_images=None`` loads a state fitted before in
        ``cache_dir`` (what coalition workers do)."""
        cache_dir = Path(cache_dir)
        self._fit_classifier(reference_images, labels, cache_dir, seed)
        if reference_images is not None:
            if labels is not None and len(reference_images):
                _, p = self.features_and_probs(reference_images)
                self.state["reference_accuracy"] = float((p.argmax(1) == np.asarray(labels)).mean())
            self._fit_reference(reference_images, cache_dir)
            self._write_pointer(cache_dir)
        else:
            self._load_reference(cache_dir)
        self.info.update({k: v for k, v in self.state.items() if k != "classifier"})
        return self.info

    def _fit_reference(self, reference_images: torch.Tensor, cache_dir: Path) -> None:
        """Compute and cache what ``score`` compares against (nothing by default)."""

    def _load_reference(self, cache_dir: Path) -> None:
        """Load what :meth:`_fit_reference` cached."""


class FrechetQuality(ClassifierProperty):
    """``quality`` = minus the Fréchet distance between samples and the reference images in the classifier's
    penultimate feature space (an FID with our classifier). Reference statistics are cached in ``cache_dir``.

    The distance is biased upwards for small n (roughly by trace terms / n), so compare utilities computed
    with the same number of samples.
    """

    name = "quality"

    def _fit_reference(self, reference_images: torch.Tensor, cache_dir: Path) -> None:
        assert self.spec is not None
        name = f"quality-ref-{self.spec.key()}-{self.state['reference_hash']}.npz"
        path = cache_dir / name
        if not path.exists():
            feats, _ = self.features_and_probs(reference_images)
            mu, sigma = feature_stats(feats)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, mu=mu, sigma=sigma, n=len(feats))
            tmp.replace(path)
        self.state["reference_stats"] = name
        self.state["reference_n"] = len(reference_images)
        self._load_reference(cache_dir)

    def _load_reference(self, cache_dir: Path) -> None:
        with np.load(cache_dir / self.state["reference_stats"]) as z:
            self.mu, self.sigma = z["mu"], z["sigma"]

    def score(self, samples: torch.Tensor) -> float:
        feats, _ = self.features_and_probs(samples)
        mu, sigma = feature_stats(feats)
        return -frechet_distance(mu, sigma, self.mu, self.sigma)


class ClassEntropy(ClassifierProperty):
    """``diversity`` = entropy in bits of the classifier's predicted-class histogram over the samples
    (hard argmax counts, like the paper's cluster-occupancy entropy; ``soft=True`` uses the mean softmax
    instead). Maximum log2(n_classes), 3.32 bits for digits."""

    name = "diversity"

    def __init__(self, soft: bool = False, **options: Any):
        super().__init__(**options)
        self.soft = soft

    def score(self, samples: torch.Tensor) -> float:
        _, p = self.features_and_probs(samples)
        assert self.spec is not None
        hard = np.bincount(p.argmax(1), minlength=self.spec.n_classes) / max(1, len(p))
        dist = p.mean(axis=0) if self.soft else hard
        dist = dist[dist > 0]
        return float(-(dist * np.log2(dist)).sum()) + 0.0

