"""The tensorrt target and backend.

TensorRT and a GPU cannot exist on the machines CI runs on, so most tests here run diffuserve's real TensorRT code
against the stand-ins of tests/fake_tensorrt.py (which compute for real on host memory and ONNX Runtime), and one
test pins every name that code used to the real APIs (`tensorrt_lean`, `cuda.bindings.runtime`). The tests marked
`gpu` and `tensorrt` need both for real and are skipped without them.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from diffuserve.engine import cudart as cudart_module
from diffuserve.engine import loader
from diffuserve.engine import trt as trt_module
from diffuserve.engine.cudart import CudaError, CudaRuntime
from diffuserve.engine.loader import LoadedEngines, load_component_engines, load_engines
from diffuserve.engine.manifest import TENSORRT_TARGET, UNET, Manifest
from diffuserve.engine.ort import BackendUnavailableError
from diffuserve.engine.trt import (
    PlanMismatchError,
    TrtDevice,
    TrtOptions,
    graph_replay_difference,
    load_tensorrt_engines,
    tensorrt_unavailable_reason,
)
from diffuserve.engine.trt_build import BuildOptions, PlanBuildError, build_plans

from . import fake_tensorrt
from .fake_tensorrt import fake_tensorrt_modules

TEXT_TO_IMAGE = ("text_encoder", "unet", "vae_decoder")


@pytest.fixture
def folder(tiny_tensorrt_export: Path, tmp_path: Path) -> Path:
    """A private copy of the export: building plans writes into it."""
    return Path(shutil.copytree(tiny_tensorrt_export, tmp_path / "model"))


@pytest.fixture
def fake():
    return fake_tensorrt_modules()


@pytest.fixture
def device(fake) -> TrtDevice:
    trt, rt = fake
    return TrtDevice(trt, CudaRuntime(rt))


@pytest.fixture
def built(folder: Path, device: TrtDevice) -> Path:
    build_plans(folder, device=device, report=lambda line: None)
    return folder


@pytest.fixture
def installed(fake, monkeypatch):
    """The stand-ins as the modules `import tensorrt` and cuda-python would give, for the loader's own path."""
    trt, rt = fake
    monkeypatch.setattr(trt_module, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(cudart_module, "import_cudart", lambda: rt)
    monkeypatch.setattr(loader, "tensorrt_installed", lambda: True)
    monkeypatch.setattr(TrtDevice, "_shared", {})
    return fake


def random_feeds(spec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        t.name: rng.integers(0, 1000, t.shape).astype(t.dtype)
        if t.dtype.startswith("int")
        else rng.standard_normal(t.shape).astype(t.dtype)
        for t in spec.inputs
    }


def plan_json(folder: Path, component: str) -> dict:
    manifest = Manifest.load(folder)
    plan = manifest.targets[TENSORRT_TARGET].plans[0].components[component]
    return json.loads((folder / plan.plan_file).read_bytes())


# --- The target ----------------------------------------------------------------------------------------------------


def test_the_tensorrt_target_is_fp16_with_explicit_casts_and_standard_ops_only(tiny_tensorrt_export: Path) -> None:
    manifest = Manifest.load(tiny_tensorrt_export)
    target = manifest.targets[TENSORRT_TARGET]
    assert target.precision == "fp16" and target.checked_with.startswith("final graph")
    assert target.image_parity["psnr_db"] >= 30
    for name, component in target.components.items():
        model = onnx.load(str(tiny_tensorrt_export / component.graph_file))
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, name
        # float32 at the boundary, so the pipeline stays float32; fp16 weights inside.
        float_io = [v for v in (*model.graph.input, *model.graph.output) if v.type.tensor_type.elem_type in (1, 10)]
        assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in float_io), name
        weights = [t for t in model.graph.initializer if t.data_type in (1, 10) and np.prod(t.dims) > 16]
        assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights), name
        assert any(n.op_type == "Cast" for n in model.graph.node), name
        for shape in component.shapes:
            allowed = shape.parity["tolerance"] * shape.parity["reference_scale"]
            assert shape.parity["tolerance"] == 2e-2 and shape.parity["max_abs_diff"] <= allowed


def test_the_timestep_embedding_is_computed_in_float32(tiny_tensorrt_export: Path) -> None:
    graph = Manifest.load(tiny_tensorrt_export).targets[TENSORRT_TARGET].components[UNET].graph_file
    model = onnx.shape_inference.infer_shapes(onnx.load(str(tiny_tensorrt_export / graph)))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    sines = [n for n in model.graph.node if n.op_type in ("Sin", "Cos")]
    assert sines and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in sines)
    # ...and the timestep reaches it without a round trip through fp16.
    casts = {n.output[0]: n for n in model.graph.node if n.op_type == "Cast"}
    for node in model.graph.node:
        for name in node.input:
            down = casts.get(name)
            if node.op_type == "Cast" and down is not None:
                assert not (down.attribute[0].i == onnx.TensorProto.FLOAT16 and node.attribute[0].i == 1)


def test_the_fp16_graph_runs_on_onnxruntime_within_fp16_tolerance_of_fp32(tiny_tensorrt_export: Path) -> None:
    manifest = Manifest.load(tiny_tensorrt_export)
    rng = np.random.default_rng(3)
    for name in TEXT_TO_IMAGE:
        fp32, fp16 = (manifest.targets[t].components[name] for t in ("cpu", TENSORRT_TARGET))
        specs = [shape.spec for shape in fp32.shapes]
        engines32 = load_component_engines(tiny_tensorrt_export / fp32.graph_file, specs, "cpu")
        engines16 = load_component_engines(tiny_tensorrt_export / fp16.graph_file, specs, "cpu")
        for spec, e32, e16 in zip(specs, engines32, engines16, strict=True):
            feeds = random_feeds(spec, rng)
            for output, expected in e32.run(feeds).items():
                actual = e16.run(feeds)[output]
                assert np.max(np.abs(actual - expected)) <= 2e-2 * np.max(np.abs(expected)), (name, output)


# --- Building --------------------------------------------------------------------------------------------------------


def test_each_plan_holds_one_static_profile_per_exported_shape_in_the_manifests_order(built: Path) -> None:
    manifest = Manifest.load(built)
    for name, graph in manifest.targets[TENSORRT_TARGET].components.items():
        profiles = plan_json(built, name)["profiles"]
        # Two sizes x two batches; the text encoder's do not depend on the size; the U-Net's rows are a batch's
        # images with and without guidance (1, 2, 4), at two text lengths.
        assert len(profiles) == len(graph.shapes) == {"text_encoder": 2, "unet": 3 * 2 * 2}.get(name, 4)
        for profile, shape in zip(profiles, graph.shapes, strict=True):
            assert profile == {t.name: [list(t.shape)] * 3 for t in shape.spec.inputs}


def test_plans_are_recorded_under_the_machines_key(built: Path, device: TrtDevice) -> None:
    manifest = Manifest.load(built)
    (plans,) = manifest.targets[TENSORRT_TARGET].plans
    assert plans.key.compute_capability == "9.0" and plans.key.tensorrt_version == "10.3.0"
    assert plans.key.precision == "fp16"
    assert plans.key.shapes == manifest.targets[TENSORRT_TARGET].shapes_digest()
    assert plans.gpu == "Fake H200"
    for name, plan in plans.components.items():
        assert plan.plan_file == f"tensorrt/plans/{plans.key.folder_name}/{name}.plan"
        assert len(plan.device_memory) == len(manifest.targets[TENSORRT_TARGET].components[name].shapes)
    # A rebuild on the same machine replaces its set; another machine's set is kept beside it.
    build_plans(built, device=device, report=lambda line: None)
    trt, rt = fake_tensorrt_modules(compute_capability=(8, 7), name="Fake Orin")
    build_plans(built, device=TrtDevice(trt, CudaRuntime(rt)), report=lambda line: None)
    keys = [p.key.compute_capability for p in Manifest.load(built).targets[TENSORRT_TARGET].plans]
    assert keys == ["9.0", "8.7"]


def test_the_network_is_strongly_typed_and_the_workspace_limit_is_set(folder: Path, device: TrtDevice, monkeypatch):
    made: dict[str, list] = {"create_network": [], "create_builder_config": []}
    for method, kept in made.items():
        real = getattr(fake_tensorrt.Builder, method)

        def keeping(self, *args, real=real, kept=kept):
            kept.append(real(self, *args))
            return kept[-1]

        monkeypatch.setattr(fake_tensorrt.Builder, method, keeping)
    networks, configs = made["create_network"], made["create_builder_config"]
    build_plans(folder, BuildOptions(workspace_gb=1.5, optimization_level=4), device=device, report=lambda line: None)
    assert len(networks) == 4
    assert all(n.flags == 1 << int(fake_tensorrt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) for n in networks)
    assert all(c.pools == {int(fake_tensorrt.MemoryPoolType.WORKSPACE): int(1.5 * 2**30)} for c in configs)
    assert all(c.builder_optimization_level == 4 for c in configs)


def test_the_timing_cache_is_kept_beside_the_plans_and_reused(folder: Path, device: TrtDevice, tmp_path: Path):
    build_plans(folder, device=device, report=lambda line: None)
    cache = folder / "tensorrt" / "plans" / "sm90-trt10.3.0.timing-cache"
    assert len(json.loads(cache.read_bytes())) == 4  # each component's build timed into it
    build_plans(folder, device=device, report=lambda line: None)
    assert len(json.loads(cache.read_bytes())) == 8  # the second build started from the first's
    elsewhere = tmp_path / "my.cache"
    build_plans(folder, BuildOptions(timing_cache=str(elsewhere)), device=device, report=lambda line: None)
    assert len(json.loads(elsewhere.read_bytes())) == 4


def test_build_reports_progress(folder: Path, device: TrtDevice) -> None:
    lines: list[str] = []
    build_plans(folder, device=device, report=lines.append)
    assert any("unet: Building engine" in line for line in lines)
    unet_shapes = len(Manifest.load(folder).targets[TENSORRT_TARGET].components["unet"].shapes)
    assert any(f"unet: {unet_shapes} profile(s)" in line for line in lines)


def test_a_graph_the_parser_refuses_fails_the_build_naming_the_node(folder: Path, device: TrtDevice) -> None:
    path = folder / "tensorrt" / "unet.onnx"
    model = onnx.load(str(path), load_external_data=False)
    model.graph.node[3].domain = "com.microsoft"
    onnx.save(model, str(path))
    node = model.graph.node[3]
    with pytest.raises(PlanBuildError, match=rf"unet: .*node 3 \({node.op_type} '{re.escape(node.name)}'"):
        build_plans(folder, device=device, report=lambda line: None)


# --- Refusing plans that are not this machine's -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "compute_capability"), [("10.3.0", (8, 7)), ("10.4.0", (9, 0)), ("11.4.0.106", (9, 0))]
)
def test_a_plan_for_another_gpu_or_tensorrt_is_refused_with_the_command_to_rebuild(
    built: Path, version: str, compute_capability: tuple[int, int], monkeypatch
) -> None:
    trt, rt = fake_tensorrt_modules(version, compute_capability=compute_capability)
    other = TrtDevice(trt, CudaRuntime(rt))
    deserialised = []
    monkeypatch.setattr(fake_tensorrt.Runtime, "deserialize_cuda_engine", lambda s, b: deserialised.append(b))
    with pytest.raises(PlanMismatchError, match=rf"diffuserve build-engines {built}") as refused:
        load_tensorrt_engines(built, Manifest.load(built), TEXT_TO_IMAGE, device=other)
    assert "compute capability 9.0, TensorRT 10.3.0" in str(refused.value)  # what the folder has
    assert not deserialised  # never deserialised blind


def test_a_plan_changed_since_it_was_built_is_refused_before_deserialising(built: Path, device: TrtDevice) -> None:
    plan = Manifest.load(built).targets[TENSORRT_TARGET].plans[0].components[UNET]
    (built / plan.plan_file).write_bytes((built / plan.plan_file).read_bytes() + b" ")
    with pytest.raises(PlanMismatchError, match="sha256 differs"):
        load_tensorrt_engines(built, Manifest.load(built), TEXT_TO_IMAGE, device=device)


def test_plans_for_other_shapes_are_refused(built: Path, device: TrtDevice) -> None:
    manifest = Manifest.load(built)
    target = manifest.targets[TENSORRT_TARGET]
    from dataclasses import replace

    fewer = {**target.components, UNET: replace(target.components[UNET], shapes=target.components[UNET].shapes[:2])}
    changed = replace(manifest, targets={**manifest.targets, TENSORRT_TARGET: replace(target, components=fewer)})
    with pytest.raises(PlanMismatchError, match="no TensorRT plans for this machine"):
        load_tensorrt_engines(built, changed, TEXT_TO_IMAGE, device=device)


# --- Running ---------------------------------------------------------------------------------------------------------


def test_each_context_is_set_up_in_the_order_tensorrt_requires(built: Path, device: TrtDevice) -> None:
    engines = load_tensorrt_engines(built, Manifest.load(built), TEXT_TO_IMAGE, device=device)
    engine = engines["vae_decoder"][2]
    engine.run({t.name: np.zeros(t.shape, t.np_dtype) for t in engine.spec.inputs})
    calls = engine._context.calls
    inputs, tensors = len(engine.spec.inputs), len(engine.spec.inputs) + len(engine.spec.outputs)
    assert engine._context.strategy == fake_tensorrt.ExecutionContextAllocationStrategy.USER_MANAGED
    assert calls[0] == "set_optimization_profile_async" and engine._context.profile == 2
    assert calls[1 : 1 + inputs] == ["set_input_shape"] * inputs
    assert calls[1 + inputs : 1 + inputs + tensors] == ["set_tensor_address"] * tensors
    assert "set_device_memory" in calls[1 + inputs + tensors :] and calls[-1] == "execute_async_v3"


def test_buffers_are_allocated_once_per_profile_at_its_shapes(built: Path, device: TrtDevice, fake) -> None:
    _, rt = fake
    engines = load_tensorrt_engines(built, Manifest.load(built), TEXT_TO_IMAGE, device=device)
    allocations = len(rt.allocations)
    for component in engines.values():
        for engine in component:
            tensors = (*engine.spec.inputs, *engine.spec.outputs)
            for t in tensors:
                binding = engine._inputs.get(t.name) or engine._outputs[t.name]
                nbytes = int(np.prod(t.shape)) * t.np_dtype.itemsize
                assert binding.device.nbytes == binding.host.nbytes == nbytes
                assert binding.host.array.shape == t.shape and binding.host.array.dtype == t.np_dtype
                assert engine._context.addresses[t.name] == binding.device.ptr
            for _ in range(2):
                engine.run({t.name: np.zeros(t.shape, t.np_dtype) for t in engine.spec.inputs})
    assert len(rt.allocations) == allocations  # running allocates nothing


def test_every_context_shares_one_activation_block_of_the_largest_size(built: Path, device: TrtDevice, fake) -> None:
    _, rt = fake
    # The text encoder first: the U-Net's larger profiles then move every context to a larger block.
    engines = load_tensorrt_engines(built, Manifest.load(built), TEXT_TO_IMAGE, device=device)
    contexts = [e._context for component in engines.values() for e in component]
    needs = [c.engine.get_device_memory_size_for_profile_v2(c.profile) for c in contexts]
    assert len({c.device_memory for c in contexts}) == 1
    pointer, size = contexts[0].device_memory
    assert size == max(needs) == device.activations.size
    assert rt.allocations[pointer][0] == "device" and rt.allocations[pointer][1].nbytes == size
    freed = [address for address in rt.allocations if rt.allocations[address][1].nbytes == size]
    assert freed == [pointer]  # the smaller blocks went when the larger came


def test_the_unet_is_captured_after_its_first_eager_run_and_replayed(built: Path, device: TrtDevice, fake) -> None:
    _, rt = fake
    engines = load_tensorrt_engines(built, Manifest.load(built), TEXT_TO_IMAGE, device=device)
    unet = engines[UNET][1]
    rng = np.random.default_rng(0)
    feeds = [{t.name: rng.standard_normal(t.shape).astype(t.dtype) for t in unet.spec.inputs} for _ in range(3)]
    first = unet.run(feeds[0])
    assert unet.uses_cuda_graph and unet._context.executions == 1  # eager, then captured (capturing runs nothing)
    rt.calls.clear()
    second = unet.run(feeds[1])
    assert "cudaGraphLaunch" in rt.calls and unet._context.executions == 2
    assert not np.array_equal(first["model_output"], second["model_output"])  # the replay read the new inputs
    assert graph_replay_difference(unet, feeds) == 0.0
    # The other components run eagerly every time.
    text = engines["text_encoder"][0]
    for _ in range(2):
        text.run({t.name: np.zeros(t.shape, t.np_dtype) for t in text.spec.inputs})
    assert not text.uses_cuda_graph


def test_without_cuda_graphs_the_unet_runs_eagerly(built: Path, device: TrtDevice) -> None:
    engines = load_tensorrt_engines(built, Manifest.load(built), (UNET,), TrtOptions(cuda_graph=False), device=device)
    unet = engines[UNET][0]
    for _ in range(3):
        unet.run({t.name: np.zeros(t.shape, t.np_dtype) for t in unet.spec.inputs})
    assert not unet.uses_cuda_graph and unet._context.executions == 3


def test_a_failed_capture_leaves_the_engine_eager_and_right(built: Path, device: TrtDevice, fake, caplog) -> None:
    _, rt = fake
    rt.fail["cudaStreamEndCapture"] = fake_tensorrt.cudaError_t.cudaErrorStreamCaptureUnsupported
    unet = load_tensorrt_engines(built, Manifest.load(built), (UNET,), device=device)[UNET][0]
    feeds = {t.name: np.ones(t.shape, t.np_dtype) for t in unet.spec.inputs}
    outputs = [unet.run(feeds)["model_output"] for _ in range(3)]
    assert not unet.uses_cuda_graph and "cudaErrorStreamCaptureUnsupported" in caplog.text
    assert all(np.array_equal(outputs[0], o) for o in outputs)


def render_on(folder: Path, engines: dict, target: str, size: tuple[int, int]) -> np.ndarray:
    from diffuserve.server.models import served_model
    from diffuserve.server.params import validate
    from diffuserve.server.pipeline import render
    from diffuserve.v1 import diffusion_pb2 as pb

    manifest = Manifest.load(folder)
    loaded = LoadedEngines(manifest, "tensorrt", target, engines, (), "")
    served = served_model(folder, loaded)
    request = pb.GenerateRequest(prompt="a red circle", seeds=[1, 2], steps=4, width=size[0], height=size[1])
    return render(served, validate(request, {served.name: served}, served.name))


def test_images_through_the_tensorrt_engines_are_those_of_the_same_graphs(built: Path, device: TrtDevice) -> None:
    """Every byte in and out passes through the bindings, copies and CUDA graphs under test."""
    manifest = Manifest.load(built)
    target = manifest.targets[TENSORRT_TARGET]
    on_cpu = {
        name: load_component_engines(
            built / target.components[name].graph_file, [s.spec for s in target.components[name].shapes], "cpu"
        )
        for name in TEXT_TO_IMAGE
    }
    on_trt = load_tensorrt_engines(built, manifest, TEXT_TO_IMAGE, device=device)
    for size in manifest.sizes:
        expected = render_on(built, on_cpu, TENSORRT_TARGET, size)
        np.testing.assert_array_equal(render_on(built, on_trt, TENSORRT_TARGET, size), expected)


# --- The backend, through the loader and the server -------------------------------------------------------------


def test_the_tensorrt_backend_serves_over_grpc(built: Path, installed) -> None:
    import grpc

    from diffuserve.server.app import BackgroundServer, ServerConfig
    from diffuserve.server.models import served_model
    from diffuserve.v1 import diffusion_pb2 as pb
    from diffuserve.v1 import diffusion_pb2_grpc as pb_grpc

    loaded = load_engines(built, TEXT_TO_IMAGE, "tensorrt")
    assert loaded.backend == "tensorrt" and loaded.device == "Fake H200"
    model = served_model(built, loaded)
    config = ServerConfig(model_dirs=(str(built),), host="127.0.0.1", port=0, backend="tensorrt")
    with BackgroundServer(config, {model.name: model}) as running, grpc.insecure_channel(running.address) as channel:
        stub = pb_grpc.DiffusionServiceStub(channel)
        response = stub.Generate(pb.GenerateRequest(prompt="a red circle", steps=3, seeds=[5]), timeout=60)
        assert len(response.images) == 1 and response.images[0].seed == 5
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        assert info.target == "tensorrt" and info.device == "Fake H200"


def test_auto_prefers_tensorrt_when_it_runs_and_says_why_when_it_does_not(folder: Path, installed) -> None:
    loaded = load_engines(folder, TEXT_TO_IMAGE, "auto")  # no plans built for this machine yet
    assert loaded.backend == "cpu" and "build-engines" in loaded.reason
    trt, rt = installed
    build_plans(folder, device=TrtDevice.shared(), report=lambda line: None)
    loaded = load_engines(folder, TEXT_TO_IMAGE, "auto")
    assert loaded.backend == "tensorrt" and "tensorrt" in loaded.reason


def test_build_missing_builds_the_plans_at_start(folder: Path, installed) -> None:
    with pytest.raises(PlanMismatchError):
        load_engines(folder, TEXT_TO_IMAGE, "tensorrt")
    loaded = load_engines(folder, TEXT_TO_IMAGE, "tensorrt", trt_options=TrtOptions(build_missing=True))
    assert loaded.backend == "tensorrt" and Manifest.load(folder).targets[TENSORRT_TARGET].plans


def test_a_folder_without_the_tensorrt_target_is_refused_naming_the_flag(tiny_export: Path, installed) -> None:
    with pytest.raises(ValueError, match="--target tensorrt"):
        load_engines(tiny_export, TEXT_TO_IMAGE, "tensorrt")


# --- What this machine really has -------------------------------------------------------------------------------


def test_without_tensorrt_the_backend_says_what_to_install() -> None:
    pytest.importorskip("cuda.bindings.runtime")
    reason = tensorrt_unavailable_reason()
    assert reason is not None
    assert "diffuserve[tensorrt]" in reason or "CUDA does not run here" in reason


def test_a_failing_cuda_call_is_an_error_naming_the_call_and_cudas_error() -> None:
    runtime = pytest.importorskip("cuda.bindings.runtime")
    cuda = CudaRuntime(runtime)
    if runtime.cudaGetDeviceCount()[0] == runtime.cudaError_t.cudaSuccess:
        pytest.skip("CUDA works here")
    with pytest.raises(CudaError, match=r"cudaGetDeviceCount failed: cudaError\w+"):
        cuda.device_count()
    lean = pytest.importorskip("tensorrt_lean")
    with pytest.raises(BackendUnavailableError, match="CUDA does not run here: cudaGetDeviceCount failed"):
        TrtDevice(lean, cuda)


# --- The stand-ins are pinned to the real APIs -----------------------------------------------------------------

# What the builder half of TensorRT is called through: its classes are not in the lean runtime, the one part of
# TensorRT that installs here, so these names come from TensorRT's Python API documentation (10.x and 11.x).
BUILDER_API = {
    "FakeTensorRT": {"Builder", "OnnxParser", "NetworkDefinitionCreationFlag"},
    "Builder": {"create_network", "create_builder_config", "create_optimization_profile", "build_serialized_network"},
    "OnnxParser": {"parse_from_file", "num_errors", "get_error"},
    "ParserError": {"node", "node_name", "node_operator", "desc"},
    "NetworkDefinitionCreationFlag": {"STRONGLY_TYPED"},
    "IBuilderConfig": {
        "set_memory_pool_limit",
        "builder_optimization_level",
        "create_timing_cache",
        "set_timing_cache",
        "get_timing_cache",
        "add_optimization_profile",
        "progress_monitor",
    },
}


def real_counterpart(lean, runtime, owner: str):
    if owner == "FakeTensorRT":
        return lean
    if owner == "FakeCudaRuntime":
        return runtime
    if owner == "Severity":
        return lean.ILogger.Severity
    return getattr(runtime, owner, None) or getattr(lean, owner)


def test_every_name_the_runtime_uses_exists_on_the_real_tensorrt_and_cuda_python(
    built: Path, device: TrtDevice, fake
) -> None:
    lean = pytest.importorskip("tensorrt_lean", reason="the dev extra installs tensorrt-lean-cu13")
    runtime = pytest.importorskip("cuda.bindings.runtime", reason="the dev extra installs cuda-python")
    # One whole flow, recorded: build, load, run (eager, capture, replay), and the release of everything.
    fake_tensorrt.ACCESSED.clear()
    trt, rt = fake_tensorrt_modules()
    fresh = TrtDevice(trt, CudaRuntime(rt))
    build_plans(built, device=fresh, report=lambda line: None)
    engines = load_tensorrt_engines(built, Manifest.load(built), TEXT_TO_IMAGE, device=fresh)
    for engine in engines[UNET][:1]:
        for _ in range(3):
            engine.run({t.name: np.zeros(t.shape, t.np_dtype) for t in engine.spec.inputs})
    del engines
    accessed = set(fake_tensorrt.ACCESSED)
    assert ("IExecutionContext", "execute_async_v3") in accessed and ("FakeCudaRuntime", "cudaGraphLaunch") in accessed
    missing, unlisted = [], []
    for owner, name in sorted(accessed):
        if name in BUILDER_API.get(owner, ()):
            continue
        if owner in BUILDER_API and owner != "FakeTensorRT":
            unlisted.append((owner, name))
        elif not hasattr(real_counterpart(lean, runtime, owner), name):
            missing.append((owner, name))
    assert not missing, f"the stand-ins offer names the real APIs lack: {missing}"
    assert not unlisted, f"builder calls not in BUILDER_API (check TensorRT's documentation, then add): {unlisted}"
    assert hasattr(lean, "__version__")
    # The classes diffuserve derives from the real ones build and take the methods TensorRT calls.
    logger = trt_module.make_logger(lean)
    assert isinstance(logger, lean.ILogger) and hasattr(lean.ILogger, "log")
    from diffuserve.engine.trt_build import make_progress_monitor

    monitor = make_progress_monitor(lean, "unet", lambda line: None)
    assert isinstance(monitor, lean.IProgressMonitor)
    for method in ("phase_start", "step_complete", "phase_finish"):
        assert hasattr(lean.IProgressMonitor, method)


# --- On a real GPU with TensorRT ---------------------------------------------------------------------------------

TENSORRT_REASON = None if shutil.which("nvidia-smi") is None else tensorrt_unavailable_reason()
requires_tensorrt = pytest.mark.skipif(
    shutil.which("nvidia-smi") is None or TENSORRT_REASON is not None,
    reason=f"needs an NVIDIA GPU and TensorRT: {TENSORRT_REASON or 'no nvidia-smi here'}",
)


@pytest.mark.gpu
@pytest.mark.tensorrt
@requires_tensorrt
def test_on_the_gpu_plans_build_and_agree_with_the_cuda_target(tiny_source: Path, tmp_path: Path) -> None:
    from diffuserve.engine.ort_cuda import cuda_unavailable_reason
    from diffuserve.export.exporter import ExportOptions, export_model

    targets = ("cpu", "tensorrt") + (("cuda",) if cuda_unavailable_reason() is None else ())
    out = tmp_path / "model"
    export_model(tiny_source, out, ExportOptions(sizes=((128, 128),), batches=(1, 2), targets=targets))
    build_plans(out)
    manifest = Manifest.load(out)
    on_trt = load_tensorrt_engines(out, manifest, TEXT_TO_IMAGE)
    reference_target = "cuda" if "cuda" in targets else "cpu"
    reference = manifest.targets[reference_target]
    rng = np.random.default_rng(0)
    for name in TEXT_TO_IMAGE:
        specs = [s.spec for s in reference.components[name].shapes]
        backend = "cuda" if reference_target == "cuda" else "cpu"
        engines = load_component_engines(out / reference.components[name].graph_file, specs, backend)
        for spec, theirs, ours in zip(specs, engines, on_trt[name], strict=True):
            feeds = random_feeds(spec, rng)
            for output, expected in theirs.run(feeds).items():
                actual = ours.run(feeds)[output]
                assert np.max(np.abs(actual - expected)) <= 2e-2 * np.max(np.abs(expected)), (name, output)


@pytest.mark.gpu
@pytest.mark.tensorrt
@requires_tensorrt
def test_on_the_gpu_cuda_graph_replay_equals_eager(tiny_source: Path, tmp_path: Path) -> None:
    from diffuserve.export.exporter import ExportOptions, export_model

    out = tmp_path / "model"
    export_model(tiny_source, out, ExportOptions(sizes=((128, 128),), batches=(1,), targets=("cpu", "tensorrt")))
    build_plans(out)
    unet = load_tensorrt_engines(out, Manifest.load(out), (UNET,))[UNET][0]
    rng = np.random.default_rng(1)
    feeds = [{t.name: rng.standard_normal(t.shape).astype(t.dtype) for t in unet.spec.inputs} for _ in range(3)]
    output = unet.run(feeds[0])["model_output"]
    assert graph_replay_difference(unet, feeds) <= 1e-3 * float(np.max(np.abs(output)))
    assert unet.uses_cuda_graph


def test_low_memory_releases_a_stages_contexts_and_buffers(built: Path, installed) -> None:
    import gc

    _, rt = installed
    loaded = load_engines(built, TEXT_TO_IMAGE, "tensorrt", low_memory=True)
    manifest = Manifest.load(built)

    def host_buffers() -> int:
        gc.collect()
        return sum(1 for kind, _ in rt.allocations.values() if kind == "host")

    for component in TEXT_TO_IMAGE:
        engines = loaded.engines[component]
        tensors = sum(len(e.spec.inputs) + len(e.spec.outputs) for e in engines)
        del engines
        # Only the resident stage's buffers exist: the previous stage's went with its engines.
        assert host_buffers() == tensors, component
    expected = render_on(built, load_tensorrt_engines(built, manifest, TEXT_TO_IMAGE), TENSORRT_TARGET, (128, 128))
    np.testing.assert_array_equal(render_on(built, loaded.engines, TENSORRT_TARGET, (128, 128)), expected)


def test_build_missing_with_low_memory_builds_once(folder: Path, installed, monkeypatch) -> None:
    from diffuserve.engine import trt_build

    builds = []
    real = trt_build.build_plans
    monkeypatch.setattr(trt_build, "build_plans", lambda *a, **k: builds.append(1) or real(*a, **k))
    options = TrtOptions(build_missing=True)
    loaded = load_engines(folder, TEXT_TO_IMAGE, "tensorrt", trt_options=options, low_memory=True)
    for component in (*TEXT_TO_IMAGE, *TEXT_TO_IMAGE):
        assert loaded.engines[component]
    assert len(builds) == 1 and loaded.manifest.targets[TENSORRT_TARGET].plans
