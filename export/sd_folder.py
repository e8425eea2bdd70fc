"""Writing a Stable Diffusion 1.x diffusers folder (model_index.json and one subfolder per component)."""

from __future__ import annotations

from pathlib import Path

import torch


def save_sd_folder(
    folder: Path, *, vae, text_encoder, tokenizer, unet, scheduler, dtype: torch.dtype = torch.float32
) -> Path:
    """The layout `diffuserve export` and diffusers' StableDiffusionPipeline read, without a safety checker."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.to("cpu", dtype).save_pretrained(folder, safe_serialization=True)
    return folder
