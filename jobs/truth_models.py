"""What `datacredit evaluate` trains for ground truth, per model family: a model retrained from scratch on a
subset, the unpruned full model fine-tuned on it, and the full model's own samples.

* ``ddpm`` / ``ldm`` (:class:`UNetTruth`): a fresh UNet trained with ``spec.model.train`` on the subset's images
  (ldm: on their VQ latents, samples decoded before scoring); FT-Shapley fine-tunes the unpruned UNet prepare saved
  (``prepare/sparsified/full``).
* ``sd-lora`` (:class:`LoraTruth`): retraining from scratch is training a fresh LoRA on the frozen base pipeline
  (the base model is never retrained, as in the paper's ArtBench setting); FT-Shapley fine-tunes the unpruned LoRA
  prepare saved (``prepare/sparsified/lora-full``). Both swap the adapter in the run's pipeline and put the
  pruned LoRA back afterwards, so the run's own coalitions still see it. D-TRAK attributes the unpruned LoRA's
  parameters, each image with its caption.
"""

from __future__ import annotations

import copy
import dataclasses
import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np
import torch
from diffusers import DDPMScheduler

from datacredit import layout
from datacredit.evaluation import WorkModel
from datacredit.seeds import derived_seed
from datacredit.storage import Storage

from .families.ddpm import FULL_DIR, unet_arch
from .families.ldm import decode, head_dim
from .families.sdlora import FULL_LORA_DIR, State, sample, text_embeddings, train_lora
from .lora import ADAPTER, attach_lora, load_lora, mark_trainable, set_lora_state
from .pipeline import finetune_and_sample
from .sample import sample_ddim
from .train import Checkpoint, train_ddpm
from .trak import Conditioning, dtrak_features
from .unet import build_unet
from .worker import PreparedRun, local_copy


class EvaluationError(ValueError):
    """The run cannot be evaluated as asked (unsupported family, missing results or prepare outputs)."""


class TruthModel(Protocol):
    """A family's models for ground truth. Samples are images in [-1, 1], as the run's property scores them."""

    images: torch.Tensor  # the contributors' images in pixels, in the order of prepare/dataset.npz
    conditional: bool  # whether the model is conditioned on captions (then :meth:`proxy` works)

    def retrain(self, members: tuple[int, ...], seed: int) -> torch.Tensor:
        """Samples of a model trained from scratch on ``members``' data."""
        ...

    def finetune_full(self, members: tuple[int, ...], seed: int) -> torch.Tensor:
        """Samples of the unpruned full model fine-tuned on ``members``' data for ``spec.method.finetune``."""
        ...

    def full_samples(self) -> torch.Tensor:
        """Samples of the unpruned full model (the run's seed), generated once."""
        ...

    def proxy(self, members: tuple[int, ...], seed: int) -> torch.Tensor:
        """Samples of the unpruned full model conditioned only on ``members``' captions (no training)."""
        ...

    def work_model(self, work: WorkModel) -> WorkModel:
        """The run's work model with the parameters its passes really run through."""
        ...

    def dtrak_features(self, dim: int, timesteps: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
        """D-TRAK features of the training data and of the full model's samples, and how many items they cover."""
        ...


def dataset_images(store: Storage) -> torch.Tensor:
    """The run's decoded training images (``prepare/dataset.npz``) as float in [-1, 1]."""
    with np.load(io.BytesIO(store.read_bytes(layout.DATASET))) as z:
        return torch.from_numpy(z["images"]).float().div(127.5).sub(1.0)


def _prepare_folder(store: Storage, p: PreparedRun) -> Any:
    return local_copy(store, layout.SPARSIFIED, "eval-" + p.manifest["configHash"])


def _missing(store: Storage, what: str) -> EvaluationError:
    return EvaluationError(f"{store.uri}/{layout.SPARSIFIED}/{what}: no unpruned full model; prepare saves it since "
                           "evaluation support for this family: delete prepare/ and rerun the run")


class UNetTruth:
    """ddpm and ldm: UNets on pixels, or on VQ latents decoded before scoring."""

    conditional = False

    def __init__(self, p: PreparedRun, store: Storage):
        self.p, self.store = p, store
        s = p.run.spec
        if s.model.family == "ldm":
            state = p.state
            self.images = dataset_images(store)  # ldm's state holds latents, not pixels
            self.train, self.clip_sample = state.latents, False
            self.decode: Callable[[torch.Tensor], torch.Tensor] = lambda z: decode(state.vq, z, state.channels)
            self.arch = {**unet_arch(p.run), "attention_head_dim": head_dim(list(s.model.architecture
                                                                                   .block_out_channels))}
        else:
            _, data = p.state
            self.images, self.train, self.clip_sample = data.images, data.images, True
            self.decode, self.arch = lambda x: x, unet_arch(p.run)
        self._full: Checkpoint | None = None
        self._full_generated: torch.Tensor | None = None

    def images_of(self, members: tuple[int, ...]) -> torch.Tensor:
        """What the UNet trains on for ``members``: their images (ddpm) or their images' latents (ldm)."""
        return self.train[torch.from_numpy(np.isin(self.p.owner, members))]

    def retrain(self, members: tuple[int, ...], seed: int) -> torch.Tensor:
        s = self.p.run.spec
        t = s.model.train
        torch.manual_seed(seed)
        model = build_unet(sample_size=self.train.shape[-1], in_channels=self.train.shape[1], **self.arch)
        result = train_ddpm(model, self.images_of(members), t.steps, t.learning_rate, t.batch_size, seed=seed)
        return self.decode(sample_ddim(result.inference_model, s.property.samples, s.method.sampler.steps, seed=seed,
                                       clip_sample=self.clip_sample))

    def full_model(self) -> Checkpoint:
        """The unpruned full model prepare saved (``prepare/sparsified/full``)."""
        if self._full is None:
            folder = _prepare_folder(self.store, self.p) / FULL_DIR
            if not (folder / "model").is_dir():
                raise _missing(self.store, FULL_DIR)
            self._full = Checkpoint.load(folder)
        return self._full

    def full_generated(self) -> torch.Tensor:
        """The full model's samples where it works: images, or latents for ldm."""
        if self._full_generated is None:
            s = self.p.run.spec
            self._full_generated = sample_ddim(self.full_model().inference_model, s.property.samples,
                                               s.method.sampler.steps, seed=s.seed, clip_sample=self.clip_sample)
        return self._full_generated

    def full_samples(self) -> torch.Tensor:
        return self.decode(self.full_generated())

    def finetune_full(self, members: tuple[int, ...], seed: int) -> torch.Tensor:
        s = self.p.run.spec
        ft = s.method.finetune
        samples, _, _ = finetune_and_sample(self.full_model(), self.images_of(members), steps=ft.steps,
                                            lr=ft.learning_rate, batch_size=ft.batch_size,
                                            n_samples=s.property.samples, ddim_steps=s.method.sampler.steps,
                                            seed=seed, clip_sample=self.clip_sample)
        return self.decode(samples)

    def proxy(self, members: tuple[int, ...], seed: int) -> torch.Tensor:
        raise EvaluationError("--baselines proxy: the model is unconditional (no captions or labels to condition "
                              "on); leave it out of --baselines")

    def work_model(self, work: WorkModel) -> WorkModel:
        return work  # prepare's parameter counts are the UNets'

    def dtrak_features(self, dim: int, timesteps: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
        generated, model = self.full_generated(), self.full_model().inference_model  # ldm: in latent space
        kw = {"dim": dim, "timesteps": timesteps, "seed": seed}
        return (dtrak_features(model, self.train, **kw).numpy(), dtrak_features(model, generated, **kw).numpy(),
                len(self.train) + len(generated))


class LoraTruth:
    """sd-lora: LoRAs on the run's frozen Stable Diffusion pipeline."""

    conditional = True

    def __init__(self, p: PreparedRun, store: Storage):
        self.p, self.store = p, store
        self.state: State = p.state
        self.images = dataset_images(store)
        self.full_dir = _prepare_folder(store, p) / FULL_LORA_DIR
        if not (self.full_dir / "adapter_config.json").is_file():
            raise _missing(store, FULL_LORA_DIR)
        unet = self.state.pipe.unet
        self._pruned_config = copy.deepcopy(unet.peft_config[ADAPTER])
        self._full_samples: torch.Tensor | None = None

    @contextmanager
    def _adapter(self, attach: Callable[[Any], None]) -> Iterator[None]:
        """The run's pipeline with another LoRA (``attach`` adds it); the pruned LoRA is put back afterwards."""
        unet = self.state.pipe.unet
        unet.unload_lora()
        try:
            attach(unet)
            yield
        finally:
            unet.unload_lora()
            unet.add_adapter(copy.deepcopy(self._pruned_config), ADAPTER)
            set_lora_state(unet, self.state.lora, "the pruned LoRA")
            mark_trainable(unet)

    def _items(self, members: tuple[int, ...]) -> np.ndarray:
        return np.flatnonzero(np.isin(self.p.owner, members))

    def _sample(self, seed: int, prompts: list[str] | None = None) -> torch.Tensor:
        """Samples from the run's prompt, or one prompt per sample."""
        s = self.p.run.spec
        images = sample(self.state.pipe, prompts or s.model.prompt, s.property.samples, s.method.sampler.steps,
                        s.method.sampler.guidance_scale, self.state.resolution, seed)
        return images.mean(dim=1, keepdim=True) if s.dataset.channels == 1 else images

    def _full_lora(self, unet: Any) -> None:
        load_lora(unet, self.full_dir, f"prepare output {self.full_dir}")

    def proxy_prompts(self, members: tuple[int, ...], seed: int) -> list[str]:
        """One caption per sample, drawn (seeded, with replacement) from ``members``' images, so a coalition's
        captions appear as often as in its data; ∅ gets the empty prompt (the unconditional model)."""
        n, enc = self.p.run.spec.property.samples, self.state.encoded
        items = self._items(members)
        if len(items) == 0:
            return [""] * n
        picks = items[np.random.default_rng(derived_seed(seed, "proxy-captions")).integers(len(items), size=n)]
        return [enc.captions[int(enc.caption[i])] for i in picks]

    def proxy(self, members: tuple[int, ...], seed: int) -> torch.Tensor:
        with self._adapter(self._full_lora):
            return self._sample(seed, self.proxy_prompts(members, seed))

    def retrain(self, members: tuple[int, ...], seed: int) -> torch.Tensor:
        s = self.p.run.spec
        lora, t = s.model.lora, s.model.train
        with self._adapter(lambda unet: attach_lora(unet, lora.rank, lora.alpha, lora.target_modules, seed=seed)):
            train_lora(self.state.pipe, self.state.encoded, self._items(members), t.steps, t.learning_rate,
                       t.batch_size, seed)
            return self._sample(seed)

    def finetune_full(self, members: tuple[int, ...], seed: int) -> torch.Tensor:
        ft = self.p.run.spec.method.finetune
        with self._adapter(self._full_lora):
            train_lora(self.state.pipe, self.state.encoded, self._items(members), ft.steps, ft.learning_rate,
                       ft.batch_size, seed)
            return self._sample(seed)

    def full_samples(self) -> torch.Tensor:
        if self._full_samples is None:
            with self._adapter(self._full_lora):
                self._full_samples = self._sample(self.p.run.spec.seed)
        return self._full_samples

    def work_model(self, work: WorkModel) -> WorkModel:
        """prepare counts LoRA parameters, but every pass runs the whole frozen UNet: its parameters are added,
        so a pruned LoRA saves little work (what it saves on a GPU)."""
        base = sum(p.numel() for n, p in self.state.pipe.unet.named_parameters() if ".lora_" not in n)
        return dataclasses.replace(work, params_full=base + work.params_full, params_pruned=base + work.params_pruned)

    def dtrak_features(self, dim: int, timesteps: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
        """D-TRAK on the unpruned LoRA's parameters (the frozen UNet held fixed), in latent space: a training image is
        its VAE latent mean with its caption's embedding, a sample of the full model is its re-encoded latent with
        the sampling prompt's; the pipeline's own noise schedule."""
        pipe, enc, s = self.state.pipe, self.state.encoded, self.p.run.spec
        generated = self.full_samples()
        with self._adapter(self._full_lora):
            vae = pipe.vae
            x = generated if generated.shape[1] == 3 else generated.repeat(1, 3, 1, 1)
            with torch.no_grad():
                latents = vae.encode(x.to(vae.device)).latent_dist.mean.cpu() * float(vae.config.scaling_factor)
            cumprod = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
            prompt = text_embeddings(pipe, [s.model.prompt])

            def lora(name: str) -> bool:
                return ".lora_" in name

            kw = {"dim": dim, "timesteps": timesteps, "seed": seed}
            train = dtrak_features(pipe.unet, enc.mean, cond=Conditioning(enc.embeddings[enc.caption], lora, cumprod),
                                   **kw)
            samples = dtrak_features(pipe.unet, latents, cond=Conditioning(
                prompt.expand(len(latents), -1, -1), lora, cumprod), **kw)
        return train.numpy(), samples.numpy(), len(train) + len(samples)


TRUTH_MODELS: dict[str, Callable[[PreparedRun, Storage], TruthModel]] = {
    "ddpm": UNetTruth, "ldm": UNetTruth, "sd-lora": LoraTruth}


def truth_model(p: PreparedRun, store: Storage) -> TruthModel:
    """The family's ground-truth models for a prepared run."""
    family = p.run.spec.model.family
    if family not in TRUTH_MODELS:
        raise EvaluationError(f"evaluate: not supported for family {family!r} (supported: "
                              f"{', '.join(TRUTH_MODELS)})")
    return TRUTH_MODELS[family](p, store)
