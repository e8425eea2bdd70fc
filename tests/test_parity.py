"""Our pipeline against diffusers' StableDiffusionPipeline: same model, same initial latents, same scheduler."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffuserve.export.reference import DIFFUSERS_SCHEDULERS, load_reference_pipeline, reference_images
from diffuserve.server.models import ServedModel
from diffuserve.server.params import GenerateParams
from diffuserve.server.pipeline import draw_noise, image_generators, render, to_uint8
from diffuserve.v1 import diffusion_pb2 as pb

PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry, low quality"
STEPS = 20
GUIDANCE = 7.5
# The bar on a 0..1 image; the ORT CPU path lands near 2e-6.
TOLERANCE = 1e-4
# Samplers that draw noise while denoising: their images depend on the generator stream, not only the start.
NOISY = ("euler_ancestral", "dpmpp_2m_sde_karras", "lcm")


def params_for(
    model: ServedModel,
    scheduler: str,
    seeds: tuple[int, ...],
    guidance: float = GUIDANCE,
    noise_mode: str = "torch_cpu",
    steps: int = STEPS,
    size: tuple[int, int] | None = None,
) -> GenerateParams:
    size = size or model.sizes[0]
    return GenerateParams(
        model=model.name,
        request_id="parity",
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        width=size[0],
        height=size[1],
        seeds=seeds,
        steps=steps,
        guidance_scale=guidance,
        scheduler=scheduler,
        output_format="png",
        quality=90,
        embed_metadata=False,
        noise_mode=noise_mode,
    )


def diffusers_images(source: Path, model: ServedModel, params: GenerateParams) -> np.ndarray:
    """diffusers' images for the same seeds: torch_cpu noise is its own CPU generators' noise; numpy noise is given
    to it as the initial latents."""
    pipe = load_reference_pipeline(source, params.scheduler)
    latents = None
    if params.noise_mode != "torch_cpu":
        latents = draw_noise(image_generators(params), model.manifest.latent_shape(params.size))
    size = (params.height, params.width)
    return reference_images(
        pipe, params.prompt, params.negative_prompt, params.seeds, size, params.steps, params.guidance_scale, latents
    )


@pytest.mark.parametrize("scheduler", list(DIFFUSERS_SCHEDULERS))
def test_every_sampler_gives_diffusers_image_for_the_same_seeds(
    tiny_source: Path, tiny_model: ServedModel, scheduler: str
) -> None:
    params = params_for(tiny_model, scheduler, seeds=(7, 1234), steps=12)
    ours = render(tiny_model, params)
    reference = diffusers_images(tiny_source, tiny_model, params)
    assert ours.shape == reference.shape == (2, 128, 128, 3)
    assert np.abs(ours - reference).max() <= TOLERANCE
    # Random weights still draw structure: the comparison is not between two flat images.
    assert reference.std() > 0.01


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m"])
def test_every_exported_size_gives_diffusers_image(tiny_source: Path, tiny_model: ServedModel, scheduler: str) -> None:
    (size,) = [s for s in tiny_model.sizes if s[0] != s[1]]  # the non-square one: width and height not swapped
    params = params_for(tiny_model, scheduler, seeds=(5, 6), steps=8, size=size)
    ours = render(tiny_model, params)
    assert ours.shape == (2, size[1], size[0], 3)
    assert np.abs(ours - diffusers_images(tiny_source, tiny_model, params)).max() <= TOLERANCE


@pytest.mark.parametrize("scheduler", ["euler", "ddim", "dpmpp_2m"])
def test_numpy_noise_given_to_diffusers_as_latents_gives_its_image(
    tiny_source: Path, tiny_model: ServedModel, scheduler: str
) -> None:
    params = params_for(tiny_model, scheduler, seeds=(7, 1234), noise_mode="numpy")
    assert np.abs(render(tiny_model, params) - diffusers_images(tiny_source, tiny_model, params)).max() <= TOLERANCE


def test_without_guidance_matches_diffusers(tiny_source: Path, tiny_model: ServedModel) -> None:
    params = params_for(tiny_model, "euler", seeds=(3,), guidance=1.0)
    assert np.abs(render(tiny_model, params) - diffusers_images(tiny_source, tiny_model, params)).max() <= TOLERANCE


@pytest.mark.parametrize("scheduler", ["euler", "ddim", "euler_ancestral"])
def test_served_image_is_the_in_process_image_and_matches_diffusers(
    tiny_source: Path, tiny_model: ServedModel, stub, scheduler: str
) -> None:
    params = params_for(tiny_model, scheduler, seeds=(11,))
    request = pb.GenerateRequest(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        seeds=[11],
        steps=STEPS,
        guidance_scale=GUIDANCE,
        scheduler=pb.Scheduler.Value(f"SCHEDULER_{scheduler.upper()}"),
        noise_mode=pb.NOISE_MODE_TORCH_CPU,
    )
    response = stub.Generate(request)
    assert response.noise_mode == pb.NOISE_MODE_TORCH_CPU
    served = np.asarray(Image.open(io.BytesIO(response.images[0].data)).convert("RGB"))
    # PNG is lossless: over gRPC the pixels are exactly the in-process pipeline's.
    np.testing.assert_array_equal(served, to_uint8(render(tiny_model, params))[0])
    # And within one quantisation level of diffusers' image (float agreement is <= 1e-4 above).
    reference = to_uint8(diffusers_images(tiny_source, tiny_model, params))[0]
    assert np.abs(served.astype(int) - reference.astype(int)).max() <= 1


@pytest.mark.parametrize("noise_mode", ["torch_cpu", "numpy"])
@pytest.mark.parametrize("scheduler", ["euler", *NOISY])
def test_an_image_does_not_depend_on_its_position_or_batch_neighbours(
    tiny_model: ServedModel, scheduler: str, noise_mode: str
) -> None:
    def image(seeds: tuple[int, ...], index: int) -> np.ndarray:
        return render(tiny_model, params_for(tiny_model, scheduler, seeds, noise_mode=noise_mode, steps=6))[index]

    alone = image((42,), 0)
    np.testing.assert_array_equal(alone, image((5, 9, 42, 3), 2))
    assert not np.array_equal(alone, image((43,), 0))
