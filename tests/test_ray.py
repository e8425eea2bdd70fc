"""The Ray Serve application (deploy/ray/diffuserve_ray.py) on a real local Ray cluster, called through Ray's gRPC
proxy on a loopback port: the same images as the in-process pipeline, streams, health, cancellation reaching the
worker's job, and autoscaling from one replica to two.

The replicas' logs are under /tmp/ray/session_latest/logs when a test here fails."""

from __future__ import annotations

import ast
import importlib
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from diffuserve.server.client import request_generate
from diffuserve.server.models import ServedModel
from diffuserve.server.params import validate
from diffuserve.server.pipeline import StageTimes, encode_images, render
from diffuserve.v1 import diffusion_pb2 as pb
from diffuserve.v1 import diffusion_pb2_grpc as pb_grpc

from .serving_helpers import free_port

REASON = 'the Ray Serve application needs ray[serve]: pip install "diffuserve[ray]"'
ray = pytest.importorskip("ray", reason=REASON)
serve = pytest.importorskip("ray.serve", reason=REASON)
yaml = pytest.importorskip("yaml", reason=REASON)  # ray's own dependency

DEPLOY_RAY = Path(__file__).resolve().parents[1] / "deploy" / "ray"
sys.path.insert(0, str(DEPLOY_RAY))
dr = importlib.import_module("diffuserve_ray")

SERVICE_NAME = dr.SERVICE_NAME
# Responses carry images: as diffuserve.server.app's clients, up to 64 MiB.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
MODEL = "tiny-sd"
DEPLOYMENT = dr.deployment_name(MODEL)
LONG = 150  # the most steps a request may ask for: long enough to act on while it runs
# Two model replicas fit in the two CPUs the cluster has; the router takes none. One ONNX Runtime thread each: the
# machine has two cores. Autoscaling reacts within seconds (Ray's defaults wait 30 s and measure every 10 s), and
# never scales down while the tests run.
APP_OPTIONS = {
    "backend": "cpu",
    "threads": 1,
    "num_cpus": 0.5,
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,
    "max_ongoing_requests": 8,
    "graceful_shutdown_timeout_s": 2,
    "autoscaling": {
        "upscale_delay_s": 0.5,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 2,
        "downscale_delay_s": 600,
    },
}
READY_TIMEOUT_S = 60
SCALE_UP_TIMEOUT_S = 120

ray_cluster = pytest.mark.slow
# The only knob for how often autoscaling metrics are pushed in Ray 2.60, deprecated for environment variables that
# Ray does not read yet.
pytestmark = pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")


@dataclass
class Cluster:
    address: str
    channel: grpc.Channel
    stub: pb_grpc.DiffusionServiceStub
    health: health_pb2_grpc.HealthStub
    timings: dict[str, float] = field(default_factory=dict)

    def model_stats(self) -> dict:
        """The model replica's worker counters (with one replica: that replica's)."""
        return serve.get_deployment_handle(DEPLOYMENT, app_name=dr.APP_NAME).stats.remote().result()

    def wait_idle(self, timeout: float = 30.0) -> dict:
        until = time.monotonic() + timeout
        while not (stats := self.model_stats())["idle"]:
            assert time.monotonic() < until, "the model replica's worker never went idle"
            time.sleep(0.05)
        return stats


def wait_serving(health: health_pb2_grpc.HealthStub) -> None:
    """The proxy learns of the application a moment after serve.run returns."""
    until = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            if (
                health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                == health_pb2.HealthCheckResponse.SERVING
            ):
                return
        except grpc.RpcError:
            pass
        assert time.monotonic() < until, "the application never answered SERVING through the proxy"
        time.sleep(0.1)


# Ray waits a fixed 30 s for its raylet to register; a machine that stalls that long (a paused VM, a loaded CI host)
# fails the start, not the application, so the start is tried once more before the tests fail.
RAY_STARTS = 2
# The tests move a few images: a small object store spares a loaded machine's memory.
OBJECT_STORE_BYTES = 256 * 2**20


def start_local_ray() -> None:
    for attempt in range(1, RAY_STARTS + 1):
        try:
            # address="local": a cluster of its own, never one RAY_ADDRESS points at. working_dir ships
            # diffuserve_ray.py to the replicas, as `serve run --working-dir deploy/ray` does.
            ray.init(
                address="local",
                num_cpus=2,
                object_store_memory=OBJECT_STORE_BYTES,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"working_dir": str(DEPLOY_RAY)},
            )
            return
        except Exception as error:  # Ray raises a bare Exception when its node does not come up in time
            ray.shutdown()
            if attempt == RAY_STARTS or "timed out during startup" not in str(error):
                raise


@pytest.fixture(scope="module")
def cluster(tiny_export: Path):
    timings: dict[str, float] = {}
    start = time.monotonic()
    start_local_ray()
    timings["ray_init_s"] = time.monotonic() - start
    channel = None
    try:
        port = free_port()
        serve.start(grpc_options=dr.grpc_options(port), http_options={"host": "127.0.0.1", "port": free_port()})
        started = time.monotonic()
        serve.run(dr.build_app([tiny_export], **APP_OPTIONS), name=dr.APP_NAME, route_prefix=dr.ROUTE_PREFIX)
        address = f"127.0.0.1:{port}"
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        health = health_pb2_grpc.HealthStub(channel)
        wait_serving(health)
        timings["deploy_s"] = time.monotonic() - started
        yield Cluster(address, channel, pb_grpc.DiffusionServiceStub(channel), health, timings)
    finally:
        if channel is not None:
            channel.close()
        stopping = time.monotonic()
        serve.shutdown()
        timings["serve_shutdown_s"] = time.monotonic() - stopping
        stopping = time.monotonic()
        ray.shutdown()
        timings["ray_shutdown_s"] = time.monotonic() - stopping
        print(f"\nRay Serve timings: {', '.join(f'{k} {v:.1f}' for k, v in timings.items())}")


def euler(**fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(scheduler=pb.SCHEDULER_EULER, noise_mode=pb.NOISE_MODE_TORCH_CPU, **fields)


def in_process_images(model: ServedModel, request: pb.GenerateRequest) -> list[bytes]:
    """What our own pipeline encodes for the same request, in this process, without a worker or a server."""
    params = validate(request, {model.name: model}, model.name)
    return [data for data, _ in encode_images(params, render(model, params), StageTimes())]


def test_call_context_has_every_context_method_the_service_uses() -> None:
    """DiffusionService calls its context's methods; a replica hands it a CallContext, which must have them all."""
    import diffuserve.server.service as service

    tree = ast.parse(Path(service.__file__).read_text())
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "context"
    }
    assert used, "the service no longer uses a context named context: update this test"
    assert sorted(name for name in used if not hasattr(dr.CallContext, name)) == []


def test_config_takes_serve_run_strings_and_refuses_two_models_of_one_name(tiny_export: Path) -> None:
    config = dr.AppConfig.model_validate({"model_dirs": "/a,/b", "num_gpus": "1", "min_replicas": "0"})
    assert config.model_dirs == ("/a", "/b") and config.num_gpus == 1 and config.min_replicas == 0
    assert config.replica_threads() == 1
    with pytest.raises(ValueError, match="max_replicas"):
        dr.AppConfig(model_dirs=("/a",), max_replicas=0)
    with pytest.raises(ValueError, match="both named 'tiny-sd'"):
        dr.build_app([tiny_export, tiny_export])
    with pytest.raises(ValueError, match="default_model: no model named 'nope'"):
        dr.build_app([tiny_export], default_model="nope")


def test_config_file_is_a_valid_serve_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((DEPLOY_RAY / "serve_config.yaml").read_text()))
    assert tuple(config.grpc_options.grpc_servicer_functions) == dr.GRPC_SERVICER_FUNCTIONS
    (app,) = config.applications
    assert app.import_path == "diffuserve_ray:app_builder" and app.route_prefix == dr.ROUTE_PREFIX
    args = dr.AppConfig.model_validate(app.args)
    assert args.num_gpus == 1 and args.max_replicas >= args.min_replicas


def test_the_proxy_fix_cancels_a_stream_closed_before_its_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's proxy, closed at a yield, never cancels its replica call; diffuserve_ray_proxy's wrapper does."""
    import asyncio

    from ray.serve._private.proxy import gRPCProxy

    proxy_fix = importlib.import_module("diffuserve_ray_proxy")

    class Response:
        def __init__(self) -> None:
            self.cancels = 0

        def cancelled(self) -> bool:
            return self.cancels > 0

        def cancel(self) -> None:
            self.cancels += 1

    class Handle:
        def __init__(self) -> None:
            self.responses: list[Response] = []

        def remote(self, *args) -> Response:
            self.responses.append(Response())
            return self.responses[-1]

    async def send_request_to_replica(self, request_id, internal_request_id, handle, proxy_request, app=False):
        handle.remote(b"request")
        for message in ("event 1", "event 2", "status"):
            yield message

    monkeypatch.setattr(gRPCProxy, "send_request_to_replica", send_request_to_replica)
    assert proxy_fix.cancel_streams_on_disconnect(None, None)
    assert proxy_fix.cancel_streams_on_disconnect(None, None)  # once per process: not wrapped twice

    async def call(read: int) -> Response:
        handle = Handle()
        stream = gRPCProxy.send_request_to_replica(
            object(), request_id="r", internal_request_id="i", handle=handle, proxy_request=None
        )
        messages = [message async for message in stream] if read == 3 else [await anext(stream) for _ in range(read)]
        await stream.aclose()  # as gRPC's server closes the handler's stream when its client went away
        assert len(messages) == read
        (response,) = handle.responses
        return response

    assert asyncio.run(call(read=1)).cancels == 1
    assert asyncio.run(call(read=3)).cancels == 0  # a stream that ran to its end is left alone


@ray_cluster
def test_health_answers_serving_through_the_proxy(cluster: Cluster) -> None:
    for service in ("", SERVICE_NAME, MODEL):
        status = cluster.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as raised:
        cluster.health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    watch = cluster.health.Watch(health_pb2.HealthCheckRequest(service=MODEL), timeout=10)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


@ray_cluster
def test_unary_generate_gives_the_in_process_images(cluster: Cluster, tiny_model: ServedModel) -> None:
    request = euler(prompt="a red circle", negative_prompt="blurry", seeds=[11, 12], steps=6)
    response, call = cluster.stub.Generate.with_call(request, metadata=(("x-request-id", "ray-unary-1"),), timeout=60)
    assert response.model == MODEL and response.request_id == "ray-unary-1"
    assert ("x-request-id", "ray-unary-1") in call.trailing_metadata()
    assert [(image.index, image.seed) for image in response.images] == [(0, 11), (1, 12)]
    assert [image.data for image in response.images] == in_process_images(tiny_model, request)
    assert response.timings.total_ms > 0 and response.steps == 6


@ray_cluster
def test_the_project_client_works_through_the_proxy(cluster: Cluster, tiny_model: ServedModel) -> None:
    """diffuserve's own client: round-robin, retries, and client-side health checking (a Watch on the service)."""
    request = euler(prompt="a green triangle", seeds=[21], steps=4)
    response = request_generate(cluster.address, request, timeout_s=60)
    assert [image.data for image in response.images] == in_process_images(tiny_model, request)


@ray_cluster
def test_stream_events_come_in_order_with_the_same_images(cluster: Cluster, tiny_model: ServedModel) -> None:
    request = euler(prompt="a blue square", seeds=[5, 6], steps=6, preview_interval=3)
    events = list(cluster.stub.GenerateStream(request, timeout=60))
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds == ["queued"] + ["progress"] * 6 + ["image"] * 2 + ["completed"]
    assert len({event.request_id for event in events}) == 1
    progress = [event.progress for event in events if event.HasField("progress")]
    assert [p.step for p in progress] == [1, 2, 3, 4, 5, 6] and all(p.total == 6 for p in progress)
    assert [len(p.previews) for p in progress] == [0, 0, 2, 0, 0, 2]
    images = [event.image for event in events if event.HasField("image")]
    assert [image.data for image in images] == in_process_images(tiny_model, request)
    completed = events[-1].completed
    assert completed.model == MODEL and not completed.images and completed.timings.total_ms > 0


@ray_cluster
def test_refusals_keep_their_status_and_listings_come_through(cluster: Cluster) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        cluster.stub.Generate(euler(prompt="", steps=4), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        list(cluster.stub.GenerateStream(euler(prompt="x", steps=9999), timeout=30))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "steps" in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        cluster.stub.Generate(euler(prompt="x", model="nope"), timeout=30)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND and "tiny-sd" in raised.value.details()

    (info,) = cluster.stub.ListModels(pb.ListModelsRequest(), timeout=30).models
    assert info.name == MODEL and info.backend == "cpu" and list(info.batch_sizes) == [1, 2]
    server = cluster.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
    assert server.default_model == MODEL and list(server.models) == [MODEL] and server.backend == "cpu"


@ray_cluster
def test_a_cancelled_stream_cancels_the_worker_job(cluster: Cluster) -> None:
    for stop_at in (1, 2, 3):  # wherever the proxy is when the client goes away
        before = cluster.wait_idle()["steps_run"]
        stream = cluster.stub.GenerateStream(euler(prompt="a long one", steps=LONG), timeout=60)
        for event in stream:
            if event.HasField("progress") and event.progress.step == stop_at:
                eta_ms = event.progress.eta_ms
                break
        stream.cancel()
        # Sent at once: had the cancelled job gone on, this one would wait in the worker's queue for the rest of it.
        follow = cluster.stub.Generate(euler(prompt="right after", seeds=[3], steps=4), timeout=60)
        assert follow.timings.queue_ms < eta_ms / 2, (stop_at, follow.timings.queue_ms, eta_ms)
        ran = cluster.wait_idle()["steps_run"] - before - 4
        assert stop_at <= ran < LONG / 2, f"cancelled at step {stop_at}, the job ran {ran} of its {LONG} steps"


@ray_cluster
def test_a_passed_deadline_cancels_the_worker_job(cluster: Cluster) -> None:
    before = cluster.wait_idle()["steps_run"]
    with pytest.raises(grpc.RpcError) as raised:
        cluster.stub.Generate(euler(prompt="a long one", steps=LONG), timeout=0.8)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    started = time.monotonic()
    follow = cluster.stub.Generate(euler(prompt="right after", seeds=[3], steps=4), timeout=60)
    assert follow.images and time.monotonic() - started < 5
    ran = cluster.wait_idle()["steps_run"] - before - 4
    assert ran < LONG, f"the job past its deadline ran all its {LONG} steps"


@ray_cluster
def test_autoscales_from_one_replica_to_two_under_load(cluster: Cluster) -> None:
    def running() -> int:
        app = serve.status().applications[dr.APP_NAME]
        return app.deployments[DEPLOYMENT].replica_states.get("RUNNING", 0)

    assert running() == 1
    stop = threading.Event()
    calls: dict[int, grpc.Future] = {}

    def load(seed: int) -> int:
        """Requests one after another until told to stop; how many were served. Any failure but the cancel at the
        end fails the test."""
        served = 0
        while not stop.is_set():
            calls[seed] = cluster.stub.Generate.future(euler(prompt="load", seeds=[seed], steps=30), timeout=120)
            try:
                calls[seed].result()
            except grpc.FutureCancelledError:
                break
            served += 1
        return served

    started = time.monotonic()
    with ThreadPoolExecutor(6) as pool:  # six callers: three times the target of two per replica
        loads = [pool.submit(load, seed) for seed in range(6)]
        try:
            while running() < 2:
                assert time.monotonic() - started < SCALE_UP_TIMEOUT_S, f"still {running()} replica(s) under load"
                assert not any(f.done() for f in loads), [f.exception() for f in loads if f.done()]
                time.sleep(0.25)
            cluster.timings["scale_up_s"] = time.monotonic() - started
        finally:
            stop.set()
            for call in list(calls.values()):  # no waiting for the last ones: cancelled, as a caller would
                call.cancel()
        assert sum(f.result() for f in loads) >= 1
    assert cluster.health.Check(health_pb2.HealthCheckRequest(service=MODEL), timeout=10).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
