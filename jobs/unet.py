"""Small diffusers ``UNet2DModel`` builders, plus save/load that also work for channel-pruned models.

A saved model is a directory with ``model.safetensors`` (the state dict) and ``model.json``: the diffusers
config, the pruned ``structure`` (GroupNorm group counts, attention heads) and free-form ``meta``. Loading
builds the model from the config, shrinks every Conv2d / Linear / GroupNorm to the saved tensor shapes,
restores the diffusers attributes that mirror widths (:func:`sync_attributes`) and loads the weights.
No module is pickled, so files do not depend on code versions beyond the diffusers config.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "model.json"
FORMAT_VERSION = 1


def build_unet(
    sample_size: int,
    in_channels: int,
    block_out_channels: tuple[int, ...] = (32, 64),
    layers_per_block: int = 1,
    attention: bool = True,
    norm_num_groups: int = 8,
    attention_head_dim: int | None = None,
    attention_blocks: Sequence[bool] | None = None,
) -> UNet2DModel:
    """A DDPM-style UNet: ``DownBlock2D`` first, ``AttnDownBlock2D`` after it (plain blocks if not
    ``attention``), mirrored up blocks and a mid block with attention when ``attention``.
    ``attention_blocks`` says per down block whether it has attention (the up blocks mirror it), for
    example ``(False, True, False, False)`` for the DDPM CIFAR-10 UNet the paper prunes.

    ``attention_head_dim=None`` gives one head per attention layer, as in the DDPM CIFAR-10 config.
    Every width must be divisible by ``norm_num_groups``.
    """
    for w in block_out_channels:
        if w % norm_num_groups:
            raise ValueError(f"block width {w} is not divisible by norm_num_groups={norm_num_groups}")
    n = len(block_out_channels)
    if attention_blocks is None:
        attention_blocks = [False] + [attention] * (n - 1)
    if len(attention_blocks) != n:
        raise ValueError(f"attention_blocks has {len(attention_blocks)} entries for {n} blocks")
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention_blocks]
    up = [b.replace("Down", "Up") for b in reversed(down)]
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        attention_head_dim=attention_head_dim,
        add_attention=attention,
    )


def untrained_like(model: UNet2DModel, seed: int) -> UNet2DModel:
    """A freshly initialised UNet of ``model``'s architecture as its diffusers config lists it: the unpruned
    widths, also for a pruned model (pruning leaves the config as it was). Seeded: the same every time."""
    with torch.random.fork_rng(devices=[]):  # leave the global generator as it was
        torch.manual_seed(seed)
        fresh = UNet2DModel.from_config(dict(model.config))
    return fresh.to(next(model.parameters()).device).eval()


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def sync_attributes(model: nn.Module) -> None:
    """Make the width attributes of diffusers modules match their (possibly pruned) layers.

    Downsample2D / Upsample2D assert ``channels`` in forward; Attention and ResnetBlock2D keep widths as
    plain attributes. GroupNorm group counts that no longer divide the width fall back to the gcd.
    """
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            if m.num_channels != m.weight.shape[0]:
                m.num_channels = m.weight.shape[0]
            if m.num_channels % m.num_groups:
                m.num_groups = math.gcd(m.num_channels, m.num_groups)
        elif isinstance(m, (Downsample2D, Upsample2D)):
            conv = getattr(m, "conv", None)
            if isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)):
                m.channels, m.out_channels = conv.in_channels, conv.out_channels
        elif isinstance(m, ResnetBlock2D):
            m.in_channels, m.out_channels = m.conv1.in_channels, m.conv2.out_channels
        elif isinstance(m, Attention):
            m.query_dim = m.to_q.in_features
            m.inner_dim = m.to_q.out_features
            m.inner_kv_dim = m.to_k.out_features
            m.out_dim = m.to_out[0].out_features
            if m.inner_dim % m.heads:
                raise ValueError(f"attention width {m.inner_dim} is not divisible by {m.heads} heads")


def structure(model: nn.Module) -> dict[str, Any]:
    """What the parameter shapes do not say: GroupNorm group counts and attention heads, by module name."""
    out: dict[str, Any] = {"group_norm_groups": {}, "attention_heads": {}}
    for name, m in model.named_modules():
        if isinstance(m, nn.GroupNorm):
            out["group_norm_groups"][name] = m.num_groups
        elif isinstance(m, Attention):
            out["attention_heads"][name] = m.heads
    return out


def block_widths(model: UNet2DModel) -> dict[str, int]:
    """Output widths of each resnet's conv2, summarising how a (pruned) UNet's blocks look."""
    return {n: int(m.conv2.out_channels) for n, m in model.named_modules() if isinstance(m, ResnetBlock2D)}


def _resize_(module: nn.Module, shapes: dict[str, torch.Size]) -> None:
    """Replace a layer's parameters with empty tensors of the saved shapes and update its size attributes."""
    for pname, shape in shapes.items():
        p = getattr(module, pname)
        if p is not None and p.shape != shape:
            empty = torch.empty(shape, dtype=p.dtype)
            setattr(module, pname, nn.Parameter(empty, requires_grad=p.requires_grad))
    w = module.weight
    if isinstance(module, nn.Conv2d):
        module.out_channels, module.in_channels = w.shape[0], w.shape[1] * module.groups
    elif isinstance(module, nn.ConvTranspose2d):
        module.in_channels, module.out_channels = w.shape[0], w.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = w.shape
    elif isinstance(module, nn.GroupNorm):
        module.num_channels = w.shape[0]


def save_unet(model: UNet2DModel, directory: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Save a (possibly pruned) UNet as ``model.safetensors`` + ``model.json`` in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME))
    doc = {
        "format": "datacredit-unet",
        "version": FORMAT_VERSION,
        "class": type(model).__name__,
        "config": {k: v for k, v in dict(model.config).items() if not k.startswith("_")},
        "structure": structure(model),
        "params": count_params(model),
        "meta": meta or {},
    }
    (directory / CONFIG_NAME).write_text(json.dumps(doc, indent=1, default=list))
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The ``meta`` dict stored by :func:`save_unet`."""
    return json.loads((Path(directory) / CONFIG_NAME).read_text()).get("meta", {})


def load_unet(directory: str | Path, device: torch.device | str = "cpu") -> UNet2DModel:
    """Load a model saved by :func:`save_unet`, pruned or not; a plain diffusers ``UNet2DModel`` folder
    (``config.json`` + weights, or a pipeline folder with ``unet/``) loads with ``from_pretrained``."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).exists():
        for folder in (directory, directory / "unet"):
            if (folder / "config.json").exists():
                return UNet2DModel.from_pretrained(str(folder)).to(device)
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME} (datacredit) or config.json (diffusers)")
    doc = json.loads((directory / CONFIG_NAME).read_text())
    if doc.get("format") != "datacredit-unet":
        raise ValueError(f"{directory / CONFIG_NAME} is not a datacredit UNet description")
    config = doc["config"]
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        if key in config and config[key] is not None:
            config[key] = tuple(config[key])
    model = UNet2DModel.from_config(config)
    state = load_file(str(directory / WEIGHTS_NAME))
    groups = doc["structure"]["group_norm_groups"]
    heads = doc["structure"]["attention_heads"]
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.GroupNorm)):
            shapes = {p: state[f"{name}.{p}"].shape for p in ("weight", "bias") if f"{name}.{p}" in state}
            _resize_(m, shapes)
        if isinstance(m, nn.GroupNorm) and name in groups:
            m.num_groups = groups[name]
        if isinstance(m, Attention) and name in heads:
            m.heads = heads[name]
    sync_attributes(model)
    model.load_state_dict(state, strict=True)
    return model.to(device)
