"""The gRPC DiffusionService: requests in, validated, run on the inference worker, responses out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from concurrent.futures import Executor
from importlib import metadata

import grpc

from diffuserve.v1 import diffusion_pb2 as pb
from diffuserve.v1 import diffusion_pb2_grpc as pb_grpc

from .models import ServedModel
from .params import GenerateParams, InvalidArgument, ModelNotFound, scheduler_enum, validate
from .pipeline import GenerateResult, generate

log = logging.getLogger(__name__)


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


class DiffusionService(pb_grpc.DiffusionServiceServicer):
    def __init__(self, models: Mapping[str, ServedModel], default_model: str, worker: Executor):
        self.models = models
        self.default_model = default_model
        # One worker thread: the engines already use every core, so concurrent runs would only contend.
        self.worker = worker

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        accepted = time.perf_counter()
        try:
            params = validate(request, self.models, self.default_model)
        except ModelNotFound as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        model = self.models[params.model]
        loop = asyncio.get_running_loop()
        try:
            queue_ms, result = await loop.run_in_executor(self.worker, _timed_generate, model, params, accepted)
        except Exception as e:  # an engine failed: this request fails, the server lives on
            log.exception("request %s failed", params.request_id)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"request {params.request_id} failed: {type(e).__name__}: {e}"
            )
        log.info(
            "request %s: %d image(s), %d steps, %s, %.0f ms",
            params.request_id,
            params.num_images,
            params.steps,
            params.scheduler,
            result.times.total_ms + queue_ms,
        )
        return response_for(params, result, queue_ms)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_info(m) for m in self.models.values()])

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        first = self.models[self.default_model]
        return pb.GetServerInfoResponse(
            version=package_version("diffuserve"),
            backend=first.backend,
            providers=first.providers,
            default_model=self.default_model,
            models=list(self.models),
            runtime_versions={
                name: package_version(name) for name in ("onnxruntime", "onnxruntime-gpu", "grpcio", "numpy")
            },
        )


def _timed_generate(model: ServedModel, params: GenerateParams, accepted: float) -> tuple[float, GenerateResult]:
    queue_ms = (time.perf_counter() - accepted) * 1e3
    return queue_ms, generate(model, params)


def response_for(params: GenerateParams, result: GenerateResult, queue_ms: float) -> pb.GenerateResponse:
    times = result.times
    return pb.GenerateResponse(
        request_id=params.request_id,
        model=params.model,
        images=[
            pb.Image(data=data, mime_type=mime, seed=seed, width=params.width, height=params.height)
            for (data, mime), seed in zip(result.images, params.seeds, strict=True)
        ],
        timings=pb.Timings(
            queue_ms=queue_ms,
            text_encoder_ms=times.text_encoder_ms,
            denoise_ms=times.denoise_ms,
            unet_ms=times.unet_ms,
            vae_decode_ms=times.vae_decode_ms,
            image_encode_ms=times.image_encode_ms,
            total_ms=queue_ms + times.total_ms,
            batch_size=params.num_images,
        ),
        steps=params.steps,
        guidance_scale=params.guidance_scale,
        scheduler=scheduler_enum(params.scheduler),
    )


def model_info(model: ServedModel) -> pb.ModelInfo:
    manifest = model.manifest
    return pb.ModelInfo(
        name=model.name,
        family=manifest.family,
        prediction_type=model.scheduler_config.prediction_type,
        width=manifest.width,
        height=manifest.height,
        batch_size=manifest.batch_size,
        schedulers=[scheduler_enum(s) for s in model.schedulers],
        default_scheduler=scheduler_enum(model.default_scheduler),
        default_steps=model.defaults.steps,
        default_guidance_scale=model.defaults.guidance_scale,
        max_steps=model.defaults.max_steps,
        max_images=model.defaults.max_images,
        backend=model.backend,
        precision=manifest.precision,
    )
