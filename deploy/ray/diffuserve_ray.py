"""diffuserve on Ray Serve: one deployment per model behind Ray's gRPC proxy, autoscaled on ongoing requests.

Each model deployment's replica is what `diffuserve serve` runs for that model: the model loaded once, an
InferenceWorker (bounded queue, batching, per-step cancellation and deadlines) and the DiffusionService servicer's own
methods. It is an adapter over the same worker, never a second pipeline. An ingress deployment (the router) takes
every call from the proxy, sends Generate and GenerateStream to the deployment of `GenerateRequest.model` (empty: the
default model), merges ListModels, and answers `grpc.health.v1.Health` from Serve's view of the deployments.

Not part of the wheel: run it from this folder (`serve run --working-dir deploy/ray ...`, see README.md beside it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from pydantic import BaseModel, ConfigDict, Field, field_validator

from diffuserve.engine.manifest import Manifest
from diffuserve.server.models import ModelDefaults, load_model
from diffuserve.server.params import MAX_MODEL_NAME_CHARS, ModelNotFound, resolve_model
from diffuserve.server.service import REQUEST_ID_KEY, DiffusionService
from diffuserve.server.worker import InferenceWorker, WorkerConfig
from diffuserve.v1 import diffusion_pb2 as pb

try:
    from ray import serve
    from ray.exceptions import RayActorError
    from ray.serve.config import gRPCOptions
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
    from ray.serve.handle import DeploymentHandle
except ImportError as e:  # pragma: no cover - exercised only without ray
    raise ImportError('the Ray Serve application needs Ray Serve: pip install "diffuserve[ray]"') from e

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DiffusionService"].full_name
APP_NAME = "diffuserve"
ROUTER_NAME = "DiffusionRouter"
# Model deployments are named after their model, with this prefix: config files override their options by this name.
MODEL_PREFIX = "model-"
# Ray's gRPC proxy registers these; it answers grpc.health.v1 only because the router implements Check and Watch.
# The last registers nothing: it makes the proxy cancel a stream whose client went away (diffuserve_ray_proxy.py).
GRPC_SERVICER_FUNCTIONS = (
    "diffuserve.v1.diffusion_pb2_grpc.add_DiffusionServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
    "diffuserve_ray_proxy.cancel_streams_on_disconnect",
)
DEFAULT_GRPC_PORT = 9000
# Ray's proxies route only to applications with an HTTP route, gRPC included; nothing answers HTTP on it.
ROUTE_PREFIX = "/" + APP_NAME
# The router only awaits its model deployments, so many calls in flight cost it next to nothing; Ray's default (5)
# would make it, not the models, the bottleneck.
ROUTER_MAX_ONGOING_REQUESTS = 1000
# Health probes within this many seconds share one answer from the controller (serve.status() is a controller call).
STATUS_CACHE_S = 1.0
# How often Watch re-reads the status to send changes.
WATCH_INTERVAL_S = 1.0
# Seconds a stopping replica's worker gets to finish what it accepted after Ray's own graceful wait (Ray has already
# waited graceful_shutdown_timeout_s for the calls in flight).
WORKER_STOP_S = 5.0
# Serve's deployment states in which a model takes requests (a scaled-to-zero model is started by its first request).
SERVING_STATES = ("HEALTHY", "UPSCALING", "DOWNSCALING")


class AppConfig(BaseModel):
    """The application's settings: build_app's keyword arguments, or the `args:` of a Serve config file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Folders made by `diffuserve export`, readable at the same path on every node that runs a replica.
    model_dirs: tuple[str, ...] = Field(min_length=1)
    # The model requests with an empty `model` get; the first folder's when unset.
    default_model: str | None = None
    backend: str = "auto"
    # ONNX Runtime's intra-op threads per replica; unset: the replica's CPU share (at least 1), so replicas on one
    # node do not oversubscribe it.
    threads: int | None = Field(default=None, ge=1)
    low_memory: bool = False
    # Per model replica (Ray's ray_actor_options). 0 GPUs on a CPU-only cluster.
    num_gpus: float = Field(default=0, ge=0)
    num_cpus: float = Field(default=1, ge=0)
    # Autoscaling on ongoing requests (queued in the worker plus running) per replica.
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float = Field(default=2, gt=0)
    # More fields of Ray's AutoscalingConfig (upscale_delay_s, downscale_delay_s, look_back_period_s, ...).
    autoscaling: dict[str, Any] = Field(default_factory=dict)
    # Calls one replica holds at once: at least the largest batch, or batching has nobody to batch with.
    max_ongoing_requests: int = Field(default=8, ge=1)
    # Calls waiting for a free replica before RESOURCE_EXHAUSTED; -1: no limit.
    max_queued_requests: int = Field(default=64, ge=-1)
    # How long a stopping replica lets its calls finish (the server's --grace).
    graceful_shutdown_timeout_s: float = Field(default=30.0, ge=0)
    # The worker inside each replica (the server's --queue-capacity, --no-batching, --max-batch-wait-ms).
    queue_capacity: int = Field(default=64, ge=1)
    batching: bool = True
    max_batch_wait_ms: float = Field(default=5.0, ge=0)
    # ModelDefaults fields (steps, guidance_scale, max_steps, max_images, text_cache_bytes) for every model, and the
    # operator's overrides of steps and guidance_scale that win over each model's own.
    defaults: dict[str, Any] = Field(default_factory=dict)
    overrides: dict[str, Any] = Field(default_factory=dict)
    router_replicas: int = Field(default=1, ge=1)

    @field_validator("model_dirs", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        """`serve run ... model_dirs=/models/a,/models/b` passes one string."""
        if isinstance(value, str | os.PathLike):
            return tuple(part for part in str(value).split(",") if part)
        return tuple(str(v) for v in value)

    def worker(self) -> WorkerConfig:
        return WorkerConfig(self.queue_capacity, self.batching, self.max_batch_wait_ms)

    def replica_threads(self) -> int:
        return self.threads if self.threads is not None else max(1, int(self.num_cpus))


class RpcError(Exception):
    """A call's gRPC status, raised in a model replica (or the router) and set on the call by the router.

    Pickled between Ray processes: its arguments are plain strings and tuples."""

    def __init__(self, code: str, details: str, trailing_metadata: tuple[tuple[str, str], ...] = ()):
        super().__init__(code, details, trailing_metadata)
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata

    @property
    def status_code(self) -> grpc.StatusCode:
        return grpc.StatusCode[self.code]

    def __str__(self) -> str:
        return f"{self.code}: {self.details}"


class CallContext:
    """The part of grpc.aio.ServicerContext that DiffusionService uses, for a call that reached a model replica
    through Ray: abort raises RpcError, which the router turns back into the call's status.

    Ray's proxy passes no deadline on: when a client's deadline passes, the proxy cancels the call, and that
    cancellation reaches the worker's job as for a cancelled call (the client sees its own DEADLINE_EXCEEDED).
    A replica cannot send initial metadata through Ray: the router echoes the request id as trailing metadata."""

    def __init__(self, invocation_metadata: Sequence[tuple[str, str]] = ()) -> None:
        self._invocation_metadata = tuple(invocation_metadata)
        self.initial_metadata: tuple[tuple[str, str], ...] = ()
        self.trailing_metadata: tuple[tuple[str, str], ...] = ()

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence = ()) -> None:
        raise RpcError(code.name, details, tuple(trailing_metadata) or self.trailing_metadata)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._invocation_metadata

    async def send_initial_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.initial_metadata = tuple(metadata)

    def time_remaining(self) -> float | None:
        return None

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.trailing_metadata = tuple((str(k), str(v)) for k, v in metadata)


class DiffusionModel:
    """One model's server on a Ray replica: the model, its InferenceWorker and the DiffusionService methods."""

    def __init__(self, folder: str, config: AppConfig):
        self.config = config
        model = load_model(
            folder,
            config.backend,
            config.replica_threads(),
            ModelDefaults(**config.defaults),
            config.overrides,
            low_memory=config.low_memory,
        )
        self.name = model.name
        self.worker = InferenceWorker(config.worker()).start()
        self.service = DiffusionService({model.name: model}, model.name, self.worker)
        log.info(
            "replica serving %s from %s: backend %s (%s) on %s",
            model.name,
            folder,
            model.backend,
            model.loaded.reason,
            model.device,
        )

    # A refusal (RpcError) is returned, or yielded as a stream's last item, not raised: Ray logs every exception a
    # replica raises with its traceback, and an invalid request is no error of the server's.

    async def Generate(self, request: pb.GenerateRequest, metadata: Sequence = ()) -> pb.GenerateResponse | RpcError:
        try:
            return await self.service.Generate(request, CallContext(metadata))
        except RpcError as e:
            return e

    async def GenerateStream(
        self, request: pb.GenerateRequest, metadata: Sequence = ()
    ) -> AsyncIterator[pb.GenerateEvent | RpcError]:
        # aclosing: when Ray stops this stream (the caller cancelled or went away), the service's stream is closed at
        # once, and that cancels the worker's job, not whenever the garbage collector gets to it.
        try:
            async with contextlib.aclosing(self.service.GenerateStream(request, CallContext(metadata))) as events:
                async for event in events:
                    yield event
        except RpcError as e:
            yield e

    async def ListModels(self, request: pb.ListModelsRequest) -> pb.ListModelsResponse:
        return await self.service.ListModels(request, CallContext())

    async def GetServerInfo(self, request: pb.GetServerInfoRequest) -> pb.GetServerInfoResponse:
        return await self.service.GetServerInfo(request, CallContext())

    def stats(self) -> dict[str, Any]:
        """The worker's counters, for operators and tests: U-Net steps run in all, requests waiting, idle or not."""
        return {"steps_run": self.worker.steps_run, "queue_depth": self.worker.depth, "idle": self.worker.idle()}

    def check_health(self) -> None:
        """Ray's own replica probe: a replica whose worker thread died is replaced."""
        if not self.worker.alive:
            raise RuntimeError(f"model {self.name}: the inference worker thread has stopped")

    def __del__(self) -> None:
        """Ray calls this after letting the calls in flight finish (graceful_shutdown_timeout_s)."""
        service, worker = getattr(self, "service", None), getattr(self, "worker", None)
        if service is not None:
            service.draining = True
        if worker is not None:
            worker.stop(WORKER_STOP_S)


class DiffusionRouter:
    """The ingress: each DiffusionService call goes to its model's deployment; health comes from Serve's status."""

    def __init__(self, models: Mapping[str, DeploymentHandle], default_model: str, deployments: Mapping[str, str]):
        self.models = dict(models)
        self.streams = {name: handle.options(stream=True) for name, handle in self.models.items()}
        self.default_model = default_model
        # model name -> its deployment's name
        self.deployments = dict(deployments)
        self.app_name = serve.get_replica_context().app_name
        self._model_infos: list[pb.ModelInfo] | None = None
        self._serving: dict[str, bool] = {}
        self._serving_at = -float("inf")
        self._status_lock = asyncio.Lock()

    def _model(self, name: str) -> str:
        try:
            resolve_model(name, self.models, self.default_model)
        except ModelNotFound as e:
            raise RpcError(grpc.StatusCode.NOT_FOUND.name, str(e)) from None
        return name or self.default_model

    async def Generate(self, request: pb.GenerateRequest, grpc_context: Any = None) -> pb.GenerateResponse:
        try:
            response = self.models[self._model(request.model)].Generate.remote(request, forwarded(grpc_context))
            try:
                answer = await response
            except asyncio.CancelledError:  # the caller cancelled or its deadline passed: so does the model's job
                response.cancel()
                raise
            if isinstance(answer, RpcError):
                return unary_failure(answer, grpc_context, pb.GenerateResponse())
            echo_request_id(grpc_context, answer.request_id)
            return answer
        except Exception as e:
            return unary_failure(e, grpc_context, pb.GenerateResponse())

    async def GenerateStream(
        self, request: pb.GenerateRequest, grpc_context: Any = None
    ) -> AsyncIterator[pb.GenerateEvent]:
        try:
            events = self.streams[self._model(request.model)].GenerateStream.remote(request, forwarded(grpc_context))
            finished = False
            try:
                async for event in events:
                    if isinstance(event, RpcError):  # the model's last item: a refusal
                        finished = True
                        stream_failure(event, grpc_context)
                    echo_request_id(grpc_context, event.request_id)
                    yield event
                finished = True
            finally:
                if not finished:  # cancelled, closed by the caller, or failed: stop the model's job
                    events.cancel()
        except Exception as e:
            stream_failure(e, grpc_context)

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context: Any = None) -> pb.ListModelsResponse:
        try:
            if self._model_infos is None:  # a model's description does not change while it is deployed
                answers = await asyncio.gather(*(handle.ListModels.remote(request) for handle in self.models.values()))
                self._model_infos = [info for answer in answers for info in answer.models]
            return pb.ListModelsResponse(models=self._model_infos)
        except Exception as e:
            return unary_failure(e, grpc_context, pb.ListModelsResponse())

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, grpc_context: Any = None
    ) -> pb.GetServerInfoResponse:
        """The default model's replica's answer (its queue, its backend), listing every model of the application."""
        try:
            info = await self.models[self.default_model].GetServerInfo.remote(request)
            del info.models[:]
            info.models.extend(self.models)
            return info
        except Exception as e:
            return unary_failure(e, grpc_context, pb.GetServerInfoResponse())

    async def Check(
        self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None
    ) -> health_pb2.HealthCheckResponse:
        """Service "" (or DiffusionService's name): SERVING while every model is; a model's name: that model."""
        status = await self._health(request.service)
        if status is None:
            return unary_failure(
                RpcError(grpc.StatusCode.NOT_FOUND.name, f"no service named {request.service!r}"),
                grpc_context,
                health_pb2.HealthCheckResponse(),
            )
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            status = await self._health(request.service)
            status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN if status is None else status
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(WATCH_INTERVAL_S)

    async def _health(self, service: str) -> int | None:
        if service not in ("", SERVICE_NAME) and service not in self.models:
            return None
        serving = await self._models_serving()
        up = all(serving.values()) if service in ("", SERVICE_NAME) else serving[service]
        return health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING

    async def _models_serving(self) -> dict[str, bool]:
        async with self._status_lock:
            if time.monotonic() - self._serving_at > STATUS_CACHE_S:
                status = await asyncio.to_thread(serve.status)  # a blocking controller call: off the event loop
                app = status.applications.get(self.app_name)
                deployments = app.deployments if app is not None else {}
                self._serving = {
                    name: deployment_serving(deployments.get(deployment))
                    for name, deployment in self.deployments.items()
                }
                self._serving_at = time.monotonic()
            return self._serving


def forwarded(grpc_context: Any) -> tuple[tuple[str, str], ...]:
    """The caller's metadata the model's service reads (x-request-id), from Ray's copy of the call's context."""
    if grpc_context is None:
        return ()
    return tuple((k, v) for k, v in grpc_context.invocation_metadata() if k == REQUEST_ID_KEY and isinstance(v, str))


def echo_request_id(grpc_context: Any, request_id: str) -> None:
    """The request id as trailing metadata: Ray's proxy sends what is set on the context with the call's messages."""
    if grpc_context is not None and request_id:
        grpc_context.set_trailing_metadata([(REQUEST_ID_KEY, request_id)])


def deployment_serving(overview: Any) -> bool:
    """A model takes requests while a replica runs, or while Serve calls its deployment healthy (scaled to zero)."""
    if overview is None:
        return False
    return overview.replica_states.get("RUNNING", 0) > 0 or overview.status in SERVING_STATES


def as_rpc_error(error: BaseException) -> RpcError:
    """The status a failed call gets: the model replica's own, or Ray's failures in gRPC's terms."""
    if type(error) is RpcError:
        return error
    # From another process, Ray raises a RayTaskError that is also an instance of the cause's class; the cause is
    # the model replica's own exception.
    cause = getattr(error, "cause", None)
    if isinstance(cause, RpcError):
        return RpcError(cause.code, cause.details, cause.trailing_metadata)
    if isinstance(error, BackPressureError):
        return RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED.name, f"the model's replicas are all busy: {error.message}")
    if isinstance(error, DeploymentUnavailableError | RayActorError):
        return RpcError(grpc.StatusCode.UNAVAILABLE.name, "the model's replica is unavailable; retry")
    log.error("a call failed in the router", exc_info=error)
    return RpcError(grpc.StatusCode.INTERNAL.name, "the call failed on the server; its log has the details")


def unary_failure(error: BaseException, grpc_context: Any, empty: Any) -> Any:
    """For a call from the proxy: the status set on its context and an empty message returned, which is how Ray's
    proxy sends a status with its trailing metadata (grpc-retry-pushback-ms). For a Python handle caller: raised."""
    rpc_error = as_rpc_error(error)
    if grpc_context is None:
        raise rpc_error from error
    grpc_context.set_code(rpc_error.status_code)
    grpc_context.set_details(rpc_error.details)
    if rpc_error.trailing_metadata:
        grpc_context.set_trailing_metadata(list(rpc_error.trailing_metadata))
    return empty


def stream_failure(error: BaseException, grpc_context: Any) -> None:
    """A stream's status travels with an exception: Ray's proxy sets the code and details set on the context before
    it (trailing metadata does not travel this way)."""
    rpc_error = as_rpc_error(error)
    if grpc_context is not None:
        grpc_context.set_code(rpc_error.status_code)
        grpc_context.set_details(rpc_error.details)
    raise rpc_error from error


def deployment_name(model_name: str) -> str:
    return MODEL_PREFIX + model_name


def model_names(config: AppConfig) -> dict[str, str]:
    """model name -> folder, from each folder's manifest (no engines loaded here)."""
    names: dict[str, str] = {}
    for folder in config.model_dirs:
        name = Manifest.load(folder).name
        if len(name) > MAX_MODEL_NAME_CHARS:
            raise ValueError(f"{folder}: model names have at most {MAX_MODEL_NAME_CHARS} characters")
        if name in names:
            raise ValueError(f"two model folders are both named {name!r}: {names[name]}, {folder}")
        names[name] = str(Path(folder).resolve())
    return names


def model_options(config: AppConfig) -> dict[str, Any]:
    return {
        "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        "autoscaling_config": {
            "min_replicas": config.min_replicas,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests,
            **config.autoscaling,
        },
        "max_ongoing_requests": config.max_ongoing_requests,
        "max_queued_requests": config.max_queued_requests,
        "graceful_shutdown_timeout_s": config.graceful_shutdown_timeout_s,
    }


def build(config: AppConfig | Mapping[str, Any]) -> serve.Application:
    config = config if isinstance(config, AppConfig) else AppConfig.model_validate(config)
    folders = model_names(config)
    default = config.default_model or next(iter(folders))
    if default not in folders:
        raise ValueError(f"default_model: no model named {default!r}; the folders hold {sorted(folders)}")
    model = serve.deployment(DiffusionModel).options(**model_options(config))
    handles = {
        name: model.options(name=deployment_name(name)).bind(folder, config) for name, folder in folders.items()
    }
    router = serve.deployment(DiffusionRouter).options(
        name=ROUTER_NAME,
        num_replicas=config.router_replicas,
        max_ongoing_requests=ROUTER_MAX_ONGOING_REQUESTS,
        # It only forwards: it needs no CPU of its own, so it never keeps a model replica from a node.
        ray_actor_options={"num_cpus": 0},
    )
    return router.bind(handles, default, {name: deployment_name(name) for name in folders})


def build_app(model_dirs: Sequence[str | os.PathLike], **options: Any) -> serve.Application:
    """The application for serve.run: `serve.run(build_app(["/models/sd15"], num_gpus=1), name=APP_NAME)`, after
    serve.start(grpc_options=grpc_options(port)). Options are AppConfig's fields."""
    return build(AppConfig(model_dirs=tuple(str(d) for d in model_dirs), **options))


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For `serve run` and Serve config files: `import_path: diffuserve_ray:app_builder` with AppConfig's fields as
    `args`."""
    return build(args)


def grpc_options(port: int = DEFAULT_GRPC_PORT, request_timeout_s: float | None = None) -> gRPCOptions:
    """Ray's gRPC proxy serving DiffusionService and grpc.health.v1 on port (all interfaces: see README.md)."""
    return gRPCOptions(
        port=port, grpc_servicer_functions=list(GRPC_SERVICER_FUNCTIONS), request_timeout_s=request_timeout_s
    )


def run(
    model_dirs: Sequence[str | os.PathLike],
    grpc_port: int = DEFAULT_GRPC_PORT,
    http_port: int = 8000,
    **options: Any,
) -> DeploymentHandle:
    """Starts Serve with the gRPC proxy on grpc_port (on the cluster ray.init connected to) and deploys the app."""
    serve.start(grpc_options=grpc_options(grpc_port), http_options={"host": "127.0.0.1", "port": http_port})
    return serve.run(build_app(model_dirs, **options), name=APP_NAME, route_prefix=ROUTE_PREFIX)
