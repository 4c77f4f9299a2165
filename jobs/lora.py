"""LoRA adapters (peft) on a diffusers UNet: attach, count, magnitude rank pruning, save and load.

A pruned LoRA has a different rank in each layer (some layers may lose every component); it is kept as a peft
adapter whose ``target_modules`` are the full names of the remaining layers, with per-layer ``rank_pattern`` and
``alpha_pattern`` chosen so that each layer keeps its scaling alpha / r. It is saved as a peft adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from datacredit.errors import ModelError

ADAPTER = "default"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"


class LoraError(ModelError):
    """A LoRA checkpoint cannot be used (bad input); the message names the field or file and what to do."""


def attach_lora(unet: UNet2DConditionModel, rank: int, alpha: float | None, target_modules: list[str],
                seed: int = 0) -> LoraConfig:
    """Add a fresh trainable LoRA (B = 0, so the UNet's output is unchanged) and return its config."""
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(target_modules),
                        init_lora_weights=True)
    torch.manual_seed(seed)  # peft draws the A matrices from torch's global generator
    try:
        unet.add_adapter(config, ADAPTER)
    except ValueError as e:
        raise LoraError(f"spec.model.lora.targetModules {target_modules}: {e}") from None
    mark_trainable(unet)
    return config


def lora_layers(unet: torch.nn.Module) -> dict[str, LoraLayer]:
    """The UNet's LoRA-wrapped layers (full module name -> layer) holding the adapter."""
    return {name: m for name, m in unet.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The adapter's parameters (what training updates)."""
    return [p for n, p in unet.named_parameters() if ".lora_" in n and f".{ADAPTER}." in n]


def mark_trainable(unet: torch.nn.Module) -> None:
    """Freeze the UNet and make exactly the adapter's parameters trainable."""
    unet.requires_grad_(False)
    for p in lora_parameters(unet):
        p.requires_grad_(True)


def count_lora_params(unet: torch.nn.Module) -> int:
    """Number of adapter parameters."""
    return sum(p.numel() for p in lora_parameters(unet))


def lora_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the adapter's weights (peft keys, no adapter name)."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()}


def set_lora_state(unet: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load adapter weights saved by :func:`lora_state`; every key must match (errors name ``source``)."""
    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise LoraError(f"{source}: LoRA weights do not fit the UNet (missing {missing[:3]}, unexpected "
                        f"{list(result.unexpected_keys)[:3]}); was it trained on this Stable Diffusion model?")


@dataclass
class LoraPruneStats:
    """What :func:`prune_lora` removed."""

    keep_ratio: float  # target: remaining LoRA params <= keep_ratio x params_before
    params_before: int
    params_after: int
    components_before: int
    components_after: int
    layers_before: int
    layers_after: int

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "achieved_ratio": self.params_after / max(1, self.params_before)}


def component_importance(layer: LoraLayer) -> torch.Tensor:
    """Magnitude of each rank component i: the Frobenius norm of its update, scaling x |B[:, i]| x |A[i, :]|."""
    a, b = layer.lora_A[ADAPTER].weight.detach(), layer.lora_B[ADAPTER].weight.detach()
    return layer.scaling[ADAPTER] * a.norm(dim=1) * b.norm(dim=0)


def prune_lora(unet: UNet2DConditionModel, keep: float) -> tuple[LoraConfig, LoraPruneStats]:
    """Remove rank components (pairs A-row / B-column) in ascending global importance until the remaining
    LoRA params are <= ``keep`` x the current ones; re-attach the smaller adapter in place. Returns its config."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep ratio must be in (0, 1], got {keep}")
    layers = lora_layers(unet)
    if not layers:
        raise LoraError("the UNet has no LoRA adapter to prune")
    if any(layer.use_dora.get(ADAPTER) for layer in layers.values()):
        raise LoraError("DoRA adapters cannot be rank-pruned: train a plain LoRA (use_dora false)")
    names, index, scores, sizes = [], [], [], []
    for name, layer in layers.items():
        imp = component_importance(layer)
        size = layer.lora_A[ADAPTER].in_features + layer.lora_B[ADAPTER].out_features
        names += [name] * len(imp)
        index += range(len(imp))
        scores.append(imp)
        sizes += [size] * len(imp)
    total = sum(sizes)
    remaining, removed = total, set()
    for j in torch.argsort(torch.cat(scores).float(), stable=True).tolist():
        if remaining <= keep * total:
            break
        removed.add(j)
        remaining -= sizes[j]
    kept: dict[str, list[int]] = {}
    for j, (name, i) in enumerate(zip(names, index, strict=True)):
        if j not in removed:
            kept.setdefault(name, []).append(i)

    state = lora_state(unet)
    new_state: dict[str, torch.Tensor] = {}
    ranks, alphas = {}, {}
    for name, idx in kept.items():
        sel = torch.tensor(idx)
        new_state[f"{name}.lora_A.weight"] = state[f"{name}.lora_A.weight"][sel].contiguous()
        new_state[f"{name}.lora_B.weight"] = state[f"{name}.lora_B.weight"][:, sel].contiguous()
        ranks[name] = len(idx)
        alphas[name] = float(layers[name].scaling[ADAPTER]) * len(idx)  # keeps alpha / r of the layer
    config = LoraConfig(r=max(ranks.values()), lora_alpha=max(alphas.values()), target_modules=sorted(kept),
                        rank_pattern=ranks, alpha_pattern=alphas)
    unet.unload_lora()
    unet.add_adapter(config, ADAPTER)
    set_lora_state(unet, new_state, "pruned LoRA")
    mark_trainable(unet)
    stats = LoraPruneStats(keep, total, remaining, len(names), len(names) - len(removed), len(layers), len(kept))
    return config, stats


def save_lora(unet: UNet2DConditionModel, directory: str | Path) -> Path:
    """Write the adapter as a peft folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    unet.peft_config[ADAPTER].save_pretrained(str(d))
    save_file({k: v.contiguous() for k, v in lora_state(unet).items()}, str(d / WEIGHTS_FILE))
    return d


def load_lora(unet: UNet2DConditionModel, path: str | Path, field: str = "spec.model.lora.checkpoint") -> None:
    """Attach a trainable LoRA from ``path``: a peft adapter folder (``adapter_config.json`` and
    ``adapter_model.safetensors``, as :func:`save_lora` or ``PeftModel.save_pretrained`` write it), or diffusers
    LoRA weights (``pytorch_lora_weights.safetensors``, a folder holding it, or any ``.safetensors`` file)."""
    p = Path(path)
    if (p / CONFIG_FILE).is_file():
        _load_peft_folder(unet, p, field)
    else:
        file = p / DIFFUSERS_WEIGHTS if p.is_dir() else p
        if not file.is_file() or file.suffix != ".safetensors":
            raise LoraError(f"{field}: {p} is neither a peft adapter folder ({CONFIG_FILE} + {WEIGHTS_FILE}) nor "
                            f"diffusers LoRA weights ({DIFFUSERS_WEIGHTS} or a .safetensors file)")
        state = load_file(str(file))
        prefix = "unet" if any(k.startswith("unet.") for k in state) else None
        try:
            unet.load_lora_adapter(state, prefix=prefix, adapter_name=ADAPTER)
        except (ValueError, KeyError, RuntimeError) as e:
            raise LoraError(f"{field}: cannot load the LoRA weights in {file}: {e}") from None
        if not lora_layers(unet):
            raise LoraError(f"{field}: {file} holds no LoRA weights for the UNet")
    mark_trainable(unet)


def _load_peft_folder(unet: UNet2DConditionModel, d: Path, field: str) -> None:
    weights = d / WEIGHTS_FILE
    if not weights.is_file():
        raise LoraError(f"{field}: {d} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
    try:
        config = LoraConfig.from_pretrained(str(d))
    except (TypeError, ValueError, json.JSONDecodeError) as e:
        raise LoraError(f"{field}: {d / CONFIG_FILE} is not a peft LoRA config: {e}") from None
    unet.add_adapter(config, ADAPTER)
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(str(weights)).items()}
    set_lora_state(unet, state, f"{field}: {weights}")
