"""Image embeddings from a transformers model folder (``spec.property.weights``), shared by the properties.

Supported: ``CLIPVisionModelWithProjection`` (``image_embeds``), models with ``get_image_features`` (CLIPModel:
the projected embedding), models with a ``vision_model`` (BLIP, e.g. BlipForQuestionAnswering: its
``pooler_output``, as the paper's diversity code does) and any vision model with a ``pooler_output`` (CLIP or
BLIP vision). Preprocessing follows ``preprocessor_config.json`` when present (resize, center crop, mean/std),
else resizes to ``config.image_size`` and uses CLIP's mean/std; grayscale images are repeated to 3 channels.
The model is loaded once per process and folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from datacredit.spec import SpecError

from ..device import pick_device

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def spec_problem(field: str, message: str) -> SpecError:
    """A manifest error naming ``field`` (e.g. ``spec.property.weights``)."""
    return SpecError("manifest", [(field, message)])


def int_options(options: dict[str, str] | None, defaults: dict[str, int | None]) -> dict[str, int | None]:
    """``spec.property.options`` as positive integers; unknown keys and bad values are errors naming the key."""
    given = dict(options or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise spec_problem(f"spec.property.options.{unknown[0]}", f"unknown option; known: {', '.join(defaults)}")
    out = dict(defaults)
    for key, value in given.items():
        number = int(value) if str(value).strip().isdigit() else 0
        if number < 1:
            raise spec_problem(f"spec.property.options.{key}", f"{value!r}: expected a positive integer")
        out[key] = number
    return out


@dataclass(frozen=True)
class Preprocess:
    """Resize (shortest edge or exact size), center crop, normalise; images come in [-1, 1]."""

    resize: tuple[int, int] | int | None  # (h, w) exact, int = shortest edge, None = keep
    crop: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float().clamp(-1, 1) + 1) / 2
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        elif x.shape[1] != 3:
            raise ValueError(f"images need 1 or 3 channels, got {x.shape[1]}")
        h, w = x.shape[-2:]
        if isinstance(self.resize, int):
            scale = self.resize / min(h, w)
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
        else:
            size = self.resize or (h, w)
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        if self.crop is not None:
            ch, cw = self.crop
            top, left = max(0, (x.shape[-2] - ch) // 2), max(0, (x.shape[-1] - cw) // 2)
            x = x[..., top : top + ch, left : left + cw]
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


def _hw(value: Any) -> tuple[int, int] | int | None:
    """A preprocessor size: {"height", "width"} -> (h, w); {"shortest_edge"} or an int -> int."""
    if value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    if isinstance(value, dict) and "shortest_edge" in value:
        return int(value["shortest_edge"])
    raise ValueError(f"unsupported size {value!r}")


def preprocess_for(folder: Path, image_size: int | None) -> Preprocess:
    """The preprocessing ``preprocessor_config.json`` in ``folder`` describes, else resize to ``image_size``."""
    path = folder / "preprocessor_config.json"
    if not path.exists():
        if not image_size:
            raise spec_problem("spec.property.weights", f"{folder}: no preprocessor_config.json and no image_size in "
                                                    "config.json; add one of them")
        return Preprocess((image_size, image_size), None, CLIP_MEAN, CLIP_STD)
    try:
        cfg = json.loads(path.read_text())
        resize = _hw(cfg.get("size")) if cfg.get("do_resize", True) else None
        crop = _hw(cfg.get("crop_size")) if cfg.get("do_center_crop", False) else None
    except ValueError as e:
        raise spec_problem("spec.property.weights", f"{path}: {e}") from None
    if isinstance(crop, int):
        crop = (crop, crop)
    mean, std = (cfg.get("image_mean", CLIP_MEAN), cfg.get("image_std", CLIP_STD)) if cfg.get(
        "do_normalize", True) else ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    return Preprocess(resize, crop, tuple(float(v) for v in mean), tuple(float(v) for v in std))


class ImageEmbedder:
    """Embeds images (N, C, H, W) in [-1, 1] with a transformers vision model folder."""

    def __init__(self, model: torch.nn.Module, preprocess: Preprocess, device: torch.device, batch_size: int = 64):
        self.model = model
        self.preprocess = preprocess
        self.device = device
        self.batch_size = batch_size

    def _forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        model = self.model
        if type(model).__name__.endswith("WithProjection"):
            return model(pixel_values=pixel_values).image_embeds
        if hasattr(model, "get_image_features"):
            out = model.get_image_features(pixel_values=pixel_values)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        if hasattr(model, "vision_model"):
            return model.vision_model(pixel_values=pixel_values).pooler_output
        return model(pixel_values=pixel_values).pooler_output

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings (N, D) as float32 on the CPU."""
        out = []
        for lo in range(0, len(images), self.batch_size):
            batch = self.preprocess(images[lo : lo + self.batch_size].to(self.device))
            out.append(self._forward(batch).float().cpu())
        return torch.cat(out) if out else torch.empty(0, 0)


@lru_cache(maxsize=4)
def _load(folder: str, device: str) -> tuple[torch.nn.Module, Preprocess]:
    import transformers

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise spec_problem("spec.property.weights", f"{folder}: not a transformers model folder (no config.json); "
                                                "save the model with save_pretrained")
    config = transformers.AutoConfig.from_pretrained(folder)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    try:
        model = (cls or transformers.AutoModel).from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise spec_problem("spec.property.weights", f"{folder}: cannot load the model ({e})") from None
    model.eval().to(device)
    vision = getattr(config, "vision_config", None) or config
    return model, preprocess_for(path, getattr(vision, "image_size", None))


def load_embedder(weights: Path | None, batch_size: int = 64, device: str | None = None) -> ImageEmbedder:
    """The embedder for a model folder; the model is loaded once per process and folder."""
    if weights is None:
        raise spec_problem("spec.property.weights", "required: an image embedding model folder (transformers "
                                                "save_pretrained, path or s3:// URI)")
    dev = pick_device(device)
    model, preprocess = _load(str(Path(weights).resolve()), str(dev))
    return ImageEmbedder(model, preprocess, dev, batch_size)
