"""Small torch modules that give each component the exact inputs and outputs of its spec."""

from __future__ import annotations

import torch
from torch import nn

from diffuserve.engine.manifest import TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER


class TextEncoder(nn.Module):
    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # int32 on the wire (TensorRT's preferred index type); the embedding lookup wants int64.
        return self.text_encoder(input_ids.to(torch.int64), return_dict=False)[0]


class UNet(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


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


def wrap_components(text_encoder: nn.Module, unet: nn.Module, vae: nn.Module) -> dict[str, nn.Module]:
    modules = {
        TEXT_ENCODER: TextEncoder(text_encoder),
        UNET: UNet(unet),
        VAE_DECODER: VaeDecoder(vae),
        VAE_ENCODER: VaeEncoder(vae),
    }
    return {name: module.eval() for name, module in modules.items()}
