"""Structured channel pruning of a diffusers UNet with torch-pruning (the paper's magnitude pruning)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch_pruning as tp
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from torch import nn

from .unet import block_widths, count_params, sync_attributes

IMPORTANCES = ("magnitude", "random")


@dataclass
class PruneStats:
    """Parameter counts and widths before and after pruning."""

    ratio: float
    importance: str
    params_before: int
    params_after: int
    widths_before: dict[str, int] = field(default_factory=dict)
    widths_after: dict[str, int] = field(default_factory=dict)

    @property
    def kept_fraction(self) -> float:
        return self.params_after / max(1, self.params_before)

    def to_dict(self) -> dict:
        return {**asdict(self), "kept_fraction": self.kept_fraction}


def _importance(name: str) -> tp.importance.Importance:
    if name == "magnitude":
        return tp.importance.MagnitudeImportance(p=2)
    if name == "random":
        return tp.importance.RandomImportance()
    raise ValueError(f"unknown importance {name!r}; expected one of {IMPORTANCES}")


def prune_unet(
    model: UNet2DModel,
    ratio: float,
    importance: str = "magnitude",
    example_size: int | None = None,
    seed: int = 0,
) -> tuple[UNet2DModel, PruneStats]:
    """Prune ``model`` in place: ``ratio`` of the channels of every prunable layer group is removed.

    As in the paper: ``MagnitudePruner`` (L2 magnitude importance), one step, ``conv_out`` ignored. Attention
    q/k/v widths are pruned per head (``num_heads``, no whole-head removal). torch-pruning treats GroupNorm
    groups as channel groups and removes the same number of channels from each, so every GroupNorm still
    divides its width; the kept count per group is floor(group_size * (1 - ratio)), which prunes narrow
    layers more than ``ratio`` (e.g. 32 -> 16, 64 -> 40 with 8 groups at 0.3). Afterwards the diffusers
    width attributes are synced so the model runs, saves and loads.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    before, widths_before = count_params(model), block_widths(model)
    if ratio > 0:
        size = example_size or int(model.config.sample_size)
        device = next(model.parameters()).device
        example = {
            "sample": torch.randn(1, model.config.in_channels, size, size, device=device),
            "timestep": torch.ones(1, dtype=torch.long, device=device),
        }
        heads = {}
        for m in model.modules():
            if isinstance(m, Attention):
                heads.update({m.to_q: m.heads, m.to_k: m.heads, m.to_v: m.heads})
        torch.manual_seed(seed)  # only the random importance draws numbers
        was_training = model.training
        model.eval()
        pruner = tp.pruner.MagnitudePruner(
            model,
            example,
            importance=_importance(importance),
            iterative_steps=1,
            pruning_ratio=ratio,
            num_heads=heads,
            prune_num_heads=False,
            ignored_layers=[model.conv_out],
        )
        pruner.step()
        sync_attributes(model)
        model.train(was_training)
        _check_groups(model)
    stats = PruneStats(ratio, importance, before, count_params(model), widths_before, block_widths(model))
    return model, stats


def _check_groups(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.GroupNorm) and m.num_channels % m.num_groups:
            raise RuntimeError(f"{name}: {m.num_channels} channels not divisible by {m.num_groups} groups")
