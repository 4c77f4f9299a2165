"""Tiny real models built from configs and saved in the formats users have (no downloads; tests only)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch


def save_tiny_clip(folder: Path) -> Path:
    """A CLIPVisionModelWithProjection (32 px, 16-d embeddings) with a CLIP image processor config.

    ``initializer_factor=5`` spreads random embeddings apart (the default makes every image look alike)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16,
                                        initializer_factor=5.0)
    transformers.CLIPVisionModelWithProjection(cfg).save_pretrained(folder, safe_serialization=True)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder)
    return folder


def save_linear_head(path: Path, seed: int, dim: int = 16) -> Path:
    """An aesthetic-style head: an nn.Linear(dim, 1) state dict saved with torch.save."""
    lin = torch.nn.Linear(dim, 1)
    torch.nn.init.normal_(lin.weight, generator=torch.Generator().manual_seed(seed))
    torch.save(lin.state_dict(), path)
    return path


def tiny_clip_tokenizer(folder: Path, max_length: int = 16):  # noqa: ANN201 (transformers type)
    """A CLIP BPE tokenizer from a letter-level vocab.json and an empty merges.txt."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True)
    letters = list(string.ascii_lowercase)
    vocab = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)


def save_tiny_sd_pipeline(root: Path) -> Path:
    """A StableDiffusionPipeline folder (``root/pipe``): UNet on 8x8 latents, VAE factor 2 (16 px images)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16)
    tokenizer = tiny_clip_tokenizer(root / "vocab")
    text = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=16))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(root / "pipe"))
    return root / "pipe"


def save_tiny_vqmodel(folder: Path, codes: int = 32) -> Path:
    """A 3-channel VQ-VAE (16x16 images -> 3x8x8 latents) saved with save_pretrained in ``folder``."""
    from diffusers import VQModel

    torch.manual_seed(0)
    VQModel(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=3, num_vq_embeddings=codes,
            sample_size=16, norm_num_groups=8).save_pretrained(folder)
    return folder
