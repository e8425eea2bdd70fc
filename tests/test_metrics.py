"""Prometheus metrics scraped from the real endpoint during real requests; the per-request log line, as text and
JSON; the request id taken from metadata and echoed."""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from diffuserve.server.app import BackgroundServer, ServerConfig
from diffuserve.server.logs import JsonFormatter
from diffuserve.server.models import ServedModel
from diffuserve.server.worker import WorkerConfig
from diffuserve.v1 import diffusion_pb2 as pb
from diffuserve.v1 import diffusion_pb2_grpc as pb_grpc

from .serving_helpers import euler_request


def scrape(server: BackgroundServer) -> dict[str, float]:
    """The endpoint's samples, name{labels} -> value."""
    url = f"http://127.0.0.1:{server.running.metrics.server_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics_count_outcomes_stages_and_batches_while_requests_run(tiny_model: ServedModel):
    config = ServerConfig(
        model_dirs=(), host="127.0.0.1", port=0, metrics_port=0, worker=WorkerConfig(queue_capacity=2)
    )
    name = tiny_model.name
    with BackgroundServer(config, {name: tiny_model}) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.DiffusionServiceStub(channel)
        before = scrape(server)
        assert before[f'diffuserve_requests_total{{model="{name}",outcome="ok"}}'] == 0
        info = [k for k in before if k.startswith("diffuserve_model_info{")]
        assert len(info) == 1 and 'backend="cpu"' in info[0] and 'sizes="128x128,192x128"' in info[0]

        with ThreadPoolExecutor(8) as pool:
            long = pool.submit(stub.Generate, euler_request(prompt="a long one", steps=80, seeds=[1]))
            time.sleep(0.3)
            during = scrape(server)  # scraped while a request runs
            burst = [
                pool.submit(stub.Generate, euler_request(prompt="a circle", steps=3, seeds=[s])) for s in range(6)
            ]
            outcomes = []
            for future in burst:
                try:
                    future.result()
                    outcomes.append("ok")
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    outcomes.append("rejected")
            long.result()
        with pytest.raises(grpc.RpcError):
            stub.Generate(pb.GenerateRequest(prompt="", steps=2))
        after = scrape(server)

    assert during["diffuserve_requests_in_flight"] == 1
    ok = f'diffuserve_requests_total{{model="{name}",outcome="ok"}}'
    assert after[ok] == 1 + outcomes.count("ok") and outcomes.count("rejected") >= 1
    assert after[f'diffuserve_requests_total{{model="{name}",outcome="rejected"}}'] == outcomes.count("rejected")
    assert after[f'diffuserve_requests_total{{model="{name}",outcome="invalid"}}'] == 1
    assert after["diffuserve_requests_in_flight"] == 0 and after["diffuserve_queue_depth"] == 0
    for stage in ("queue", "text_encoder", "denoise", "vae_decode", "image_encode"):
        assert after[f'diffuserve_stage_duration_seconds_count{{model="{name}",stage="{stage}"}}'] == after[ok]
    assert after[f'diffuserve_request_duration_seconds_sum{{model="{name}"}}'] > 0
    assert after[f'diffuserve_images_total{{model="{name}"}}'] == after[ok]
    inferences = after[f'diffuserve_inference_count_total{{model="{name}"}}']
    executions = after[f'diffuserve_execution_count_total{{model="{name}"}}']
    assert inferences == after[ok] and 1 <= executions <= inferences
    assert after[f'diffuserve_batch_size_count{{model="{name}"}}'] == executions
    assert after[f'diffuserve_unet_call_duration_seconds_count{{model="{name}"}}'] == executions


def test_each_request_logs_one_line_with_its_id_from_metadata_echoed_back(tiny_model: ServedModel, caplog):
    config = ServerConfig(model_dirs=(), host="127.0.0.1", port=0)
    with (
        BackgroundServer(config, {tiny_model.name: tiny_model}) as server,
        grpc.insecure_channel(server.address) as ch,
    ):
        stub = pb_grpc.DiffusionServiceStub(ch)
        with caplog.at_level(logging.INFO, logger="diffuserve.server.service"):
            response, call = stub.Generate.with_call(
                euler_request(prompt="a red circle", steps=2, seeds=[3]), metadata=(("x-request-id", "trace-42"),)
            )
    assert response.request_id == "trace-42"
    assert ("x-request-id", "trace-42") in call.initial_metadata()
    (record,) = [r for r in caplog.records if "request trace-42" in r.getMessage()]
    assert "ok, model tiny-sd, txt2img 128x128, 1 image(s), 2 steps euler, batch of 1" in record.getMessage()
    entry = json.loads(JsonFormatter().format(record))
    assert entry["request_id"] == "trace-42" and entry["outcome"] == "ok" and entry["sampler"] == "euler"
    assert entry["size"] == "128x128" and entry["batch"] == 1 and entry["total_ms"] > 0 and entry["level"] == "INFO"
