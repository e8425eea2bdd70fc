"""The gRPC surface on a real loopback server: models, info, health, reflection, validation, formats, seeds."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from diffuserve.server.models import load_model
from diffuserve.server.params import InvalidArgument, validate
from diffuserve.v1 import diffusion_pb2 as pb

FAST = {"prompt": "a green square", "steps": 2}


def test_list_models_describes_the_served_model(stub) -> None:
    (model,) = stub.ListModels(pb.ListModelsRequest()).models
    assert (model.name, model.width, model.height, model.batch_size) == ("tiny-sd", 128, 128, 2)
    assert list(model.batch_sizes) == [1, 2]
    assert [(s.width, s.height) for s in model.sizes] == [(128, 128), (192, 128)]
    assert (model.target, model.precision) == ("cpu", "fp32")
    # Every sampler runs the SD 1.x scheduler config of the tiny model, whose own class is PNDM.
    assert set(model.schedulers) == set(pb.Scheduler.values()) - {pb.SCHEDULER_UNSPECIFIED}
    assert model.default_scheduler == pb.SCHEDULER_PNDM
    assert model.backend == "cpu" and model.prediction_type == "epsilon"


def test_a_sampler_that_cannot_run_the_models_config_is_not_offered_and_is_refused(
    tiny_export: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # diffusers' PNDM and Euler ancestral have no x0-predicting ("sample") form.
    folder = tmp_path / "tiny-x0"
    shutil.copytree(tiny_export, folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "sample"}))
    with caplog.at_level(logging.WARNING):
        model = load_model(folder, backend="cpu")
    assert {"pndm", "euler_ancestral"}.isdisjoint(model.schedulers) and {"euler", "ddim"} <= set(model.schedulers)
    assert "sampler euler_ancestral is not offered: scheduler config prediction_type='sample'" in caplog.text
    # The config's class is PNDM's, which cannot run it: the default is the first sampler offered instead.
    assert model.default_scheduler == model.schedulers[0] == "ddim"
    request = pb.GenerateRequest(prompt="a red circle", scheduler=pb.SCHEDULER_EULER_ANCESTRAL)
    with pytest.raises(
        InvalidArgument, match="scheduler: 'euler_ancestral' is not one of SCHEDULER_DDIM, SCHEDULER_EULER"
    ):
        validate(request, {model.name: model}, model.name)


def test_server_info_reports_the_backend_really_running(stub) -> None:
    info = stub.GetServerInfo(pb.GetServerInfoRequest())
    assert info.backend == "cpu"
    assert list(info.providers) == ["CPUExecutionProvider"]
    assert info.target == "cpu" and info.device and info.backend_reason
    assert info.default_model == "tiny-sd" and list(info.models) == ["tiny-sd"]
    assert "onnxruntime" in info.runtime_versions
    assert info.default_noise_mode == pb.NOISE_MODE_TORCH_CPU


@pytest.mark.parametrize("service", ["", "diffuserve.v1.DiffusionService", "tiny-sd"])
def test_health_is_serving_overall_and_per_model(channel, service: str) -> None:
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (response,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in response.list_services_response.service}
    assert {"diffuserve.v1.DiffusionService", "grpc.health.v1.Health"} <= names


def test_generate_returns_seeds_timings_and_settings(stub) -> None:
    response = stub.Generate(pb.GenerateRequest(**FAST, seeds=[5], num_images=3, request_id="abc"))
    assert response.request_id == "abc" and response.model == "tiny-sd"
    seeds = [image.seed for image in response.images]
    assert seeds[0] == 5 and len(set(seeds)) == 3  # missing seeds are drawn at random and returned
    assert all(
        image.mime_type == "image/png" and (image.width, image.height) == (128, 128) for image in response.images
    )
    t = response.timings
    assert t.total_ms >= t.denoise_ms >= t.unet_ms > 0 and t.text_encoder_ms > 0 and t.vae_decode_ms > 0
    assert t.batch_size == 3
    assert (response.steps, response.scheduler, response.guidance_scale) == (2, pb.SCHEDULER_PNDM, 7.5)
    assert response.noise_mode == pb.NOISE_MODE_TORCH_CPU


def test_request_id_is_generated_when_empty(stub) -> None:
    assert len(stub.Generate(pb.GenerateRequest(**FAST)).request_id) == 32


def test_a_returned_seed_reproduces_the_image(stub) -> None:
    first = stub.Generate(pb.GenerateRequest(**FAST)).images[0]
    again = stub.Generate(pb.GenerateRequest(**FAST, seeds=[first.seed])).images[0]
    assert again.data == first.data


@pytest.mark.parametrize(
    ("fmt", "mime", "pil_format"),
    [(pb.IMAGE_FORMAT_JPEG, "image/jpeg", "JPEG"), (pb.IMAGE_FORMAT_WEBP, "image/webp", "WEBP")],
)
def test_lossy_formats_are_encoded_as_asked(stub, fmt: int, mime: str, pil_format: str) -> None:
    image = stub.Generate(pb.GenerateRequest(**FAST, output_format=fmt, quality=80)).images[0]
    assert image.mime_type == mime
    assert Image.open(io.BytesIO(image.data)).format == pil_format


def test_png_metadata_carries_prompt_and_seed(stub) -> None:
    image = stub.Generate(pb.GenerateRequest(**FAST, seeds=[99], embed_metadata=True)).images[0]
    text = Image.open(io.BytesIO(image.data)).text
    assert (text["prompt"], text["seed"], text["steps"], text["scheduler"]) == ("a green square", "99", "2", "pndm")
    assert text["noise_mode"] == "torch_cpu"


def test_jpeg_metadata_is_in_exif(stub) -> None:
    image = stub.Generate(
        pb.GenerateRequest(**FAST, seeds=[4], embed_metadata=True, output_format=pb.IMAGE_FORMAT_JPEG)
    ).images[0]
    description = Image.open(io.BytesIO(image.data)).getexif()[0x010E]
    assert json.loads(description)["seed"] == "4"


def test_no_metadata_unless_asked(stub) -> None:
    image = stub.Generate(pb.GenerateRequest(**FAST)).images[0]
    assert "prompt" not in Image.open(io.BytesIO(image.data)).text


BAD_REQUESTS = [
    ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "prompt: must not be empty"),
    ({"prompt": "   "}, grpc.StatusCode.INVALID_ARGUMENT, "prompt: must not be empty"),
    ({"prompt": "x" * 10_001}, grpc.StatusCode.INVALID_ARGUMENT, "prompt: at most 10000 characters"),
    ({"width": 96}, grpc.StatusCode.INVALID_ARGUMENT, r"width: model 'tiny-sd' serves the sizes 128x128, 192x128 "),
    ({"width": 192, "height": 192}, grpc.StatusCode.INVALID_ARGUMENT, r"height: .* got 192x192"),
    ({"height": 256}, grpc.StatusCode.INVALID_ARGUMENT, r"height: .* got 128x256"),
    ({"width": -128}, grpc.StatusCode.INVALID_ARGUMENT, "width: .*got -128"),
    ({"steps": 151}, grpc.StatusCode.INVALID_ARGUMENT, r"steps: must be in 1\.\.150, got 151"),
    ({"steps": -1}, grpc.StatusCode.INVALID_ARGUMENT, r"steps: must be in 1\.\.150, got -1"),
    ({"guidance_scale": float("nan")}, grpc.StatusCode.INVALID_ARGUMENT, "guidance_scale: must be a finite number"),
    ({"guidance_scale": float("inf")}, grpc.StatusCode.INVALID_ARGUMENT, "guidance_scale: must be a finite number"),
    (
        {"guidance_scale": -2.0},
        grpc.StatusCode.INVALID_ARGUMENT,
        r"guidance_scale: must be a finite number in 0\.\.50",
    ),
    (
        {"scheduler": 99},
        grpc.StatusCode.INVALID_ARGUMENT,
        "scheduler: '#99' is not one of SCHEDULER_DDIM, SCHEDULER_PNDM, SCHEDULER_EULER, ",
    ),
    (
        {"scheduler": pb.SCHEDULER_LCM, "steps": 51},
        grpc.StatusCode.INVALID_ARGUMENT,
        r"steps: steps=51 .*; allowed: an integer in 1 \.\. 50 \(scheduler 'lcm'\)",
    ),
    ({"noise_mode": 7}, grpc.StatusCode.INVALID_ARGUMENT, "noise_mode: '#7' is not one of NOISE_MODE_"),
    ({"num_images": 9}, grpc.StatusCode.INVALID_ARGUMENT, r"num_images: must be in 1\.\.8, got 9"),
    ({"num_images": -1}, grpc.StatusCode.INVALID_ARGUMENT, r"num_images: must be in 1\.\.8, got -1"),
    ({"seeds": [1, 2, 3], "num_images": 2}, grpc.StatusCode.INVALID_ARGUMENT, "seeds: got 3 seeds for 2 image"),
    ({"output_format": 42}, grpc.StatusCode.INVALID_ARGUMENT, "output_format: '#42' is not one of IMAGE_FORMAT_PNG"),
    ({"quality": 101}, grpc.StatusCode.INVALID_ARGUMENT, r"quality: must be in 1\.\.100"),
    ({"model": "sdxl"}, grpc.StatusCode.NOT_FOUND, r"model: no model named 'sdxl'; this server has \['tiny-sd'\]"),
]


@pytest.mark.parametrize(("fields", "code", "message"), BAD_REQUESTS, ids=[str(f)[:40] for f, _, _ in BAD_REQUESTS])
def test_bad_field_is_refused_naming_it(stub, fields: dict, code: grpc.StatusCode, message: str) -> None:
    request = pb.GenerateRequest(**{**FAST, **fields})
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(request)
    assert error.value.code() == code
    assert re.search(message, error.value.details()), error.value.details()


def test_every_bad_field_is_reported_at_once(stub) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(pb.GenerateRequest(prompt="", steps=1000, quality=-5))
    details = error.value.details()
    assert "prompt:" in details and "steps:" in details and "quality:" in details


def test_server_keeps_serving_after_bad_requests(stub) -> None:
    for fields, _, _ in BAD_REQUESTS:
        with pytest.raises(grpc.RpcError):
            stub.Generate(pb.GenerateRequest(**{**FAST, **fields}))
    response = stub.Generate(pb.GenerateRequest(**FAST, seeds=[1]))
    pixels = np.asarray(Image.open(io.BytesIO(response.images[0].data)))
    assert pixels.shape == (128, 128, 3)
