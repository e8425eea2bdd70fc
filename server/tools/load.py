"""`diffuserve bench` over gRPC: requests one at a time, a closed loop of N clients, an open loop of Poisson arrivals
at a fixed rate, sweeps over either, and a soak; against running servers, or a model served here on a loopback port."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
import numpy as np

from diffuserve.v1 import diffusion_pb2 as pb
from diffuserve.v1 import diffusion_pb2_grpc as pb_grpc

from ..app import BackgroundServer, ServerConfig
from ..client import Connection
from ..models import ServedModel
from ..params import scheduler_enum
from ..worker import WorkerConfig
from .report import ProgressBar, Sample, new_report, stages_of, summarise

BENCH_PROMPT = "a red circle on a blue background"
BENCH_SEED = 7
BENCH_GUIDANCE = 7.5
MODES = ("latency", "closed", "open", "soak")
# Requests before any row is timed: connections, the servers' first runs (lazy allocations) and the prompt's cache.
WARMUP_REQUESTS = 2


@dataclass(frozen=True)
class RequestSettings:
    """What every bench request asks for; seeds differ per request (a seed per image), so none is cached whole."""

    prompt: str = BENCH_PROMPT
    negative_prompt: str = ""
    model: str = ""
    steps: int = 20
    scheduler: str = "euler"
    guidance_scale: float = BENCH_GUIDANCE
    # 0: the model's default size.
    width: int = 0
    height: int = 0
    images_per_request: int = 1
    timeout_s: float | None = None

    def request(self, index: int) -> pb.GenerateRequest:
        seeds = [BENCH_SEED + index * self.images_per_request + k for k in range(self.images_per_request)]
        request = pb.GenerateRequest(
            model=self.model,
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            width=self.width,
            height=self.height,
            seeds=seeds,
        )
        if self.scheduler:
            request.scheduler = scheduler_enum(self.scheduler)
        return request


@dataclass(frozen=True)
class LoadPlan:
    mode: str = "latency"
    # latency: requests one after another.
    runs: int = 5
    # closed: a row per number of clients; open: a row per arrival rate (requests/s).
    concurrency: tuple[int, ...] = (1, 4, 8)
    rates: tuple[float, ...] = ()
    # closed and open: requests per row.
    requests: int = 32
    # soak: how long in all, at concurrency[0] clients, and the window each row covers.
    soak_s: float = 0.0
    window_s: float = 60.0
    # The seed of the open loop's arrival times, so a rerun offers the same load.
    arrival_seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "open" and not self.rates:
            raise ValueError("--rate: an open loop needs at least one arrival rate (requests/s)")
        if any(rate <= 0 for rate in self.rates):
            raise ValueError(f"--rate: arrival rates are requests per second above 0, got {list(self.rates)}")
        if any(clients < 1 for clients in self.concurrency) or not self.concurrency:
            raise ValueError(f"--concurrency: one or more client counts of at least 1, got {list(self.concurrency)}")
        if self.requests < 1 or self.runs < 1:
            raise ValueError(f"--requests and --runs: at least 1, got {self.requests} and {self.runs}")
        if self.mode == "soak" and (self.soak_s <= 0 or self.window_s <= 0):
            raise ValueError(f"--soak: a duration and a window above 0 s, got {self.soak_s} and {self.window_s}")


@dataclass
class Caller:
    """One channel to the servers, the stub, and the token: what every bench request goes through."""

    link: Connection
    settings: RequestSettings
    channel: grpc.Channel = field(init=False)
    stub: pb_grpc.DiffusionServiceStub = field(init=False)
    # The run's clock: samples say when they finished, relative to this.
    t0: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.channel = self.link.channel()
        self.stub = pb_grpc.DiffusionServiceStub(self.channel)

    def call(self, index: int, sent: float | None = None) -> Sample:
        """One request, timed from `sent` (when it was due; now if None) to its answer."""
        sent = time.perf_counter() if sent is None else sent
        try:
            response = self.stub.Generate(
                self.settings.request(index), timeout=self.settings.timeout_s, metadata=self.link.metadata
            )
        except grpc.RpcError as error:
            return self.failed(error, sent)
        return self.answered(response, sent)

    def answered(self, response: pb.GenerateResponse, sent: float) -> Sample:
        now = time.perf_counter()
        return Sample(
            latency_ms=(now - sent) * 1e3,
            done_s=now - self.t0,
            stages=stages_of(response.timings),
            batch_size=max(1, response.timings.batch_size),
            images=len(response.images),
        )

    def failed(self, error: grpc.RpcError, sent: float) -> Sample:
        now = time.perf_counter()
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        return Sample(latency_ms=(now - sent) * 1e3, done_s=now - self.t0, error=code.name)

    def memory(self) -> dict[str, float | None]:
        """The serving process's resident and GPU memory (with several servers: the one this call reached)."""
        try:
            info = self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10, metadata=self.link.metadata)
        except grpc.RpcError:
            return {"rss_mb": None, "gpu_mb": None}
        gpu = info.gpu_memory_bytes / 2**20 if info.HasField("gpu_memory_bytes") else None
        return {"rss_mb": info.resident_memory_bytes / 2**20 or None, "gpu_mb": gpu}

    def close(self) -> None:
        self.channel.close()


def server_environment(caller: Caller) -> tuple[dict[str, Any], RequestSettings]:
    """What serves the requests (GetServerInfo and the model's ListModels entry), and the settings with the model's
    defaults filled in, so the report says what was really run."""
    metadata, settings = caller.link.metadata, caller.settings
    info = caller.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30, metadata=metadata)
    models = caller.stub.ListModels(pb.ListModelsRequest(), timeout=30, metadata=metadata).models
    name = settings.model or info.default_model
    model = next((m for m in models if m.name == name), None)
    if model is None:
        raise ValueError(f"--model: no model named {name!r} on the server; it has {[m.name for m in models]}")
    server = {
        "addresses": list(caller.link.addresses),
        "version": info.version,
        "model": model.name,
        "family": model.family,
        "backend": info.backend,
        "target": info.target,
        "precision": model.precision,
        "device": info.device,
        "providers": list(info.providers),
        "batch_sizes": list(model.batch_sizes),
        "sizes": [[s.width, s.height] for s in model.sizes],
        "batching": info.batching,
        "max_batch_wait_ms": info.max_batch_wait_ms,
        "queue_capacity": info.queue_capacity,
        "runtime_versions": dict(info.runtime_versions),
    }
    filled = settings
    if not settings.width or not settings.height:
        filled = RequestSettings(**{**asdict(settings), "width": model.width, "height": model.height})
    return server, filled


# The modes. Each returns its rows; a row is the summary of one load point's samples.


def latency_rows(caller: Caller, plan: LoadPlan, progress: ProgressBar) -> list[dict]:
    samples = []
    start = time.perf_counter()
    for index in range(plan.runs):
        samples.append(caller.call(index))
        progress.advance()
    return [summarise(samples, time.perf_counter() - start, {"kind": "single", "value": 1}, caller.memory())]


def run_clients(caller: Caller, clients: int, next_index: Callable[[], int | None], answered) -> None:
    """`clients` callers, each sending its next request (numbered by next_index, None: stop) when the last is
    answered; every answer goes to `answered`, under one lock."""
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                index = next_index()
            if index is None:
                return
            sample = caller.call(index)
            with lock:
                answered(sample)

    with ThreadPoolExecutor(clients) as pool:
        for _ in range(clients):
            pool.submit(client)


def closed_loop(caller: Caller, clients: int, requests: int, progress: ProgressBar) -> tuple[list[Sample], float]:
    """`clients` callers, each sending its next request when the last is answered, until `requests` are."""
    counter = iter(range(requests))
    samples: list[Sample] = []

    def answered(sample: Sample) -> None:
        samples.append(sample)
        progress.advance()

    start = time.perf_counter()
    run_clients(caller, clients, lambda: next(counter, None), answered)
    return samples, time.perf_counter() - start


def arrival_times(rate: float, count: int, seed: int) -> np.ndarray:
    """Seconds from the start at which each request is due: a Poisson process (exponential gaps) at `rate`/s."""
    return np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, count))


def open_loop(
    caller: Caller, rate: float, requests: int, seed: int, progress: ProgressBar
) -> tuple[list[Sample], float]:
    """Requests sent when due, whether or not earlier ones were answered, so queueing under load shows. Each is timed
    from when it was due, not when it went out: a late send is the bench's delay, and counting from the send would
    hide it (coordinated omission)."""
    due = arrival_times(rate, requests, seed)
    samples: list[Sample] = []
    lock = threading.Lock()
    finished = threading.Semaphore(0)

    def record(future: grpc.Future, sent: float) -> None:
        try:
            sample = caller.answered(future.result(), sent)
        except grpc.RpcError as error:
            sample = caller.failed(error, sent)
        with lock:
            samples.append(sample)
            progress.advance()
        finished.release()

    start = time.perf_counter()
    for index, at in enumerate(due):
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent = start + at
        future = caller.stub.Generate.future(
            caller.settings.request(index), timeout=caller.settings.timeout_s, metadata=caller.link.metadata
        )
        future.add_done_callback(lambda f, sent=sent: record(f, sent))
    for _ in due:
        finished.acquire()
    return samples, time.perf_counter() - start


def sweep_rows(caller: Caller, plan: LoadPlan, progress: ProgressBar) -> list[dict]:
    rows = []
    if plan.mode == "closed":
        for clients in plan.concurrency:
            samples, wall = closed_loop(caller, clients, plan.requests, progress)
            rows.append(summarise(samples, wall, {"kind": "clients", "value": clients}, caller.memory()))
    else:
        for rate in plan.rates:
            samples, wall = open_loop(caller, rate, plan.requests, plan.arrival_seed, progress)
            rows.append(summarise(samples, wall, {"kind": "rate", "value": rate}, caller.memory()))
    return rows


def soak_rows(caller: Caller, plan: LoadPlan, progress: ProgressBar) -> list[dict]:
    """A closed loop at concurrency[0] clients for soak_s seconds; a row per window, with the server's memory at the
    window's end, so a leak or a slowdown over time shows as a trend."""
    windows = max(1, round(plan.soak_s / plan.window_s))
    stop = threading.Event()
    samples: list[Sample] = []
    counter = itertools.count()
    memory = []
    caller.t0 = start = time.perf_counter()

    def next_index() -> int | None:
        return None if stop.is_set() else next(counter)

    clients = threading.Thread(target=run_clients, args=(caller, plan.concurrency[0], next_index, samples.append))
    clients.start()
    for window in range(1, windows + 1):
        # Sleep to the window's end in short steps, so the bar moves.
        while (left := start + window * plan.window_s - time.perf_counter()) > 0:
            time.sleep(min(left, 1.0))
            progress.update(time.perf_counter() - start)
        memory.append(caller.memory())
    stop.set()
    clients.join()
    rows = []
    for window in range(windows):
        begin, end = window * plan.window_s, (window + 1) * plan.window_s
        # Requests answered after the last window's end (the clients' last ones) belong to no window.
        inside = [s for s in samples if begin <= s.done_s < end]
        load = {"kind": "minute", "value": round(end / 60, 3)}
        rows.append(summarise(inside, plan.window_s, load, memory[window]))
    return rows


def run_load_bench(
    link: Connection, plan: LoadPlan, settings: RequestSettings, target: str, extras: Callable[[], dict] | None = None
) -> dict[str, Any]:
    """Warms up, runs the plan's mode against the servers behind `link` and returns the report."""
    caller = Caller(link, settings)
    try:
        server, settings = server_environment(caller)
        caller.settings = settings
        for index in range(WARMUP_REQUESTS):
            caller.call(index)
        with ProgressBar(f"bench {plan.mode}", *progress_total(plan)) as progress:
            if plan.mode == "latency":
                rows = latency_rows(caller, plan, progress)
            elif plan.mode == "soak":
                rows = soak_rows(caller, plan, progress)
            else:
                rows = sweep_rows(caller, plan, progress)
    finally:
        caller.close()
    report_settings = {**asdict(settings), **plan_settings(plan)}
    return new_report(plan.mode, target, server, report_settings, rows, **(extras() if extras else {}))


def progress_total(plan: LoadPlan) -> tuple[float, str]:
    if plan.mode == "latency":
        return plan.runs, "requests"
    if plan.mode == "soak":
        return plan.soak_s, "s"
    points = len(plan.concurrency) if plan.mode == "closed" else len(plan.rates)
    return points * plan.requests, "requests"


def plan_settings(plan: LoadPlan) -> dict[str, Any]:
    """The plan's figures that matter to the mode run, for the report's settings."""
    if plan.mode == "latency":
        return {"runs": plan.runs}
    if plan.mode == "soak":
        return {"clients": plan.concurrency[0], "soak_s": plan.soak_s, "window_s": plan.window_s}
    if plan.mode == "closed":
        return {"requests_per_row": plan.requests, "concurrency": list(plan.concurrency)}
    return {"requests_per_row": plan.requests, "rates": list(plan.rates), "arrival_seed": plan.arrival_seed}


# A model served here: a real gRPC server on a loopback port, so every mode measures what a client would.


@contextmanager
def served_here(model: ServedModel, worker: WorkerConfig | None = None) -> Iterator[Connection]:
    config = ServerConfig(model_dirs=(), host="127.0.0.1", port=0, worker=worker or WorkerConfig())
    with BackgroundServer(config, {model.name: model}) as server:
        yield Connection((server.address,))


def worker_for(plan: LoadPlan, batching: bool, max_batch_wait_ms: float | None) -> WorkerConfig:
    """The in-process server's worker: a queue that holds the whole offered load (the bench measures queueing, not
    refusals; a running server's own queue is what it is), batching as asked."""
    wait = {} if max_batch_wait_ms is None else {"max_batch_wait_ms": max_batch_wait_ms}
    capacity = max(WorkerConfig.queue_capacity, 2 * max(plan.concurrency), plan.requests if plan.rates else 0)
    return WorkerConfig(batching=batching, queue_capacity=capacity, **wait)
