"""Building, starting and stopping the gRPC server: DiffusionService, health and reflection on one port."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from diffuserve.engine.manifest import format_size
from diffuserve.v1 import diffusion_pb2 as pb
from diffuserve.v1 import diffusion_pb2_grpc as pb_grpc

from .interceptors import RequestGuard
from .metrics import Metrics, start_metrics_server
from .models import ModelDefaults, ServedModel, load_model
from .oip import OIP_SERVICE_NAME, add_oip_service
from .params import MAX_MODEL_NAME_CHARS, max_request_bytes
from .security import TlsFiles, TokenAuth, keepalive_options, server_credentials
from .service import DiffusionService
from .worker import InferenceWorker, WorkerConfig

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DiffusionService"].full_name
# Responses: images are a few MB at most; 64 MiB leaves room for several large images in one response.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DRAIN_POLL_S = 0.05
# Time for responses of calls that finished at the end of the grace period to reach their clients.
RESPONSE_FLUSH_S = 1.0
# Clients' channels: a response may be that large.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def server_options(models: Mapping[str, ServedModel]) -> list[tuple[str, int]]:
    """Requests are received up to the largest one validation can accept: a larger one is refused by gRPC before
    it is read into memory (RESOURCE_EXHAUSTED, as gRPC answers any message over the limit)."""
    largest = max(max_request_bytes(model.defaults.max_images) for model in models.values())
    return [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", largest)]


@dataclass(frozen=True)
class ServerConfig:
    model_dirs: tuple[str, ...]
    host: str = "[::]"
    port: int = 50051
    backend: str = "auto"
    threads: int | None = None
    defaults: ModelDefaults = field(default_factory=ModelDefaults)
    # Operator's request defaults (steps, guidance_scale) that win over each model's own.
    overrides: Mapping[str, Any] = field(default_factory=dict)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    # Seconds accepted requests get to finish after a stop signal.
    grace_s: float = 30.0
    # diffuserve.engine.ort_cuda.CudaOptions for the cuda backend (None: its defaults).
    cuda_options: Any = None
    # diffuserve.engine.trt.TrtOptions for the tensorrt backend (None: its defaults).
    trt_options: Any = None
    # Only the running stage's engines resident, each stage loading its own: for boards with little shared memory.
    low_memory: bool = False
    # TLS on the port (mutual TLS with a client CA); None: plaintext, for a loopback or a TLS-terminating proxy.
    tls: TlsFiles | None = None
    # Bearer tokens the port accepts (from a file or the environment); empty: no token asked.
    auth_tokens: tuple[str, ...] = ()
    # With tokens: whether health checks (probes carry none) and reflection stay open.
    open_health: bool = True
    open_reflection: bool = True
    # The longest a request may run: calls on a connection asked to reconnect get this long to finish.
    longest_request_s: float = 600.0
    # Prometheus metrics on this port (0: any free one); None: none.
    metrics_port: int | None = None
    # The HTTP gateway and browser playground on this port (0: any free one), a client of this server; None: none.
    http_port: int | None = None


def load_models(config: ServerConfig) -> dict[str, ServedModel]:
    models: dict[str, ServedModel] = {}
    for folder in config.model_dirs:
        model = load_model(
            folder,
            config.backend,
            config.threads,
            config.defaults,
            config.overrides,
            config.cuda_options,
            config.trt_options,
            low_memory=config.low_memory,
        )
        if len(model.name) > MAX_MODEL_NAME_CHARS:
            raise ValueError(f"{folder}: model names have at most {MAX_MODEL_NAME_CHARS} characters")
        if model.name in models:
            raise ValueError(f"two model folders are both named {model.name!r}: {models[model.name].folder}, {folder}")
        models[model.name] = model
        log.info(
            "serving %s from %s: backend %s (%s), target %s (%s), on %s, sizes %s, batches %s%s",
            model.name,
            folder,
            model.backend,
            model.loaded.reason,
            model.target,
            model.precision,
            model.device,
            ", ".join(format_size(size) for size in model.sizes),
            list(model.batch_sizes),
            ", low memory: one stage's engines resident at a time" if model.low_memory else "",
        )
        log.info("%s: execution providers %s", model.name, ", ".join(model.providers))
    return models


@dataclass
class Running:
    """A started server and what its shutdown needs."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service: DiffusionService
    worker: InferenceWorker
    # The /metrics HTTP server, when there is one (its port: .server_port).
    metrics: Any = None
    # The HTTP gateway (gateway.app.GatewayServer; its port: .port), when there is one.
    gateway: Any = None


async def start_server(config: ServerConfig, models: Mapping[str, ServedModel]) -> Running:
    """Starts the worker and the server; config.port 0 binds a free port, reported in Running.port."""
    worker = InferenceWorker(config.worker).start()
    metrics = metrics_endpoint = None
    if config.metrics_port is not None:
        metrics = Metrics(models, lambda: worker.depth)
        worker.on_batch = metrics.batch_done
        metrics_endpoint, _ = start_metrics_server(metrics, config.host, config.metrics_port)
    auth = [TokenAuth(config.auth_tokens, config.open_health, config.open_reflection)] if config.auth_tokens else []
    options = server_options(models) + keepalive_options(config.longest_request_s)
    server = grpc.aio.server(interceptors=[*auth, RequestGuard()], options=options)
    service = DiffusionService(models, next(iter(models)), worker, metrics)
    pb_grpc.add_DiffusionServiceServicer_to_server(service, server)
    # The Open Inference Protocol (tritonclient, perf_analyzer users), an adapter over the same worker.
    add_oip_service(server, service)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = (SERVICE_NAME, OIP_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(services, server)
    address = f"{config.host}:{config.port}"
    port = (
        server.add_secure_port(address, server_credentials(config.tls))
        if config.tls
        else server.add_insecure_port(address)
    )
    if port == 0:
        raise OSError(f"could not bind {config.host}:{config.port}")
    await server.start()
    for name in ("", SERVICE_NAME, OIP_SERVICE_NAME, *models):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    gateway = None
    if config.http_port is not None:
        from .gateway.app import gateway_beside_server

        gateway = gateway_beside_server(config.host, port, config.http_port, config.grace_s)
        await asyncio.get_running_loop().run_in_executor(None, gateway.start)
        log.info("playground on %s", gateway.url)
    return Running(server, port, health_servicer, service, worker, metrics_endpoint, gateway)


async def drain(running: Running, grace_s: float) -> None:
    """Health goes NOT_SERVING and new requests get UNAVAILABLE; accepted ones get up to grace_s to finish."""
    running.service.draining = True
    await running.health.enter_graceful_shutdown()
    until = time.monotonic() + grace_s
    while not running.worker.idle() and time.monotonic() < until:
        await asyncio.sleep(DRAIN_POLL_S)
    # Lets the finished calls send their responses; anything still running past the grace is cancelled.
    await running.server.stop(max(0.0, until - time.monotonic()) + RESPONSE_FLUSH_S)
    await asyncio.get_running_loop().run_in_executor(None, running.worker.stop)
    if running.metrics is not None:
        running.metrics.shutdown()
        running.metrics.server_close()
    # Last: its streams were calls of this server, finished or ended by now; new ones were answered 503 meanwhile.
    if running.gateway is not None:
        await asyncio.get_running_loop().run_in_executor(None, running.gateway.stop)


def serve(config: ServerConfig) -> None:
    """Serves until SIGTERM or SIGINT, then drains for up to config.grace_s and returns."""
    models = load_models(config)

    async def main() -> None:
        running = await start_server(config, models)
        log.info("listening on %s:%d", config.host, running.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
            log.info("stopping: draining for up to %.0f s", config.grace_s)
        finally:
            await drain(running, config.grace_s)
        log.info("stopped")

    asyncio.run(main())


class BackgroundServer:
    """A server on its own event-loop thread, for tests, benchmarks and the demo: start, use .port, stop."""

    def __init__(self, config: ServerConfig, models: Mapping[str, ServedModel] | None = None):
        self.config = config
        self.models = models if models is not None else load_models(config)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-server", daemon=True)

    def start(self) -> BackgroundServer:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(start_server(self.config, self.models), self._loop)
        self.running = started.result()
        self.port = self.running.port
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace_s: float = 0.0) -> None:
        asyncio.run_coroutine_threadsafe(drain(self.running, grace_s), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
