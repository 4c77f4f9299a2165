"""What a model family implements, and the data and assets the worker hands it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from datacredit.seeds import Seeds
from datacredit.spec import ValuationRun


@dataclass
class TrainData:
    """The run's training set, decoded once by prepare (``prepare/dataset.npz``)."""

    images: torch.Tensor  # (N, C, H, W) float in [-1, 1] at the data set's resolution
    owner: np.ndarray  # (N,) contributor index of each image
    captions: list[str]  # (N,) one caption per image; "" where there is none

    def subset(self, mask: np.ndarray) -> TrainData:
        """The images where ``mask`` is True (a coalition's data)."""
        idx = np.flatnonzero(mask)
        return TrainData(self.images[torch.from_numpy(idx)], self.owner[idx], [self.captions[i] for i in idx])


@dataclass
class Assets:
    """Resolves a manifest's model and weight URIs (paths, file://, s3://) to local files or folders."""

    fetch: Callable[[str, str], Path]  # (uri, field path for errors) -> local path; s3:// downloaded once

    def get(self, uri: str, field: str) -> Path:
        """A local path for ``uri``; errors name ``field`` (for example ``spec.model.autoencoder``)."""
        return self.fetch(uri, field)


class Family(Protocol):
    """A model family. All randomness comes from the seeds passed in (same seed, same result)."""

    name: str

    def resolution(self, run: ValuationRun, assets: Assets) -> int:
        """The image side in pixels the data set is decoded at (``spec.dataset.resolution`` wins)."""
        ...

    def prepare(
        self, run: ValuationRun, data: TrainData, out_dir: Path, assets: Assets, progress: bool = False
    ) -> dict[str, Any]:
        """Load (or train) the full model, prune it, fine-tune the pruned model on all data, and write what
        coalitions need to ``out_dir`` (uploaded as ``prepare/sparsified``). Returns ``params_full``,
        ``params_pruned``, ``prune`` (a dict) and ``seconds`` (a dict of stage timings)."""
        ...

    def load(self, run: ValuationRun, out_dir: Path, data: TrainData, assets: Assets) -> Any:
        """Load what :meth:`prepare` wrote; the result is reused by every coalition of the process."""
        ...

    def coalition(
        self, run: ValuationRun, state: Any, mask: np.ndarray, seeds: Seeds
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Fine-tune a copy of the sparsified model on the images where ``mask`` is True, then generate
        ``spec.property.samples`` images in [-1, 1]; with no images, sample the model trained on no data (the
        paper's null model: the untrained initialisation, or the base model without the LoRA). ``seeds.data``
        draws the batches, ``seeds.noise`` everything else. Returns the samples and stage seconds."""
        ...

    def coalitions(
        self, run: ValuationRun, state: Any, masks: Sequence[np.ndarray], seeds: Sequence[Seeds]
    ) -> list[tuple[torch.Tensor, dict[str, float]]]:
        """:meth:`coalition` for several (mask, seeds) pairs of one run at once: each one's samples, equal to
        what :meth:`coalition` gives within float tolerance, and its stage seconds (its share of a pack's)."""
        ...


def one_by_one(family: Family, run: ValuationRun, state: Any, masks: Sequence[np.ndarray], seeds: Sequence[Seeds]
               ) -> list[tuple[torch.Tensor, dict[str, float]]]:
    """:meth:`Family.coalitions` for a family that does not pack: one :meth:`Family.coalition` after another."""
    return [family.coalition(run, state, mask, seed) for mask, seed in zip(masks, seeds, strict=True)]
