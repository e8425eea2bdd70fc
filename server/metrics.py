"""Prometheus metrics on their own port (`serve --metrics-port`; the `metrics` extra).

Names follow Prometheus' conventions (units in the name, `_total` on counters); labels are few and bounded: the model
(a served model's name, never a client's string), the outcome, the stage. Triton users read the mean batch size as
`diffuserve_inference_count_total / diffuserve_execution_count_total`, as they divide Triton's pair.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from diffuserve.engine.manifest import format_size

if TYPE_CHECKING:
    from .models import ServedModel
    from .worker import Job

log = logging.getLogger(__name__)

OUTCOMES = ("ok", "invalid", "rejected", "cancelled", "deadline", "failed")
# The stages of a request timed in StageTimes, by their label here.
STAGES = {
    "queue": "queue_ms",
    "text_encoder": "text_encoder_ms",
    "vae_encode": "vae_encode_ms",
    "denoise": "denoise_ms",
    "vae_decode": "vae_decode_ms",
    "image_encode": "image_encode_ms",
}
# Seconds, from a tiny model's milliseconds on a GPU to a full-size one's minutes on a CPU.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 150, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# A request's model label when it names none this server has: unknown names stay out of the label set.
UNKNOWN_MODEL = "unknown"


class MissingExtra(RuntimeError):
    pass


class Metrics:
    """The server's metrics on a registry of their own (tests start several servers in one process)."""

    def __init__(self, models: Mapping[str, ServedModel], queue_depth: Callable[[], int]):
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError as error:
            raise MissingExtra("--metrics-port needs prometheus-client: pip install 'diffuserve[metrics]'") from error
        self.models = set(models)
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "diffuserve_requests",
            "Generate, GenerateStream and ModelInfer calls by outcome",
            ["model", "outcome"],
            registry=r,
        )
        self.in_flight = Gauge("diffuserve_requests_in_flight", "Requests accepted and not finished", registry=r)
        self.queue_depth = Gauge("diffuserve_queue_depth", "Requests waiting for the worker", registry=r)
        self.queue_depth.set_function(queue_depth)
        self.stage_seconds = Histogram(
            "diffuserve_stage_duration_seconds",
            "Time per stage of a completed request",
            ["model", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "diffuserve_request_duration_seconds",
            "End to end time of a completed request, queue included",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.unet_seconds = Histogram(
            "diffuserve_unet_call_duration_seconds",
            "Mean U-Net call time of each batch",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_images = Histogram(
            "diffuserve_batch_size",
            "Images sharing the engine calls of a batch",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.images = Counter("diffuserve_images", "Images produced", ["model"], registry=r)
        self.inferences = Counter(
            "diffuserve_inference_count",
            "Images run through the engines (Triton's inference count)",
            ["model"],
            registry=r,
        )
        self.executions = Counter(
            "diffuserve_execution_count",
            "Batches run through the engines (Triton's execution count)",
            ["model"],
            registry=r,
        )
        info = Gauge(
            "diffuserve_model_info",
            "1 per served model, its engines in the labels",
            ["model", "family", "backend", "target", "precision", "sizes", "batch_sizes"],
            registry=r,
        )
        for model in models.values():
            info.labels(
                model.name,
                model.family,
                model.backend,
                model.target,
                model.precision,
                ",".join(format_size(size) for size in model.sizes),
                ",".join(str(b) for b in model.batch_sizes),
            ).set(1)
        for name in models:  # every series exists from the start, so rates work from the first scrape
            for outcome in OUTCOMES:
                self.requests.labels(name, outcome)

    def label(self, model: str) -> str:
        return model if model in self.models else UNKNOWN_MODEL

    def accepted(self) -> None:
        """A request was queued: in flight until finished(..., job) says how it ended."""
        self.in_flight.inc()

    def finished(self, model: str, outcome: str, job: Job | None = None) -> None:
        """One request ended, refused (no job) or after it was accepted (its job); a completed one (outcome ok)
        adds its stages' times."""
        model = self.label(model)
        self.requests.labels(model, outcome).inc()
        if job is not None:
            self.in_flight.dec()
        if outcome != "ok" or job is None:
            return
        times = job.times
        for stage, attribute in STAGES.items():
            self.stage_seconds.labels(model, stage).observe(getattr(times, attribute) / 1e3)
        self.request_seconds.labels(model).observe((times.total_ms + times.queue_ms) / 1e3)
        self.images.labels(model).inc(job.params.num_images)

    def batch_done(self, jobs: Iterable[Job]) -> None:
        """A batch left the engines: its size, and its mean U-Net call time."""
        jobs = list(jobs)
        model = self.label(jobs[0].params.model)
        images = sum(job.params.num_images for job in jobs)
        self.batch_images.labels(model).observe(images)
        self.inferences.labels(model).inc(images)
        self.executions.labels(model).inc()
        longest = max(jobs, key=lambda job: job.steps_done)  # members that left early ran fewer calls
        if longest.steps_done:
            self.unet_seconds.labels(model).observe(longest.times.unet_ms / longest.steps_done / 1e3)


def start_metrics_server(metrics: Metrics, host: str, port: int):
    """The /metrics endpoint on its own port, on a thread of prometheus_client's; returns (server, thread)."""
    from prometheus_client import start_http_server

    # An IPv6 wildcard as gRPC spells it ("[::]") is "::" to the HTTP server; on a host without IPv6, where gRPC
    # quietly listens on IPv4 alone, so does this.
    address = host.strip("[]") or "0.0.0.0"
    try:
        server, thread = start_http_server(port, addr=address, registry=metrics.registry)
    except OSError:
        if address != "::":
            raise
        server, thread = start_http_server(port, addr="0.0.0.0", registry=metrics.registry)
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server, thread
