"""Writing a Stable Diffusion diffusers folder (model_index.json and one subfolder per component)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# A Stable Diffusion 1.x/2.x pipeline's options for a folder without the safety checker and its image processor.
NO_SAFETY_CHECKER = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def save_pipeline_folder(
    folder: Path, pipeline_class: str, components: dict[str, Any], dtype: torch.dtype = torch.float32, **settings: Any
) -> Path:
    """Saves the components through the diffusers pipeline class itself, so model_index.json names that class and
    the folder loads with its from_pretrained. `settings` are the pipeline's own constructor options."""
    import diffusers

    pipeline = getattr(diffusers, pipeline_class)(**components, **settings)
    pipeline.to("cpu", dtype).save_pretrained(folder, safe_serialization=True)
    return folder


def save_sd_folder(
    folder: Path, *, vae, text_encoder, tokenizer, unet, scheduler, dtype: torch.dtype = torch.float32
) -> Path:
    """The layout `diffuserve export` and diffusers' StableDiffusionPipeline read, without a safety checker."""
    components = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet}
    return save_pipeline_folder(
        folder, "StableDiffusionPipeline", {**components, "scheduler": scheduler}, dtype, **NO_SAFETY_CHECKER
    )
