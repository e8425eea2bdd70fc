"""The gRPC DiffusionService: requests in, validated, queued for the inference worker, responses or events out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from importlib import metadata

import grpc

from diffuserve.v1 import diffusion_pb2 as pb
from diffuserve.v1 import diffusion_pb2_grpc as pb_grpc

from .metrics import Metrics
from .models import ServedModel
from .noise import DEFAULT_NOISE_MODE
from .params import (
    MAX_REQUEST_ID_CHARS,
    GenerateParams,
    InvalidArgument,
    ModelNotFound,
    noise_mode_enum,
    scheduler_enum,
    task_enum,
    validate,
)
from .pipeline import GenerateResult
from .resources import rss_bytes
from .worker import (
    SHUTTING_DOWN,
    DeadlineExceeded,
    Event,
    ImageReady,
    InferenceWorker,
    Job,
    JobCancelled,
    Progress,
    Queued,
    QueueFull,
    RequestFailed,
    WorkerStopping,
)

log = logging.getLogger(__name__)

# gRPC's standard trailer for "retry after this many ms"; clients with a retry policy honour it.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
# The request id as metadata: taken from the caller where the request has none, and sent back on every call.
REQUEST_ID_KEY = "x-request-id"
# How a job that stopped without images ends its call: the outcome it is counted under, and the status.
STOPPED_JOBS = {
    DeadlineExceeded: ("deadline", grpc.StatusCode.DEADLINE_EXCEEDED),
    JobCancelled: ("cancelled", grpc.StatusCode.CANCELLED),
    # This request failed (logged with its cause); the server lives on.
    RequestFailed: ("failed", grpc.StatusCode.INTERNAL),
}
_DONE = object()


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


class DiffusionService(pb_grpc.DiffusionServiceServicer):
    def __init__(
        self,
        models: Mapping[str, ServedModel],
        default_model: str,
        worker: InferenceWorker,
        metrics: Metrics | None = None,
    ):
        self.models = models
        self.default_model = default_model
        self.worker = worker
        self.metrics = metrics
        self.draining = False

    def _record(self, model: str, outcome: str, job: Job | None = None) -> None:
        if self.metrics is not None:
            self.metrics.finished(model, outcome, job)

    async def refuse(self, context, model: str, outcome: str, code: grpc.StatusCode, message: str) -> None:
        """Ends a call that was never queued, counting it under its outcome."""
        self._record(model, outcome)
        await context.abort(code, message)

    async def _accept(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, listener: Callable[[Event], None] | None
    ) -> Job:
        """Validates and queues a request, or ends the call with the status that says why not."""
        model = request.model or self.default_model
        if self.draining:
            await self.refuse(context, model, "rejected", grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        if not request.request_id:  # a request id given as metadata, as proxies and tracing set it
            request.request_id = metadata_request_id(context)
        try:
            if request.init_image or request.mask_image:  # decoding and resizing images: off the event loop
                loop = asyncio.get_running_loop()
                params = await loop.run_in_executor(None, validate, request, self.models, self.default_model)
            else:
                params = validate(request, self.models, self.default_model)
        except ModelNotFound as e:
            await self.refuse(context, model, "invalid", grpc.StatusCode.NOT_FOUND, str(e))
        except InvalidArgument as e:
            await self.refuse(context, model, "invalid", grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return await self.queue(params, context, call_deadline(context), listener)

    async def queue(
        self,
        params: GenerateParams,
        context: grpc.aio.ServicerContext,
        deadline: float | None,
        listener: Callable[[Event], None] | None = None,
    ) -> Job:
        """Queues a validated request on the worker, whichever protocol it came by, or ends the call with the status
        that says why not. Its id goes back as metadata first (metadata values are ASCII: a Unicode id is echoed in
        the response only)."""
        if params.request_id.isascii():
            await context.send_initial_metadata(((REQUEST_ID_KEY, params.request_id),))
        job = Job(self.models[params.model], params, deadline, listener, params.preview_interval)
        try:
            self.worker.submit(job)
        except QueueFull as e:
            context.set_trailing_metadata(((RETRY_PUSHBACK_KEY, str(e.retry_after_ms)),))
            await self.refuse(context, params.model, "rejected", grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except WorkerStopping:
            await self.refuse(context, params.model, "rejected", grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        if self.metrics is not None:
            self.metrics.accepted()
        return job

    async def finish(self, job: Job, context: grpc.aio.ServicerContext) -> GenerateResult:
        """Waits for the job's result, ending the call with the status that says why there is none."""
        try:
            result = await outcome(job)
        except tuple(STOPPED_JOBS) as e:
            name, code = STOPPED_JOBS[type(e)]
            self._ended(job, name)
            await context.abort(code, str(e))
        except asyncio.CancelledError:  # the caller went away while waiting
            self._ended(job, "cancelled")
            raise
        self._ended(job, "ok")
        return result

    def _ended(self, job: Job, outcome: str) -> None:
        log_done(job, outcome)
        self._record(job.params.model, outcome, job)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        job = await self._accept(request, context, listener=None)
        with cancel_if_abandoned(job):
            result = await self.finish(job, context)
        return response_for(job, result, with_images=True)

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def deliver(event: object) -> None:  # called on the worker thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        job = await self._accept(request, context, listener=deliver)
        job.future.add_done_callback(lambda _: deliver(_DONE))
        request_id = job.params.request_id
        with cancel_if_abandoned(job):
            while (event := await events.get()) is not _DONE:
                yield event_proto(request_id, job, event)
            result = await self.finish(job, context)
        yield pb.GenerateEvent(request_id=request_id, completed=response_for(job, result, with_images=False))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_info(m) for m in self.models.values()])

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        first = self.models[self.default_model]
        config = self.worker.config
        return pb.GetServerInfoResponse(
            version=package_version("diffuserve"),
            backend=first.backend,
            providers=first.providers,
            device=first.device,
            target=first.target,
            backend_reason=first.loaded.reason,
            default_model=self.default_model,
            models=list(self.models),
            runtime_versions={
                name: package_version(name) for name in ("onnxruntime", "onnxruntime-gpu", "grpcio", "numpy")
            },
            queue_capacity=config.queue_capacity,
            queue_depth=self.worker.depth,
            batching=config.batching,
            max_batch_wait_ms=config.max_batch_wait_ms,
            default_noise_mode=noise_mode_enum(DEFAULT_NOISE_MODE),
            text_cache=text_cache_info(self.models.values()),
            resident_memory_bytes=rss_bytes() or 0,
            gpu_memory_bytes=first.gpu_memory_bytes(),
        )


def outcome(job: Job) -> asyncio.Future:
    """The job's result on this event loop. Not asyncio.wrap_future: cancelling the waiting handler would cancel
    the job's own future too, and the worker would never learn that nobody wants the job any more."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def copy(done: Future) -> None:
        if waiter.done():  # the handler stopped waiting
            return
        error = done.exception()
        if error is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result(done.result())

    def settled(done: Future) -> None:  # on the worker thread
        if not loop.is_closed():
            loop.call_soon_threadsafe(copy, done)

    job.future.add_done_callback(settled)
    return waiter


@contextmanager
def cancel_if_abandoned(job: Job) -> Iterator[None]:
    """However the handler leaves (the caller cancelled, disconnected, or the stream was closed while paused at a
    yield), the job is told to stop, so its rows leave the batch at the next step; a finished job ignores it."""
    try:
        yield
    finally:
        job.cancel()


def log_done(job: Job, outcome: str) -> None:
    """One line per request: what it asked, how it ended, where its time went (JSON fields with --log-format json)."""
    p, t = job.params, job.times
    fields = {
        "request_id": p.request_id,
        "model": p.model,
        "task": p.task,
        "size": f"{p.width}x{p.height}",
        "images": p.num_images,
        "steps": p.steps,
        "sampler": p.scheduler,
        "outcome": outcome,
        "batch": job.batch_size,
        "queue_ms": round(t.queue_ms, 1),
        "text_encoder_ms": round(t.text_encoder_ms, 1),
        "denoise_ms": round(t.denoise_ms, 1),
        "vae_decode_ms": round(t.vae_decode_ms, 1),
        "total_ms": round(t.total_ms, 1),
    }
    log.info(
        "request %s: %s, model %s, %s %s, %d image(s), %d steps %s, batch of %d, %.0f ms (queue %.0f)",
        p.request_id,
        outcome,
        p.model,
        p.task,
        fields["size"],
        p.num_images,
        p.steps,
        p.scheduler,
        job.batch_size,
        t.total_ms,
        t.queue_ms,
        extra={"fields": fields},
    )


def call_deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as time.monotonic(), None without one."""
    remaining = context.time_remaining()
    return time.monotonic() + remaining if remaining is not None else None


def metadata_request_id(context: grpc.aio.ServicerContext) -> str:
    """The caller's x-request-id metadata, where it is a usable id; else empty (validation generates one)."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and len(value) <= MAX_REQUEST_ID_CHARS:
            return value if value.isprintable() else ""
    return ""


def image_proto(params: GenerateParams, index: int, data: bytes, mime_type: str) -> pb.Image:
    return pb.Image(
        data=data, mime_type=mime_type, seed=params.seeds[index], width=params.width, height=params.height, index=index
    )


def event_proto(request_id: str, job: Job, event: Event) -> pb.GenerateEvent:
    if isinstance(event, Queued):
        return pb.GenerateEvent(request_id=request_id, queued=pb.Queued(position=event.position, depth=event.depth))
    if isinstance(event, Progress):
        shape = job.model.manifest.latent_shape(job.params.size)
        previews = [
            pb.Image(
                data=data, mime_type="image/png", seed=job.params.seeds[i], width=shape[2], height=shape[1], index=i
            )
            for i, data in enumerate(event.previews)
        ]
        progress = pb.Progress(step=event.step, total=event.total, eta_ms=event.eta_ms, previews=previews)
        return pb.GenerateEvent(request_id=request_id, progress=progress)
    if isinstance(event, ImageReady):
        return pb.GenerateEvent(
            request_id=request_id, image=image_proto(job.params, event.index, event.data, event.mime_type)
        )
    raise TypeError(f"unknown event {event!r}")


def response_for(job: Job, result: GenerateResult, with_images: bool) -> pb.GenerateResponse:
    params, times = job.params, result.times
    images = (
        [image_proto(params, i, data, mime) for i, (data, mime) in enumerate(result.images)] if with_images else []
    )
    return pb.GenerateResponse(
        request_id=params.request_id,
        model=params.model,
        images=images,
        timings=pb.Timings(
            queue_ms=times.queue_ms,
            text_encoder_ms=times.text_encoder_ms,
            vae_encode_ms=times.vae_encode_ms,
            denoise_ms=times.denoise_ms,
            unet_ms=times.unet_ms,
            vae_decode_ms=times.vae_decode_ms,
            image_encode_ms=times.image_encode_ms,
            total_ms=times.total_ms,
            batch_size=job.batch_size,
            unet_calls=times.unet_calls,
        ),
        steps=params.steps,
        guidance_scale=params.guidance_scale,
        scheduler=scheduler_enum(params.scheduler),
        noise_mode=noise_mode_enum(params.noise_mode),
        task=task_enum(params.task),
        strength=params.strength,
        prompt_tokens=params.prompt_tokens,
        negative_prompt_tokens=params.negative_prompt_tokens,
        text_chunks=params.text_chunks,
    )


def model_info(model: ServedModel) -> pb.ModelInfo:
    manifest = model.manifest
    return pb.ModelInfo(
        name=model.name,
        family=manifest.family,
        prediction_type=model.scheduler_config.prediction_type,
        width=manifest.default_size[0],
        height=manifest.default_size[1],
        sizes=[pb.ImageSize(width=w, height=h) for w, h in model.sizes],
        batch_size=max(model.batch_sizes),
        batch_sizes=model.batch_sizes,
        schedulers=[scheduler_enum(s) for s in model.schedulers],
        default_scheduler=scheduler_enum(model.default_scheduler),
        default_steps=model.defaults.steps,
        default_guidance_scale=model.defaults.guidance_scale,
        max_steps=model.defaults.max_steps,
        max_images=model.defaults.max_images,
        backend=model.backend,
        precision=model.precision,
        target=model.target,
        tasks=[task_enum(task) for task in model.tasks],
        text_lengths=model.text_lengths,
        max_prompt_tokens=max_prompt_tokens(model),
        guidance_embedded=model.guidance_embedded,
    )


def max_prompt_tokens(model: ServedModel) -> int:
    """The longest prompt that fits the longest text length served: 75 tokens per chunk of 77."""
    seq_len = model.tokenizer.max_length
    return max(model.text_lengths) // seq_len * (seq_len - 2)


def text_cache_info(models: Iterable[ServedModel]) -> pb.TextEncoderCache:
    """The models' caches of encoded prompt chunks, summed."""
    stats = [model.text_cache.stats() for model in models if model.text_cache is not None]
    hits, misses = sum(s.hits for s in stats), sum(s.misses for s in stats)
    return pb.TextEncoderCache(
        hits=hits,
        misses=misses,
        hit_rate=hits / (hits + misses) if hits + misses else 0.0,
        entries=sum(s.entries for s in stats),
        bytes=sum(s.bytes for s in stats),
        max_entries=sum(s.max_entries for s in stats),
        max_bytes=sum(s.max_bytes for s in stats),
    )
