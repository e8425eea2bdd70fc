"""Image-to-image and inpainting against diffusers' own pipelines on the same model, images, seeds and scheduler; their
batching with text-to-image, and their bad inputs answered over gRPC."""

from __future__ import annotations

import io
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from diffuserve.export.reference import diffusers_scheduler
from diffuserve.server.models import ServedModel, load_model
from diffuserve.server.params import GenerateParams, validate
from diffuserve.server.pipeline import render
from diffuserve.v1 import diffusion_pb2 as pb

from .serving_helpers import busy, serving

PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
# The bar on a 0..1 image.
TOLERANCE = 1e-4


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def init_pixels(width: int = 128, height: int = 128) -> np.ndarray:
    """A picture with structure at every scale: a colour gradient, a disc and some noise."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 9.0)], axis=-1)
    disc = (x - width / 2) ** 2 + (y - height / 3) ** 2 < (min(width, height) / 4) ** 2
    rgb[disc] = (0.9, 0.1, 0.1)
    rgb += np.random.default_rng(0).normal(0, 0.03, rgb.shape)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def mask_pixels(width: int = 128, height: int = 128) -> np.ndarray:
    """White (repaint) over a rectangle off the latent grid, so the mask's downsampling is exercised."""
    mask = np.zeros((height, width), np.uint8)
    mask[20:75, 37:110] = 255
    return mask


def request(model: ServedModel, **fields) -> pb.GenerateRequest:
    fields = {
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "steps": 10,
        "guidance_scale": 7.5,
        "scheduler": pb.SCHEDULER_EULER,
        "noise_mode": pb.NOISE_MODE_TORCH_CPU,
        **fields,
    }
    return pb.GenerateRequest(**fields)


def params(model: ServedModel, **fields) -> GenerateParams:
    return validate(request(model, **fields), {model.name: model}, model.name)


def diffusers_edit(source: Path, p: GenerateParams, init: np.ndarray, mask: np.ndarray | None, **extra) -> np.ndarray:
    """diffusers' img2img or inpaint pipeline, one init image (and mask) per seed, each seed its own generator."""
    import diffusers

    cls = diffusers.StableDiffusionInpaintPipeline if mask is not None else diffusers.StableDiffusionImg2ImgPipeline
    pipe = cls.from_pretrained(
        source, use_safetensors=True, dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = diffusers_scheduler(p.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    n = p.num_images
    images = {"image": [Image.fromarray(init)] * n}
    if mask is not None:
        images["mask_image"] = [Image.fromarray(mask)] * n
        images.update(height=p.height, width=p.width)
    with torch.no_grad():
        return pipe(
            prompt=[p.prompt] * n,
            negative_prompt=[p.negative_prompt] * n,
            strength=p.strength,
            num_inference_steps=p.steps,
            guidance_scale=p.guidance_scale,
            generator=[torch.Generator().manual_seed(seed) for seed in p.seeds],
            output_type="np",
            **images,
            **extra,
        ).images


@pytest.mark.parametrize(("scheduler", "strength"), [("euler", 0.6), ("ddim", 0.75), ("dpmpp_2m", 0.5), ("heun", 0.7)])
def test_img2img_gives_diffusers_image(tiny_source: Path, tiny_model: ServedModel, scheduler: str, strength: float):
    init = init_pixels()
    p = params(
        tiny_model,
        init_image=png(init),
        strength=strength,
        seeds=[3, 77],
        scheduler=pb.Scheduler.Value(f"SCHEDULER_{scheduler.upper()}"),
    )
    assert p.task == "img2img" and p.start > 0
    ours = render(tiny_model, p)
    reference = diffusers_edit(tiny_source, p, init, None)
    assert ours.shape == reference.shape == (2, 128, 128, 3)
    assert np.abs(ours - reference).max() <= TOLERANCE


@pytest.mark.parametrize(("scheduler", "strength", "blur"), [("euler", 1.0, 0), ("ddim", 0.7, 0), ("euler", 0.8, 6)])
def test_inpainting_an_ordinary_unet_gives_diffusers_image(
    tiny_source: Path, tiny_model: ServedModel, scheduler: str, strength: float, blur: int
):
    init, mask = init_pixels(), mask_pixels()
    fields = {"strength": strength} if strength != 1.0 else {}
    p = params(
        tiny_model,
        init_image=png(init),
        mask_image=png(mask),
        seeds=[5, 6],
        mask_blur=blur,
        scheduler=pb.Scheduler.Value(f"SCHEDULER_{scheduler.upper()}"),
        **fields,
    )
    assert p.task == "inpaint" and p.strength == strength
    ours = render(tiny_model, p)
    # diffusers blurs a mask by the caller's hand: its mask_processor.blur, then the pipeline binarises it.
    mask_image = np.asarray(Image.fromarray(mask).filter(ImageFilter.GaussianBlur(blur))) if blur else mask
    reference = diffusers_edit(tiny_source, p, init, mask_image)
    assert np.abs(ours - reference).max() <= TOLERANCE
    # Outside the mask the image is the init image's (through the VAE), inside it is repainted.
    assert reference.std() > 0.01


def test_an_init_image_of_another_size_is_resized_or_refused(tiny_model: ServedModel):
    small = png(init_pixels(100, 80))
    resized = params(tiny_model, init_image=small, width=128, height=128)
    assert resized.init_image.shape == (3, 128, 128)
    with pytest.raises(ValueError, match=r"init_image: 100x80 .*128x128"):
        params(tiny_model, init_image=small, width=128, height=128, resize_mode=pb.RESIZE_MODE_REFUSE)
    # Size 0 takes the init image's own size where the model serves it.
    wide = params(tiny_model, init_image=png(init_pixels(192, 128)))
    assert (wide.width, wide.height) == (192, 128)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"init_image": b"not an image"}, "init_image: "),
        ({"init_image": png(init_pixels()), "strength": 0.01}, "strength: "),
        ({"init_image": png(init_pixels()), "strength": 1.5}, "strength: must be in"),
        ({"strength": 0.5}, "strength: applies only with init_image"),
        ({"mask_image": png(mask_pixels())}, "mask_image: inpainting needs init_image"),
        ({"init_image": png(init_pixels()), "mask_image": png(init_pixels())}, "mask_image: "),
        ({"init_image": png(init_pixels()), "mask_image": png(mask_pixels(64, 64))}, "mask_image: "),
        ({"init_image": png(init_pixels()), "mask_blur": 4}, "mask_blur: applies only with mask_image"),
        ({"resize_mode": pb.RESIZE_MODE_REFUSE}, "resize_mode: applies only with init_image"),
        ({"original_size": pb.ImageSize(width=512, height=512)}, "original_size: "),
    ],
)
def test_bad_editing_fields_are_invalid_argument_naming_the_field(stub, fields: dict, message: str):
    with pytest.raises(grpc.RpcError) as refused:
        stub.Generate(pb.GenerateRequest(prompt=PROMPT, steps=4, **fields))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in refused.value.details()


def test_mixed_tasks_batched_are_bit_identical_to_running_alone(tiny_model: ServedModel):
    init, mask = png(init_pixels()), png(mask_pixels())
    requests = [
        request(tiny_model, seeds=[1], steps=6),
        request(tiny_model, seeds=[2], steps=6, init_image=init, strength=1.0),
        request(tiny_model, seeds=[3], steps=6, init_image=init, mask_image=mask),
        request(tiny_model, seeds=[4], steps=6, init_image=init, strength=0.5),
        request(tiny_model, seeds=[5], steps=6, init_image=init, mask_image=mask, strength=0.5),
    ]
    with serving(tiny_model) as (_, stub, _):
        alone = [stub.Generate(r) for r in requests]
        with busy(stub), ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(stub.Generate, requests))
    # Batches hold two images here (the largest exported batch): two of the three that start at the first step share
    # their calls, whatever their tasks; the two at strength 0.5 share theirs, never with those.
    sizes = [r.timings.batch_size for r in together]
    assert sorted(sizes[:3]) == [1, 2, 2] and sizes[3:] == [2, 2]
    for a, b in zip(alone, together, strict=True):
        assert a.images[0].data == b.images[0].data
    tasks = [pb.TASK_TXT2IMG, pb.TASK_IMG2IMG, pb.TASK_INPAINT, pb.TASK_IMG2IMG, pb.TASK_INPAINT]
    assert [r.task for r in alone] == tasks


def test_a_model_exported_without_a_vae_encoder_serves_text_to_image_only(tiny_export: Path, tmp_path: Path):
    folder = tmp_path / "no-encoder"
    shutil.copytree(tiny_export, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for target in manifest["targets"].values():
        del target["components"]["vae_encoder"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    model = load_model(folder, backend="cpu")
    assert model.tasks == ("txt2img",)
    with pytest.raises(
        ValueError, match=r"init_image: model .tiny-sd. serves txt2img, not img2img \(its export has no VAE"
    ):
        params(model, init_image=png(init_pixels()))
    assert params(model).task == "txt2img"


@pytest.mark.parametrize("width", [2**31 - 1, 1_000_000, -1])
def test_an_init_image_is_never_resized_to_a_size_the_model_refuses(tiny_model: ServedModel, width: int):
    with pytest.raises(ValueError) as refused:
        params(tiny_model, init_image=png(init_pixels(8, 8)), width=width, height=128)
    assert str(refused.value).startswith("width: model 'tiny-sd' serves the sizes")


def test_a_unicode_request_id_is_served_and_echoed(stub):
    response = stub.Generate(pb.GenerateRequest(prompt=PROMPT, steps=1, seeds=[1], request_id="é-1"))
    assert response.request_id == "é-1" and len(response.images) == 1
