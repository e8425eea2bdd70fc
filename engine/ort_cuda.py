"""ONNX Runtime on an NVIDIA GPU: one static session per shape over one device copy of the weights.

The flow of `load_cuda_engines`, top to bottom:
1. `check_cuda_available`: the CUDA provider is in this onnxruntime and really opens the device (ORT otherwise
   falls back to the CPU silently), or a BackendUnavailableError says what to install or which library is missing.
2. `SharedWeights.load`: the graph's large initializers, read once and copied once to the GPU (after
   `configure_python_allocator`, so that copy is not rounded up to powers of two).
3. Per shape, `create_session`: the graph with its symbolic dimensions pinned to that shape, the shared weights as
   user-supplied initializers, CPU fallback refused (a refusal is diagnosed: which nodes would have run on the CPU),
   CUDA graphs for the U-Net.
4. Per shape, `IoBinding`: device buffers for every input and output, bound once; each run copies in place.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import logging
import math
import os
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import nvml
from .base import check_feeds, replay_difference
from .manifest import UNET, ComponentSpec
from .ort import CPU, CUDA, BackendUnavailableError, check_graph_matches_spec, import_onnxruntime, session_options

log = logging.getLogger(__name__)

CONV_ALGO_SEARCHES = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
# Provider options that `extra` may not override: they decide where the buffers live and which sessions replay graphs.
OWN_FIELD_OPTIONS = {"device_id": "device_id", "enable_cuda_graph": "cuda_graph"}
ARENA_EXTEND_STRATEGIES = ("kNextPowerOfTwo", "kSameAsRequested")
# Initializers this large are shared across the shapes' sessions; smaller ones (biases, shape constants, the scalar
# inputs that CUDA kernels read on the host) stay with each session, where ORT places them itself: a shared tensor
# planned on another device than the one it lives on is copied anyway (session_state_utils.cc).
SHARED_MIN_BYTES = 1024
# CPU threads per session: with CPU fallback refused no kernel runs on the CPU, and every session would otherwise
# start a pool as large as the machine (4 components x several shapes).
CPU_THREADS = 1
# The gpu_graph_id run option that runs a CUDA-graph session eagerly, without capture or replay.
EAGER_GRAPH_ID = -1
# Dtypes whose numpy arrays ORT turns into OrtValues (bfloat16 and float8 have no numpy type ORT accepts).
SHAREABLE_DTYPES = frozenset({"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"})
# The ORT type string of each spec dtype, to check a graph's I/O before binding buffers to it.
ORT_TENSOR_TYPES = {
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
    "int32": "tensor(int32)",
    "int64": "tensor(int64)",
}
# How many CPU-placed nodes an error names before it counts the rest.
LISTED_NODES = 20


@dataclass(frozen=True)
class CudaOptions:
    """The CUDA provider's settings for every session of a model.

    The defaults were NOT measured here (the machine that wrote this has no GPU). They are ONNX Runtime's own
    defaults or what its Stable Diffusion tooling sets (onnxruntime/python/tools/transformers/io_binding_helper.py
    `CudaSession.get_cuda_provider_options`, models/stable_diffusion/engine_builder_ort_cuda.py); each says which
    comparison of `diffuserve bench` on the cuda backend (default against `--cuda-option KEY=VALUE`) would measure
    it on the GPU that serves.
    """

    device_id: int = 0
    # Replay the U-Net as a CUDA graph (one per shape); ORT's SD README reports 1.11 s -> 1.04 s for SD 1.5 512x512
    # 50 steps on an A100. Measure: bench with and without `--no-cuda-graph`, U-Net ms per call.
    cuda_graph: bool = True
    # ORT's default. With one static shape per session the search runs once per convolution at the first call
    # (start-up and warm-up time), never again. Measure: bench EXHAUSTIVE vs HEURISTIC, warm-up s and U-Net ms.
    cudnn_conv_algo_search: str = "EXHAUSTIVE"
    # ORT's default since 1.14: cuDNN may take the faster algorithms that need a large workspace, at the cost of peak
    # GPU memory. Measure: bench on/off, U-Net ms and peak GPU memory.
    cudnn_conv_use_max_workspace: bool = True
    # ORT's default (off). The cuda target's graphs already carry NhwcConv from onnxruntime.transformers' fusion, and
    # a layout change rewrites Conv weights into new per-session tensors, bypassing the shared copy (seen on the CPU,
    # whose NCHWc layout does it; on the GPU not verified). Measure: bench on/off, U-Net ms and GPU memory per shape.
    prefer_nhwc: bool = False
    # ORT's default. It touches only the fp32 islands of an fp16 graph (the SDXL VAE, normalisations kept fp32 for
    # range, where TF32 keeps fp32's exponent); note that cuDNN's frontend convolutions use TF32 whatever it says.
    # Measure: bench on/off on a model with fp32 islands, VAE ms and the image against the fp32 pipeline.
    use_tf32: bool = True
    # What ORT's SD tooling sets: grow the arena by what is asked, not by powers of two, so each session holds less
    # idle memory. Measure: bench GPU memory with the two strategies, and U-Net ms.
    arena_extend_strategy: str = "kSameAsRequested"
    # Provider options passed as given, over the fields above (e.g. {"cudnn_conv_algo_search": "HEURISTIC"}, or one
    # without a field: {"sdpa_kernel": "2"}, {"fuse_conv_bias": "1"}); not device_id or enable_cuda_graph.
    extra: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.device_id < 0:
            raise ValueError(f"device_id must be >= 0, got {self.device_id}")
        if self.cudnn_conv_algo_search not in CONV_ALGO_SEARCHES:
            raise ValueError(
                f"cudnn_conv_algo_search must be one of {CONV_ALGO_SEARCHES}, got {self.cudnn_conv_algo_search!r}"
            )
        if self.arena_extend_strategy not in ARENA_EXTEND_STRATEGIES:
            raise ValueError(
                f"arena_extend_strategy must be one of {ARENA_EXTEND_STRATEGIES}, got {self.arena_extend_strategy!r}"
            )
        clashing = sorted(set(OWN_FIELD_OPTIONS) & set(self.extra))
        if clashing:
            fields = [OWN_FIELD_OPTIONS[k] for k in clashing]
            raise ValueError(f"extra provider options {clashing} are set through CudaOptions {fields}, not extra")
        object.__setattr__(self, "extra", {str(k): str(v) for k, v in self.extra.items()})

    def uses_cuda_graph(self, spec: ComponentSpec) -> bool:
        """CUDA graphs for the U-Net only: it is called every step, the other components once per image."""
        return self.cuda_graph and spec.name == UNET

    def provider_options(self, cuda_graph: bool) -> dict[str, str]:
        """The CUDAExecutionProvider options of one session, as the strings ORT parses; `extra` wins."""
        options = {
            "device_id": str(self.device_id),
            "cudnn_conv_algo_search": self.cudnn_conv_algo_search,
            "cudnn_conv_use_max_workspace": _flag(self.cudnn_conv_use_max_workspace),
            "prefer_nhwc": _flag(self.prefer_nhwc),
            "use_tf32": _flag(self.use_tf32),
            "arena_extend_strategy": self.arena_extend_strategy,
            "enable_cuda_graph": _flag(cuda_graph),
        }
        return options | dict(self.extra)


def _flag(value: bool) -> str:
    return "1" if value else "0"


@dataclass(frozen=True)
class Placement:
    """Where a model's sessions run: the execution provider and the OrtValue device of its weights and buffers.

    `load_cuda_engines` uses ON_CUDA; ON_CPU runs the very same code on a machine without a GPU (the tests)."""

    provider: str
    device: str

    @property
    def backend(self) -> str:
        return "cuda" if self.provider == CUDA else "cpu"


ON_CUDA = Placement(CUDA, "cuda")
ON_CPU = Placement(CPU, "cpu")


# --- 1. Is CUDA really there? ---------------------------------------------------------------------------------------


def cuda_major_version() -> int | None:
    """The CUDA major version this onnxruntime-gpu was built for (its build info), None if it does not say."""
    try:
        from onnxruntime.capi.build_and_package_info import cuda_version
    except ImportError:
        return None
    try:
        return int(str(cuda_version).split(".")[0])
    except ValueError:
        return None


def cuda_library_sonames(cuda_major: int) -> tuple[str, ...]:
    """The libraries onnxruntime-gpu 1.2x/1.3x needs for a CUDA major version: those its CUDA provider links (the
    driver, the runtime, cuBLAS, cuBLASLt, cuRAND: readelf -d of the 1.31.1 wheel) and those it opens at run time
    (cuDNN 9; cuFFT, whose soname major is one below CUDA's)."""
    return (
        "libcuda.so.1",
        f"libcudart.so.{cuda_major}",
        f"libcublasLt.so.{cuda_major}",
        f"libcublas.so.{cuda_major}",
        "libcurand.so.10",
        f"libcufft.so.{cuda_major - 1}",
        "libcudnn.so.9",
    )


def unloadable_libraries(sonames: Iterable[str]) -> dict[str, str]:
    """Each library the dynamic loader cannot open here, with its reason."""
    failed = {}
    for soname in sonames:
        try:
            ctypes.CDLL(soname)
        except OSError as e:
            failed[soname] = str(e)
    return failed


def _device_probe_error(ort, device_id: int) -> str | None:
    """Why a one-float buffer cannot be allocated on the device, or None: allocating loads ORT's CUDA provider
    library (and so every library it links) and opens the device, without needing a graph."""
    try:
        ort.OrtValue.ortvalue_from_shape_and_type([1], np.float32, "cuda", device_id)
    except Exception as e:  # ORT's pybind errors derive from Exception only
        return str(e).strip()
    return None


def _preload_quietly(ort) -> None:
    """ORT's own loader for CUDA libraries installed from pip (nvidia-* wheels); it prints what it cannot load."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        ort.preload_dlls()
    if printed.getvalue().strip():
        log.debug("onnxruntime.preload_dlls: %s", printed.getvalue().strip())


def cuda_unusable_message(reason: str, device_id: int) -> str:
    """What to tell when the CUDA provider is installed but does not run: which of its libraries fail to load."""
    major = cuda_major_version()
    majors = (major,) if major else (12, 13)
    parts = []
    for m in majors:
        missing = unloadable_libraries(cuda_library_sonames(m))
        if missing:
            details = "; ".join(f"{name} ({error})" for name, error in missing.items())
            parts.append(f"For CUDA {m} these libraries fail to load: {details}")
    if not parts:
        parts.append("Every CUDA library it needs loads, so look at the GPU and its driver (nvidia-smi)")
    built = f"built for CUDA {major} and cuDNN 9" if major else "whose CUDA version its build info does not give"
    return (
        f"onnxruntime-gpu ({built}) cannot use CUDA device {device_id}: {reason}. " + "; ".join(parts) + ". Install "
        "the CUDA and cuDNN libraries it was built for (or pip install onnxruntime-gpu[cuda,cudnn]), or serve with "
        "--backend cpu"
    )


def cuda_unavailable_reason(device_id: int = 0) -> str | None:
    """Why the CUDA backend cannot run here, or None when it really can (not just listed: onnxruntime-gpu lists
    CUDAExecutionProvider on machines without a GPU or without its libraries)."""
    try:
        ort = import_onnxruntime()
    except BackendUnavailableError as e:
        return str(e)
    available = ort.get_available_providers()
    if CUDA not in available:
        return (
            f"onnxruntime {ort.__version__} here is the CPU build, without CUDAExecutionProvider (it has "
            f"{available}): install diffuserve[cuda] (onnxruntime-gpu) instead of diffuserve[cpu], never both (they "
            "share one import name and break each other: pip uninstall onnxruntime first), or serve with --backend cpu"
        )
    error = _device_probe_error(ort, device_id)
    if error and hasattr(ort, "preload_dlls"):
        _preload_quietly(ort)
        error = _device_probe_error(ort, device_id)
    return cuda_unusable_message(error, device_id) if error else None


def check_cuda_available(device_id: int = 0) -> None:
    reason = cuda_unavailable_reason(device_id)
    if reason:
        raise BackendUnavailableError(reason)


# --- 2. One copy of the weights -------------------------------------------------------------------------------------


def configure_python_allocator(options: CudaOptions) -> None:
    """Sets how onnxruntime's Python-side CUDA allocator grows, before its first use.

    The weights and the bound buffers come from that allocator (OrtValue.ortvalue_from_*), an arena onnxruntime
    creates once per device with global settings; its default growth by powers of two can hold up to about twice
    what the weights need. The setter is deprecated in favour of the provider option, which configures only the
    sessions' own arenas (onnxruntime-gpu 1.31.1 has it; whether it still reaches that arena is not verified here)."""
    ort = import_onnxruntime()
    binding = ort.capi._pybind_state
    setter, strategies = (
        getattr(binding, "set_arena_extend_strategy", None),
        getattr(binding, "ArenaExtendStrategy", None),
    )
    if setter is None or strategies is None:
        return
    # The setter logs its deprecation as a warning on ORT's default logger; 2 (warnings) is that logger's default.
    ort.set_default_logger_severity(3)
    try:
        setter(getattr(strategies, options.arena_extend_strategy))
    finally:
        ort.set_default_logger_severity(2)


def _import_onnx():
    try:
        import onnx
    except ImportError as e:
        raise BackendUnavailableError(
            "the CUDA backend reads the graph's weights with the onnx package, which is not installed: install "
            "diffuserve[cuda]"
        ) from e
    return onnx


def _external_array(folder: Path, tensor, dtype: np.dtype) -> np.ndarray:
    """A memory map of an initializer kept in the graph's external data file: its bytes are read once, by the copy
    to the device, and never held in host memory as a whole."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    path = (folder / info["location"]).resolve()
    if folder.resolve() not in path.parents:
        raise ValueError(f"initializer {tensor.name!r}: external data {info['location']!r} is outside {folder}")
    shape = tuple(int(d) for d in tensor.dims)
    offset, nbytes = int(info.get("offset", 0)), math.prod(shape) * dtype.itemsize
    if int(info.get("length", nbytes)) != nbytes or offset + nbytes > path.stat().st_size:
        raise ValueError(
            f"initializer {tensor.name!r}: {list(shape)} {dtype} needs {nbytes} bytes at offset {offset} of "
            f"{path.name} (length {info.get('length')}, file {path.stat().st_size} bytes)"
        )
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def folded_initializers(graph) -> set[str]:
    """Initializers whose every consumer takes only initializers: ORT's constant folding replaces such nodes by new
    constants in each session and drops the initializer, shared or not (seen here: a Cast of an fp16 weight), so a
    shared copy of it would be GPU memory no session uses."""
    constant = {t.name for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            if name in constant:
                consumers.setdefault(name, []).append(node)
    return {
        name
        for name, nodes in consumers.items()
        if all(all(i in constant or not i for i in node.input) for node in nodes)
    }


def read_initializers(graph_path: str | os.PathLike, min_bytes: int = SHARED_MIN_BYTES) -> dict[str, np.ndarray]:
    """The graph's initializers worth sharing, by name: at least `min_bytes`, embedded or in its external data file,
    and used as they are (not folded into a new constant by each session)."""
    onnx = _import_onnx()
    from onnx import external_data_helper, helper, numpy_helper

    graph_path = Path(graph_path)
    model = onnx.load(str(graph_path), load_external_data=False)
    folded = folded_initializers(model.graph)
    arrays, left = {}, []
    for tensor in model.graph.initializer:
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        except KeyError:  # a type numpy has no name for: left to ORT
            continue
        if dtype.name not in SHAREABLE_DTYPES or math.prod(tensor.dims) * dtype.itemsize < min_bytes:
            continue
        if tensor.name in folded:
            left.append(tensor.name)
        elif external_data_helper.uses_external_data(tensor):
            arrays[tensor.name] = _external_array(graph_path.parent, tensor, dtype)
        else:
            arrays[tensor.name] = numpy_helper.to_array(tensor)
    if left:
        log.warning(
            "%s: %d weight tensor(s) feed only nodes ORT folds into constants, a copy in every session (%s): store "
            "them in the type and layout their consumers take",
            graph_path.name,
            len(left),
            ", ".join(left[:LISTED_NODES]),
        )
    return arrays


def non_owning_view(ort, owner):
    """An OrtValue over `owner`'s buffer that does not own it.

    SessionOptions.add_initializer refuses an OrtValue that owns its buffer ("must be owned by the user"), and every
    OrtValue allocated on the GPU from Python does; a DLPack view shares the buffer without owning it (and keeps the
    owner alive). The public OrtValue has it in onnxruntime 1.31, the binding underneath since about 1.21."""
    if hasattr(ort.OrtValue, "__dlpack__") and hasattr(ort.OrtValue, "from_dlpack"):
        return ort.OrtValue.from_dlpack(owner)
    binding = ort.capi._pybind_state.OrtValue
    if hasattr(binding, "from_dlpack") and hasattr(owner._ortvalue, "to_dlpack"):
        return ort.OrtValue(binding.from_dlpack(owner._ortvalue.to_dlpack()))
    raise BackendUnavailableError(
        f"sharing one copy of the weights needs onnxruntime-gpu >= 1.21 (OrtValue DLPack support); this is "
        f"{ort.__version__}: install diffuserve[cuda] again"
    )


class SharedWeights:
    """One device copy of a component's large initializers, given to every shape's session (add_initializer: ORT
    uses it in place when it lives on the device the session planned for it)."""

    def __init__(self, views: Mapping[str, Any], keep_alive: Sequence[object], device: str, nbytes: int):
        self.views = dict(views)
        # The owning OrtValues, and on the CPU the arrays whose memory the OrtValues wrap without copying.
        self._keep_alive = tuple(keep_alive)
        self.device = device
        self.nbytes = nbytes

    @classmethod
    def load(
        cls,
        graph_path: str | os.PathLike,
        device: str = "cuda",
        device_id: int = 0,
        min_bytes: int = SHARED_MIN_BYTES,
    ) -> SharedWeights:
        ort = import_onnxruntime()
        views, keep, nbytes = {}, [], 0
        for name, array in read_initializers(graph_path, min_bytes).items():
            owner = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, device_id)
            views[name] = non_owning_view(ort, owner)
            keep.append(owner)
            if device == "cpu":
                keep.append(array)
            nbytes += array.nbytes
        return cls(views, keep, device, nbytes)

    def add_to(self, options) -> None:
        """Hands the views to a session's options; they hold raw pointers, so this object must outlive the creation
        of the session (which then keeps the buffers alive itself)."""
        for name, value in self.views.items():
            options.add_initializer(name, value)


# --- 3. One static session per shape --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodePlacement:
    provider: str
    op_type: str
    name: str

    def describe(self) -> str:
        return f"{self.op_type} {self.name!r}"


class CpuPlacementError(BackendUnavailableError):
    """Nodes of the graph would run on the CPU, which `session.disable_cpu_ep_fallback` refuses."""

    def __init__(self, component: str, provider: str, nodes: Sequence[NodePlacement]):
        self.nodes = tuple(nodes)
        listed = ", ".join(node.describe() for node in self.nodes[:LISTED_NODES])
        more = f" and {len(self.nodes) - LISTED_NODES} more" if len(self.nodes) > LISTED_NODES else ""
        super().__init__(
            f"{component}: {len(self.nodes)} node(s) would run on the CPU, not {provider} (it has no kernel for them "
            f"here, or they compute shapes the static session did not fold): {listed}{more}. Export the cuda target "
            "with the onnxruntime-gpu that serves it, or serve with --backend cpu"
        )


def placements_from_profile(events: Iterable[Mapping[str, Any]]) -> list[NodePlacement]:
    """Each node's provider from an ORT profile (the JSON list end_profiling writes), in order of first run."""
    suffix = "_kernel_time"
    seen: dict[str, NodePlacement] = {}
    for event in events:
        name, args = str(event.get("name", "")), event.get("args") or {}
        if event.get("cat") != "Node" or not name.endswith(suffix) or "provider" not in args:
            continue
        node = name[: -len(suffix)]
        seen.setdefault(node, NodePlacement(str(args["provider"]), str(args.get("op_name", "?")), node))
    return list(seen.values())


def placements_from_assignment(subgraphs: Iterable[Any]) -> list[NodePlacement]:
    """Each node's provider from InferenceSession.get_provider_graph_assignment_info()."""
    return [NodePlacement(sub.ep_name, node.op_type, node.name) for sub in subgraphs for node in sub.get_nodes()]


def zero_feeds(spec: ComponentSpec) -> dict[str, np.ndarray]:
    return {t.name: np.zeros(t.shape, t.np_dtype) for t in spec.inputs}


def build_session_options(spec: ComponentSpec, weights: SharedWeights, placement: Placement, allow_cpu: bool = False):
    options = session_options(CPU_THREADS)
    # Static shapes inside the session: CUDA graphs need them, and Shape/Gather/Concat chains fold into constants
    # instead of running on the CPU.
    for dim, value in spec.free_dimensions().items():
        options.add_free_dimension_override_by_name(dim, value)
    if not allow_cpu and placement.provider != CPU:
        # A node placed on the CPU is a session-creation error, not a silent slowdown.
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if placement.provider == CUDA:
        # Warnings name real problems here (a shared initializer copied because ORT planned it elsewhere).
        options.log_severity_level = 2
    weights.add_to(options)
    return options


def providers_for(placement: Placement, options: CudaOptions, cuda_graph: bool) -> list:
    if placement.provider == CUDA:
        return [(CUDA, options.provider_options(cuda_graph))]
    return [placement.provider]


def placements_by_assignment(graph_path: Path, session_opts, providers: list) -> list[NodePlacement]:
    ort = import_onnxruntime()
    session_opts.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    session = ort.InferenceSession(str(graph_path), session_opts, providers=providers)
    return placements_from_assignment(session.get_provider_graph_assignment_info())


def placements_by_profile(graph_path: Path, session_opts, providers: list, spec: ComponentSpec) -> list[NodePlacement]:
    """The placement an ORT profile records for one run on zero feeds (for ORT without assignment info)."""
    ort = import_onnxruntime()
    with tempfile.TemporaryDirectory(prefix="diffuserve-placement-") as folder:
        session_opts.enable_profiling = True
        session_opts.profile_file_prefix = str(Path(folder) / "placement")
        session = ort.InferenceSession(str(graph_path), session_opts, providers=providers)
        session.run(None, zero_feeds(spec))
        events = json.loads(Path(session.end_profiling()).read_text())
    return placements_from_profile(events)


def cpu_placed_nodes(
    graph_path: Path, spec: ComponentSpec, weights: SharedWeights, options: CudaOptions, placement: Placement
) -> list[NodePlacement]:
    """The nodes ORT puts on the CPU when it may: the same static session, with fallback allowed."""
    ort = import_onnxruntime()
    session_opts = build_session_options(spec, weights, placement, allow_cpu=True)
    providers = providers_for(placement, options, cuda_graph=False)
    if placement.provider != CPU:
        providers.append(CPU)
    if hasattr(ort.InferenceSession, "get_provider_graph_assignment_info"):
        placements = placements_by_assignment(graph_path, session_opts, providers)
    else:
        placements = placements_by_profile(graph_path, session_opts, providers, spec)
    return [p for p in placements if p.provider == CPU]


def create_session(
    graph_path: Path,
    spec: ComponentSpec,
    weights: SharedWeights,
    options: CudaOptions,
    placement: Placement = ON_CUDA,
    cuda_graph: bool = False,
):
    """One shape's session; if ORT refuses it, says which nodes would have run on the CPU."""
    ort = import_onnxruntime()
    session_opts = build_session_options(spec, weights, placement)
    providers = providers_for(placement, options, cuda_graph)
    try:
        session = ort.InferenceSession(str(graph_path), session_opts, providers=providers)
    except Exception as refused:  # ORT's pybind errors derive from Exception only
        nodes = _diagnose(graph_path, spec, weights, options, placement)
        if nodes:
            raise CpuPlacementError(spec.name, placement.provider, nodes) from refused
        raise
    actual = session.get_providers()
    if actual[0] != placement.provider:
        reason = f"the session runs on {actual}, not {placement.provider}"
        raise BackendUnavailableError(cuda_unusable_message(reason, options.device_id))
    return session


def _diagnose(graph_path, spec, weights, options, placement) -> list[NodePlacement]:
    try:
        return cpu_placed_nodes(graph_path, spec, weights, options, placement)
    except Exception as e:  # the diagnosis must not hide the error it diagnoses
        log.warning("%s: could not tell which nodes ORT places on the CPU: %s", spec.name, e)
        return []


# --- 4. IO binding ------------------------------------------------------------------------------------------------


class IoBinding:
    """A session's inputs and outputs as device buffers allocated and bound once; each run copies the inputs into
    them in place (CUDA graphs replay on these very addresses) and the outputs back to the host."""

    def __init__(self, session, spec: ComponentSpec, device: str = "cuda", device_id: int = 0):
        ort = import_onnxruntime()
        check_io_types(session, spec)
        self._session = session
        self._binding = session.io_binding()
        self._inputs = {t.name: _allocate(ort, t, device, device_id) for t in spec.inputs}
        self._outputs = {t.name: _allocate(ort, t, device, device_id) for t in spec.outputs}
        for name, value in self._inputs.items():
            self._binding.bind_ortvalue_input(name, value)
        for name, value in self._outputs.items():
            self._binding.bind_ortvalue_output(name, value)
        # A CPU OrtValue's numpy() is a view of the bound buffer, which the next run overwrites; a GPU one's is a
        # fresh host copy already.
        self._copy_outputs = device == "cpu"
        # The buffers are this object's state: one run at a time.
        self._lock = threading.Lock()

    def run(self, feeds: Mapping[str, np.ndarray], run_options=None) -> dict[str, np.ndarray]:
        with self._lock:
            for name, value in self._inputs.items():
                value.update_inplace(np.ascontiguousarray(feeds[name]))
            # The copies in may still be in flight on another stream than the one the session computes on.
            self._binding.synchronize_inputs()
            self._session.run_with_iobinding(self._binding, run_options)
            self._binding.synchronize_outputs()
            return {name: self._to_host(value) for name, value in self._outputs.items()}

    def _to_host(self, value) -> np.ndarray:
        array = value.numpy()
        return array.copy() if self._copy_outputs else array


def _allocate(ort, tensor, device: str, device_id: int):
    return ort.OrtValue.ortvalue_from_shape_and_type(list(tensor.shape), tensor.np_dtype, device, device_id)


def check_io_types(session, spec: ComponentSpec) -> None:
    """The graph's I/O element types are the spec's (bound buffers are typed by the spec)."""
    graph = {i.name: i.type for i in session.get_inputs()} | {o.name: o.type for o in session.get_outputs()}
    for t in (*spec.inputs, *spec.outputs):
        if graph.get(t.name) != ORT_TENSOR_TYPES[t.dtype]:
            raise ValueError(f"{spec.name}: graph tensor {t.name} is {graph.get(t.name)}, the spec says {t.dtype}")


def _graph_run_options(graph_id: int):
    run_options = import_onnxruntime().RunOptions()
    run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
    return run_options


class OrtCudaEngine:
    """One shape of a component: its static session, the shared weights, its bound buffers."""

    def __init__(
        self,
        session,
        spec: ComponentSpec,
        weights: SharedWeights,
        device: str,
        binding: IoBinding,
        graph_id: int | None = None,
        backend: str = "cuda",
    ):
        check_graph_matches_spec(session, spec)
        self.session = session
        self.spec = spec
        self.weights = weights
        self.device = device
        self.backend = backend
        self.graph_id = graph_id
        self._binding = binding
        # ORT captures the graph on an early run with this id and replays it on every later one.
        self._run_options = _graph_run_options(graph_id) if graph_id is not None else None
        self._eager_options = _graph_run_options(EAGER_GRAPH_ID) if graph_id is not None else None

    @property
    def uses_cuda_graph(self) -> bool:
        return self.graph_id is not None

    @property
    def providers(self) -> Sequence[str]:
        return self.session.get_providers()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.spec, feeds)
        return self._binding.run(feeds, self._run_options)

    def run_eager(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The same session and buffers, without capturing or replaying its CUDA graph."""
        check_feeds(self.spec, feeds)
        return self._binding.run(feeds, self._eager_options)


def graph_replay_difference(engine: OrtCudaEngine, feeds_list: Sequence[Mapping[str, np.ndarray]]) -> float:
    """The largest |graph - eager| over the feeds on the same session (engine.base.replay_difference)."""
    if not engine.uses_cuda_graph:
        raise ValueError(f"{engine.spec.name}: this engine does not use a CUDA graph")
    return replay_difference(engine, feeds_list)


# --- The flow -------------------------------------------------------------------------------------------------------


def _device_name(placement: Placement, device_id: int) -> str:
    if placement.provider != CUDA:
        return placement.device
    return nvml.gpu_name(device_id) or f"CUDA device {device_id}"


def build_engines(
    graph_path: str | os.PathLike,
    specs: Sequence[ComponentSpec],
    options: CudaOptions,
    placement: Placement = ON_CUDA,
) -> tuple[OrtCudaEngine, ...]:
    """The engines of one component graph, one per spec, over one copy of its weights."""
    graph_path = Path(graph_path)
    used_before = nvml.gpu_memory_used(options.device_id) if placement.provider == CUDA else None
    weights = SharedWeights.load(graph_path, placement.device, options.device_id)
    device = _device_name(placement, options.device_id)
    engines = []
    for index, spec in enumerate(specs):
        cuda_graph = placement.provider == CUDA and options.uses_cuda_graph(spec)
        session = create_session(graph_path, spec, weights, options, placement, cuda_graph)
        binding = IoBinding(session, spec, placement.device, options.device_id)
        # A distinct graph id per shape, so graphs never mix even if shapes come to share a session.
        graph_id = index if cuda_graph else None
        engines.append(OrtCudaEngine(session, spec, weights, device, binding, graph_id, placement.backend))
    _log_loaded(graph_path, engines, weights, used_before, options.device_id)
    return tuple(engines)


def _log_loaded(graph_path, engines, weights, used_before, device_id) -> None:
    used_after = nvml.gpu_memory_used(device_id) if used_before is not None else None
    growth = f", GPU memory +{(used_after - used_before) / 2**20:.0f} MiB" if used_after is not None else ""
    log.info(
        "%s: %d shape(s) on %s over one copy of %d weight tensors (%.0f MiB)%s",
        graph_path.name,
        len(engines),
        engines[0].device if engines else "?",
        len(weights.views),
        weights.nbytes / 2**20,
        growth,
    )


def load_cuda_engines(
    graph_path: str | os.PathLike, specs: Sequence[ComponentSpec], options: CudaOptions | None = None
) -> tuple[OrtCudaEngine, ...]:
    """One engine per spec on the GPU, in the specs' order, all over one copy of the weights; a BackendUnavailableError
    when CUDA does not really run here."""
    options = options or CudaOptions()
    configure_python_allocator(options)
    check_cuda_available(options.device_id)
    return build_engines(graph_path, specs, options, ON_CUDA)
