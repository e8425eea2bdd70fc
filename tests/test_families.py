"""Every model family and task served, against the matching diffusers pipeline on the same tiny random model, seeds
and scheduler: SD 2.x (v-prediction, zero terminal SNR), SDXL (two encoders, size conditioning, an empty negative
prompt as zeros, no guidance at B rows), SDXL image-to-image, inpainting U-Nets, LCM's guidance embedding."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from diffuserve.engine.manifest import UNET
from diffuserve.export.reference import diffusers_scheduler
from diffuserve.server.models import ServedModel
from diffuserve.server.params import GenerateParams, validate
from diffuserve.server.pipeline import render
from diffuserve.v1 import diffusion_pb2 as pb

from .serving_helpers import serving

PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
# The bar on a 0..1 image.
TOLERANCE = 1e-4
SIZE = 64


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def picture(size: int = SIZE) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(9 * x * y)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def mask(size: int = SIZE) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[10:40, 21:55] = 255
    return m


def params(model: ServedModel, **fields) -> GenerateParams:
    fields = {
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "steps": 6,
        "guidance_scale": 5.0,
        "seeds": [3, 11],
        "noise_mode": pb.NOISE_MODE_TORCH_CPU,
        **fields,
    }
    return validate(pb.GenerateRequest(**fields), {model.name: model}, model.name)


def reference(source: Path, pipeline: str, p: GenerateParams, **extra) -> np.ndarray:
    """diffusers' pipeline of that class on the source folder, one CPU generator per seed."""
    import diffusers

    pipe = getattr(diffusers, pipeline).from_pretrained(source, use_safetensors=True, dtype=torch.float32)
    pipe.scheduler = diffusers_scheduler(p.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    n = p.num_images
    if p.guided:
        extra.setdefault("negative_prompt", [p.negative_prompt] * n)
    with torch.no_grad():
        return pipe(
            prompt=[p.prompt] * n,
            num_inference_steps=p.steps,
            guidance_scale=p.guidance_scale,
            generator=[torch.Generator().manual_seed(s) for s in p.seeds],
            output_type="np",
            **extra,
        ).images


def agree(model: ServedModel, source: Path, pipeline: str, p: GenerateParams, **extra) -> np.ndarray:
    ours = render(model, p)
    theirs = reference(source, pipeline, p, **extra)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= TOLERANCE
    assert theirs.std() > 0.01  # random weights still draw structure: not two flat images
    return ours


def unet_rows(model: ServedModel, p: GenerateParams, monkeypatch) -> list[int]:
    """The rows of every U-Net call one render makes."""
    rows = []
    for engine in model.loaded.engines[UNET]:

        def run(feeds, engine=engine, original=engine.run):
            rows.append(len(feeds["sample"]))
            return original(feeds)

        monkeypatch.setattr(engine, "run", run)
    render(model, p)
    monkeypatch.undo()
    return rows


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m"])
def test_sd2_v_prediction_gives_diffusers_image(family, scheduler: str):
    model, source = family("sd2")
    assert model.family == "sd2" and model.scheduler_config.prediction_type == "v_prediction"
    p = params(model, scheduler=pb.Scheduler.Value(f"SCHEDULER_{scheduler.upper()}"))
    agree(model, source, "StableDiffusionPipeline", p, height=SIZE, width=SIZE)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "unipc"])
def test_sd2_zero_terminal_snr_gives_diffusers_image(family, scheduler: str):
    model, source = family("sd2-zero-snr")
    assert model.scheduler_config.rescale_betas_zero_snr
    p = params(model, scheduler=pb.Scheduler.Value(f"SCHEDULER_{scheduler.upper()}"))
    agree(model, source, "StableDiffusionPipeline", p, height=SIZE, width=SIZE)


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m_karras"])
def test_sdxl_gives_diffusers_image(family, scheduler: str):
    model, source = family("sdxl")
    p = params(model, scheduler=pb.Scheduler.Value(f"SCHEDULER_{scheduler.upper()}"))
    agree(model, source, "StableDiffusionXLPipeline", p, height=SIZE, width=SIZE)


def test_sdxl_size_conditioning_is_diffusers_time_ids(family):
    model, source = family("sdxl")
    p = params(
        model,
        original_size=pb.ImageSize(width=1024, height=768),
        crop_top=16,
        crop_left=8,
        target_size=pb.ImageSize(width=512, height=512),
    )
    ours = agree(
        model,
        source,
        "StableDiffusionXLPipeline",
        p,
        height=SIZE,
        width=SIZE,
        original_size=(768, 1024),
        crops_coords_top_left=(16, 8),
        target_size=(512, 512),
    )
    assert np.abs(ours - render(model, params(model))).max() > 1e-3


def test_sdxl_empty_negative_prompt_conditions_on_zeros(family):
    model, source = family("sdxl")
    assert model.manifest.force_zeros_for_empty_prompt
    p = params(model, negative_prompt="")
    agree(model, source, "StableDiffusionXLPipeline", p, height=SIZE, width=SIZE, negative_prompt=None)


def test_sdxl_without_guidance_runs_the_unet_at_b_rows(family, monkeypatch):
    """Turbo's way: guidance off runs one row per image, not a padded unconditional half."""
    model, source = family("sdxl")
    p = params(model, guidance_scale=0.0, scheduler=pb.SCHEDULER_EULER_ANCESTRAL, steps=2)
    assert not p.guided
    agree(model, source, "StableDiffusionXLPipeline", p, height=SIZE, width=SIZE)
    assert unet_rows(model, p, monkeypatch) == [2, 2]
    assert unet_rows(model, params(model, steps=2), monkeypatch) == [4, 4]


def test_sdxl_img2img_gives_diffusers_image(family):
    model, source = family("sdxl")
    init = picture()
    p = params(model, init_image=png(init), strength=0.6, scheduler=pb.SCHEDULER_EULER)
    agree(
        model,
        source,
        "StableDiffusionXLImg2ImgPipeline",
        p,
        image=[Image.fromarray(init)] * p.num_images,
        strength=p.strength,
    )


@pytest.mark.parametrize(("name", "pipeline"), [("sd1-inpaint", "StableDiffusionInpaintPipeline")])
@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_inpainting_unet_gives_diffusers_image(family, name: str, pipeline: str, strength: float):
    model, source = family(name)
    assert model.tasks == ("inpaint",)
    init, m = picture(), mask()
    fields = {"strength": strength} if strength != 1.0 else {}
    p = params(model, init_image=png(init), mask_image=png(m), scheduler=pb.SCHEDULER_DDIM, **fields)
    agree(
        model,
        source,
        pipeline,
        p,
        image=[Image.fromarray(init)] * p.num_images,
        mask_image=[Image.fromarray(m)] * p.num_images,
        strength=p.strength,
        height=SIZE,
        width=SIZE,
    )


def test_sdxl_inpainting_unet_gives_diffusers_image(family):
    model, source = family("sdxl-inpaint")
    init, m = picture(), mask()
    p = params(model, init_image=png(init), mask_image=png(m), scheduler=pb.SCHEDULER_EULER, strength=0.8)
    agree(
        model,
        source,
        "StableDiffusionXLInpaintPipeline",
        p,
        image=[Image.fromarray(init)] * p.num_images,
        mask_image=[Image.fromarray(m)] * p.num_images,
        strength=p.strength,
        height=SIZE,
        width=SIZE,
    )


def test_lcm_embeds_the_guidance_scale_and_runs_b_rows(family, monkeypatch):
    model, source = family("sd1-lcm")
    assert model.guidance_embedded
    p = params(model, scheduler=pb.SCHEDULER_LCM, steps=4, guidance_scale=8.0)
    assert not p.guided
    ours = agree(model, source, "LatentConsistencyModelPipeline", p, height=SIZE, width=SIZE)
    assert unet_rows(model, p, monkeypatch) == [2] * 4
    # The scale reaches the U-Net: another scale, another image.
    assert np.abs(ours - render(model, params(model, scheduler=pb.SCHEDULER_LCM, steps=4, guidance_scale=2.0))).max()


def test_listing_shows_each_models_family_tasks_and_shapes(family):
    models = {name: family(name)[0] for name in ("sd2", "sdxl", "sd1-inpaint", "sd1-lcm")}
    served = {model.name: model for model in models.values()}
    with serving(models["sdxl"]) as (server, stub, _):
        server.running.service.models = served  # one server, four models: the listing is per model
        listed = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert listed["sd2"].family == "sd2" and listed["sd2"].prediction_type == "v_prediction"
    assert list(listed["sdxl"].tasks) == [pb.TASK_TXT2IMG, pb.TASK_IMG2IMG, pb.TASK_INPAINT]
    assert list(listed["sd1-inpaint"].tasks) == [pb.TASK_INPAINT]
    assert listed["sd1-lcm"].guidance_embedded and not listed["sdxl"].guidance_embedded
    for info in listed.values():
        assert [(s.width, s.height) for s in info.sizes] == [(SIZE, SIZE)]
        assert list(info.batch_sizes) == [1, 2] and list(info.text_lengths) == [77, 154]


def test_family_fields_are_refused_where_they_do_not_apply(family):
    sd2, _ = family("sd2")
    inpaint, _ = family("sd1-inpaint")
    with pytest.raises(ValueError, match="original_size: size conditioning .* is SDXL's"):
        params(sd2, original_size=pb.ImageSize(width=512, height=512))
    with pytest.raises(ValueError, match="init_image: model 'sd1-inpaint' serves inpaint, not txt2img"):
        params(inpaint)
    with serving(inpaint) as (_, stub, _), pytest.raises(grpc.RpcError) as refused:
        stub.Generate(pb.GenerateRequest(prompt=PROMPT, init_image=png(picture()), steps=2))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "mask_image" in refused.value.details()
