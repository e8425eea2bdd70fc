"""Tiny random models of each Stable Diffusion architecture, built from configs in seconds, for demos and tests.

SD 1.x; SD 2.x (OpenCLIP text encoder as diffusers stores it, v-prediction); SDXL base (two text encoders, the U-Net's
added text-and-time conditioning); and their inpainting (9-channel U-Net) and LCM (guidance-embedding U-Net)
variants. Each is a real diffusers folder with its release's layout, scheduler config and pipeline class, so it
loads with that pipeline's from_pretrained, but with widths of 32-64 and random weights.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from diffuserve.engine.manifest import FAMILIES, INPAINT_EXTRA_CHANNELS, SD1, SD2, SDXL

from .families import SDXL_TIME_IDS
from .scheduler_configs import (
    LCM_SCHEDULER_CONFIG,
    SD1_SCHEDULER_CONFIG,
    SD21_SCHEDULER_CONFIG,
    SDXL_SCHEDULER_CONFIG,
    ZERO_SNR_SCHEDULER_OVERRIDES,
)
from .sd_folder import NO_SAFETY_CHECKER, save_pipeline_folder
from .tiny_tokenizer import EOS_TOKEN, TINY_VOCAB_SIZE, save_tiny_clip_tokenizer

# The tiny models by name, as keyword arguments of build_tiny_model: every architecture and variant diffuserve
# exports, for tests to build the same folders.
TINY_MODELS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "sd1": {},
        "sd2": {"family": SD2},
        "sd2-zero-snr": {"family": SD2, "zero_snr": True},
        "sdxl": {"family": SDXL},
        "sd1-inpaint": {"inpainting": True},
        "sdxl-inpaint": {"family": SDXL, "inpainting": True},
        "sd1-lcm": {"lcm": True},
        "sdxl-lcm": {"family": SDXL, "lcm": True},
    }
)

# OpenCLIP's tokenizer (SD 2.x's, SDXL's second) pads with "!" where OpenAI CLIP's pads with its end-of-text token.
OPENCLIP_PAD_TOKEN = "!"
# What scales each family's latents to about unit variance: SD 1.x/2.x's VAE, and SDXL's retrained one.
SD_VAE_SCALING_FACTOR = 0.18215
SDXL_VAE_SCALING_FACTOR = 0.13025
# The width each of SDXL's time ids is embedded at (256 in SDXL).
TINY_TIME_EMBED_DIM = 8
# Width of LCM's guidance-scale embedding (256 in LCM Dreamshaper v7).
TINY_TIME_COND_DIM = 32
LATENT_CHANNELS = 4
# An inpainting U-Net's input: the latents, the mask and the masked image's latents.
INPAINT_IN_CHANNELS = 2 * LATENT_CHANNELS + INPAINT_EXTRA_CHANNELS


@dataclass(frozen=True)
class TinyTextEncoder:
    """One text encoder of a family and its tokenizer."""

    part: str
    tokenizer: str
    pad_token: str
    # OpenAI CLIP (SD 1.x, SDXL's first) uses quick GELU, OpenCLIP (SD 2.x, SDXL's second) plain GELU.
    hidden_act: str
    hidden_size: int = 32
    # The pooled projection's width, which the U-Net's added conditioning takes (SDXL's second); 0: no projection.
    projection_dim: int = 0


_OPENAI_CLIP = TinyTextEncoder("text_encoder", "tokenizer", EOS_TOKEN, "quick_gelu")
TEXT_ENCODERS: Mapping[str, tuple[TinyTextEncoder, ...]] = MappingProxyType(
    {
        SD1: (_OPENAI_CLIP,),
        SD2: (TinyTextEncoder("text_encoder", "tokenizer", OPENCLIP_PAD_TOKEN, "gelu"),),
        # Widths differ between the two (768 and 1280 in SDXL) and from the pooled width, so that a concatenation in
        # the wrong order or a hidden state taken for the pooled embedding fails on its shape.
        SDXL: (
            _OPENAI_CLIP,
            TinyTextEncoder("text_encoder_2", "tokenizer_2", OPENCLIP_PAD_TOKEN, "gelu", 64, projection_dim=40),
        ),
    }
)

_SD1_BLOCKS = {
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}
# The U-Net's layout per family, beyond the widths every tiny U-Net shares.
UNET_LAYOUTS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        SD1: {**_SD1_BLOCKS, "attention_head_dim": 8},
        # SD 2.x: a head count per level (diffusers' attention_head_dim), linear projections in the transformer
        # blocks, attention upcast to float32 (2.1's fp16 softmax overflows otherwise).
        SD2: {**_SD1_BLOCKS, "attention_head_dim": (2, 4), "use_linear_projection": True, "upcast_attention": True},
        # SDXL: no attention at the highest resolution, more transformer layers lower down, and the pooled text
        # embedding and time ids added to the timestep embedding.
        SDXL: {
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "attention_head_dim": (2, 4),
            "use_linear_projection": True,
            "transformer_layers_per_block": (1, 2),
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": TINY_TIME_EMBED_DIM,
        },
    }
)
FAMILY_SCHEDULERS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        SD1: SD1_SCHEDULER_CONFIG,
        # DDIM's default spacing written out, so no reader of the config depends on knowing diffusers' defaults.
        SD2: {**SD21_SCHEDULER_CONFIG, "timestep_spacing": "leading"},
        SDXL: SDXL_SCHEDULER_CONFIG,
    }
)


def build_tiny_model(
    folder: str | Path,
    seed: int = 0,
    prediction_type: str | None = None,
    *,
    family: str = SD1,
    inpainting: bool = False,
    lcm: bool = False,
    zero_snr: bool = False,
) -> Path:
    """Writes a diffusers folder of the family's layout (8x VAE, 4 latent channels) with random weights.

    `inpainting`: a 9-channel U-Net and the inpainting pipeline; `lcm`: a U-Net with LCM's guidance embedding and
    LCMScheduler; `zero_snr`: the scheduler rescaled to zero terminal SNR with trailing timesteps; `prediction_type`
    replaces the family's own (SD 2.x: v_prediction, others: epsilon).
    """
    import diffusers

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if inpainting and lcm:
        raise ValueError("no pipeline inpaints with an LCM U-Net; choose inpainting or lcm")
    folder = Path(folder)
    scheduler_config = tiny_scheduler_config(family, lcm, zero_snr, prediction_type)
    encoders = TEXT_ENCODERS[family]
    tokenizers = {encoder.tokenizer: tiny_tokenizer(folder / encoder.tokenizer, encoder) for encoder in encoders}
    in_channels = INPAINT_IN_CHANNELS if inpainting else LATENT_CHANNELS
    torch.manual_seed(seed)
    components: dict[str, Any] = {
        **tokenizers,
        **{encoder.part: tiny_text_encoder(encoder, tokenizers[encoder.tokenizer]) for encoder in encoders},
        "unet": tiny_unet(family, encoders, in_channels, TINY_TIME_COND_DIM if lcm else None),
        "vae": tiny_vae(SDXL_VAE_SCALING_FACTOR if family == SDXL else SD_VAE_SCALING_FACTOR),
        "scheduler": getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config),
    }
    pipeline_class, settings = tiny_pipeline(family, inpainting, lcm)
    save_pipeline_folder(folder, pipeline_class, components, **settings)
    # Keep the scheduler file as the release has it, variant settings aside (save_pretrained adds derived defaults).
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
    return folder


def tiny_scheduler_config(family: str, lcm: bool, zero_snr: bool, prediction_type: str | None) -> dict[str, Any]:
    import diffusers

    config = dict(LCM_SCHEDULER_CONFIG if lcm else FAMILY_SCHEDULERS[family])
    if zero_snr:
        scheduler = getattr(diffusers, config["_class_name"])
        if "rescale_betas_zero_snr" not in inspect.signature(scheduler.__init__).parameters:
            raise ValueError(f"zero_snr: {scheduler.__name__} has no zero-terminal-SNR rescaling")
        config.update(ZERO_SNR_SCHEDULER_OVERRIDES)
    if prediction_type:
        config["prediction_type"] = prediction_type
    return config


def tiny_pipeline(family: str, inpainting: bool, lcm: bool) -> tuple[str, dict[str, Any]]:
    """The diffusers pipeline class the folder is saved as, and its constructor options."""
    if family == SDXL:
        # As SDXL base ships: an empty negative prompt conditions on zeros. No watermark on tiny models' images.
        sdxl = {"force_zeros_for_empty_prompt": True, "add_watermarker": False}
        if inpainting:
            return "StableDiffusionXLInpaintPipeline", {**sdxl, "requires_aesthetics_score": False}
        # LCM-SDXL ships as an SDXL pipeline with LCMScheduler.
        return "StableDiffusionXLPipeline", sdxl
    if inpainting:
        return "StableDiffusionInpaintPipeline", NO_SAFETY_CHECKER
    return ("LatentConsistencyModelPipeline" if lcm else "StableDiffusionPipeline"), NO_SAFETY_CHECKER


def tiny_tokenizer(folder: Path, encoder: TinyTextEncoder):
    from transformers import CLIPTokenizer

    save_tiny_clip_tokenizer(folder, pad_token=encoder.pad_token)
    return CLIPTokenizer.from_pretrained(folder)


def tiny_text_encoder(encoder: TinyTextEncoder, tokenizer) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=encoder.hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        hidden_act=encoder.hidden_act,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **({"projection_dim": encoder.projection_dim} if encoder.projection_dim else {}),
    )
    return (CLIPTextModelWithProjection if encoder.projection_dim else CLIPTextModel)(config)


def tiny_unet(
    family: str, encoders: tuple[TinyTextEncoder, ...], in_channels: int, time_cond_proj_dim: int | None
) -> nn.Module:
    """The family's U-Net layout at widths 32 and 64. Its cross-attention reads the text encoders' hidden states side
    by side; SDXL's added conditioning, the time ids' embeddings and the pooled text embedding."""
    from diffusers import UNet2DConditionModel

    layout = dict(UNET_LAYOUTS[family])
    if family == SDXL:
        pooled = sum(encoder.projection_dim for encoder in encoders)
        layout["projection_class_embeddings_input_dim"] = SDXL_TIME_IDS * TINY_TIME_EMBED_DIM + pooled
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=in_channels,
        out_channels=LATENT_CHANNELS,
        cross_attention_dim=sum(encoder.hidden_size for encoder in encoders),
        time_cond_proj_dim=time_cond_proj_dim,
        **layout,
    )


def tiny_vae(scaling_factor: float) -> nn.Module:
    """Four levels, as in SD: 8x spatial downsampling, 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=LATENT_CHANNELS,
        layers_per_block=1,
        sample_size=128,
        scaling_factor=scaling_factor,
    )
