"""Our pipeline against diffusers' StableDiffusionPipeline: same model, same initial latents, same scheduler."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffuserve.export.reference import load_reference_pipeline, reference_images
from diffuserve.server.models import ServedModel
from diffuserve.server.params import GenerateParams
from diffuserve.server.pipeline import initial_latents, render, to_uint8
from diffuserve.v1 import diffusion_pb2 as pb

PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry, low quality"
STEPS = 20
GUIDANCE = 7.5
# The bar on a 0..1 image; the ORT CPU path lands near 2e-6.
TOLERANCE = 1e-4


def params_for(
    model: ServedModel, scheduler: str, seeds: tuple[int, ...], guidance: float = GUIDANCE
) -> GenerateParams:
    return GenerateParams(
        model=model.name,
        request_id="parity",
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        width=model.manifest.width,
        height=model.manifest.height,
        seeds=seeds,
        steps=STEPS,
        guidance_scale=guidance,
        scheduler=scheduler,
        output_format="png",
        quality=90,
        embed_metadata=False,
    )


def diffusers_images(source: Path, model: ServedModel, params: GenerateParams) -> np.ndarray:
    pipe = load_reference_pipeline(source, params.scheduler)
    noise = initial_latents(params.seeds, model.manifest.latent_shape, 1.0)
    return reference_images(pipe, params.prompt, params.negative_prompt, noise, params.steps, params.guidance_scale)


@pytest.mark.parametrize("scheduler", ["euler", "ddim"])
def test_in_process_image_matches_diffusers(tiny_source: Path, tiny_model: ServedModel, scheduler: str) -> None:
    params = params_for(tiny_model, scheduler, seeds=(7, 1234))
    ours = render(tiny_model, params)
    reference = diffusers_images(tiny_source, tiny_model, params)
    assert ours.shape == reference.shape == (2, 128, 128, 3)
    assert np.abs(ours - reference).max() <= TOLERANCE
    # Random weights still draw structure: the comparison is not between two flat images.
    assert reference.std() > 0.01


def test_without_guidance_matches_diffusers(tiny_source: Path, tiny_model: ServedModel) -> None:
    params = params_for(tiny_model, "euler", seeds=(3,), guidance=1.0)
    assert np.abs(render(tiny_model, params) - diffusers_images(tiny_source, tiny_model, params)).max() <= TOLERANCE


@pytest.mark.parametrize("scheduler", ["euler", "ddim"])
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
    )
    response = stub.Generate(request)
    served = np.asarray(Image.open(io.BytesIO(response.images[0].data)).convert("RGB"))
    # PNG is lossless: over gRPC the pixels are exactly the in-process pipeline's.
    np.testing.assert_array_equal(served, to_uint8(render(tiny_model, params))[0])
    # And within one quantisation level of diffusers' image (float agreement is <= 1e-4 above).
    reference = to_uint8(diffusers_images(tiny_source, tiny_model, params))[0]
    assert np.abs(served.astype(int) - reference.astype(int)).max() <= 1


def test_an_image_does_not_depend_on_its_batch_neighbours(tiny_model: ServedModel) -> None:
    alone = render(tiny_model, params_for(tiny_model, "euler", seeds=(42,)))
    batched = render(tiny_model, params_for(tiny_model, "euler", seeds=(5, 42, 9)))
    np.testing.assert_array_equal(alone[0], batched[1])
