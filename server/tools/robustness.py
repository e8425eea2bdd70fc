"""`diffuserve bench --faults` and `--fuzz`: what a caller gone or a burst of callers costs everyone else, and
whether hostile and malformed requests all get the answers the API documents, on a real server.

Two measurements over loopback gRPC: how long the next request waits after a long unary request is cancelled
(against the same request on an idle server), and how a burst of ten times the queue's capacity with mixed deadlines
is answered (accepted and refused, each by outcome, with latencies).
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import grpc
import numpy as np

from diffuserve.v1 import diffusion_pb2 as pb
from diffuserve.v1 import diffusion_pb2_grpc as pb_grpc

from ..app import CHANNEL_OPTIONS, BackgroundServer, ServerConfig
from ..client import Connection
from ..models import load_model
from ..worker import WorkerConfig

PROMPT = "a red circle on a blue background"
POLL_S = 0.005


@dataclass(frozen=True)
class FaultOptions:
    model_dir: str
    # The cancelled request: many images and many two-call steps, so it would hold the worker for seconds.
    cancelled_images: int = 8
    cancelled_steps: int = 150
    cancelled_scheduler: int = pb.SCHEDULER_HEUN
    cancel_after_s: float = 1.0
    next_steps: int = 2
    repeats: int = 3
    queue_capacity: int = 8
    burst_factor: int = 10
    burst_steps: int = 20
    # Every other request of the burst has this deadline; the rest have none.
    short_deadline_s: float = 0.4


def wait_until(condition, timeout_s: float = 60.0) -> None:
    until = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > until:
            raise TimeoutError("the server did not get there in time")
        time.sleep(POLL_S)


def timed_ms(stub: pb_grpc.DiffusionServiceStub, request: pb.GenerateRequest) -> float:
    start = time.perf_counter()
    stub.Generate(request)
    return (time.perf_counter() - start) * 1e3


def after_cancel(server: BackgroundServer, stub: pb_grpc.DiffusionServiceStub, options: FaultOptions) -> dict:
    """The next request's latency, alone on an idle server and right after a long request was cancelled."""
    long = pb.GenerateRequest(
        prompt=PROMPT,
        num_images=options.cancelled_images,
        steps=options.cancelled_steps,
        scheduler=options.cancelled_scheduler,
    )
    # DDIM: one U-Net call per step, so the cancelled job's calls are the worker's count less these.
    following = pb.GenerateRequest(prompt=PROMPT, steps=options.next_steps, scheduler=pb.SCHEDULER_DDIM)
    worker = server.running.worker
    idle_ms, after_ms, wasted_steps = [], [], []
    for _ in range(options.repeats):
        idle_ms.append(timed_ms(stub, following))
        before = worker.steps_run
        call = stub.Generate.future(long)
        wait_until(lambda: not worker.idle())
        time.sleep(options.cancel_after_s)
        call.cancel()
        after_ms.append(timed_ms(stub, following))
        wait_until(worker.idle)
        wasted_steps.append(worker.steps_run - before - options.next_steps)
    return {
        "idle_p50_ms": statistics.median(idle_ms),
        "after_cancel_p50_ms": statistics.median(after_ms),
        "after_cancel_max_ms": max(after_ms),
        "cancelled_job_calls_p50": statistics.median(wasted_steps),
    }


def burst(address: str, options: FaultOptions) -> dict:
    """burst_factor x queue_capacity requests at once, every other one with a short deadline."""
    count = options.burst_factor * options.queue_capacity
    barrier = threading.Barrier(count)

    def call(index: int) -> dict:
        deadline = options.short_deadline_s if index % 2 else None
        request = pb.GenerateRequest(prompt=PROMPT, steps=options.burst_steps, seeds=[index])
        barrier.wait()
        start = time.perf_counter()
        try:
            stub.Generate(request, timeout=deadline)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
        return {"deadline": deadline is not None, "code": code.name, "ms": (time.perf_counter() - start) * 1e3}

    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel, ThreadPoolExecutor(count) as pool:
        stub = pb_grpc.DiffusionServiceStub(channel)
        outcomes = list(pool.map(call, range(count)))
    refused = [o["ms"] for o in outcomes if o["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.name]
    accepted = [o for o in outcomes if o["code"] != grpc.StatusCode.RESOURCE_EXHAUSTED.name]
    completed = [o["ms"] for o in accepted if o["code"] == grpc.StatusCode.OK.name]
    return {
        "requests": count,
        "outcomes": dict(Counter((o["code"], "short deadline" if o["deadline"] else "no deadline") for o in outcomes)),
        "refused": len(refused),
        "refused_p50_ms": float(np.median(refused)) if refused else None,
        "refused_max_ms": max(refused, default=None),
        "accepted": len(accepted),
        "completed_p50_ms": float(np.median(completed)) if completed else None,
        "completed_max_ms": max(completed, default=None),
    }


def run_faults(options: FaultOptions, json_path: str | None = None) -> dict:
    model = load_model(options.model_dir, backend="cpu")
    config = ServerConfig(
        model_dirs=(), host="127.0.0.1", port=0, worker=WorkerConfig(queue_capacity=options.queue_capacity)
    )
    with BackgroundServer(config, {model.name: model}) as server:
        with grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.DiffusionServiceStub(channel)
            stub.Generate(pb.GenerateRequest(prompt=PROMPT, steps=options.next_steps, num_images=2))  # warm-up
            cancel = after_cancel(server, stub, options)
        overload = burst(server.address, options)
    print(format_report(model.name, options, cancel, overload))
    report = {"options": asdict(options), "after_cancel": cancel, "burst": overload}
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_report(model: str, options: FaultOptions, cancel: dict, overload: dict) -> str:
    sampler = pb.Scheduler.Name(options.cancelled_scheduler)
    lines = [
        f"model {model}: a unary request of {options.cancelled_images} images x {options.cancelled_steps} "
        f"{sampler} steps cancelled after {options.cancel_after_s:g} s, then a {options.next_steps}-step request",
        f"  next request: {cancel['after_cancel_p50_ms']:.0f} ms p50 ({cancel['after_cancel_max_ms']:.0f} max) "
        f"after the cancel, {cancel['idle_p50_ms']:.0f} ms on an idle server; the cancelled job ran "
        f"{cancel['cancelled_job_calls_p50']:.0f} U-Net calls",
        f"burst of {overload['requests']} requests ({options.burst_factor} x a queue of {options.queue_capacity}), "
        f"{options.burst_steps} steps, every other one with a {options.short_deadline_s:g} s deadline:",
        f"  refused {overload['refused']} (p50 {_ms(overload['refused_p50_ms'])}, max "
        f"{_ms(overload['refused_max_ms'])}); accepted {overload['accepted']}, completed p50 "
        f"{_ms(overload['completed_p50_ms'])}, max {_ms(overload['completed_max_ms'])}",
        f"  {'outcome':<22}{'deadline':<16}{'requests':>9}",
    ]
    for (code, deadline), n in sorted(overload["outcomes"].items()):
        lines.append(f"  {code:<22}{deadline:<16}{n:>9}")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


# Limits of the server the fuzzer meets: valid requests stay cheap, and every limit is still there to be crossed.
FUZZ_MAX_STEPS = 2
FUZZ_MAX_IMAGES = 2


def run_fuzz_on_server(link: Connection, count: int, seed: int = 0, json_path: str | None = None) -> bool:
    """`diffuserve bench --server ADDRESS --fuzz N`: a running server fuzzed as it is configured (its limits are read
    from ListModels); True if the contract held for every case."""
    from .fuzz import run_fuzz

    return tell_fuzz(run_fuzz(link, count, seed), f"servers {', '.join(link.addresses)}, seed {seed}:", json_path)


def tell_fuzz(report, heading: str, json_path: str | None) -> bool:
    """Prints a fuzz run's report (and writes it as JSON where asked); True if the contract held."""
    from .fuzz import format_report as format_fuzz_report

    print(heading)
    print(format_fuzz_report(report))
    if json_path:
        Path(json_path).write_text(json.dumps(asdict(report), indent=2, default=str) + "\n")
    return report.ok


def run_fuzz_on_model(model_dir: str, count: int, seed: int = 0, json_path: str | None = None) -> bool:
    """`diffuserve bench MODEL --fuzz N`: the model served on loopback with small limits, fuzzed; True if the
    contract held for every case."""
    from .fuzz import run_fuzz
    from .load import served_here

    model = load_model(model_dir, backend="cpu")
    limits = replace(model.defaults, max_steps=FUZZ_MAX_STEPS, max_images=FUZZ_MAX_IMAGES)
    with served_here(replace(model, defaults=limits)) as link:
        report = run_fuzz(link, count, seed)
    heading = f"model {model.name}, max_steps {FUZZ_MAX_STEPS}, max_images {FUZZ_MAX_IMAGES}, seed {seed}:"
    return tell_fuzz(report, heading, json_path)
