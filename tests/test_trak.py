"""D-TRAK features on a tiny real diffusers UNet: exact per-sample gradients, a seeded projection, and a planted
case where the contributor holding copies of the generated samples must come out on top."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datacredit import evaluation as ev

pytestmark = pytest.mark.workload


Setup = tuple[torch.nn.Module, dict[str, torch.Tensor], torch.Tensor]


@pytest.fixture(scope="module")
def setup() -> Setup:
    """A UNet trained briefly on digits, its samples, and three contributors: copies of those samples, uniform
    noise, other digits."""
    from datacredit.jobs.digits import digit_arrays, noise_images
    from datacredit.jobs.sample import sample_ddim
    from datacredit.jobs.train import train_ddpm
    from datacredit.jobs.unet import build_unet

    torch.manual_seed(0)
    digits = torch.from_numpy(digit_arrays()[0][:200]).float().div(127.5).sub(1).unsqueeze(1)
    model = train_ddpm(build_unet(8, 1, (16, 32)), digits[:160], steps=40, lr=2e-3, batch_size=32,
                       ema=False).inference_model
    generated = sample_ddim(model, 6, steps=10, seed=0)
    noise = torch.from_numpy(noise_images(6, np.random.default_rng(0))).float().div(127.5).sub(1).unsqueeze(1)
    return model, {"copies": generated.clone(), "noise": noise, "digits": digits[160:166]}, generated


def test_per_sample_gradients_are_those_of_a_plain_backward_per_image(setup: Setup) -> None:
    from datacredit.jobs.train import noise_scheduler
    from datacredit.jobs.trak import draws, output_gradients

    model, groups, _ = setup
    images = torch.cat(list(groups.values()))
    batched = torch.cat(list(output_gradients(model, images, timesteps=4, seed=1, batch=5)))
    t, noise = draws(4, (1, 8, 8), seed=1)
    alpha = noise_scheduler().alphas_cumprod[t].view(-1, 1, 1, 1)
    for k in (0, 7, 17):
        model.zero_grad()
        xt = alpha.sqrt() * images[k:k + 1] + (1 - alpha).sqrt() * noise
        model(xt, t).sample.pow(2).mean().backward()
        plain = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert torch.allclose(batched[k], plain, atol=1e-6, rtol=1e-4)
    assert batched.shape == (18, sum(p.numel() for p in model.parameters()))


def test_features_are_seeded_and_independent_of_the_projection_batch(setup: Setup) -> None:
    from datacredit.jobs.trak import dtrak_features

    model, groups, _ = setup
    images = torch.cat(list(groups.values()))
    one = dtrak_features(model, images, dim=64, timesteps=3, seed=0)
    assert one.shape == (18, 64) and one.dtype == torch.float64
    assert torch.equal(one, dtrak_features(model, images, dim=64, timesteps=3, seed=0))
    assert torch.allclose(one, dtrak_features(model, images, dim=64, timesteps=3, seed=0, batch=4), atol=1e-10)
    assert not torch.allclose(one, dtrak_features(model, images, dim=64, timesteps=3, seed=1))


def test_dtrak_ranks_copies_of_the_generated_samples_first(setup: Setup) -> None:
    from datacredit.jobs.trak import dtrak_features

    model, groups, generated = setup
    images = torch.cat(list(groups.values()))
    owner = np.repeat(np.arange(3), 6)
    kw = {"dim": 128, "timesteps": 5, "seed": 0}
    scores = ev.trak_scores(dtrak_features(model, images, **kw).numpy(),
                            dtrak_features(model, generated, **kw).numpy(), owner, 3)
    copies, noise, digits = scores
    assert scores.shape == (3,) and np.isfinite(scores).all()
    assert copies > 0 and copies > 2 * max(abs(noise), abs(digits))


def test_conditional_gradients_are_those_of_a_plain_backward_on_the_lora_only(tmp_path_factory: pytest.TempPathFactory
                                                                               ) -> None:
    """sd-lora: per-image gradients of a text-conditional UNet over its LoRA parameters only, each image with its
    own caption embedding and the pipeline's noise schedule, equal a plain backward per image."""
    from diffusers import UNet2DConditionModel

    from datacredit.jobs.lora import attach_lora, lora_parameters
    from datacredit.jobs.trak import Conditioning, draws, dtrak_features, output_gradients
    from tests.tiny_models import save_tiny_sd_pipeline

    folder = save_tiny_sd_pipeline(tmp_path_factory.mktemp("sd"))
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet")).eval()
    attach_lora(unet, 4, None, ["to_q", "to_k", "to_v", "to_out.0"])
    with torch.no_grad():
        for p in lora_parameters(unet):
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    g = torch.Generator().manual_seed(2)
    latents, emb = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 16, 32, generator=g)
    cumprod = torch.linspace(0.999, 0.01, 1000)
    cond = Conditioning(emb, lambda name: ".lora_" in name, cumprod)
    batched = torch.cat(list(output_gradients(unet, latents, timesteps=3, seed=1, batch=2, cond=cond)))
    lora = lora_parameters(unet)
    assert batched.shape == (5, sum(p.numel() for p in lora))
    t, noise = draws(3, (4, 8, 8), seed=1)
    alpha = cumprod[t].view(-1, 1, 1, 1)
    for k in (0, 3):
        unet.zero_grad()
        xt = alpha.sqrt() * latents[k:k + 1] + (1 - alpha).sqrt() * noise
        unet(xt, t, emb[k:k + 1].expand(3, -1, -1)).sample.pow(2).mean().backward()
        plain = torch.cat([p.grad.reshape(-1) for p in lora])
        assert torch.allclose(batched[k], plain, atol=1e-6, rtol=1e-4)
    # the caption matters: the same latent with another caption has another feature
    feats = dtrak_features(unet, latents[[0, 0]], dim=32, timesteps=2, cond=Conditioning(
        emb[[0, 1]], cond.trainable, cumprod))
    assert feats.shape == (2, 32) and not torch.allclose(feats[0], feats[1])
