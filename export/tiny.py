"""A tiny random Stable-Diffusion-1.x-architecture model built from configs (seconds), for demos and tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .sd_folder import save_sd_folder
from .tiny_tokenizer import TINY_VOCAB_SIZE, save_tiny_clip_tokenizer

# SD 1.x's own noise schedule (PNDMScheduler config as shipped with SD 1.5).
SD1_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}


def build_tiny_model(folder: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Writes a diffusers folder with SD 1.x's layout and 8x VAE, but widths of 32-64, with random weights."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    save_tiny_clip_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=TINY_VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=3,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    # Four levels, as in SD: 8x spatial downsampling, 4 latent channels.
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        sample_size=128,
    )
    scheduler = PNDMScheduler.from_config({**SD1_SCHEDULER_CONFIG, "prediction_type": prediction_type})
    save_sd_folder(folder, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    # Keep the scheduler file exactly as a real SD 1.x folder has it (save_pretrained adds derived defaults).
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**SD1_SCHEDULER_CONFIG, "prediction_type": prediction_type}, indent=2)
    )
    return folder
