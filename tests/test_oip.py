"""The KServe v2 / Open Inference Protocol service over the same worker as DiffusionService: every RPC with our own
stubs on a real loopback server, pixels equal to Generate's PNG, errors naming the input; then tritonclient itself,
from its own venv (build/tritonclient-venv, created once and kept) in a subprocess."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import math
import re
import shutil
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2
from grpc_tools import protoc
from PIL import Image

from diffuserve.server import app
from diffuserve.server.models import ServedModel
from diffuserve.server.service import DiffusionService, package_version
from diffuserve.server.worker import InferenceWorker, WorkerConfig
from diffuserve.v1 import diffusion_pb2 as pb
from diffuserve.v1 import diffusion_pb2_grpc as pb_grpc

from .serving_helpers import LONG, busy, euler_request, wait_idle

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"
STUBS = PROTOS / "inference"


def _import_stubs() -> None:
    """The stubs as diffuserve.inference even where the editable install predates that package (it is mapped by
    pyproject's package-dir; a `pip install -e .` since then makes this a no-op)."""
    if importlib.util.find_spec("diffuserve.inference") is not None:
        return
    spec = importlib.util.spec_from_file_location(
        "diffuserve.inference", STUBS / "__init__.py", submodule_search_locations=[str(STUBS)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["diffuserve.inference"] = module
    spec.loader.exec_module(module)


_import_stubs()

from diffuserve.inference import grpc_service_pb2 as oip  # noqa: E402
from diffuserve.inference import grpc_service_pb2_grpc as oip_grpc  # noqa: E402
from diffuserve.server.interceptors import RequestGuard  # noqa: E402
from diffuserve.server.metrics import Metrics  # noqa: E402
from diffuserve.server.oip import OIP_SERVICE_NAME, add_oip_service  # noqa: E402

STEPS = 4  # few steps: these tests are about the protocol, not the pictures
SEED = 1234
PROMPT = "a red circle"

# tritonclient's side: its pinned release in a venv of its own, kept between runs.
TRITONCLIENT_REQUIREMENT = "tritonclient[grpc]==2.73.*"
TRITONCLIENT_VENV = ROOT / "build" / "tritonclient-venv"
# Written last, so a venv whose install was interrupted is rebuilt rather than used.
TRITONCLIENT_MARKER = "diffuserve-installed.json"
PIP_INSTALL_TIMEOUT_S = 600
# pip's complaints when the index cannot be reached (no network, no DNS, a proxy refusing): a reason to skip, not
# a failure.
UNREACHABLE = re.compile(
    r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|Name or service not known|"
    r"Network is unreachable|ProxyError|No matching distribution found for tritonclient|"
    r"Could not find a version that satisfies the requirement tritonclient"
)

# The generated stubs are rewritten to import themselves as diffuserve.inference, as the Makefile's protos target
# does: the same two substitutions.
STUB_REWRITES = (
    (re.compile(r"^from inference import", re.M), "from diffuserve.inference import"),
    (re.compile(r"'inference\.grpc_service_pb2'"), "'diffuserve.inference.grpc_service_pb2'"),
)
GENERATED = ("grpc_service_pb2.py", "grpc_service_pb2.pyi", "grpc_service_pb2_grpc.py")


async def _start_with_oip(config: app.ServerConfig, models: dict[str, ServedModel]) -> app.Running:
    """app.start_server with the OIP service registered beside DiffusionService, as app.py is to register it."""
    worker = InferenceWorker(config.worker).start()
    # The metrics without their HTTP endpoint: the tests read the registry.
    metrics = Metrics(models, lambda: worker.depth)
    worker.on_batch = metrics.batch_done
    server = grpc.aio.server(interceptors=[RequestGuard()], options=app.server_options(models))
    service = DiffusionService(models, next(iter(models)), worker, metrics)
    pb_grpc.add_DiffusionServiceServicer_to_server(service, server)
    add_oip_service(server, service)
    health_servicer = health.aio.HealthServicer()
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return app.Running(server, port, health_servicer, service, worker)


class OipServer(app.BackgroundServer):
    """BackgroundServer (its loop thread, drain and stop) serving the OIP service too."""

    def start(self) -> OipServer:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(_start_with_oip(self.config, self.models), self._loop)
        self.running = started.result()
        self.port = self.running.port
        return self


@contextmanager
def serving_oip(model: ServedModel, **worker):
    config = app.ServerConfig(model_dirs=(), host="127.0.0.1", port=0, worker=WorkerConfig(**worker))
    with OipServer(config, {model.name: model}) as server, grpc.insecure_channel(server.address) as channel:
        yield server, oip_grpc.GRPCInferenceServiceStub(channel), pb_grpc.DiffusionServiceStub(channel)


@pytest.fixture(scope="module")
def served(tiny_model: ServedModel):
    with serving_oip(tiny_model) as running:
        yield running


@pytest.fixture
def oip_stub(served) -> oip_grpc.GRPCInferenceServiceStub:
    return served[1]


@pytest.fixture
def stub(served) -> pb_grpc.DiffusionServiceStub:
    return served[2]


# Building requests the way clients do: raw (tritonclient) or typed contents.
def raw_bytes(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def raw_input(name: str, datatype: str, shape: list[int], data: bytes) -> tuple:
    return oip.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape), data


def prompt_input(text: str = PROMPT, shape: list[int] | None = None) -> tuple:
    return raw_input("prompt", "BYTES", shape or [1], raw_bytes(text.encode()))


def int_input(name: str, *values: int, datatype: str = "INT32", shape: list[int] | None = None) -> tuple:
    dtype = {"INT32": "<i4", "INT64": "<i8", "UINT64": "<u8"}[datatype]
    return raw_input(name, datatype, shape or [len(values)], np.array(values, dtype=dtype).tobytes())


def raw_request(*inputs: tuple, model: str = "", **fields) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model, **fields)
    for tensor, data in inputs:
        request.inputs.append(tensor)
        request.raw_input_contents.append(data)
    return request


def basic_request(**fields) -> oip.ModelInferRequest:
    return raw_request(
        prompt_input(),
        int_input("seed", SEED, datatype="INT64"),
        int_input("steps", STEPS),
        raw_input("scheduler", "BYTES", [1], raw_bytes(b"euler")),
        **fields,
    )


def outputs_of(response: oip.ModelInferResponse) -> dict[str, np.ndarray]:
    dtypes = {"UINT8": np.uint8, "INT64": np.dtype("<i8")}
    return {
        out.name: np.frombuffer(data, dtype=dtypes[out.datatype]).reshape(list(out.shape))
        for out, data in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def generate_pixels(stub: pb_grpc.DiffusionServiceStub, **fields) -> tuple[np.ndarray, list[int]]:
    """Generate's images decoded from their PNGs: uint8 [N, H, W, 3], and their seeds."""
    response = stub.Generate(pb.GenerateRequest(**fields))
    images = [np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB")) for image in response.images]
    return np.stack(images), [image.seed for image in response.images]


def infer_error(oip_stub, request: oip.ModelInferRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        oip_stub.ModelInfer(request)
    return raised.value


def test_generated_stubs_match_the_proto(tmp_path: Path) -> None:
    status = protoc.main(
        [
            "protoc",
            f"-I{PROTOS}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(STUBS / "grpc_service.proto"),
        ]
    )
    assert status == 0
    for name in GENERATED:
        fresh = (tmp_path / "inference" / name).read_text()
        for pattern, replacement in STUB_REWRITES:
            fresh = pattern.sub(replacement, fresh)
        assert fresh == (STUBS / name).read_text(), f"{name} is stale: run `make protos`"


def test_the_proto_is_wire_compatible_with_the_open_inference_protocol() -> None:
    """Field numbers of the messages tritonclient sends and reads, as KServe's open_inference_grpc.proto has them."""
    expected = {
        "ModelInferRequest": {
            "model_name": 1,
            "model_version": 2,
            "id": 3,
            "parameters": 4,
            "inputs": 5,
            "outputs": 6,
            "raw_input_contents": 7,
        },
        "ModelInferRequest.InferInputTensor": {"name": 1, "datatype": 2, "shape": 3, "parameters": 4, "contents": 5},
        "ModelInferRequest.InferRequestedOutputTensor": {"name": 1, "parameters": 2},
        "ModelInferResponse": {
            "model_name": 1,
            "model_version": 2,
            "id": 3,
            "parameters": 4,
            "outputs": 5,
            "raw_output_contents": 6,
        },
        "ModelInferResponse.InferOutputTensor": {"name": 1, "datatype": 2, "shape": 3, "parameters": 4, "contents": 5},
        "ModelMetadataResponse": {"name": 1, "versions": 2, "platform": 3, "inputs": 4, "outputs": 5},
        "ModelMetadataResponse.TensorMetadata": {"name": 1, "datatype": 2, "shape": 3},
        "ServerMetadataResponse": {"name": 1, "version": 2, "extensions": 3},
        "ModelReadyRequest": {"name": 1, "version": 2},
        "InferParameter": {
            "bool_param": 1,
            "int64_param": 2,
            "string_param": 3,
            "double_param": 4,
            "uint64_param": 5,
        },
        "InferTensorContents": {
            "bool_contents": 1,
            "int_contents": 2,
            "int64_contents": 3,
            "uint_contents": 4,
            "uint64_contents": 5,
            "fp32_contents": 6,
            "fp64_contents": 7,
            "bytes_contents": 8,
        },
    }
    for path, fields in expected.items():
        descriptor = oip.DESCRIPTOR.message_types_by_name[path.split(".")[0]]
        for nested in path.split(".")[1:]:
            descriptor = descriptor.nested_types_by_name[nested]
        assert {f.name: f.number for f in descriptor.fields} == fields, path
    methods = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    assert OIP_SERVICE_NAME == "inference.GRPCInferenceService"
    assert sorted(methods) == sorted(
        ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"]
    )


def test_server_live_ready_and_metadata(oip_stub) -> None:
    assert oip_stub.ServerLive(oip.ServerLiveRequest()).live
    assert oip_stub.ServerReady(oip.ServerReadyRequest()).ready
    metadata = oip_stub.ServerMetadata(oip.ServerMetadataRequest())
    assert metadata.name == "diffuserve"
    assert metadata.version == package_version("diffuserve")
    assert list(metadata.extensions) == []


def test_model_ready_per_model(oip_stub, tiny_model: ServedModel) -> None:
    assert oip_stub.ModelReady(oip.ModelReadyRequest(name=tiny_model.name)).ready
    assert oip_stub.ModelReady(oip.ModelReadyRequest(name=tiny_model.name, version="1")).ready
    assert not oip_stub.ModelReady(oip.ModelReadyRequest(name=tiny_model.name, version="2")).ready
    assert not oip_stub.ModelReady(oip.ModelReadyRequest(name="no-such-model")).ready


def test_model_metadata_lists_inputs_and_outputs(oip_stub, tiny_model: ServedModel) -> None:
    metadata = oip_stub.ModelMetadata(oip.ModelMetadataRequest(name=tiny_model.name))
    assert metadata.name == tiny_model.name
    assert list(metadata.versions) == ["1"]
    inputs = {t.name: (t.datatype, list(t.shape)) for t in metadata.inputs}
    assert inputs == {
        "prompt": ("BYTES", [1]),
        "negative_prompt": ("BYTES", [1]),
        "seed": ("INT64", [-1]),
        "steps": ("INT32", [1]),
        "guidance_scale": ("FP32", [1]),
        "width": ("INT32", [1]),
        "height": ("INT32", [1]),
        "scheduler": ("BYTES", [1]),
        "num_images": ("INT32", [1]),
        "noise_mode": ("BYTES", [1]),
    }
    # The tiny model serves 128x128 and 192x128: one height, two widths.
    outputs = {t.name: (t.datatype, list(t.shape)) for t in metadata.outputs}
    assert outputs == {"image": ("UINT8", [-1, 128, -1, 3]), "seed": ("INT64", [-1])}


def test_model_metadata_of_an_unknown_model_is_not_found(oip_stub) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        oip_stub.ModelMetadata(oip.ModelMetadataRequest(name="no-such-model"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert raised.value.details().startswith("model_name: no model named 'no-such-model'")


def test_infer_pixels_are_those_of_generates_png(oip_stub, stub, tiny_model: ServedModel) -> None:
    response = oip_stub.ModelInfer(basic_request(model=tiny_model.name, id="oip-1"))
    outputs = outputs_of(response)
    expected, seeds = generate_pixels(stub, prompt=PROMPT, seeds=[SEED], steps=STEPS, scheduler=pb.SCHEDULER_EULER)
    assert outputs["image"].shape == (1, 128, 128, 3)
    np.testing.assert_array_equal(outputs["image"], expected)
    assert outputs["seed"].tolist() == seeds == [SEED]
    assert (response.model_name, response.model_version, response.id) == (tiny_model.name, "1", "oip-1")
    assert response.parameters["steps"].int64_param == STEPS
    assert response.parameters["scheduler"].string_param == "euler"
    assert response.parameters["total_ms"].double_param > 0


def test_typed_contents_give_the_same_pixels_and_every_setting_applies(oip_stub, stub) -> None:
    """Typed contents (no raw), the empty model name (the default model), two images, a non-default size, the
    negative prompt and guidance scale, an [1, 1] prompt as Triton's Stable Diffusion example sends it."""
    tensor = oip.ModelInferRequest.InferInputTensor
    contents = oip.InferTensorContents
    request = oip.ModelInferRequest(
        inputs=[
            tensor(
                name="prompt", datatype="BYTES", shape=[1, 1], contents=contents(bytes_contents=[b"a blue square"])
            ),
            tensor(name="negative_prompt", datatype="BYTES", shape=[1], contents=contents(bytes_contents=[b"red"])),
            tensor(name="seed", datatype="INT64", shape=[2], contents=contents(int64_contents=[7, 8])),
            tensor(name="steps", datatype="INT32", shape=[1], contents=contents(int_contents=[3])),
            tensor(name="guidance_scale", datatype="FP32", shape=[1], contents=contents(fp32_contents=[5.0])),
            tensor(name="width", datatype="INT32", shape=[1], contents=contents(int_contents=[192])),
            tensor(name="height", datatype="INT32", shape=[1], contents=contents(int_contents=[128])),
            tensor(name="scheduler", datatype="BYTES", shape=[1], contents=contents(bytes_contents=[b"euler"])),
            tensor(name="num_images", datatype="INT32", shape=[1], contents=contents(int_contents=[2])),
        ],
        outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name="image")],
    )
    response = oip_stub.ModelInfer(request)
    assert [out.name for out in response.outputs] == ["image"]
    outputs = outputs_of(response)
    expected, _ = generate_pixels(
        stub,
        prompt="a blue square",
        negative_prompt="red",
        seeds=[7, 8],
        steps=3,
        guidance_scale=5.0,
        width=192,
        height=128,
        num_images=2,
        scheduler=pb.SCHEDULER_EULER,
    )
    assert outputs["image"].shape == (2, 128, 192, 3)
    np.testing.assert_array_equal(outputs["image"], expected)
    assert response.parameters["guidance_scale"].double_param == 5.0


def test_seeds_left_out_are_drawn_and_returned(oip_stub) -> None:
    request = raw_request(prompt_input(), int_input("steps", 2), int_input("num_images", 2))
    seeds = outputs_of(oip_stub.ModelInfer(request))["seed"]
    assert seeds.shape == (2,) and (seeds >= 0).all() and seeds[0] != seeds[1]


BAD_INPUTS = {
    "no prompt": ((int_input("steps", 2),), "prompt: required"),
    "prompt as INT32": ((int_input("prompt", 1),), "prompt: datatype must be BYTES"),
    "two prompts": ((raw_input("prompt", "BYTES", [2], raw_bytes(b"a", b"b")),), "prompt: takes one element"),
    "empty prompt": ((prompt_input(""),), "prompt: must not be empty"),
    "prompt not UTF-8": ((raw_input("prompt", "BYTES", [1], raw_bytes(b"\xff")),), "prompt: not valid UTF-8"),
    "raw BYTES cut short": ((raw_input("prompt", "BYTES", [1], struct.pack("<I", 9) + b"abc"),), "prompt: element 0"),
    "raw INT32 of the wrong size": ((prompt_input(), raw_input("steps", "INT32", [1], b"\x01\x00")), "steps: shape"),
    "steps over the limit": ((prompt_input(), int_input("steps", 100_000)), "steps: must be in 1.."),
    "steps beyond INT32": ((prompt_input(), int_input("steps", 2**40, datatype="INT64")), "steps: must fit an INT32"),
    "width not served": ((prompt_input(), int_input("width", 100)), "width: model 'tiny-sd' serves the sizes"),
    "unknown scheduler": (
        (prompt_input(), raw_input("scheduler", "BYTES", [1], raw_bytes(b"SCHEDULER_EULER"))),
        "scheduler: 'SCHEDULER_EULER' is not one of",
    ),
    "unknown noise mode": (
        (prompt_input(), raw_input("noise_mode", "BYTES", [1], raw_bytes(b"cuda"))),
        "noise_mode: 'cuda' is not one of numpy, torch_cpu",
    ),
    "negative seed": ((prompt_input(), int_input("seed", -1, datatype="INT64")), "seed: each must be in 0.."),
    "seed too large for INT64": ((prompt_input(), int_input("seed", 2**63, datatype="UINT64")), "seed: each must"),
    "more seeds than images": (
        (prompt_input(), int_input("seed", 1, 2, datatype="INT64"), int_input("num_images", 1)),
        "seed: got 2 seeds for 1 image(s)",
    ),
    "unknown input": ((prompt_input(), int_input("strength", 1)), "'strength': the model has no such input"),
    "input given twice": ((prompt_input(), prompt_input()), "prompt: given twice"),
    "negative dimension": ((prompt_input(shape=[-1]),), "prompt: shape [-1] has a negative dimension"),
}


@pytest.mark.parametrize("inputs, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_are_invalid_argument_naming_the_input(oip_stub, inputs, message: str) -> None:
    error = infer_error(oip_stub, raw_request(*inputs))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()


def test_every_bad_input_is_named_in_one_answer(oip_stub) -> None:
    request = raw_request(int_input("prompt", 1), int_input("guidance_scale", 3), int_input("bogus", 1))
    details = infer_error(oip_stub, request).details()
    assert "prompt: datatype" in details and "guidance_scale: datatype" in details and "'bogus'" in details


def test_request_level_mistakes_name_their_field(oip_stub) -> None:
    request = basic_request()
    request.raw_input_contents.pop()
    error = infer_error(oip_stub, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("raw_input_contents: 3 entries for 4 inputs")

    tensor = oip.ModelInferRequest.InferInputTensor(
        name="prompt", datatype="BYTES", shape=[1], contents=oip.InferTensorContents(bytes_contents=[b"x"])
    )
    mixed = raw_request((tensor, raw_bytes(b"x")))
    assert "prompt: has both contents and raw_input_contents" in infer_error(oip_stub, mixed).details()

    request = basic_request(outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name="images")])
    assert infer_error(oip_stub, request).details().startswith("outputs: the model has no output 'images'")

    request = basic_request(id="x" * 200)
    assert infer_error(oip_stub, request).details().startswith("id: at most 128 printable characters")

    request = basic_request(parameters={"sequence_id": oip.InferParameter(int64_param=3)})
    assert infer_error(oip_stub, request).details().startswith("sequence_id: model")


def test_unknown_model_or_version_is_not_found(oip_stub) -> None:
    error = infer_error(oip_stub, basic_request(model="no-such-model"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "model_name: no model named 'no-such-model'" in error.details()
    error = infer_error(oip_stub, basic_request(model_version="7"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details().startswith("model_version:")


def test_undecodable_bytes_are_invalid_argument(served) -> None:
    server = served[0]
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary(f"/{OIP_SERVICE_NAME}/ModelInfer")
        with pytest.raises(grpc.RpcError) as raised:
            call(b"\xff\xff\xff")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_oip_and_generate_requests_share_the_queue_and_batches(oip_stub, stub, served) -> None:
    """Compatible requests of both services, sent while the worker is busy, run as one batch of the same worker."""
    with busy(stub), ThreadPoolExecutor(2) as pool:
        infer = pool.submit(oip_stub.ModelInfer, basic_request())
        generate = pool.submit(stub.Generate, euler_request(prompt="a green circle", seeds=[9], steps=STEPS))
        response, generated = infer.result(timeout=120), generate.result(timeout=120)
    assert response.parameters["batch_size"].int64_param == 2
    assert generated.timings.batch_size == 2
    wait_idle(served[0])


def test_the_timeout_parameter_is_a_deadline(oip_stub, served) -> None:
    """Triton's `timeout` request parameter (microseconds) stops the request as a gRPC deadline does."""
    server = served[0]
    wait_idle(server)
    before = server.running.worker.steps_run
    request = raw_request(prompt_input(), int_input("steps", LONG))
    request.parameters["timeout"].int64_param = 300_000
    error = infer_error(oip_stub, request)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(server)
    assert server.running.worker.steps_run - before < LONG


def test_a_cancelled_infer_leaves_the_worker(oip_stub, served) -> None:
    server = served[0]
    wait_idle(server)
    before = server.running.worker.steps_run
    call = oip_stub.ModelInfer.future(raw_request(prompt_input(), int_input("steps", LONG)))
    time.sleep(0.3)
    call.cancel()
    wait_idle(server)
    assert server.running.worker.steps_run - before < LONG


def test_infer_requests_count_in_the_metrics_and_echo_the_request_id(oip_stub, served, tiny_model) -> None:
    registry = served[0].running.service.metrics.registry

    def count(outcome: str) -> float:
        return registry.get_sample_value("diffuserve_requests_total", {"model": tiny_model.name, "outcome": outcome})

    ok, invalid = count("ok"), count("invalid")
    _, call = oip_stub.ModelInfer.with_call(basic_request(), metadata=[("x-request-id", "from-metadata")])
    assert call.result().id == "from-metadata"
    assert ("x-request-id", "from-metadata") in call.initial_metadata()
    infer_error(oip_stub, raw_request(prompt_input(""), model=tiny_model.name))
    assert (count("ok"), count("invalid")) == (ok + 1, invalid + 1)


def test_a_draining_server_is_not_ready_and_refuses_inference(tiny_model: ServedModel) -> None:
    with serving_oip(tiny_model) as (server, oip_stub, _):
        server.running.service.draining = True
        assert oip_stub.ServerLive(oip.ServerLiveRequest()).live
        assert not oip_stub.ServerReady(oip.ServerReadyRequest()).ready
        assert not oip_stub.ModelReady(oip.ModelReadyRequest(name=tiny_model.name)).ready
        error = infer_error(oip_stub, basic_request())
        assert error.code() == grpc.StatusCode.UNAVAILABLE


# tritonclient itself, in a venv of its own.
@pytest.fixture(scope="session")
def tritonclient_python() -> Path:
    """build/tritonclient-venv with tritonclient[grpc] and numpy: created once, then kept across runs."""
    python = TRITONCLIENT_VENV / "bin" / "python"
    marker = TRITONCLIENT_VENV / TRITONCLIENT_MARKER
    if marker.exists() and json.loads(marker.read_text()).get("requirement") == TRITONCLIENT_REQUIREMENT:
        return python
    shutil.rmtree(TRITONCLIENT_VENV, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(TRITONCLIENT_VENV)], check=True)
    # Not the project's constraints: tritonclient wants protobuf < 7, which diffuserve's own venv cannot have.
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            TRITONCLIENT_REQUIREMENT,
            "numpy",
        ],
        capture_output=True,
        text=True,
        timeout=PIP_INSTALL_TIMEOUT_S,
    )
    if install.returncode != 0:
        shutil.rmtree(TRITONCLIENT_VENV, ignore_errors=True)
        if UNREACHABLE.search(install.stderr):
            pytest.skip(f"pip could not reach an index with {TRITONCLIENT_REQUIREMENT}: {install.stderr[-300:]}")
        pytest.fail(f"pip install {TRITONCLIENT_REQUIREMENT} failed:\n{install.stderr[-2000:]}")
    seconds = time.perf_counter() - start
    marker.write_text(json.dumps({"requirement": TRITONCLIENT_REQUIREMENT, "install_s": round(seconds, 1)}))
    print(f"created {TRITONCLIENT_VENV} with {TRITONCLIENT_REQUIREMENT} in {seconds:.1f} s")
    return python


@pytest.mark.slow
def test_tritonclient_talks_to_the_oip_service(
    tritonclient_python: Path, served, stub, tiny_model: ServedModel, tmp_path: Path
) -> None:
    server = served[0]
    script = Path(__file__).with_name("tritonclient_check.py")
    # -I: tritonclient's venv alone, nothing of this process's paths.
    args = [server.address, tiny_model.name, PROMPT, str(SEED), str(STEPS), str(tmp_path)]
    run = subprocess.run(
        [str(tritonclient_python), "-I", str(script), *args], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)

    assert report["server_live"] and report["server_ready"] and report["model_ready"]
    assert not report["unknown_model_ready"]
    assert report["server_metadata"]["name"] == "diffuserve"
    metadata = report["model_metadata"]
    assert metadata["name"] == tiny_model.name
    # protobuf's JSON writes int64 as strings.
    inputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in metadata["inputs"]}
    assert inputs["prompt"] == ("BYTES", [1]) and inputs["seed"] == ("INT64", [-1])
    outputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in metadata["outputs"]}
    assert outputs["image"] == ("UINT8", [-1, 128, -1, 3])

    image, seeds = np.load(tmp_path / "image.npy"), np.load(tmp_path / "seed.npy")
    expected, expected_seeds = generate_pixels(stub, prompt=PROMPT, seeds=[SEED], steps=STEPS)
    assert image.dtype == np.uint8 and image.shape == (1, 128, 128, 3)
    np.testing.assert_array_equal(image, expected)
    assert seeds.tolist() == expected_seeds == [SEED]
    assert report["response_id"] == "tritonclient-check"

    bad = report["bad_request"]
    assert bad is not None and bad["status"] == "StatusCode.INVALID_ARGUMENT"
    assert bad["message"].startswith("steps: must be in 1..")
    assert math.isfinite(report["response_parameters"]["total_ms"]["double_param"])
