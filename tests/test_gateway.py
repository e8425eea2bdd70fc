"""The HTTP gateway on real sockets: a real gRPC server with the tiny model on loopback, the gateway under uvicorn in
front of it, HTTP over real connections (one of them dropped mid-run), and `serve --http-port` as a process."""

from __future__ import annotations

import base64
import http.client
import importlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from PIL import Image

from diffuserve.server.app import BackgroundServer, ServerConfig
from diffuserve.server.cli import main
from diffuserve.server.client import ClientRequest, connection
from diffuserve.server.gateway.app import GatewayConfig, GatewayServer
from diffuserve.server.gateway.payload import http_status
from diffuserve.server.metrics import MissingExtra
from diffuserve.server.models import ServedModel

from .serving_helpers import LONG, free_port, serving, wait_idle

# Steps a job may still run after its HTTP caller is gone: the one in flight, and the time it takes the gateway to
# hear of it and gRPC to tell the server.
STEPS_TO_NOTICE = LONG // 4
CLI = [sys.executable, "-m", "diffuserve.server.cli"]


@contextmanager
def gateway_for(address: str, **settings):
    with GatewayServer(GatewayConfig(connection(address, **settings), "127.0.0.1", 0)) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def gateway(server: BackgroundServer):
    with gateway_for(server.address) as running:
        yield running


def get(port: int, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    client = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        client.request("GET", path, headers=headers or {})
        response = client.getresponse()
        return response.status, response.read()
    finally:
        client.close()


def post(port: int, body: bytes | dict, headers: dict | None = None) -> tuple[int, str, list]:
    """POST /api/generate: (status, content type, events as (name, data)) for a stream, or the error body's JSON
    as the one 'error' event."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    client = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        client.request("POST", "/api/generate", data, {"Content-Type": "application/json", **(headers or {})})
        response = client.getresponse()
        kind = response.getheader("content-type", "")
        if not kind.startswith("text/event-stream"):
            return response.status, kind, [("error", json.loads(response.read())["error"])]
        return response.status, kind, read_events(response)
    finally:
        client.close()


def read_events(response: http.client.HTTPResponse) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in iter(response.readline, b""):
        text = line.decode().rstrip("\n")
        if text.startswith("event: "):
            name = text.removeprefix("event: ")
        elif text.startswith("data: "):
            events.append((name, json.loads(text.removeprefix("data: "))))
    return events


def png_pixels(data: bytes) -> bytes:
    return Image.open(io.BytesIO(data)).convert("RGB").tobytes()


def test_models_lists_names_sizes_samplers_and_defaults(gateway: GatewayServer, tiny_model: ServedModel) -> None:
    status, body = get(gateway.port, "/api/models")
    assert status == 200
    (model,) = json.loads(body)["models"]
    assert model["name"] == tiny_model.name
    assert model["sizes"] == [{"width": w, "height": h} for w, h in tiny_model.sizes]
    assert model["default_scheduler"] in model["schedulers"] and "euler" in model["schedulers"]
    assert model["default_steps"] >= 1 and model["max_steps"] >= model["default_steps"]
    assert isinstance(model["default_guidance_scale"], float)


def test_the_page_and_its_files_are_served(gateway: GatewayServer) -> None:
    status, page = get(gateway.port, "/")
    assert status == 200 and b"<title>diffuserve playground</title>" in page
    for name in ("playground.js", "playground.css"):
        assert get(gateway.port, f"/static/{name}")[0] == 200


def test_generate_streams_queued_progress_image_completed_in_order(gateway: GatewayServer) -> None:
    body = {"prompt": "a red circle", "steps": 4, "seed": 7, "scheduler": "euler", "preview_interval": 2}
    status, kind, events = post(gateway.port, body)
    assert status == 200 and kind.startswith("text/event-stream")
    names = [name for name, _ in events]
    assert names == ["queued", "progress", "progress", "progress", "progress", "image", "completed"]
    progress = [data for name, data in events if name == "progress"]
    assert [p["step"] for p in progress] == [1, 2, 3, 4] and {p["total"] for p in progress} == {4}
    # Previews every second step, each a PNG at latent resolution.
    assert [len(p["previews"]) for p in progress] == [0, 1, 0, 1]
    preview = Image.open(io.BytesIO(base64.b64decode(progress[1]["previews"][0]["data"])))
    assert preview.format == "PNG" and preview.size[0] < 128
    image, completed = events[-2][1], events[-1][1]
    assert image["seed"] == 7 and image["mime_type"] == "image/png"
    assert Image.open(io.BytesIO(base64.b64decode(image["data"]))).size == (image["width"], image["height"])
    # The settings actually used, the server's defaults filled in.
    assert completed["steps"] == 4 and completed["scheduler"] == "euler" and completed["seeds"] == [7]
    assert completed["prompt"] == "a red circle" and completed["model"]
    assert completed["timings"]["total_ms"] > 0 and isinstance(completed["guidance_scale"], float)


def test_the_gateways_image_is_the_one_a_direct_generate_gives(gateway: GatewayServer, stub) -> None:
    settings = {"prompt": "a blue square", "negative_prompt": "red", "steps": 3, "guidance_scale": 2.5}
    body = {**settings, "seed": 11, "scheduler": "euler", "width": 192, "height": 128}
    _, _, events = post(gateway.port, body)
    via_gateway = base64.b64decode(dict(events)["image"]["data"])
    request = ClientRequest(**settings, seeds=(11,), scheduler="euler", width=192, height=128).to_proto()
    direct = stub.Generate(request).images[0].data
    assert png_pixels(via_gateway) == png_pixels(direct)
    # The same file too: the embedded settings are the same settings.
    assert via_gateway == direct


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        (b"{", "body", "not valid JSON"),
        (b'{"prompt": NaN}', "body", "not valid JSON"),
        (b"[" * 100_000, "body", "not valid JSON"),
        (b'["a red circle"]', "body", "expected a JSON object"),
        ({"prompt": "a", "steps": "twenty"}, "steps", 'expected an integer, got a string "twenty"'),
        ({"prompt": "a", "steps": 2.5}, "steps", "expected an integer"),
        ({"prompt": 5}, "prompt", "expected a string"),
        ({"prompt": "a", "seed": -1}, "seed", "must be an integer in 0..18446744073709551615"),
        ({"prompt": "a", "guidance_scale": "high"}, "guidance_scale", "expected a number"),
        ({"prompt": "a", "guidance_scale": 1e39}, "guidance_scale", "finite 32-bit float"),
        ({"prompt": "a", "scheduler": "fastest"}, "scheduler", "'fastest' is not one of euler, ddim"),
        ({"prompt": "a", "sampler": "euler"}, "sampler", "unknown field; the fields are prompt"),
    ],
)
def test_a_body_the_proto_cannot_carry_is_refused_by_the_gateway_naming_the_field(
    gateway: GatewayServer, body, field: str, says: str
) -> None:
    status, _, [(_, error)] = post(gateway.port, body)
    assert status == 400 and error["code"] == "INVALID_ARGUMENT"
    assert error["fields"] == [field] and error["message"].startswith(f"{field}: ") and says in error["message"]


def test_the_servers_refusals_keep_their_message_as_http_statuses(gateway: GatewayServer) -> None:
    status, _, [(_, error)] = post(gateway.port, {"prompt": "a", "steps": 100_000, "guidance_scale": 99})
    assert status == 400 and error["code"] == "INVALID_ARGUMENT"
    assert error["fields"] == ["steps", "guidance_scale"]
    assert "steps: must be in 1..150, got 100000" in error["message"] and "guidance_scale: must be" in error["message"]
    status, _, [(_, error)] = post(gateway.port, {"prompt": "a", "model": "no-such-model"})
    assert status == 404 and error["code"] == "NOT_FOUND" and "no-such-model" in error["message"]
    status, _, [(_, error)] = post(gateway.port, {"prompt": " "})
    assert status == 400 and error["fields"] == ["prompt"]


def test_grpc_codes_map_to_the_usual_http_statuses() -> None:
    expected = {
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.DEADLINE_EXCEEDED: 504,
        grpc.StatusCode.UNAUTHENTICATED: 401,
        grpc.StatusCode.PERMISSION_DENIED: 403,
        grpc.StatusCode.INTERNAL: 500,
    }
    assert {code: http_status(code) for code in expected} == expected
    assert all(400 <= http_status(code) < 600 for code in grpc.StatusCode if code != grpc.StatusCode.OK)


def test_bad_bodies_never_stop_the_gateway(gateway: GatewayServer) -> None:
    bad = [b"", b"\xff\xfe", b"null", b"1e999", b'{"prompt": {"a": []}}', b"{" * 50_000, b"x" * (2 << 20)]
    statuses = [post(gateway.port, body)[0] for body in bad]
    assert set(statuses) <= {400, 413} and statuses[-1] == 413
    status, _, events = post(gateway.port, {"prompt": "still here", "steps": 2})
    assert status == 200 and events[-1][0] == "completed"


def test_many_streams_at_once_each_get_their_own_image(gateway: GatewayServer) -> None:
    seeds = range(20, 26)
    with ThreadPoolExecutor(len(seeds)) as pool:
        answers = list(pool.map(lambda s: post(gateway.port, {"prompt": "a circle", "steps": 3, "seed": s}), seeds))
    assert [status for status, _, _ in answers] == [200] * len(seeds)
    assert [dict(events)["completed"]["seeds"] for _, _, events in answers] == [[s] for s in seeds]


def test_dropping_the_connection_mid_run_cancels_the_job_on_the_server(tiny_model: ServedModel) -> None:
    with serving(tiny_model) as (server, stub, _), gateway_for(server.address) as gateway:
        body = json.dumps({"prompt": "a red circle", "steps": LONG, "scheduler": "euler", "seed": 3}).encode()
        head = f"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=60) as browser:
            browser.sendall(head + body)
            received = b""
            while b"event: progress" not in received:
                chunk = browser.recv(1 << 16)
                assert chunk, f"the gateway closed the stream first: {received[-300:]!r}"
                received += chunk
        # The tab is gone: the gRPC call is cancelled, and the worker leaves the job at its next step.
        wait_idle(server)
        steps = server.running.worker.steps_run
        after = stub.Generate(ClientRequest(prompt="a blue square", steps=2).to_proto())
    assert steps < STEPS_TO_NOTICE, f"the worker ran {steps} of {LONG} steps for a caller that had left"
    assert len(after.images) == 1


def test_the_gateway_passes_the_callers_token_on_and_grants_nothing_itself(tiny_model: ServedModel) -> None:
    config = ServerConfig(model_dirs=(), host="127.0.0.1", port=0, auth_tokens=("s3cret",))
    with BackgroundServer(config, {tiny_model.name: tiny_model}) as server:
        with gateway_for(server.address) as gateway:
            status, body = get(gateway.port, "/api/models")
            assert status == 401 and json.loads(body)["error"]["code"] == "UNAUTHENTICATED"
            assert get(gateway.port, "/api/models", {"Authorization": "Bearer s3cret"})[0] == 200
            status, _, [(_, error)] = post(gateway.port, {"prompt": "a"}, {"Authorization": "Bearer wrong"})
            assert status == 401
        with gateway_for(server.address, token="s3cret") as gateway:  # diffuserve gateway --auth-token-file
            status, _, events = post(gateway.port, {"prompt": "a", "steps": 2})
            assert status == 200 and events[-1][0] == "completed"


def test_without_the_extra_the_gateway_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # what an import of a package not installed does
    monkeypatch.delitem(sys.modules, "diffuserve.server.gateway.app")
    with pytest.raises(MissingExtra, match=r"pip install 'diffuserve\[gateway\]'"):
        importlib.import_module("diffuserve.server.gateway.app")


def wait_for_page(port: int, process: subprocess.Popen, timeout: float = 120.0) -> bytes:
    until = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"the process exited with {process.returncode}"
        try:
            status, page = get(port, "/")
            if status == 200:
                return page
        except OSError:
            pass
        assert time.monotonic() < until, "the page never came up"
        time.sleep(0.2)


def test_serve_with_an_http_port_serves_the_playground_and_stops_on_sigterm(tiny_export: Path) -> None:
    """The port from the environment (DIFFUSERVE_HTTP_PORT), as every serve setting may come."""
    grpc_port, http_port = free_port(), free_port()
    command = [*CLI, "serve", str(tiny_export), "--host", "127.0.0.1", "--port", str(grpc_port), "--backend", "cpu"]
    process = subprocess.Popen(command, env={**os.environ, "DIFFUSERVE_HTTP_PORT": str(http_port)})
    try:
        assert b"diffuserve playground" in wait_for_page(http_port, process)
        assert json.loads(get(http_port, "/api/models")[1])["models"][0]["name"] == "tiny-sd"
        status, _, events = post(http_port, {"prompt": "a red circle", "steps": 2, "seed": 5})
        assert status == 200 and events[-1][1]["seeds"] == [5]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_the_gateway_command_serves_a_running_server_and_stops_on_sigterm(server: BackgroundServer) -> None:
    http_port = free_port()
    command = [*CLI, "gateway", "--server", server.address, "--http-port", str(http_port)]
    process = subprocess.Popen(command)
    try:
        wait_for_page(http_port, process, timeout=30)
        status, _, events = post(http_port, {"prompt": "a square", "steps": 2})
        assert status == 200 and events[-1][0] == "completed"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_http_port_settings_are_checked_before_anything_loads(tmp_path: Path, capsys) -> None:
    assert main(["serve", "--http-port", "70000"]) == 2
    assert "--http-port: must be 0..65535, got 70000" in capsys.readouterr().err
    config = tmp_path / "serve.toml"
    config.write_text("http_port = 'eighty'\n")
    assert main(["serve", "--config", str(config)]) == 2
    assert "http_port" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--http-port: the in-process gateway speaks plaintext"):
        main(["serve", "--http-port", "0", "--tls-cert", "cert.pem", "--tls-key", "key.pem"])
