"""The ONNX Runtime CUDA engine: the backend check, one copy of the weights, static sessions, IO binding, CUDA graphs.

Everything but the GPU itself runs here on real ONNX Runtime CPU sessions: the same classes take a device ("cpu")
and a provider. Tests marked `gpu` need a CUDA that really runs (onnxruntime-gpu, its libraries and a GPU) and are
skipped cleanly without one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from diffuserve.engine import nvml
from diffuserve.engine.manifest import (
    ENCODER_HIDDEN_STATES,
    INPUT_IDS,
    LAST_HIDDEN_STATE,
    LATENT_SAMPLE,
    MODEL_OUTPUT,
    SAMPLE,
    SYMBOLIC_AXES,
    TEXT_ENCODER,
    TIMESTEP,
    UNET,
    VAE_DECODER,
    ComponentSpec,
    TensorSpec,
)
from diffuserve.engine.ort import CPU, BackendUnavailableError
from diffuserve.engine.ort_cuda import (
    ON_CPU,
    CpuPlacementError,
    CudaOptions,
    IoBinding,
    NodePlacement,
    Placement,
    SharedWeights,
    build_engines,
    cuda_library_sonames,
    cuda_unavailable_reason,
    graph_replay_difference,
    load_cuda_engines,
    non_owning_view,
    placements_by_profile,
    placements_from_assignment,
    placements_from_profile,
    read_initializers,
    unloadable_libraries,
)

CUDA_REASON = cuda_unavailable_reason()
requires_cuda = pytest.mark.skipif(CUDA_REASON is not None, reason=f"no working CUDA: {CUDA_REASON}")

# An IR version every onnxruntime-gpu this project allows reads (1.31 reads up to 13; onnx 1.23 writes 14).
IR_VERSION = 10
OPSET = 17
HIDDEN = 32  # decoder channels: its Conv weight is 4.5 KiB, its MatMul weight 1.5 KiB, both shared
DECODED = 3 * 2 * 2  # channels before DepthToSpace(2) makes 3-channel images twice the latent size
TOKENS = 16
CONTEXT = (8, 32)  # the U-Net's encoder_hidden_states: sequence, width


def _value(name: str, elem: int, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, dims)


def _axes(component: str, tensor: str, rank: int, static: dict[int, int]) -> list:
    """A tensor's dims as the manifest names its symbolic axes, the other axes static."""
    names = SYMBOLIC_AXES[component][tensor]
    return [names.get(axis, static.get(axis)) for axis in range(rank)]


def save(model: onnx.ModelProto, path: Path, external: bool = True) -> Path:
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    if external:
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save(model, str(path))
    return path


def decoder_model(fp16: bool = False) -> onnx.ModelProto:
    """A VAE-decoder-shaped graph: Conv, MatMul over channels, Add, DepthToSpace; fp16 inside when asked, fp32 I/O."""
    rng = np.random.default_rng(0)
    dtype, elem = (np.float16, TensorProto.FLOAT16) if fp16 else (np.float32, TensorProto.FLOAT)
    weights = {
        "conv.weight": rng.standard_normal((HIDDEN, 4, 3, 3)) * 0.2,
        "conv.bias": rng.standard_normal(HIDDEN) * 0.1,
        "proj.weight": rng.standard_normal((HIDDEN, DECODED)) * 0.2,
        "proj.bias": rng.standard_normal(DECODED) * 0.1,
    }
    initializers = [numpy_helper.from_array(w.astype(dtype), name) for name, w in weights.items()]
    x = LATENT_SAMPLE
    nodes = []
    if fp16:
        nodes.append(helper.make_node("Cast", [x], ["x16"], name="cast_in", to=elem))
        x = "x16"
    nodes += [
        helper.make_node("Conv", [x, "conv.weight", "conv.bias"], ["h"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Transpose", ["r"], ["nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["nhwc", "proj.weight"], ["m"], name="proj"),
        helper.make_node("Add", ["m", "proj.bias"], ["a"], name="proj_bias"),
        helper.make_node("Transpose", ["a"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("DepthToSpace", ["nchw"], ["y16" if fp16 else SAMPLE], name="upsample", blocksize=2),
    ]
    if fp16:
        nodes.append(helper.make_node("Cast", ["y16"], [SAMPLE], name="cast_out", to=TensorProto.FLOAT))
    graph = helper.make_graph(
        nodes,
        VAE_DECODER,
        [_value(LATENT_SAMPLE, TensorProto.FLOAT, _axes(VAE_DECODER, LATENT_SAMPLE, 4, {1: 4}))],
        [_value(SAMPLE, TensorProto.FLOAT, _axes(VAE_DECODER, SAMPLE, 4, {1: 3}))],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def unet_model() -> onnx.ModelProto:
    """A U-Net-shaped graph: the sample convolved, conditioned on the timestep and the pooled text context."""
    rng = np.random.default_rng(1)
    weights = {
        "conv_in.weight": rng.standard_normal((16, 4, 3, 3)) * 0.2,
        "context.weight": rng.standard_normal((CONTEXT[1], 16)) * 0.2,
        "time.weight": rng.standard_normal((1, 16)) * 0.01,
        "conv_out.weight": rng.standard_normal((4, 16, 3, 3)) * 0.2,
    }
    initializers = [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()]
    initializers += [
        numpy_helper.from_array(np.array([1], np.int64), "axis_1"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "axes_2_3"),
    ]
    nodes = [
        helper.make_node("Conv", [SAMPLE, "conv_in.weight"], ["h"], name="conv_in", pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", [ENCODER_HIDDEN_STATES], ["pooled"], name="pool", axes=[1], keepdims=0),
        helper.make_node("MatMul", ["pooled", "context.weight"], ["c"], name="context"),
        helper.make_node("Unsqueeze", [TIMESTEP, "axis_1"], ["t"], name="time_unsqueeze"),
        helper.make_node("Mul", ["t", "time.weight"], ["te"], name="time"),
        helper.make_node("Add", ["c", "te"], ["cond"], name="cond"),
        helper.make_node("Unsqueeze", ["cond", "axes_2_3"], ["cond4"], name="cond_unsqueeze"),
        helper.make_node("Add", ["h", "cond4"], ["hc"], name="condition"),
        helper.make_node("Relu", ["hc"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "conv_out.weight"], [MODEL_OUTPUT], name="conv_out", pads=[1, 1, 1, 1]),
    ]
    inputs = [
        _value(SAMPLE, TensorProto.FLOAT, _axes(UNET, SAMPLE, 4, {1: 4})),
        _value(TIMESTEP, TensorProto.FLOAT, _axes(UNET, TIMESTEP, 1, {})),
        _value(
            ENCODER_HIDDEN_STATES,
            TensorProto.FLOAT,
            _axes(UNET, ENCODER_HIDDEN_STATES, 3, dict(enumerate(CONTEXT, 1))),
        ),
    ]
    outputs = [_value(MODEL_OUTPUT, TensorProto.FLOAT, _axes(UNET, MODEL_OUTPUT, 4, {1: 4}))]
    graph = helper.make_graph(nodes, UNET, inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def text_encoder_model(vocab: int, width: int) -> onnx.ModelProto:
    """A text-encoder-shaped graph whose token table (vocab x width fp32) dominates its weights, as in CLIP."""
    rng = np.random.default_rng(2)
    table = rng.standard_normal((vocab, width), dtype=np.float32)
    proj = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["token_embedding", INPUT_IDS], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "proj.weight"], [LAST_HIDDEN_STATE], name="proj"),
    ]
    graph = helper.make_graph(
        nodes,
        TEXT_ENCODER,
        [_value(INPUT_IDS, TensorProto.INT32, _axes(TEXT_ENCODER, INPUT_IDS, 2, {1: TOKENS}))],
        [
            _value(
                LAST_HIDDEN_STATE, TensorProto.FLOAT, _axes(TEXT_ENCODER, LAST_HIDDEN_STATE, 3, {1: TOKENS, 2: width})
            )
        ],
        [numpy_helper.from_array(table, "token_embedding"), numpy_helper.from_array(proj, "proj.weight")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def decoder_spec(batch: int, latent: int) -> ComponentSpec:
    return ComponentSpec(
        VAE_DECODER,
        (TensorSpec(LATENT_SAMPLE, (batch, 4, latent, latent), "float32"),),
        (TensorSpec(SAMPLE, (batch, 3, 2 * latent, 2 * latent), "float32"),),
    )


def unet_spec(batch: int, latent: int) -> ComponentSpec:
    return ComponentSpec(
        UNET,
        (
            TensorSpec(SAMPLE, (batch, 4, latent, latent), "float32"),
            TensorSpec(TIMESTEP, (batch,), "float32"),
            TensorSpec(ENCODER_HIDDEN_STATES, (batch, *CONTEXT), "float32"),
        ),
        (TensorSpec(MODEL_OUTPUT, (batch, 4, latent, latent), "float32"),),
    )


def text_encoder_spec(batch: int, width: int) -> ComponentSpec:
    return ComponentSpec(
        TEXT_ENCODER,
        (TensorSpec(INPUT_IDS, (batch, TOKENS), "int32"),),
        (TensorSpec(LAST_HIDDEN_STATE, (batch, TOKENS, width), "float32"),),
    )


def random_feeds(spec: ComponentSpec, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        t.name: rng.integers(0, 100, t.shape).astype(t.np_dtype)
        if t.dtype.startswith("int")
        else rng.standard_normal(t.shape).astype(t.np_dtype)
        for t in spec.inputs
    }


def reference(graph: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph on a plain CPU session with its dimensions left symbolic."""
    session = ort.InferenceSession(str(graph), providers=[CPU])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("graphs")
    return {
        "decoder": save(decoder_model(), folder / "vae_decoder.onnx"),
        "decoder_embedded": save(decoder_model(), folder / "vae_decoder_embedded.onnx", external=False),
        "decoder_fp16": save(decoder_model(fp16=True), folder / "vae_decoder_fp16.onnx"),
        "unet": save(unet_model(), folder / "unet.onnx"),
    }


# --- The backend check ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(CUDA_REASON is None, reason="CUDA really runs here")
def test_without_a_working_cuda_loading_fails_first_naming_what_to_install(tmp_path: Path) -> None:
    # The graph does not even exist: the check comes before anything is read or allocated.
    with pytest.raises(BackendUnavailableError, match=r"--backend cpu") as refused:
        load_cuda_engines(tmp_path / "missing.onnx", [decoder_spec(1, 8)], CudaOptions())
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "CPU build" in str(refused.value)
        assert "diffuserve[cuda]" in str(refused.value) and "never both" in str(refused.value)
    else:
        # onnxruntime-gpu without its libraries or a GPU: the message names the libraries that fail to load.
        assert "fail to load" in str(refused.value) or "nvidia-smi" in str(refused.value)


def test_the_cuda_libraries_probed_follow_the_cuda_major_version() -> None:
    assert cuda_library_sonames(12) == (
        "libcuda.so.1",
        "libcudart.so.12",
        "libcublasLt.so.12",
        "libcublas.so.12",
        "libcurand.so.10",
        "libcufft.so.11",
        "libcudnn.so.9",
    )
    assert {"libcudart.so.13", "libcublasLt.so.13", "libcufft.so.12", "libcudnn.so.9"} <= set(cuda_library_sonames(13))


def test_only_libraries_that_do_not_load_are_reported() -> None:
    missing = unloadable_libraries(["libc.so.6", "libdiffuserve-absent.so.7"])
    assert list(missing) == ["libdiffuserve-absent.so.7"]
    assert "libdiffuserve-absent.so.7" in missing["libdiffuserve-absent.so.7"]


# --- Provider options -----------------------------------------------------------------------------------------------


def test_default_provider_options_are_the_documented_ones() -> None:
    assert CudaOptions().provider_options(cuda_graph=False) == {
        "device_id": "0",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "cudnn_conv_use_max_workspace": "1",
        "prefer_nhwc": "0",
        "use_tf32": "1",
        "arena_extend_strategy": "kSameAsRequested",
        "enable_cuda_graph": "0",
    }


def test_options_map_to_provider_strings_and_extra_options_pass_through_over_them() -> None:
    options = CudaOptions(
        device_id=1,
        cudnn_conv_algo_search="HEURISTIC",
        cudnn_conv_use_max_workspace=False,
        prefer_nhwc=True,
        use_tf32=False,
        extra={"sdpa_kernel": 2, "arena_extend_strategy": "kNextPowerOfTwo"},
    )
    assert options.provider_options(cuda_graph=True) == {
        "device_id": "1",
        "cudnn_conv_algo_search": "HEURISTIC",
        "cudnn_conv_use_max_workspace": "0",
        "prefer_nhwc": "1",
        "use_tf32": "0",
        "arena_extend_strategy": "kNextPowerOfTwo",
        "enable_cuda_graph": "1",
        "sdpa_kernel": "2",
    }


def test_cuda_graphs_are_for_the_unet_only_and_can_be_turned_off() -> None:
    assert CudaOptions().uses_cuda_graph(unet_spec(2, 8))
    assert not CudaOptions().uses_cuda_graph(decoder_spec(1, 8))
    assert not CudaOptions(cuda_graph=False).uses_cuda_graph(unet_spec(2, 8))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cudnn_conv_algo_search": "FASTEST"}, r"cudnn_conv_algo_search must be one of .*'FASTEST'"),
        ({"arena_extend_strategy": "grow"}, r"arena_extend_strategy must be one of"),
        ({"device_id": -1}, r"device_id must be >= 0, got -1"),
        (
            {"extra": {"enable_cuda_graph": "1"}},
            r"\['enable_cuda_graph'\] are set through CudaOptions \['cuda_graph'\]",
        ),
        ({"extra": {"device_id": "1"}}, r"\['device_id'\] are set through CudaOptions \['device_id'\]"),
    ],
)
def test_bad_options_are_refused_naming_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CudaOptions(**kwargs)


# --- One copy of the weights ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("graph", ["decoder", "decoder_embedded"])
def test_initializers_of_a_kib_or_more_are_read_from_external_data_or_the_graph(
    graphs: dict[str, Path], graph: str
) -> None:
    arrays = read_initializers(graphs[graph])
    expected = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(graphs[graph])).graph.initializer}
    assert sorted(arrays) == ["conv.weight", "proj.weight"]  # the biases are under 1 KiB
    for name, array in arrays.items():
        np.testing.assert_array_equal(array, expected[name])
    assert isinstance(arrays["conv.weight"], np.memmap) == (graph == "decoder")


def test_weights_that_ort_folds_per_session_are_not_shared(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # ORT folds Cast(weight) into a new constant in every session and drops the weight, user-supplied or not.
    weight = numpy_helper.from_array(np.ones((64, 64), np.float16), "w16")
    nodes = [
        helper.make_node("Cast", ["w16"], ["w32"], name="cast_weight", to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "w32"], ["y"], name="mm"),
    ]
    x, y = _value("x", TensorProto.FLOAT, ["batch", 64]), _value("y", TensorProto.FLOAT, ["batch", 64])
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], [weight]), opset_imports=[helper.make_opsetid("", OPSET)]
    )
    graph = save(model, tmp_path / "cast.onnx")
    assert read_initializers(graph) == {}
    assert "1 weight tensor(s) feed only nodes ORT folds into constants" in caplog.text and "w16" in caplog.text


def test_initializers_outside_the_graph_folder_are_refused(tmp_path: Path, graphs: dict[str, Path]) -> None:
    model = onnx.load(str(graphs["decoder"]), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../elsewhere.data"
    onnx.save(model, str(tmp_path / "escaping.onnx"))
    with pytest.raises(ValueError, match=r"external data '../elsewhere.data' is outside"):
        read_initializers(tmp_path / "escaping.onnx")


def test_an_owning_ortvalue_is_refused_as_a_shared_initializer_and_its_view_is_not() -> None:
    owner = ort.OrtValue.ortvalue_from_shape_and_type([64, 64], np.float32, "cpu", 0)
    with pytest.raises(Exception, match="must be owned by the user"):
        ort.SessionOptions().add_initializer("w", owner)
    view = non_owning_view(ort, owner)
    assert view.data_ptr() == owner.data_ptr()
    ort.SessionOptions().add_initializer("w", view)


def test_the_view_through_the_binding_underneath_is_the_same_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    # onnxruntime 1.21-1.30 have DLPack only in the binding, not on the public OrtValue: take that path here.
    owner = ort.OrtValue.ortvalue_from_numpy(np.arange(8, dtype=np.float32).reshape(2, 4))
    monkeypatch.delattr(ort.OrtValue, "from_dlpack")
    view = non_owning_view(ort, owner)
    assert view.data_ptr() == owner.data_ptr()
    np.testing.assert_array_equal(view.numpy(), owner.numpy())


def test_ort_uses_the_shared_weights_in_place(graphs: dict[str, Path]) -> None:
    # ORT says at INFO level which user-supplied initializers it took without copying (session_state_utils.cc); its
    # log goes to the process's stderr, hence a child process. Optimisation stops short of level 3 here: the CPU's
    # NCHWc layout rewrites Conv weights into new per-session tensors ("Removing initializer 'conv.weight'"), as a
    # layout change on the GPU would (CudaOptions.prefer_nhwc).
    code = (
        "import onnxruntime as ort\n"
        "from diffuserve.engine.ort_cuda import SharedWeights\n"
        f"graph = {str(graphs['decoder'])!r}\n"
        "options = ort.SessionOptions()\n"
        "options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED\n"
        "options.log_severity_level = 0\n"
        "weights = SharedWeights.load(graph, device='cpu')\n"
        "weights.add_to(options)\n"
        "ort.InferenceSession(graph, options, providers=['CPUExecutionProvider'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    for name in ("conv.weight", "proj.weight"):
        assert f"Using user supplied initializer with name ({name})" in done.stderr
    assert "Cannot use user supplied initializer" not in done.stderr


def test_shared_weights_hold_the_large_initializers_once(graphs: dict[str, Path]) -> None:
    weights = SharedWeights.load(graphs["decoder"], device="cpu")
    assert sorted(weights.views) == ["conv.weight", "proj.weight"]
    assert weights.nbytes == (HIDDEN * 4 * 9 + HIDDEN * DECODED) * 4
    np.testing.assert_array_equal(
        weights.views["proj.weight"].numpy(), read_initializers(graphs["decoder"])["proj.weight"]
    )


# --- Static sessions over the shared weights ------------------------------------------------------------------------


def test_every_shape_gets_a_static_session_over_one_weights_object(graphs: dict[str, Path]) -> None:
    specs = [decoder_spec(1, 8), decoder_spec(4, 8), decoder_spec(1, 12)]
    engines = build_engines(graphs["decoder"], specs, CudaOptions(), ON_CPU)
    assert [e.spec for e in engines] == specs
    assert len({id(e.weights) for e in engines}) == 1
    for engine in engines:
        assert engine.session.get_inputs()[0].shape == list(engine.spec.inputs[0].shape)
        assert (engine.backend, engine.providers[0], engine.uses_cuda_graph) == ("cpu", CPU, False)
        feeds = random_feeds(engine.spec, seed=engine.spec.batch_size)
        np.testing.assert_allclose(engine.run(feeds)[SAMPLE], reference(graphs["decoder"], feeds)[SAMPLE], atol=1e-5)


def test_a_unet_engine_without_cuda_takes_no_cuda_graph(graphs: dict[str, Path]) -> None:
    (engine,) = build_engines(graphs["unet"], [unet_spec(2, 8)], CudaOptions(cuda_graph=True), ON_CPU)
    assert not engine.uses_cuda_graph
    with pytest.raises(ValueError, match="does not use a CUDA graph"):
        graph_replay_difference(engine, [random_feeds(engine.spec, 0)])
    feeds = random_feeds(engine.spec, 0)
    np.testing.assert_allclose(
        engine.run(feeds)[MODEL_OUTPUT], reference(graphs["unet"], feeds)[MODEL_OUTPUT], atol=1e-5
    )


# --- IO binding -----------------------------------------------------------------------------------------------------


def test_io_bound_runs_equal_plain_runs_call_after_call(graphs: dict[str, Path]) -> None:
    spec = unet_spec(2, 8)
    session = ort.InferenceSession(str(graphs["unet"]), providers=[CPU])
    bound = IoBinding(session, spec, device="cpu")
    results = []
    for seed in range(4):
        feeds = random_feeds(spec, seed)
        results.append((bound.run(feeds), session.run([MODEL_OUTPUT], feeds)[0]))
    # Compared after every call, so an output aliased to the bound buffer (overwritten by the next run) would show.
    for got, expected in results:
        np.testing.assert_array_equal(got[MODEL_OUTPUT], expected)
    assert not np.array_equal(results[0][1], results[1][1])


def test_binding_refuses_a_spec_whose_dtypes_differ_from_the_graph(graphs: dict[str, Path]) -> None:
    spec = decoder_spec(1, 8)
    wrong = ComponentSpec(spec.name, (TensorSpec(LATENT_SAMPLE, (1, 4, 8, 8), "float16"),), spec.outputs)
    session = ort.InferenceSession(str(graphs["decoder"]), providers=[CPU])
    with pytest.raises(ValueError, match=r"graph tensor latent_sample is tensor\(float\), the spec says float16"):
        IoBinding(session, wrong, device="cpu")


# --- Where the nodes run --------------------------------------------------------------------------------------------

DECODER_NODES = [
    ("Conv", "conv"),
    ("Relu", "relu"),
    ("Transpose", "to_nhwc"),
    ("MatMul", "proj"),
    ("Add", "proj_bias"),
    ("Transpose", "to_nchw"),
    ("DepthToSpace", "upsample"),
]


def plain_options():
    options = ort.SessionOptions()
    # Unoptimised, so the graph's own nodes are the ones placed (ORT would fuse some of them otherwise).
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def test_the_profile_parser_lists_each_node_of_a_real_cpu_profile(tmp_path: Path, graphs: dict[str, Path]) -> None:
    options = plain_options()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(str(graphs["decoder"]), options, providers=[CPU])
    feeds = random_feeds(decoder_spec(1, 8), 0)
    session.run(None, feeds)
    session.run(None, feeds)  # a second run: each node is still listed once
    events = json.loads(Path(session.end_profiling()).read_text())
    assert placements_from_profile(events) == [NodePlacement(CPU, op, name) for op, name in DECODER_NODES]


def test_placement_by_profile_runs_the_static_session_once_on_zero_feeds(graphs: dict[str, Path]) -> None:
    placements = placements_by_profile(graphs["decoder"], plain_options(), [CPU], decoder_spec(2, 8))
    assert [(p.op_type, p.name) for p in placements] == DECODER_NODES


def test_assignment_info_lists_each_node_with_its_provider(graphs: dict[str, Path]) -> None:
    if not hasattr(ort.InferenceSession, "get_provider_graph_assignment_info"):
        pytest.skip(f"onnxruntime {ort.__version__} records no assignment info")
    options = plain_options()
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    session = ort.InferenceSession(str(graphs["decoder"]), options, providers=[CPU])
    placements = placements_from_assignment(session.get_provider_graph_assignment_info())
    assert sorted((p.provider, p.op_type, p.name) for p in placements) == sorted((CPU, *n) for n in DECODER_NODES)


def test_nodes_a_provider_cannot_take_are_a_startup_error_listing_them(graphs: dict[str, Path]) -> None:
    # The Azure provider of the CPU wheel takes no node at all: every node falls to the CPU, as nodes without a CUDA
    # kernel would, and the refusal (session.disable_cpu_ep_fallback) is diagnosed on a real session.
    if "AzureExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no AzureExecutionProvider to stand for a provider without kernels")
    elsewhere = Placement("AzureExecutionProvider", "cpu")
    with pytest.raises(CpuPlacementError) as refused:
        build_engines(graphs["decoder"], [decoder_spec(1, 8)], CudaOptions(), elsewhere)
    # The nodes as ORT placed them after its own fusions (here MatMul+Add became a Gemm).
    assert {n.op_type for n in refused.value.nodes} >= {"Conv", "DepthToSpace"}
    assert {n.provider for n in refused.value.nodes} == {CPU}
    assert "node(s) would run on the CPU, not AzureExecutionProvider" in str(refused.value)
    assert "Conv 'conv'" in str(refused.value) and "--backend cpu" in str(refused.value)


def test_a_long_list_of_cpu_nodes_is_cut_with_a_count() -> None:
    nodes = [NodePlacement(CPU, "Shape", f"shape_{i}") for i in range(25)]
    message = str(CpuPlacementError(UNET, "CUDAExecutionProvider", nodes))
    assert message.startswith("unet: 25 node(s) would run on the CPU")
    assert "Shape 'shape_19'" in message and "shape_20" not in message and "and 5 more" in message


# --- NVML -----------------------------------------------------------------------------------------------------------


def test_nvml_follows_cuda_visible_devices() -> None:
    assert nvml.nvml_index(1, None) == 1
    assert nvml.nvml_index(1, "3,2") == 2
    assert nvml.nvml_index(0, "GPU-8e4c, 1") == "GPU-8e4c"
    with pytest.raises(nvml.NvmlUnavailableError, match="CUDA device 2 is not visible"):
        nvml.nvml_index(2, "0,1")


def test_without_nvml_the_gpu_figures_are_none_and_query_says_why() -> None:
    try:
        nvml.query(0)
    except nvml.NvmlUnavailableError as e:
        reason = str(e)
    else:
        pytest.skip("NVML answers here")
    assert "libnvidia-ml.so.1" in reason or "NVML error" in reason
    assert nvml.gpu_name(0) is None and nvml.gpu_memory_used(0) is None


# A stand-in for the driver's NVML, built here because no driver is: two devices with fixed figures, so the ctypes
# calls (argument types, the memory struct's layout, error strings) run against a real shared library.
FAKE_NVML = r"""
#include <stdio.h>
#include <string.h>
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
int nvmlInit_v2(void) { return 0; }
int nvmlShutdown(void) { return 0; }
const char *nvmlErrorString(int status) { return status == 2 ? "Invalid Argument" : "Unknown Error"; }
int nvmlDeviceGetHandleByIndex_v2(unsigned int index, void **handle) {
    if (index > 1) return 2;
    *handle = (void *)(unsigned long)(index + 1);
    return 0;
}
int nvmlDeviceGetHandleByUUID(const char *uuid, void **handle) {
    if (strcmp(uuid, "GPU-fake-1") != 0) return 2;
    *handle = (void *)2;
    return 0;
}
int nvmlDeviceGetName(void *handle, char *name, unsigned int length) {
    snprintf(name, length, "Fake GPU %lu", (unsigned long)handle);
    return 0;
}
int nvmlDeviceGetMemoryInfo(void *handle, nvmlMemory_t *memory) {
    memory->total = 80ULL << 30;
    memory->used = (unsigned long long)(unsigned long)handle << 30;
    memory->free = memory->total - memory->used;
    return 0;
}
"""

NVML_QUERIES = """
import json
from diffuserve.engine import nvml
try:
    nvml.query(5)
    missing = None
except nvml.NvmlUnavailableError as e:
    missing = str(e)
print(json.dumps({"first": nvml.query(0).__dict__, "used_1": nvml.gpu_memory_used(1), "missing": missing,
                  "name_5": nvml.gpu_name(5)}))
"""


def test_nvml_figures_come_through_ctypes_from_the_driver_library(tmp_path: Path) -> None:
    (tmp_path / "nvml.c").write_text(FAKE_NVML)
    built = subprocess.run(
        ["cc", "-shared", "-fPIC", "-o", str(tmp_path / nvml.LIBRARY), str(tmp_path / "nvml.c")], capture_output=True
    )
    if built.returncode != 0:
        pytest.skip(f"no C compiler to build a stand-in NVML: {built.stderr!r}")

    def queries(visible: str | None) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"} | {"LD_LIBRARY_PATH": str(tmp_path)}
        env |= {"CUDA_VISIBLE_DEVICES": visible} if visible else {}
        done = subprocess.run(
            [sys.executable, "-c", NVML_QUERIES], env=env, check=True, capture_output=True, text=True
        )
        return json.loads(done.stdout)

    plain = queries(None)
    assert plain["first"] == {"name": "Fake GPU 1", "memory_used": 1 << 30, "memory_total": 80 << 30}
    assert plain["used_1"] == 2 << 30
    assert plain["missing"] == "device 5 failed: NVML error 2 (Invalid Argument)" and plain["name_5"] is None
    assert queries("GPU-fake-1")["first"]["name"] == "Fake GPU 2"


# --- On the GPU -----------------------------------------------------------------------------------------------------


def fp16_tolerance(expected: np.ndarray) -> float:
    # fp16 keeps 11 significant bits (relative step ~1e-3); a few roundings through Conv and MatMul add up to ~1e-2.
    return 1e-2 * (1.0 + float(np.max(np.abs(expected))))


@pytest.mark.gpu
@requires_cuda
def test_cuda_results_match_the_cpu_within_fp16_tolerance(graphs: dict[str, Path]) -> None:
    specs = [decoder_spec(1, 8), decoder_spec(4, 16)]
    engines = load_cuda_engines(graphs["decoder_fp16"], specs, CudaOptions())
    for engine in engines:
        assert engine.providers[0] == "CUDAExecutionProvider" and engine.backend == "cuda" and engine.device
        feeds = random_feeds(engine.spec, 7)
        # The fp32 graph holds the same weights before rounding to fp16: the reference is fp32 arithmetic.
        expected = reference(graphs["decoder"], feeds)[SAMPLE]
        got = engine.run(feeds)[SAMPLE]
        assert got.dtype == np.float32
        assert float(np.max(np.abs(got - expected))) <= fp16_tolerance(expected)


@pytest.mark.gpu
@requires_cuda
def test_unet_graph_replays_equal_eager_runs_on_new_inputs(graphs: dict[str, Path]) -> None:
    specs = [unet_spec(2, 8), unet_spec(8, 16)]
    engines = load_cuda_engines(graphs["unet"], specs, CudaOptions(cuda_graph=True))
    assert [e.graph_id for e in engines] == [0, 1]
    for engine in engines:
        feeds_list = [random_feeds(engine.spec, seed) for seed in range(4)]
        assert graph_replay_difference(engine, feeds_list) <= 1e-6
        expected = reference(graphs["unet"], feeds_list[-1])[MODEL_OUTPUT]
        # fp32 graph, but cuDNN's convolutions may run in TF32 (10-bit mantissa, as fp16's).
        got = engine.run(feeds_list[-1])[MODEL_OUTPUT]
        assert float(np.max(np.abs(got - expected))) <= fp16_tolerance(expected)


@pytest.mark.gpu
@requires_cuda
def test_all_shapes_share_one_weights_object_on_the_gpu(graphs: dict[str, Path]) -> None:
    engines = load_cuda_engines(graphs["decoder"], [decoder_spec(b, 8) for b in (1, 2, 4)], CudaOptions())
    assert len({id(e.weights) for e in engines}) == 1
    assert engines[0].weights.device == "cuda"
    assert {v.device_name() for v in engines[0].weights.views.values()} == {"cuda"}


MEMORY_SCRIPT = """
import json
import numpy as np
from diffuserve.engine import nvml
from diffuserve.engine.manifest import ComponentSpec, TensorSpec
from diffuserve.engine.ort_cuda import CudaOptions, load_cuda_engines
specs = [
    ComponentSpec(
        "text_encoder",
        (TensorSpec("input_ids", (b, {tokens}), "int32"),),
        (TensorSpec("last_hidden_state", (b, {tokens}, {width}), "float32"),),
    )
    for b in {batches!r}
]
before = nvml.gpu_memory_used(0)
engines = load_cuda_engines({graph!r}, specs, CudaOptions())
for engine in engines:
    engine.run({{"input_ids": np.ones(engine.spec.inputs[0].shape, np.int32)}})
print(json.dumps({{"grown": nvml.gpu_memory_used(0) - before, "weights": engines[0].weights.nbytes}}))
"""


@pytest.mark.gpu
@requires_cuda
def test_a_second_batch_size_adds_far_less_gpu_memory_than_a_copy_of_the_weights(tmp_path: Path) -> None:
    if nvml.gpu_memory_used(0) is None:
        pytest.skip("NVML gives no GPU memory figure here")
    vocab, width = 65536, 1024  # a 256 MiB token table: far above any session's own overhead
    graph = save(text_encoder_model(vocab, width), tmp_path / "text_encoder.onnx")

    def grown(batches: tuple[int, ...]) -> dict[str, int]:
        # A fresh process each: ORT's Python-side GPU allocator keeps what it once held.
        script = MEMORY_SCRIPT.format(graph=str(graph), tokens=TOKENS, width=width, batches=batches)
        done = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    one, two = grown((1,)), grown((1, 4))
    assert one["weights"] == vocab * width * 4 + width * width * 4
    assert two["grown"] - one["grown"] < one["weights"] / 2, (one, two)
