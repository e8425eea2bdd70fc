"""Building, starting and stopping the gRPC server: DiffusionService, health and reflection on one port."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from diffuserve.v1 import diffusion_pb2 as pb
from diffuserve.v1 import diffusion_pb2_grpc as pb_grpc

from .models import ModelDefaults, ServedModel, load_model
from .service import DiffusionService

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DiffusionService"].full_name
# Images are a few MB at most; 64 MiB leaves room for several large images per response without allowing abuse.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


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
    # Seconds accepted requests get to finish after a stop signal.
    grace_s: float = 30.0


def load_models(config: ServerConfig) -> dict[str, ServedModel]:
    models: dict[str, ServedModel] = {}
    for folder in config.model_dirs:
        model = load_model(folder, config.backend, config.threads, config.defaults, config.overrides)
        if model.name in models:
            raise ValueError(f"two model folders are both named {model.name!r}: {models[model.name].folder}, {folder}")
        models[model.name] = model
        log.info("serving %s from %s on %s (%s)", model.name, folder, model.backend, ", ".join(model.providers))
    return models


async def start_server(
    config: ServerConfig, models: Mapping[str, ServedModel], worker: ThreadPoolExecutor
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Starts serving; returns the server, the port really bound (config.port 0 picks a free one) and health."""
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    default_model = next(iter(models))
    pb_grpc.add_DiffusionServiceServicer_to_server(DiffusionService(models, default_model, worker), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"could not bind {config.host}:{config.port}")
    await server.start()
    for name in ("", SERVICE_NAME, *models):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer


async def stop_server(server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, grace_s: float) -> None:
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace_s)


def serve(config: ServerConfig) -> None:
    """Serves until SIGTERM or SIGINT, then drains for up to config.grace_s."""
    models = load_models(config)

    async def main() -> None:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference") as worker:
            server, port, health_servicer = await start_server(config, models, worker)
            log.info("listening on %s:%d", config.host, port)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            try:
                await stop.wait()
                log.info("stopping: draining for up to %.0f s", config.grace_s)
            finally:
                await stop_server(server, health_servicer, config.grace_s)

    asyncio.run(main())


class BackgroundServer:
    """A server on its own event-loop thread, for tests, benchmarks and the demo: start, use .port, stop."""

    def __init__(self, config: ServerConfig, models: Mapping[str, ServedModel] | None = None):
        self.config = config
        self.models = models if models is not None else load_models(config)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-server", daemon=True)

    def start(self) -> BackgroundServer:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(start_server(self.config, self.models, self._worker), self._loop)
        self._server, self.port, self._health = started.result()
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace_s: float = 0.0) -> None:
        stopped = asyncio.run_coroutine_threadsafe(stop_server(self._server, self._health, grace_s), self._loop)
        stopped.result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._worker.shutdown()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
