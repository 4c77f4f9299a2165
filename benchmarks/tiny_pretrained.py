"""Tiny diffusion components pretrained on digits, for the sd-lora and ldm rows of the paper-table benchmark.

No weights can be downloaded here, so each model is built from configs (the tests' tiny sizes) and pretrained for
a few hundred steps on all digits: a VQ-VAE for ldm, and for sd-lora a VAE plus a UNet that denoises its latents
under the empty prompt (the LoRA the valuation trains on top is what learns the captions).
"""

from __future__ import annotations

import json
import string
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LETTERS = list(string.ascii_lowercase)


def tokenizer(folder: Path, max_length: int = 16):  # noqa: ANN201 (transformers type)
    """A CLIP BPE tokenizer over single letters (captions are lowercase words)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["<|startoftext|>", "<|endoftext|>", *LETTERS, *(c + "</w>" for c in LETTERS)]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)


def pretrained_pipeline(root: Path, images: torch.Tensor, vae_steps: int = 400, unet_steps: int = 600,
                        seed: int = 0) -> Path:
    """Build, pretrain and save (``root/pipe``, reused when there) a StableDiffusionPipeline on ``images``
    (N, 3, 16, 16) in [-1, 1]; returns its folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = root / "pipe"
    if (out / "model_index.json").is_file():
        return out
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    started = time.monotonic()
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    for step in range(vae_steps):
        x = images[torch.randint(len(images), (64,), generator=gen)]
        dist = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(dist.sample(generator=gen)).sample, x) + 1e-6 * dist.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            print(f"tiny SD: VAE step {step + 1}/{vae_steps} loss {loss.item():.4f}", flush=True)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    latents = latents * vae.config.scaling_factor

    tok = tokenizer(root / "tokenizer-src")
    text = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=len(tok), max_position_embeddings=16)).eval()
    with torch.no_grad():
        empty = text(tok([""], padding="max_length", max_length=16, return_tensors="pt").input_ids)[0]
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    noise_sched = DDPMScheduler.from_config(scheduler.config)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    for step in range(unet_steps):
        z = latents[torch.randint(len(latents), (64,), generator=gen)]
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(noise_sched.config.num_train_timesteps, (len(z),), generator=gen)
        pred = unet(noise_sched.add_noise(z, noise, t), t, empty.expand(len(z), -1, -1)).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            print(f"tiny SD: UNet step {step + 1}/{unet_steps} loss {loss.item():.4f}", flush=True)
    pipe = StableDiffusionPipeline(unet=unet.eval(), vae=vae, text_encoder=text, tokenizer=tok, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out))
    print(f"tiny SD: pretrained in {time.monotonic() - started:.0f} s", flush=True)
    return out


def pretrained_vqmodel(root: Path, images: torch.Tensor, steps: int = 400, seed: int = 0) -> Path:
    """Build, pretrain (reconstruction + commitment loss) and save (``root/vqvae``, reused when there) a VQModel
    for ``images`` (N, 1, 16, 16) in [-1, 1]: 3x8x8 latents, 64 codes; returns its folder."""
    from diffusers import VQModel

    out = root / "vqvae"
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    started = time.monotonic()
    vq = VQModel(in_channels=1, out_channels=1, block_out_channels=(16, 32),
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 latent_channels=3, num_vq_embeddings=64, sample_size=16, norm_num_groups=8)
    opt = torch.optim.Adam(vq.parameters(), lr=2e-3)
    for step in range(steps):
        x = images[torch.randint(len(images), (64,), generator=gen)]
        out_ = vq(x)
        loss = F.mse_loss(out_.sample, x) + out_.commit_loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            print(f"tiny VQ-VAE: step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
    vq.eval().save_pretrained(str(out))
    print(f"tiny VQ-VAE: pretrained in {time.monotonic() - started:.0f} s", flush=True)
    return out
