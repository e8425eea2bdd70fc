"""Small torch modules that give each component the exact inputs and outputs of its spec."""

from __future__ import annotations

import torch
from torch import nn

from diffuserve.engine.manifest import TEXT_EMBEDS, TIME_IDS, UNET, VAE_DECODER, VAE_ENCODER

from .specs import ModelDims, TextEncoderDims


class TextEncoder(nn.Module):
    def __init__(self, text_encoder: nn.Module, dims: TextEncoderDims):
        super().__init__()
        self.text_encoder = text_encoder
        self.penultimate = dims.penultimate
        self.pooled = bool(dims.pooled_dim)

    def forward(self, input_ids: torch.Tensor):
        # int32 on the wire (TensorRT's preferred index type); the embedding lookup wants int64.
        out = self.text_encoder(input_ids.to(torch.int64), output_hidden_states=self.penultimate, return_dict=True)
        hidden = out.hidden_states[-2] if self.penultimate else out.last_hidden_state
        return (hidden, out.text_embeds) if self.pooled else hidden


class UNet(nn.Module):
    """sample, timestep, encoder_hidden_states, then the extra inputs the U-Net's config asks for, in the spec's order:
    SDXL's text_embeds and time_ids, LCM's timestep_cond."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.added = unet.config.addition_embed_type == "text_time"
        self.timestep_cond = unet.config.time_cond_proj_dim is not None

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, *extra: torch.Tensor
    ) -> torch.Tensor:
        extra = list(extra)
        added = {TEXT_EMBEDS: extra.pop(0), TIME_IDS: extra.pop(0)} if self.added else None
        cond = extra.pop(0) if self.timestep_cond else None
        return self.unet(
            sample, timestep, encoder_hidden_states, timestep_cond=cond, added_cond_kwargs=added, return_dict=False
        )[0]


class VaeDecoder(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoder(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent_dist = self.vae.encode(sample, return_dict=False)[0]
        return latent_dist.mean, latent_dist.logvar


def wrap_components(modules: dict[str, nn.Module], dims: ModelDims) -> dict[str, nn.Module]:
    """The spec-shaped module of every component, from the folder's modules by part name."""
    wrapped = {encoder.name: TextEncoder(modules[encoder.name], encoder) for encoder in dims.text_encoders}
    wrapped[UNET] = UNet(modules["unet"])
    wrapped[VAE_DECODER] = VaeDecoder(modules["vae"])
    wrapped[VAE_ENCODER] = VaeEncoder(modules["vae"])
    return {name: module.eval() for name, module in wrapped.items()}
