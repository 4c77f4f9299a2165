"""``fid`` and ``inception-score``: Inception-v3 image-quality metrics, computed with torchmetrics on
torch-fidelity's Inception network loaded from local weights (clusters are often offline: nothing is downloaded).

``spec.property.weights`` must point at torch-fidelity's Inception-v3 state dict
``pt_inception-2015-12-05-6726825d.pth`` (the 2015-12-05 TensorFlow FID network converted to PyTorch), as a path or
an s3:// URI. Images (N, C, H, W) in [-1, 1] are converted to the uint8 RGB the network takes (grayscale repeated
to 3 channels) and resized to 299 x 299 by torchmetrics (bilinear, antialiased).

- ``fid``: utility = minus the Fréchet Inception distance (2048-d pool features) between the samples and the
  reference images (``spec.property.reference``, else the training images). The reference statistics (torchmetrics'
  real-feature sums) are computed once, in prepare, and cached in the run's property folder; coalition workers load
  them. Like any FID, it is biased upwards for small sample counts: compare utilities computed with the same
  ``spec.property.samples``.
- ``inception-score``: utility = the Inception Score of the samples (exp of the mean KL between p(y|x) and p(y)
  over the 1008 logits, torchmetrics' default "logits_unbiased"), averaged over ``splits`` random splits
  (``options.splits``, default 10, at most the sample count; the paper's CIFAR setting uses 1). No reference.

Options (``spec.property.options``, strings): ``batch_size`` (Inception batch, default 64) and, for
``inception-score``, ``splits``. The network is loaded once per process and shared by every property instance.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datacredit.spec import SpecError

from ..device import pick_device
from .classifier import tensor_hash

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FEATURE_DIM = 2048
# A few keys of torch-fidelity's FeatureExtractorInceptionV3 state dict (torchvision's inception_v3 has others).
_SIGNATURE_KEYS = ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.conv.weight", "fc.weight", "fc.bias")


def _problem(field: str, message: str) -> SpecError:
    return SpecError("manifest", [(field, message)])


def _weights_path(weights: Path | str | None, name: str) -> Path:
    """The weights file, or an error naming ``spec.property.weights`` that says what to give."""
    if weights is None:
        raise _problem("spec.property.weights", f"required by property {name!r}: point it at the Inception-v3 "
                                                f"weights file {WEIGHTS_FILE} (torch-fidelity's format), a path or "
                                                "an s3:// URI; nothing is downloaded")
    path = Path(weights)
    if not path.is_file():
        raise _problem("spec.property.weights", f"{path} is not a file: expected the Inception-v3 weights file "
                                                f"{WEIGHTS_FILE}")
    return path


def _options(options: dict[str, str] | None, defaults: dict[str, int], name: str) -> dict[str, int]:
    """Integer options >= 1 from ``spec.property.options``; unknown keys and bad values name the field."""
    out = dict(defaults)
    for key, value in (options or {}).items():
        if key not in defaults:
            raise _problem(f"spec.property.options.{key}", f"property {name!r} does not use it; it takes "
                                                           f"{', '.join(sorted(defaults))}")
        try:
            out[key] = int(value)
        except (TypeError, ValueError):
            out[key] = 0
        if out[key] < 1:
            raise _problem(f"spec.property.options.{key}", f"expected an integer >= 1, got {value!r}")
    return out


@lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def weights_digest(path: Path) -> str:
    """Short content hash of the weights file (computed once per file version and process)."""
    st = os.stat(path)
    return _file_digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def _check_state_dict(path: Path) -> None:
    """Refuse anything but a plain tensor state dict with torch-fidelity's keys before the network loads it.

    torch-fidelity loads the file with ``weights_only=False`` (arbitrary pickle); a ``weights_only=True`` load
    first keeps a file that is not a plain state dict from ever being unpickled that way."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unreadable file is the same user error)
        raise _problem("spec.property.weights", f"{path}: not a readable torch state dict ({type(e).__name__}: "
                                                f"{e}); expected {WEIGHTS_FILE}") from None
    missing = [k for k in _SIGNATURE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise _problem("spec.property.weights", f"{path}: not torch-fidelity's Inception-v3 state dict ({WEIGHTS_FILE};"
                                                f" missing {', '.join(missing)})")


_NETWORKS: dict[tuple[str, str, str], torch.nn.Module] = {}  # (weights sha256, feature, device) -> network
_MAX_NETWORKS = 4


def _load_network(path: Path, feature: str) -> torch.nn.Module:
    from torchmetrics.image.fid import NoTrainInceptionV3

    _check_state_dict(path)
    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[feature],
                                 feature_extractor_weights_path=str(path))
    except (RuntimeError, KeyError, ValueError) as e:  # wrong shapes
        raise _problem("spec.property.weights", f"{path}: does not load into torch-fidelity's Inception-v3 "
                                                f"({WEIGHTS_FILE}): {e}") from None
    if feature == str(FEATURE_DIM):
        net.num_features = FEATURE_DIM  # torchmetrics reads it instead of running a dummy 299x299 image
    return net


def inception_network(weights: Path, feature: str, device: torch.device) -> torch.nn.Module:
    """torch-fidelity's Inception-v3 (torchmetrics' never-training wrapper) giving ``feature`` ("2048" pool
    features or "logits_unbiased"): loaded once per process for each weights content, feature and device, and
    shared by every property instance (workers score many coalitions)."""
    key = (weights_digest(weights), feature, str(device))
    net = _NETWORKS.get(key)
    if net is None:
        net = _load_network(Path(weights), feature).to(device)
        while len(_NETWORKS) >= _MAX_NETWORKS:
            _NETWORKS.pop(next(iter(_NETWORKS)))
        _NETWORKS[key] = net
    return net


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """Images (N, 1 or 3, H, W) in [-1, 1] as uint8 RGB in [0, 255] (what the Inception network takes; it does
    the 299 x 299 resize itself). Rounds like the worker's dataset encoding, so stored images map back exactly."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1 or 3, H, W), got {tuple(images.shape)}")
    x = images.detach().float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _batches(images: torch.Tensor, batch_size: int, device: torch.device):
    for lo in range(0, len(images), batch_size):
        yield to_uint8_rgb(images[lo : lo + batch_size]).to(device)


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


class FrechetInceptionDistance:
    """``fid`` = minus the FID between the samples and the reference images (see the module docstring)."""

    name = "fid"

    def __init__(self, weights: Path | None = None, options: dict[str, str] | None = None):
        self.weights = _weights_path(weights, self.name)
        self.batch_size = _options(options, {"batch_size": 64}, self.name)["batch_size"]
        self.device = pick_device()
        self.digest = weights_digest(self.weights)
        from torchmetrics.image.fid import FrechetInceptionDistance as _FID

        net = inception_network(self.weights, str(FEATURE_DIM), self.device)
        self.metric = _FID(feature=net, reset_real_features=False, normalize=False).to(self.device)
        self.state: dict[str, Any] = {}

    def _stats_name(self, reference: torch.Tensor) -> str:
        key = hashlib.sha256(f"{self.digest}-{tensor_hash(reference)}-{FEATURE_DIM}".encode()).hexdigest()[:16]
        return f"fid-ref-{key}.npz"

    @torch.no_grad()
    def _compute_reference(self, reference: torch.Tensor, path: Path) -> None:
        if len(reference) < 2:
            raise ValueError(f"property {self.name!r}: need at least 2 reference images, got {len(reference)}")
        self.metric.reset_real_features = True
        self.metric.reset()
        self.metric.reset_real_features = False
        for batch in _batches(reference, self.batch_size, self.device):
            self.metric.update(batch, real=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, real_features_sum=self.metric.real_features_sum.cpu().numpy(),
                 real_features_cov_sum=self.metric.real_features_cov_sum.cpu().numpy(),
                 real_features_num_samples=np.int64(self.metric.real_features_num_samples.item()))
        tmp.replace(path)

    def _load_reference(self, path: Path) -> None:
        with np.load(path) as z:
            total, cov, n = z["real_features_sum"], z["real_features_cov_sum"], int(z["real_features_num_samples"])
        m = self.metric
        m.real_features_sum = torch.from_numpy(total).to(self.device, torch.float64)
        m.real_features_cov_sum = torch.from_numpy(cov).to(self.device, torch.float64)
        m.real_features_num_samples = torch.tensor(n, dtype=torch.long, device=self.device)

    def fit(self, reference_images: torch.Tensor | None, labels: np.ndarray | None, cache_dir: Path,
            seed: int = 0) -> dict[str, Any]:
        """Compute the reference statistics once and cache them in ``cache_dir`` (``fid.json`` names the file);
        ``reference_images=None`` loads them from there (what coalition workers do)."""
        cache_dir = Path(cache_dir)
        pointer = cache_dir / f"{self.name}.json"
        t0 = time.perf_counter()
        cached = True
        if reference_images is None:
            if not pointer.exists():
                raise FileNotFoundError(f"{pointer}: fit the property with reference images first")
            self.state = json.loads(pointer.read_text())
            if self.state.get("weights_sha256") != self.digest:
                raise _problem("spec.property.weights", f"{self.weights} (sha256 {self.digest}) is not the file the "
                                                        f"reference statistics were computed with "
                                                        f"({self.state.get('weights_sha256')}); rerun prepare")
        else:
            cache_dir.mkdir(parents=True, exist_ok=True)
            name = self._stats_name(reference_images)
            if not (cache_dir / name).exists():
                self._compute_reference(reference_images, cache_dir / name)
                cached = False
            self.state = {"reference_stats": name, "reference_n": len(reference_images),
                          "weights_sha256": self.digest, "feature": FEATURE_DIM}
            _write_json(pointer, self.state)
        self._load_reference(cache_dir / self.state["reference_stats"])
        return {**self.state, "cached": cached, "seconds": round(time.perf_counter() - t0, 3)}

    @torch.no_grad()
    def score(self, samples: torch.Tensor) -> float:
        if not self.state:
            raise RuntimeError(f"property {self.name!r}: call fit() before score()")
        if len(samples) < 2:
            raise ValueError(f"property {self.name!r}: need at least 2 samples, got {len(samples)}")
        self.metric.reset()  # keeps the real-feature sums (reset_real_features=False)
        for batch in _batches(samples, self.batch_size, self.device):
            self.metric.update(batch, real=False)
        return -float(self.metric.compute())


class InceptionScore:
    """``inception-score`` = the Inception Score of the samples (see the module docstring)."""

    name = "inception-score"

    def __init__(self, weights: Path | None = None, options: dict[str, str] | None = None):
        self.weights = _weights_path(weights, self.name)
        opts = _options(options, {"splits": 10, "batch_size": 64}, self.name)
        self.splits, self.batch_size = opts["splits"], opts["batch_size"]
        self.device = pick_device()
        self.digest = weights_digest(self.weights)
        self.net = inception_network(self.weights, "logits_unbiased", self.device)
        self.seed = 0
        self.fitted = False

    def fit(self, reference_images: torch.Tensor | None, labels: np.ndarray | None, cache_dir: Path,
            seed: int = 0) -> dict[str, Any]:
        """Nothing to compute: records the weights' hash in ``cache_dir`` so every worker checks it scores with
        the same network, and keeps ``seed`` for the random splits."""
        cache_dir = Path(cache_dir)
        pointer = cache_dir / f"{self.name}.json"
        if reference_images is None and pointer.exists():
            recorded = json.loads(pointer.read_text()).get("weights_sha256")
            if recorded != self.digest:
                raise _problem("spec.property.weights", f"{self.weights} (sha256 {self.digest}) is not the file "
                                                        f"prepare used ({recorded}); rerun prepare")
        elif reference_images is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            _write_json(pointer, {"weights_sha256": self.digest, "splits": self.splits})
        self.seed, self.fitted = seed, True
        return {"weights_sha256": self.digest, "splits": self.splits}

    @torch.no_grad()
    def score(self, samples: torch.Tensor) -> float:
        from torchmetrics.image.inception import InceptionScore as _IS

        if not self.fitted:
            raise RuntimeError(f"property {self.name!r}: call fit() before score()")
        splits = max(1, min(self.splits, len(samples)))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
            metric = _IS(feature=self.net, splits=splits, normalize=False).to(self.device)
        for batch in _batches(samples, self.batch_size, self.device):
            metric.update(batch)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(self.seed)  # the splits' permutation: same samples, same score
            warnings.filterwarnings("ignore", message=".*degrees of freedom.*")  # the std over 1 split
            mean, _ = metric.compute()
        return float(mean)
