"""``aesthetic``: a LAION-style aesthetic score, a linear head on L2-normalised CLIP image embeddings.

The paper (ArtBench, SD + LoRA) uses the LAION aesthetic predictor v1 head ``sa_0_4_vit_l_14_linear.pth`` (an
``nn.Linear(768, 1)`` state dict) on OpenAI CLIP ViT-L/14 image embeddings, and the 0.9 quantile of the
per-image scores over the samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .embedding import int_options, load_embedder, spec_problem


def load_linear_head(path: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (1, D) and ``bias`` (1,) of a linear head from a .pth state dict or a .safetensors file."""
    if path is None:
        raise spec_problem("spec.property.head", "required: the aesthetic linear head (an nn.Linear(D, 1) state dict, "
                                                 ".pth or .safetensors, path or s3:// URI)")
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unreadable file is the same user error)
        raise spec_problem("spec.property.head", f"{path}: cannot read it ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "weight" not in state or "bias" not in state:
        raise spec_problem("spec.property.head", f"{path}: expected an nn.Linear state dict with keys weight and bias")
    weight, bias = state["weight"].float(), state["bias"].float().reshape(-1)
    if weight.ndim != 2 or weight.shape[0] != 1 or bias.numel() != 1:
        raise spec_problem("spec.property.head", f"{path}: expected weight (1, D) and bias (1,), got "
                                                 f"{tuple(weight.shape)} and {tuple(bias.shape)}")
    return weight, bias


class AestheticScore:
    """``aesthetic`` = the ``quantile`` (default 0.9) of per-image scores ``head(clip(x) / |clip(x)|)``.

    ``weights``: a CLIP model folder (CLIPVisionModelWithProjection or CLIPModel, transformers save_pretrained);
    ``head``: the linear head. Options: ``batch_size`` (embedding batch, default 64)."""

    name = "aesthetic"

    def __init__(self, weights: Path | None = None, head: Path | None = None, quantile: float = 0.9,
                 options: dict[str, str] | None = None):
        opts = int_options(options, {"batch_size": 64})
        self.weight, self.bias = load_linear_head(head)
        self.embedder = load_embedder(weights, batch_size=int(opts["batch_size"] or 64))
        self.quantile = quantile

    def scores(self, images: torch.Tensor) -> np.ndarray:
        """The per-image aesthetic scores."""
        emb = self.embedder(images)
        if emb.shape[1] != self.weight.shape[1]:
            raise spec_problem("spec.property.head", f"the head takes {self.weight.shape[1]}-d embeddings but the "
                                                     f"model in spec.property.weights gives {emb.shape[1]}-d ones")
        emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return (emb @ self.weight.T + self.bias).squeeze(1).double().numpy()

    def fit(self, reference_images: torch.Tensor | None, labels: np.ndarray | None, cache_dir: Path,
            seed: int = 0) -> dict[str, Any]:
        """Nothing to fit: the head is given. Reports the reference images' score when they are given."""
        if reference_images is None:
            return {}
        return {"quantile": self.quantile, "referenceScore": float(np.quantile(self.scores(reference_images),
                                                                               self.quantile))}

    def score(self, samples: torch.Tensor) -> float:
        return float(np.quantile(self.scores(samples), self.quantile))
