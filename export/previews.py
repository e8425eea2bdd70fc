"""The latent-to-RGB map behind streaming previews, fitted to the model's own VAE at export."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# The largest image side the preview map is fitted at.
FIT_MAX_SIDE = 128


@torch.no_grad()
def fit_latent_rgb(vae, height: int, width: int, samples: int = 16, seed: int = 0) -> tuple[tuple[float, ...], ...]:
    """Least-squares fit of each latent pixel (unscaled, plus a bias) to the colour of the image patch it encodes.

    The images are random colour fields at latent resolution, upsampled: flat patches whose colour the latent
    must carry, which is all a preview needs to show.
    """
    generator = torch.Generator().manual_seed(seed)
    downsample = 2 ** (len(vae.config.block_out_channels) - 1)
    # The map is per latent pixel, so a small image fits it as well as a full-size one: at SD's 512x512 the fit
    # took 5 minutes and 11 GB on 2 cores, at 128x128 seconds.
    height, width = (min(side, FIT_MAX_SIDE // (2 * downsample) * 2 * downsample) for side in (height, width))
    h, w = height // downsample, width // downsample
    colours = torch.rand(samples, 3, h // 2, w // 2, generator=generator)
    images = F.interpolate(colours, size=(height, width), mode="nearest")
    latents = vae.encode(images * 2 - 1).latent_dist.mean
    targets = F.avg_pool2d(images, downsample)
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).double().numpy()
    y = targets.permute(0, 2, 3, 1).reshape(-1, 3).double().numpy()
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    solution, *_ = np.linalg.lstsq(x, y, rcond=None)
    return tuple(tuple(float(v) for v in row) for row in solution)
