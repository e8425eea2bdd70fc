"""Serving under load on real servers: streaming, cancellation, deadlines, the bounded queue, batching, drain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from diffuserve.server.models import ServedModel
from diffuserve.v1 import diffusion_pb2 as pb
from diffuserve.v1 import diffusion_pb2_grpc as pb_grpc

from .serving_helpers import BLOCKER, LONG, busy, euler_request, free_port, serving, wait_idle


def test_stream_events_come_in_order(tiny_model: ServedModel) -> None:
    with serving(tiny_model) as (_, stub, _):
        request = euler_request(prompt="a red circle", steps=6, seeds=[1, 2], preview_interval=3)
        events = list(stub.GenerateStream(request))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["queued"] + ["progress"] * 6 + ["image"] * 2 + ["completed"]
    assert len({e.request_id for e in events}) == 1
    progress = [e.progress for e in events if e.HasField("progress")]
    assert [p.step for p in progress] == [1, 2, 3, 4, 5, 6] and all(p.total == 6 for p in progress)
    assert [len(p.previews) for p in progress] == [0, 0, 2, 0, 0, 2]
    assert progress[2].previews[0].width == 16 and progress[-1].eta_ms < progress[0].eta_ms
    images = [e.image for e in events if e.HasField("image")]
    assert [(i.index, i.seed) for i in images] == [(0, 1), (1, 2)]
    completed = events[-1].completed
    assert not completed.images and completed.timings.total_ms > 0 and completed.steps == 6


def test_cancelled_stream_stops_within_a_step_and_spares_its_batch_mate(tiny_model: ServedModel) -> None:
    with serving(tiny_model) as (server, stub, _):
        request = euler_request(prompt="a blue square", steps=LONG, seeds=[5])
        with busy(stub, steps=BLOCKER), ThreadPoolExecutor(1) as pool:
            mate = pool.submit(stub.Generate, euler_request(prompt="a green circle", steps=LONG, seeds=[6]))
            call = stub.GenerateStream(request)
            cancelled_at = 0
            for event in call:
                if event.HasField("progress") and event.progress.step >= 3:
                    cancelled_at = event.progress.step
                    call.cancel()
                    break
            response = mate.result(timeout=120)
        wait_idle(server)
    assert response.timings.batch_size == 2  # they did share the engine calls
    assert len(response.images) == 1
    # The mate ran all its steps; the cancelled request at most one more than it had reported, plus the one running.
    assert server.running.worker.steps_run <= BLOCKER + LONG + cancelled_at + 2


def test_deadline_stops_the_request_and_the_server_goes_on(tiny_model: ServedModel) -> None:
    with serving(tiny_model) as (server, stub, _):
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(euler_request(prompt="a red circle", steps=LONG), timeout=0.5)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_idle(server)
        assert server.running.worker.steps_run < LONG
        assert stub.Generate(euler_request(prompt="a red circle", steps=2)).images


def test_request_that_cannot_start_before_its_deadline_never_uses_the_engines(tiny_model: ServedModel) -> None:
    with serving(tiny_model, batching=False) as (server, stub, _):
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(stub.Generate, euler_request(prompt="a red circle", steps=LONG))
            time.sleep(0.2)  # the long request is running, for about a second more
            with pytest.raises(grpc.RpcError) as error:
                stub.Generate(euler_request(prompt="a red circle", steps=LONG), timeout=0.3)
            long.result(timeout=120)
        wait_idle(server)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert server.running.worker.steps_run == LONG


def test_full_queue_refuses_at_once_and_loses_nothing_accepted(tiny_model: ServedModel) -> None:
    with serving(tiny_model, queue_capacity=2, batching=False) as (_, stub, _):

        def call(seed: int):
            try:
                return stub.Generate(euler_request(prompt="a red circle", steps=30, seeds=[seed]))
            except grpc.RpcError as e:
                return e

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(call, range(8)))
    refused = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    served = [o for o in outcomes if not isinstance(o, grpc.RpcError)]
    assert refused and len(served) >= 3  # one running and two waiting, at least
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry in about" in error.details()
        assert "grpc-retry-pushback-ms" in dict(error.trailing_metadata())
    assert all(len(r.images) == 1 for r in served)


# Euler, and two samplers that draw noise every step from each image's own generator, in both noise modes.
@pytest.mark.parametrize(
    ("scheduler", "noise_mode"),
    [
        (pb.SCHEDULER_EULER, pb.NOISE_MODE_TORCH_CPU),
        (pb.SCHEDULER_EULER_ANCESTRAL, pb.NOISE_MODE_TORCH_CPU),
        (pb.SCHEDULER_DPMPP_2M_SDE_KARRAS, pb.NOISE_MODE_NUMPY),
    ],
)
def test_batched_images_are_bit_identical_to_images_made_alone(
    tiny_model: ServedModel, scheduler: int, noise_mode: int
) -> None:
    common = {"steps": 8, "scheduler": scheduler, "noise_mode": noise_mode}
    requests = [
        pb.GenerateRequest(prompt="a red circle", seeds=[11], guidance_scale=7.5, **common),
        pb.GenerateRequest(
            prompt="a blue triangle", negative_prompt="green", seeds=[12], guidance_scale=4.0, **common
        ),
    ]
    with serving(tiny_model, batching=False) as (_, stub, _):
        alone = [stub.Generate(r) for r in requests]
    with serving(tiny_model) as (_, stub, _), busy(stub), ThreadPoolExecutor(2) as pool:
        together = list(pool.map(stub.Generate, requests))
    assert [r.timings.batch_size for r in alone] == [1, 1]
    assert [r.timings.batch_size for r in together] == [2, 2]
    for a, b in zip(alone, together, strict=True):
        assert a.images[0].data == b.images[0].data


def test_requests_of_other_sizes_never_share_engine_calls(tiny_model: ServedModel) -> None:
    sizes = [(128, 128), (192, 128), (128, 128)]
    requests = [
        pb.GenerateRequest(prompt="a red circle", seeds=[i], steps=4, width=w, height=h)
        for i, (w, h) in enumerate(sizes)
    ]
    with serving(tiny_model) as (_, stub, _), busy(stub), ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(stub.Generate, requests))
    assert [(r.images[0].width, r.images[0].height) for r in responses] == sizes
    assert [r.timings.batch_size for r in responses] == [2, 1, 2]


def test_a_lone_caller_never_waits_for_batch_company(tiny_model: ServedModel) -> None:
    # A window far longer than any queue wait on a loaded machine: waiting it out would show at once.
    wait_ms = 20_000
    with serving(tiny_model, max_batch_wait_ms=wait_ms) as (_, stub, _):
        timings = [stub.Generate(euler_request(prompt="a red circle", steps=2)).timings for _ in range(3)]
    assert all(t.queue_ms < wait_ms / 4 and t.batch_size == 1 for t in timings)


def test_health_and_listing_answer_while_a_batch_denoises(tiny_model: ServedModel) -> None:
    with serving(tiny_model) as (_, stub, channel), ThreadPoolExecutor(1) as pool:
        busy = pool.submit(stub.Generate, euler_request(prompt="a red circle", steps=LONG))
        time.sleep(0.3)
        start = time.perf_counter()
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        stub.ListModels(pb.ListModelsRequest())
        elapsed = time.perf_counter() - start
        assert not busy.done()
        busy.result(timeout=120)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert elapsed < 1.0


def test_every_response_carries_the_timing_breakdown(tiny_model: ServedModel) -> None:
    with serving(tiny_model) as (_, stub, _):
        t = stub.Generate(euler_request(prompt="a red circle", steps=3)).timings
    assert t.queue_ms >= 0 and t.text_encoder_ms > 0 and t.denoise_ms >= t.unet_ms > 0
    assert t.vae_decode_ms > 0 and t.image_encode_ms > 0 and t.batch_size == 1
    assert t.total_ms >= t.text_encoder_ms + t.denoise_ms + t.vae_decode_ms


def test_sigterm_drains_the_request_in_flight_and_exits_cleanly(tiny_export: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "diffuserve.server.cli", "serve", str(tiny_export), "--host", "127.0.0.1"]
    process = subprocess.Popen([*command, "--port", str(port), "--backend", "cpu", "--grace", "60"])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            stub = pb_grpc.DiffusionServiceStub(channel)
            stream = stub.GenerateStream(euler_request(prompt="a red circle", steps=LONG))
            events = []
            for event in stream:
                events.append(event)
                if event.HasField("progress"):
                    break
            os.kill(process.pid, signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Generate(euler_request(prompt="a red circle", steps=2))
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            events.extend(stream)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert events[-1].HasField("completed") and sum(e.HasField("image") for e in events) == 1


def test_stopping_a_server_ends_its_inference_thread(tiny_model: ServedModel) -> None:
    with serving(tiny_model) as (server, stub, _):
        stub.Generate(euler_request(prompt="a red circle", steps=2))
        assert server.running.worker.alive
    assert not server.running.worker.alive
