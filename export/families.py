"""Which model family a diffusers folder holds, read from model_index.json and the configs, and its torch modules.

SD 1.x and 2.x share one layout (one CLIP text encoder; 2.x's is OpenCLIP as diffusers stores it, a CLIPTextModel
with plain GELU); SDXL has two text encoders and a U-Net with added text-and-time conditioning. Inpainting U-Nets
(9 input channels) and LCM U-Nets (a guidance embedding) are variants of either, read from the U-Net's config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffuserve.engine.manifest import INPAINT_EXTRA_CHANNELS, SD1, SD2, SDXL, TEXT_ENCODER, TEXT_ENCODER_2

from .specs import ModelDims, TextEncoderDims

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# The pipeline classes whose folders each family reads; their task variants share the weights' layout.
SD_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "LatentConsistencyModelPipeline",
    "LatentConsistencyModelImg2ImgPipeline",
)
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
# The classes each family's folder must name per part in model_index.json.
SD_CLASSES = {"text_encoder": "CLIPTextModel", "unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}
SDXL_CLASSES = {**SD_CLASSES, "text_encoder_2": "CLIPTextModelWithProjection"}
# SDXL's time ids: original size (h, w), crop top-left (y, x), target size (h, w).
SDXL_TIME_IDS = 6
# OpenCLIP's text tower uses plain GELU where OpenAI's CLIP (SD 1.x) uses quick_gelu: what tells SD 2.x apart.
SD2_HIDDEN_ACT = "gelu"
# transformers writes a huge sentinel for an unset model_max_length.
UNSET_MAX_LENGTH = 1_000_000


class ExportError(RuntimeError):
    """The source folder cannot be exported as asked; the message says what to change."""


@dataclass(frozen=True)
class SourceModel:
    """What export reads from a folder: its family, the pipeline class, the part folders and their classes."""

    folder: Path
    family: str
    pipeline_class: str
    parts: dict[str, str]
    force_zeros_for_empty_prompt: bool

    @property
    def tokenizers(self) -> tuple[str, ...]:
        """The tokenizer folders, one per text encoder."""
        return ("tokenizer", "tokenizer_2") if self.family == SDXL else ("tokenizer",)


def read_source(src: Path) -> SourceModel:
    """The family of a diffusers folder, or an ExportError saying why it is not one diffuserve exports."""
    index_path = src / "model_index.json"
    if not index_path.is_file():
        raise ExportError(f"{src}: no model_index.json; expected a diffusers model folder")
    index = json.loads(index_path.read_text())
    pipeline = index.get("_class_name", "")
    if pipeline in SDXL_PIPELINES:
        if index.get("requires_aesthetics_score") or not (index.get("text_encoder") or [None])[0]:
            raise ExportError(
                f"{src}: an SDXL refiner (one text encoder, aesthetic-score conditioning) is not supported; "
                "export the SDXL base model"
            )
        expected, family = SDXL_CLASSES, SDXL
    elif pipeline in SD_PIPELINES:
        expected, family = SD_CLASSES, SD1
    else:
        supported = ", ".join((*SD_PIPELINES, *SDXL_PIPELINES))
        raise ExportError(
            f"{src}: model_index.json names the pipeline {pipeline!r}; diffuserve exports Stable Diffusion 1.x/2.x "
            f"and SDXL folders ({supported})"
        )
    for part, cls in expected.items():
        declared = (index.get(part) or [None, None])[1]
        if declared != cls:
            raise ExportError(f"{src}: model_index.json names {part} as {declared!r}; diffuserve exports {cls}")
    if family == SD1 and json.loads((src / "text_encoder" / "config.json").read_text()).get("hidden_act") == (
        SD2_HIDDEN_ACT
    ):
        family = SD2
    zeros = bool(index.get("force_zeros_for_empty_prompt", family == SDXL))
    return SourceModel(src, family, pipeline, dict(expected), zeros)


def check_safetensors(src: Path, part: str) -> None:
    """Pickled weights can run arbitrary code when loaded, so only safetensors are accepted."""
    folder = src / part
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ExportError(
            f"{folder}: only pickle weights ({', '.join(pickles)}); diffuserve loads safetensors only. "
            "Convert them first (load with diffusers and save_pretrained(..., safe_serialization=True))."
        )
    raise ExportError(f"{folder}: no *.safetensors weights found")


def load_modules(source: SourceModel) -> dict[str, nn.Module]:
    """The folder's torch modules by part name (text_encoder[, text_encoder_2], unet, vae), float32, eval mode."""
    import diffusers
    import transformers
    from diffusers.models.attention_processor import AttnProcessor

    for part in source.parts:
        check_safetensors(source.folder, part)
    load = {"use_safetensors": True, "dtype": torch.float32}
    modules = {}
    for part, cls in source.parts.items():
        library = transformers if part.startswith("text_encoder") else diffusers
        modules[part] = getattr(library, cls).from_pretrained(source.folder / part, **load).eval()
    # Plain matmul-softmax attention instead of torch's fused SDPA: the attention fusions of onnxruntime.transformers
    # match this pattern (they found none in SDPA's graph), and the numbers are the same to float32 rounding.
    for part in ("unet", "vae"):
        modules[part].set_attn_processor(AttnProcessor())
    return modules


def tokenizer_max_length(folder: Path, fallback: int) -> int:
    config_path = folder / "tokenizer_config.json"
    length = (
        json.loads(config_path.read_text()).get("model_max_length", fallback) if config_path.is_file() else fallback
    )
    return int(length) if length and length < UNSET_MAX_LENGTH else fallback


def model_dims(source: SourceModel, modules: dict[str, nn.Module]) -> ModelDims:
    scheduler = json.loads((source.folder / "scheduler" / "scheduler_config.json").read_text())
    unet, vae = modules["unet"].config, modules["vae"].config
    sdxl = source.family == SDXL
    encoders, lengths, vocab = [], [], []
    for name, tokenizer in zip((TEXT_ENCODER, TEXT_ENCODER_2), source.tokenizers, strict=False):
        config = modules[name].config
        positions = config.max_position_embeddings
        lengths.append(min(tokenizer_max_length(source.folder / tokenizer, positions), positions))
        vocab.append(config.vocab_size)
        pooled = config.projection_dim if name == TEXT_ENCODER_2 else 0
        encoders.append(TextEncoderDims(name, config.hidden_size, penultimate=sdxl, pooled_dim=pooled))
    if len(set(lengths)) != 1:
        raise ExportError(f"{source.folder}: the tokenizers' lengths differ ({lengths}); SDXL's are equal")
    return ModelDims(
        text_seq_len=lengths[0],
        text_encoders=tuple(encoders),
        vocab_size=min(vocab),
        latent_channels=vae.latent_channels,
        unet_in_channels=unet.in_channels,
        unet_out_channels=unet.out_channels,
        cross_attention_dim=unet.cross_attention_dim,
        image_channels=vae.in_channels,
        vae_downsample=2 ** (len(vae.block_out_channels) - 1),
        unet_downsample=2 ** (len(unet.block_out_channels) - 1),
        num_train_timesteps=scheduler.get("num_train_timesteps", 1000),
        time_ids=SDXL_TIME_IDS if sdxl else 0,
        timestep_cond_dim=unet.time_cond_proj_dim or 0,
    )


def check_unet(source: SourceModel, dims: ModelDims, unet_config) -> None:
    """The U-Net must take exactly what the family's pipeline feeds it; anything else is refused here, by name,
    rather than failing inside the export or serving wrong images."""
    check_unet_inputs(source, dims)
    check_cross_attention(source, dims, unet_config)
    if source.family == SDXL:
        check_sdxl_added_conditioning(source, dims, unet_config)
    elif unet_config.addition_embed_type or unet_config.class_embed_type:
        raise ExportError(
            f"{source.folder}: the U-Net has added conditioning (addition_embed_type "
            f"{unet_config.addition_embed_type!r}, class_embed_type {unet_config.class_embed_type!r}), which "
            f"{source.pipeline_class} does not feed; diffuserve serves SD 1.x/2.x U-Nets without it"
        )


def check_unet_inputs(source: SourceModel, dims: ModelDims) -> None:
    """A U-Net takes the latents, or for inpainting also the mask and the masked image's latents; nothing else."""
    allowed = (dims.latent_channels, 2 * dims.latent_channels + INPAINT_EXTRA_CHANNELS)
    if dims.unet_in_channels not in allowed:
        raise ExportError(
            f"{source.folder}: the U-Net takes {dims.unet_in_channels} input channels; diffuserve serves "
            f"{allowed[0]} (latents) or {allowed[1]} (inpainting: latents, mask, masked-image latents)"
        )
    if dims.unet_out_channels != dims.latent_channels:
        raise ExportError(
            f"{source.folder}: the U-Net predicts {dims.unet_out_channels} channels; the VAE's latents have "
            f"{dims.latent_channels}"
        )


def check_cross_attention(source: SourceModel, dims: ModelDims, unet_config) -> None:
    """The U-Net attends to the text encoders' hidden states side by side (SDXL: both encoders')."""
    text_width = sum(encoder.hidden_size for encoder in dims.text_encoders)
    if unet_config.cross_attention_dim != text_width:
        widths = " + ".join(f"{encoder.name} {encoder.hidden_size}" for encoder in dims.text_encoders)
        raise ExportError(
            f"{source.folder}: the U-Net's cross_attention_dim is {unet_config.cross_attention_dim}; the text "
            f"encoders give {widths} = {text_width}"
        )


def check_sdxl_added_conditioning(source: SourceModel, dims: ModelDims, unet_config) -> None:
    """SDXL base adds the pooled text embedding and six embedded time ids to the timestep embedding."""
    if unet_config.addition_embed_type != "text_time":
        raise ExportError(
            f"{source.folder}: the SDXL U-Net's addition_embed_type is {unet_config.addition_embed_type!r}; "
            "diffuserve serves 'text_time'"
        )
    expected = dims.time_ids * unet_config.addition_time_embed_dim + dims.text_embeds_dim
    taken = unet_config.projection_class_embeddings_input_dim
    if taken == expected:
        return
    # The refiner's five time ids: original size, crop top-left and an aesthetic score instead of the target size.
    refiner = taken == (dims.time_ids - 1) * unet_config.addition_time_embed_dim + dims.text_embeds_dim
    why = "; this is an SDXL refiner's U-Net (aesthetic-score conditioning), not supported" if refiner else ""
    raise ExportError(
        f"{source.folder}: the U-Net's added conditioning takes {taken} numbers; SDXL base's is {dims.time_ids} time "
        f"ids x {unet_config.addition_time_embed_dim} + the pooled text embedding's {dims.text_embeds_dim} = "
        f"{expected}{why}"
    )
