"""Tasks: text-to-image, image-to-image and inpainting differ only in their start latents and in what the U-Net or
each step adds (an inpainting U-Net's mask channels; latent blending for an ordinary U-Net). One function each.

Every noise draw comes from the image's own generator, in the order diffusers' pipelines draw them, so each image
equals the diffusers pipeline's on the same seed whether it ran alone or in a batch:
- txt2img: the initial noise;
- img2img: the init image's latent sample, then the noise (StableDiffusionImg2ImgPipeline.prepare_latents);
- inpaint: the init image's latent sample (unless strength is 1 on an inpainting U-Net), the noise, then the masked
  image's latent sample (StableDiffusionInpaintPipeline.prepare_latents, then prepare_mask_latents); an ordinary
  U-Net never reads the masked image's latents, but the draw is made so the sampler's noise that follows matches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from diffuserve.engine.manifest import IMG2IMG, INPAINT, LATENT_LOGVAR, LATENT_MEAN, SAMPLE, VAE_ENCODER

from .images import latent_mask, masked_image
from .noise import NoiseGenerator, draw_noise
from .rows import RowRunner
from .schedulers import Plan, get_sampler, noised_latents


@dataclass(frozen=True)
class LatentBlend:
    """Inpainting with an ordinary U-Net: after every step, outside the mask the latents are the image's own, noised
    to the level of the next step (diffusers' StableDiffusionInpaintPipeline with a 4-channel U-Net)."""

    original: np.ndarray  # [n, C, h, w] the init image's latents
    noise: np.ndarray  # [n, C, h, w] the noise the start latents were made with
    mask: np.ndarray  # [n, 1, h, w] 1 where the image is repainted

    def apply(self, plan: Plan, index: int, latents: np.ndarray) -> np.ndarray:
        """The latents after call index, blended; the last call blends with the image itself."""
        known = self.original
        if index + 1 < plan.calls:
            known = get_sampler(plan.sampler).add_noise(plan, index + 1, self.original, self.noise)
        return (1 - self.mask) * known + self.mask * latents

    def rows(self, keep: np.ndarray) -> LatentBlend:
        return LatentBlend(self.original[keep], self.noise[keep], self.mask[keep])


@dataclass(frozen=True)
class Start:
    """One request's start: its latents [n, C, h, w] entering the plan's call `start`, the inpainting U-Net's extra
    channels (mask and masked-image latents, [n, 1 + C, h, w]) and the latent blend, where the task has them."""

    latents: np.ndarray
    channels: np.ndarray | None = None
    blend: LatentBlend | None = None


def encode_images(model, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each image [3, H, W] in -1..1 through the VAE encoder: its latent distribution's (mean, logvar), [C, h, w]."""
    if not images:
        return []
    engines = model.engines(VAE_ENCODER, model_size(images[0]))
    out = RowRunner(engines, len(images))({SAMPLE: np.stack(images)})
    return list(zip(out[LATENT_MEAN], out[LATENT_LOGVAR], strict=True))


def model_size(image: np.ndarray) -> tuple[int, int]:
    return (image.shape[2], image.shape[1])


def latent_sample(model, distribution: tuple[np.ndarray, np.ndarray], generator: NoiseGenerator) -> np.ndarray:
    """One draw of the image's latents [1, C, h, w], scaled as the U-Net sees latents (diffusers' retrieve_latents
    then `scaling_factor * latents`)."""
    mean, logvar = distribution
    sample = mean + np.exp(0.5 * logvar) * generator.standard_normal((1, *mean.shape))
    manifest = model.manifest
    return ((sample - np.float32(manifest.vae_shift_factor)) * np.float32(manifest.vae_scaling_factor)).astype(
        np.float32
    )


def start(
    model, params, plan: Plan, generators: Sequence[NoiseGenerator], encoded: dict[str, tuple[np.ndarray, np.ndarray]]
) -> Start:
    """The request's start, by its task; `encoded` holds the VAE encoder's output for its init and masked images."""
    latent_shape = model.manifest.latent_shape(params.size)
    if params.task == IMG2IMG:
        original = np.concatenate([latent_sample(model, encoded["init"], g) for g in generators])
        return Start(noised_latents(plan, params.start, original, draw_noise(generators, latent_shape)))
    if params.task == INPAINT:
        return inpaint_start(model, params, plan, generators, encoded, latent_shape)
    return Start(draw_noise(generators, latent_shape) * np.float32(plan.init_noise_sigma))


def from_noise(params) -> bool:
    """Inpainting at strength 1 starts from pure noise, not the init image noised (diffusers' is_strength_max)."""
    return params.strength == 1.0


def needs_init_latents(model, params) -> bool:
    """Whether inpainting reads the init image's latents: to start from, or to blend (an ordinary U-Net)."""
    return not (model.manifest.inpainting_unet and from_noise(params))


def inpaint_start(model, params, plan, generators, encoded, latent_shape) -> Start:
    manifest = model.manifest
    pure_noise = from_noise(params)
    needs_original = needs_init_latents(model, params)
    originals, noises, masked = [], [], []
    for g in generators:
        if needs_original:
            originals.append(latent_sample(model, encoded["init"], g))
        noises.append(g.standard_normal((1, *latent_shape)))
        if manifest.inpainting_unet:
            masked.append(latent_sample(model, encoded["masked"], g))
        else:  # drawn for the stream's sake: an ordinary U-Net never reads it
            g.standard_normal((1, *latent_shape))
    noise = np.concatenate(noises)
    original = np.concatenate(originals) if originals else None
    if pure_noise:
        latents = noise * np.float32(plan.init_noise_sigma)
    else:
        latents = noised_latents(plan, params.start, original, noise)
    n = len(generators)
    mask = np.repeat(latent_mask(params.mask, latent_shape[1:])[None], n, 0).astype(np.float32)
    if manifest.inpainting_unet:
        return Start(latents, channels=np.concatenate([mask, np.concatenate(masked)], axis=1))
    return Start(latents, blend=LatentBlend(original, noise, mask))


def images_to_encode(model, params) -> dict[str, np.ndarray]:
    """The images [3, H, W] the request's task sends through the VAE encoder, by role."""
    if params.task == IMG2IMG:
        return {"init": params.init_image}
    if params.task != INPAINT:
        return {}
    images = {}
    if needs_init_latents(model, params):
        images["init"] = params.init_image
    if model.manifest.inpainting_unet:
        images["masked"] = masked_image(params.init_image, params.mask)
    return images


def starts(model, params_list: Sequence, plan: Plan, generators: Sequence[Sequence[NoiseGenerator]]) -> list[Start]:
    """Every request's start; the images of all of them go through the VAE encoder together."""
    wanted = [images_to_encode(model, p) for p in params_list]
    flat = [image for images in wanted for image in images.values()]
    distributions = iter(encode_images(model, flat))
    encoded = [{role: next(distributions) for role in images} for images in wanted]
    return [start(model, p, plan, g, e) for p, g, e in zip(params_list, generators, encoded, strict=True)]
