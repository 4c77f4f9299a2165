"""Image decoding, validation and sample grids. Tensors are (N, C, H, W) float32 in [-1, 1]."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

_MODES = {1: "L", 3: "RGB"}


def _mode(channels: int) -> str:
    if channels not in _MODES:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    return _MODES[channels]


MAX_PIXELS = 4096 * 4096  # a training image larger than this is refused before it is decoded
_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def decode_check(blob: bytes, name: str = "", max_pixels: int = MAX_PIXELS) -> str | None:
    """Return why ``blob`` cannot be used as an image, else ``None``: empty, not decodable (any decoder error),
    not the format its ``name``'s suffix says (a GIF named .png), or more than ``max_pixels`` pixels."""
    if not blob:
        return "empty file"
    suffix = Path(name).suffix.lower()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the pixel cap below decides
        try:
            with Image.open(io.BytesIO(blob)) as im:
                if suffix in _FORMATS and im.format != _FORMATS[suffix]:
                    return f"{im.format or 'unknown'} data in a {suffix} file (read as PNG or JPEG only)"
                if im.width < 1 or im.height < 1:
                    return f"image has no pixels ({im.width}x{im.height})"
                if im.width * im.height > max_pixels:
                    return f"too large: {im.width}x{im.height} pixels, more than {max_pixels:,}; downscale it"
                im.verify()
            with Image.open(io.BytesIO(blob)) as im:
                im.load()
        except Exception as e:  # noqa: BLE001 - decoders raise anything on hostile bytes; the file is skipped
            return f"{type(e).__name__}: {e}"
    return None


def decode_image(blob: bytes, size: int, channels: int) -> np.ndarray:
    """Decode one image to a (C, size, size) float32 array in [-1, 1] (raises on a corrupt image)."""
    with Image.open(io.BytesIO(blob)) as im:
        im = im.convert(_mode(channels))
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        arr = np.asarray(im, dtype=np.float32)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.clip(arr / 127.5 - 1.0, -1.0, 1.0)


def load_images(blobs: Sequence[bytes], size: int, channels: int) -> torch.Tensor:
    """Decode encoded images (PNG, JPEG, ...) into a (N, C, size, size) tensor in [-1, 1].

    Corrupt blobs raise: filter them first with :func:`decode_check`.
    """
    if not blobs:
        return torch.empty(0, channels, size, size)
    return torch.from_numpy(np.stack([decode_image(b, size, channels) for b in blobs]))


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) or (C, H, W) in [-1, 1] -> uint8 array with channels last, channel dim kept."""
    x = t.detach().float().cpu().clamp(-1, 1)
    x = ((x + 1.0) * 127.5).round().to(torch.uint8).numpy()
    return np.moveaxis(x, -3, -1)


def to_pil(t: torch.Tensor) -> Image.Image:
    """One image (C, H, W) in [-1, 1] -> PIL image (L or RGB)."""
    arr = to_uint8(t)
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr, _mode(arr.shape[-1]))


def encode_png(t: torch.Tensor) -> bytes:
    """One image (C, H, W) in [-1, 1] -> PNG bytes."""
    buf = io.BytesIO()
    to_pil(t).save(buf, format="PNG")
    return buf.getvalue()


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int = 1) -> Image.Image:
    """Tile (N, C, H, W) images into one PIL image; ``scale`` enlarges pixels (nearest) for tiny images."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[y : y + h, x : x + w] = arr[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid, _mode(c))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    return img


def save_grid(
    images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int | None = None
) -> Path:
    """Save a PNG grid of (N, C, H, W) images; tiny images are enlarged to about 32 px by default."""
    if scale is None:
        scale = max(1, 32 // images.shape[-1])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, nrow=nrow, scale=scale).save(path, format="PNG")
    return path
