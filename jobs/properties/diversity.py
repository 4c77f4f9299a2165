"""Diversity properties: entropy of where samples fall among reference clusters or predicted attributes.

``cluster-entropy`` follows the paper's code (CelebA-HQ, BLIP embeddings): embed the reference images, similarity
= dot product, distance = max(similarity) - similarity, Ward clustering of the references into ``clusters``
(scipy ``fcluster`` maxclust); each sample goes to the cluster with the smallest *mean* distance to its members;
F = entropy in bits of the cluster occupancy. ``classifier-entropy`` is the same entropy over the argmax of a
user's attribute classifier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..device import pick_device
from .embedding import int_options, load_embedder, spec_problem

CLUSTER_FILE = "cluster-entropy.npz"


def entropy_bits(counts: np.ndarray) -> float:
    """Entropy in bits of a histogram (0 for an empty or single-bin one)."""
    p = np.asarray(counts, dtype=np.float64)
    p = p[p > 0] / max(1.0, p.sum())
    return float(-(p * np.log2(p)).sum()) + 0.0


def ward_clusters(embeddings: np.ndarray, clusters: int) -> tuple[np.ndarray, float]:
    """Cluster labels 0..K-1 (K <= ``clusters``) of the embeddings and the maximum similarity used for distances."""
    from scipy.cluster.hierarchy import fcluster, ward
    from scipy.spatial.distance import squareform

    sim = embeddings @ embeddings.T
    max_sim = float(sim.max())
    dist = max_sim - sim
    dist = (dist + dist.T) / 2
    np.fill_diagonal(dist, 0.0)
    labels = fcluster(ward(squareform(dist, checks=False)), clusters, criterion="maxclust")
    return np.unique(labels, return_inverse=True)[1].astype(np.int64), max_sim


class ClusterEntropy:
    """``cluster-entropy``: entropy in bits of the samples' occupancy of Ward clusters of the reference images
    in an embedding model's space (``spec.property.weights``, a transformers model folder). Maximum
    log2(clusters). Options: ``batch_size`` (embedding batch, default 64)."""

    name = "cluster-entropy"

    def __init__(self, weights: Path | None = None, clusters: int = 20, options: dict[str, str] | None = None):
        opts = int_options(options, {"batch_size": 64})
        self.embedder = load_embedder(weights, batch_size=int(opts["batch_size"] or 64))
        self.clusters = clusters
        self.reference: np.ndarray | None = None  # (R, D) embeddings
        self.labels: np.ndarray | None = None  # (R,) cluster of each reference, 0..K-1
        self.max_sim = 0.0

    def fit(self, reference_images: torch.Tensor | None, labels: np.ndarray | None, cache_dir: Path,
            seed: int = 0) -> dict[str, Any]:
        """Embed and cluster the references once, caching both in ``cache_dir``; ``reference_images=None``
        loads that cache (what coalition workers do)."""
        path = Path(cache_dir) / CLUSTER_FILE
        if reference_images is not None:
            if len(reference_images) < 2:
                raise ValueError(f"property {self.name!r} needs at least 2 reference images, got "
                                 f"{len(reference_images)} (spec.property.reference)")
            emb = self.embedder(reference_images).double().numpy()
            cluster_of, max_sim = ward_clusters(emb, self.clusters)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, embeddings=emb, labels=cluster_of, max_sim=max_sim, clusters=self.clusters)
            tmp.replace(path)
        elif not path.exists():
            raise FileNotFoundError(f"{path}: fit the property with reference images first")
        with np.load(path) as z:
            self.reference, self.labels, self.max_sim = z["embeddings"], z["labels"], float(z["max_sim"])
        n_clusters = int(self.labels.max()) + 1
        return {"clusters": n_clusters, "reference": len(self.labels), "embeddingDim": int(self.reference.shape[1]),
                "referenceEntropy": entropy_bits(np.bincount(self.labels, minlength=n_clusters))}

    def assign(self, samples: torch.Tensor) -> np.ndarray:
        """The cluster (0..K-1) of each sample: the smallest mean distance to a cluster's references."""
        if self.reference is None or self.labels is None:
            raise RuntimeError(f"property {self.name!r}: call fit() before score()")
        emb = self.embedder(samples).double().numpy()
        dist = self.max_sim - emb @ self.reference.T  # (N, R)
        members = np.eye(int(self.labels.max()) + 1)[self.labels]  # (R, K) one-hot
        mean_dist = (dist @ members) / members.sum(axis=0)
        return mean_dist.argmin(axis=1)

    def score(self, samples: torch.Tensor) -> float:
        return entropy_bits(np.bincount(self.assign(samples)))


class ClassifierEntropy:
    """``classifier-entropy``: entropy in bits of the predicted (argmax) attribute histogram of a user's
    classifier, a TorchScript file (``spec.property.weights``) mapping images (N, 3, H, W) in [-1, 1] to logits.
    Options: ``size`` (resize samples to size x size first; default: unchanged), ``batch_size`` (default 256)."""

    name = "classifier-entropy"

    def __init__(self, weights: Path | None = None, options: dict[str, str] | None = None):
        opts = int_options(options, {"size": None, "batch_size": 256})
        if weights is None:
            raise spec_problem("spec.property.weights", "required: an attribute classifier as a TorchScript file "
                                                        "(torch.jit.save), path or s3:// URI")
        self.device = pick_device()
        try:
            self.model = torch.jit.load(str(weights), map_location=self.device).eval()
        except (RuntimeError, ValueError, OSError) as e:
            raise spec_problem("spec.property.weights", f"{weights}: not a TorchScript file ({e}); save it with "
                                                        "torch.jit.save(torch.jit.script(model))") from None
        self.size = opts["size"]
        self.batch_size = int(opts["batch_size"] or 256)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, int]:
        """The predicted attribute of each image and the number of attributes (logit columns)."""
        preds, n_classes = [], 0
        for lo in range(0, len(images), self.batch_size):
            x = images[lo : lo + self.batch_size].to(self.device).float()
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            if self.size and tuple(x.shape[-2:]) != (self.size, self.size):
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True,
                                  align_corners=False).clamp(-1, 1)
            logits = self.model(x)
            if logits.ndim != 2:
                raise ValueError(f"property {self.name!r}: the classifier returned shape {tuple(logits.shape)}, "
                                 "expected logits (N, classes)")
            n_classes = int(logits.shape[1])
            preds.append(logits.argmax(dim=1).cpu().numpy())
        return (np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)), n_classes

    def fit(self, reference_images: torch.Tensor | None, labels: np.ndarray | None, cache_dir: Path,
            seed: int = 0) -> dict[str, Any]:
        """Nothing to fit: the classifier is given. Reports the reference images' entropy when they are given."""
        if reference_images is None:
            return {}
        pred, n_classes = self.predict(reference_images)
        return {"classes": n_classes, "referenceEntropy": entropy_bits(np.bincount(pred, minlength=n_classes))}

    def score(self, samples: torch.Tensor) -> float:
        pred, n_classes = self.predict(samples)
        return entropy_bits(np.bincount(pred, minlength=n_classes))
