"""Real servers for the serving tests: started per test on a loopback port, with a request to keep them busy."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc

from diffuserve.server.app import BackgroundServer, ServerConfig
from diffuserve.server.models import ServedModel
from diffuserve.server.worker import WorkerConfig
from diffuserve.v1 import diffusion_pb2 as pb
from diffuserve.v1 import diffusion_pb2_grpc as pb_grpc

LONG = 150  # the most steps a request may ask for: long enough to act on while it runs
BLOCKER = 100  # long enough that requests sent after it starts are sure to queue behind it


def euler_request(**fields) -> pb.GenerateRequest:
    """A request for Euler: one U-Net call per step, so the step counts here are the worker's call counts."""
    return pb.GenerateRequest(scheduler=pb.SCHEDULER_EULER, **fields)


@contextmanager
def serving(model: ServedModel, **worker):
    config = ServerConfig(model_dirs=(), host="127.0.0.1", port=0, worker=WorkerConfig(**worker))
    with BackgroundServer(config, {model.name: model}) as server, grpc.insecure_channel(server.address) as channel:
        yield server, pb_grpc.DiffusionServiceStub(channel), channel


@contextmanager
def busy(stub: pb_grpc.DiffusionServiceStub, steps: int = BLOCKER):
    """Keeps the worker on an incompatible request (other step count), so requests sent meanwhile queue up together."""
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(stub.Generate, euler_request(prompt="a yellow square", steps=steps))
        time.sleep(0.2)
        yield
        blocker.result(timeout=120)


def wait_idle(server: BackgroundServer, timeout: float = 30.0) -> None:
    until = time.monotonic() + timeout
    while not server.running.worker.idle():
        assert time.monotonic() < until, "the worker never went idle"
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
