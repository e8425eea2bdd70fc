"""TensorRT: one deserialised engine per component, an execution context per optimization profile (one per shape).

The flow of `load_tensorrt_engines`, top to bottom:
1. `TrtDevice.shared`: TensorRT (10.3 or newer) and cuda-python import and a GPU is there, or a
   BackendUnavailableError says what to install; one stream and one activation-memory block per GPU, for every model.
2. `find_plans`: the manifest's plan set whose key (compute capability, TensorRT version, precision, shapes) is this
   machine's, else a PlanMismatchError saying to run `diffuserve build-engines` (a plan is never deserialised blind).
3. Per component, `load_plan`: the plan file checked against the sha256 recorded when it was built, deserialised, and
   its I/O tensors and profiles checked against the manifest's shapes.
4. Per shape, `TrtEngine`: a context without memory of its own (USER_MANAGED) on that shape's profile, its input
   shapes set, device and page-locked host buffers allocated once and their addresses set, the activation block
   given; the U-Net's call is captured as a CUDA graph after its first eager run and replayed after.

Written against TensorRT's documented Python API (10.3, JetPack 6, through 11.x) and cuda-python; the machines that
wrote it have no GPU, so it runs here only against the stand-ins of tests/fake_tensorrt.py.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import check_feeds, replay_difference
from .cudart import CudaError, CudaRuntime, DeviceBuffer, HostBuffer
from .manifest import TENSORRT_TARGET, UNET, ComponentGraph, ComponentSpec, Manifest, PlanFile, PlanKey, PlanSet
from .ort import BackendUnavailableError

log = logging.getLogger(__name__)

# The oldest TensorRT this runs on: JetPack 6's. It has the name-based I/O API of 10.x, execute_async_v3 and the
# v2 device-memory calls (10.1+).
MIN_TENSORRT = (10, 3)
# Plans live beside the target's graphs, one folder per key.
PLANS_FOLDER = "plans"
BUILD_HINT = "run `diffuserve build-engines {folder}` on this machine (or serve with --build-missing)"


class PlanMismatchError(BackendUnavailableError):
    """The folder has no plans for this GPU and TensorRT (or they changed since they were built)."""


class TrtError(RuntimeError):
    """A TensorRT call refused its arguments (they return False rather than raise); the message names the call."""


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise BackendUnavailableError(
            "TensorRT's Python package is not installed: install diffuserve[tensorrt] on the GPU machine (on Jetson, "
            "JetPack's python3-libnvinfer, visible to a venv made with --system-site-packages)"
        ) from e
    return tensorrt


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def check_version(trt) -> None:
    if version_tuple(trt.__version__) < MIN_TENSORRT:
        raise BackendUnavailableError(
            f"TensorRT {trt.__version__} is older than {'.'.join(map(str, MIN_TENSORRT))}, the oldest diffuserve runs"
        )


# TensorRT's severities as logging levels: its INFO narrates every build phase, so it goes to DEBUG.
def _log_level(trt, severity) -> int:
    levels = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.ERROR,
        trt.ILogger.Severity.ERROR: logging.ERROR,
        trt.ILogger.Severity.WARNING: logging.WARNING,
    }
    return levels.get(severity, logging.DEBUG)


def make_logger(trt):
    """An ILogger that hands TensorRT's messages to Python logging."""

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, msg) -> None:
            log.log(_log_level(trt, severity), "TensorRT: %s", msg)

    return Logger()


def ok(result: bool, call: str) -> None:
    if not result:
        raise TrtError(f"TensorRT refused {call} (its log above says why)")


@dataclass(frozen=True)
class TrtOptions:
    """The tensorrt backend's settings for every engine of a server."""

    device_id: int = 0
    # Replay the U-Net's call as a CUDA graph, one per shape, after its first eager run.
    cuda_graph: bool = True
    # Build the plans a folder lacks for this machine at start-up instead of refusing it.
    build_missing: bool = False
    # For builds: the builder's workspace limit (None: TensorRT's default, the device's memory) and timing cache.
    workspace_gb: float | None = None
    timing_cache: str | None = None

    def __post_init__(self) -> None:
        if self.device_id < 0:
            raise ValueError(f"device_id must be >= 0, got {self.device_id}")
        if self.workspace_gb is not None and self.workspace_gb <= 0:
            raise ValueError(f"--workspace-gb must be positive, got {self.workspace_gb}")


# --- 1. The device: one stream, one activation block ------------------------------------------------------------


class ActivationMemory:
    """One device block for the activations of every context on a GPU, the size of the largest need: the engines of
    the pipelines run one at a time (TrtDevice.lock), so they never use it at once. When a context that needs more is
    added, every context moves to the new, larger block."""

    def __init__(self, cuda: CudaRuntime):
        self._cuda = cuda
        self._block: DeviceBuffer | None = None
        self._users: weakref.WeakSet[TrtEngine] = weakref.WeakSet()

    @property
    def size(self) -> int:
        return self._block.nbytes if self._block else 0

    def attach(self, user: TrtEngine, nbytes: int) -> None:
        if nbytes > self.size:
            old, self._block = self._block, self._cuda.device_buffer(nbytes)
            for other in list(self._users):
                other.use_activation_memory(self._block.ptr, self._block.nbytes)
            if old is not None:
                old.close()
            log.debug("activation memory: one block of %.1f MiB", nbytes / 2**20)
        self._users.add(user)
        user.use_activation_memory(self._block.ptr, self._block.nbytes)


class TrtDevice:
    """TensorRT and CUDA on one GPU: the runtime that deserialises plans, one stream every engine runs on, the shared
    activation memory, and the lock that runs one engine at a time."""

    _shared: dict[int, TrtDevice] = {}
    _shared_lock = threading.Lock()

    def __init__(self, trt, cuda: CudaRuntime, device_id: int = 0):
        check_version(trt)
        self.trt, self.cuda, self.device_id = trt, cuda, device_id
        try:
            if cuda.device_count() <= device_id:
                raise BackendUnavailableError(f"no CUDA device {device_id} here ({cuda.device_count()} found)")
            cuda.set_device(device_id)
            self.info = cuda.device_info(device_id)
            self.stream = cuda.stream()
        except CudaError as e:
            raise BackendUnavailableError(f"CUDA does not run here: {e}") from e
        self.logger = make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.activations = ActivationMemory(cuda)
        self.lock = threading.Lock()

    @classmethod
    def shared(cls, device_id: int = 0) -> TrtDevice:
        """The process's one TrtDevice for a GPU, so every model served shares its stream and activation block."""
        with cls._shared_lock:
            if device_id not in cls._shared:
                cls._shared[device_id] = cls(import_tensorrt(), CudaRuntime(), device_id)
            return cls._shared[device_id]

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def provider(self) -> str:
        return f"TensorRT {self.trt.__version__}"

    def plan_key(self, target_precision: str, shapes_digest: str) -> PlanKey:
        return PlanKey(self.info.compute_capability, self.trt.__version__, target_precision, shapes_digest)


def tensorrt_unavailable_reason(device_id: int = 0) -> str | None:
    """Why the tensorrt backend cannot run here, or None when TensorRT, cuda-python and a GPU are all there."""
    try:
        TrtDevice.shared(device_id)
    except BackendUnavailableError as e:
        return str(e)
    return None


# --- 2. The plans for this machine ---------------------------------------------------------------------------------


def plans_folder(folder: Path) -> Path:
    return folder / TENSORRT_TARGET / PLANS_FOLDER


def machine_key(device: TrtDevice, manifest: Manifest) -> PlanKey:
    target = manifest.target(TENSORRT_TARGET)
    return device.plan_key(target.precision, target.shapes_digest())


def find_plans(folder: Path, manifest: Manifest, key: PlanKey) -> PlanSet:
    """The plan set built for this key; a folder without one is refused, saying what it has and what to run."""
    plan_sets = manifest.target(TENSORRT_TARGET).plans
    for plans in plan_sets:
        if plans.key == key:
            return plans
    built = "; ".join(f"{p.key.describe()} (on {p.gpu or 'an unnamed GPU'})" for p in plan_sets) or "none"
    raise PlanMismatchError(
        f"model {manifest.name!r} has no TensorRT plans for this machine ({key.describe()}); plans built: {built}. "
        "A plan runs only on the GPU architecture and TensorRT version that built it: "
        + BUILD_HINT.format(folder=folder)
    )


def read_plan(folder: Path, component: str, plan: PlanFile) -> bytes:
    """The plan's bytes, checked against the digest recorded when it was built."""
    path = folder / plan.plan_file
    if not path.is_file():
        raise PlanMismatchError(f"{component}: plan {path} is missing; " + BUILD_HINT.format(folder=folder))
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != plan.sha256:
        raise PlanMismatchError(
            f"{component}: plan {path} is not the one built (its sha256 differs from the manifest's); "
            + BUILD_HINT.format(folder=folder)
        )
    return data


# --- 3. One engine per component, checked against the manifest ---------------------------------------------------


def tensor_names(engine) -> list[str]:
    return [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]


def check_engine(trt, engine, graph: ComponentGraph, component: str) -> None:
    """The plan's tensors, dtypes and profiles are the manifest's: profile i is shape i, min = opt = max."""
    specs = [shape.spec for shape in graph.shapes]
    first = specs[0]
    expected = {t.name: (trt.TensorIOMode.INPUT, t.dtype) for t in first.inputs}
    expected |= {t.name: (trt.TensorIOMode.OUTPUT, t.dtype) for t in first.outputs}
    actual = {
        name: (engine.get_tensor_mode(name), np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name)
        for name in tensor_names(engine)
    }
    if actual != expected:
        raise PlanMismatchError(f"{component}: the plan's tensors are {actual}, the manifest's {expected}: rebuild it")
    if engine.num_optimization_profiles != len(specs):
        raise PlanMismatchError(
            f"{component}: the plan has {engine.num_optimization_profiles} profiles, the manifest {len(specs)} shapes"
        )
    for index, spec in enumerate(specs):
        for t in spec.inputs:
            shapes = [tuple(dims) for dims in engine.get_tensor_profile_shape(t.name, index)]
            if shapes != [t.shape] * 3:
                raise PlanMismatchError(
                    f"{component}: profile {index} of the plan has {t.name} min/opt/max {shapes}, the manifest's "
                    f"shape is {list(t.shape)}: rebuild it"
                )


def load_plan(device: TrtDevice, folder: Path, component: str, graph: ComponentGraph, plan: PlanFile):
    engine = device.runtime.deserialize_cuda_engine(read_plan(folder, component, plan))
    if engine is None:
        raise PlanMismatchError(
            f"{component}: TensorRT could not deserialise {plan.plan_file} (its log above says why); "
            + BUILD_HINT.format(folder=folder)
        )
    check_engine(device.trt, engine, graph, component)
    return engine


# --- 4. An engine per shape ----------------------------------------------------------------------------------------


@dataclass
class Binding:
    """One I/O tensor's buffers: page-locked host memory the feeds are copied into (or outputs out of), and the
    device memory whose address the context holds."""

    host: HostBuffer
    device: DeviceBuffer


class TrtEngine:
    """One shape of a component: a context on its profile, its buffers, and, for the U-Net, its CUDA graph."""

    backend = "tensorrt"

    def __init__(self, device: TrtDevice, engine, profile: int, spec: ComponentSpec, cuda_graph: bool = False):
        self.spec = spec
        self.profile = profile
        self.device = device.name
        self.providers = (device.provider,)
        self._device = device
        # The deserialised engine holds the weights (once for all its profiles) and must outlive its contexts.
        self.weights = engine
        self._cuda_graph_wanted = cuda_graph
        self._graph = None
        # Eager runs so far: the first one does TensorRT's lazy set-up, which a graph capture must not record.
        self._eager_runs = 0
        trt, cuda, stream = device.trt, device.cuda, device.stream
        self._context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self._context is None:
            raise TrtError(f"{spec.name}: TensorRT could not create an execution context for profile {profile}")
        ok(self._context.set_optimization_profile_async(profile, stream.address), f"profile {profile}")
        for t in spec.inputs:
            ok(self._context.set_input_shape(t.name, t.shape), f"{spec.name} input shape {t.name} {list(t.shape)}")
        self._inputs = {t.name: self._bind(cuda, t) for t in spec.inputs}
        self._outputs = {t.name: self._bind(cuda, t) for t in spec.outputs}
        for t in spec.outputs:
            shape = tuple(self._context.get_tensor_shape(t.name))
            if shape != t.shape:
                raise TrtError(f"{spec.name}: output {t.name} is {list(shape)} at this profile, the spec's {t.shape}")
        device.activations.attach(self, engine.get_device_memory_size_for_profile_v2(profile))
        # Switching the profile may have enqueued copies.
        stream.synchronize()

    def _bind(self, cuda: CudaRuntime, tensor) -> Binding:
        host = cuda.host_buffer(tensor.shape, tensor.np_dtype)
        binding = Binding(host, cuda.device_buffer(host.nbytes))
        ok(self._context.set_tensor_address(tensor.name, binding.device.ptr), f"address of {tensor.name}")
        return binding

    def use_activation_memory(self, ptr: int, nbytes: int) -> None:
        """Points the context at the shared block; a CUDA graph captured on another block is dropped."""
        self._context.set_device_memory(ptr, nbytes)
        self._graph = None

    @property
    def uses_cuda_graph(self) -> bool:
        return self._graph is not None

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._run(feeds, graph=self._cuda_graph_wanted)

    def run_eager(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The same context and buffers, without the CUDA graph."""
        return self._run(feeds, graph=False)

    def _run(self, feeds: Mapping[str, np.ndarray], graph: bool) -> dict[str, np.ndarray]:
        check_feeds(self.spec, feeds)
        device = self._device
        cuda, stream = device.cuda, device.stream
        with device.lock:
            for name, binding in self._inputs.items():
                np.copyto(binding.host.array, feeds[name])
                cuda.copy_to_device(binding.device, binding.host, stream)
            if graph and self._graph is not None:
                self._graph.launch(stream)
            else:
                self._enqueue()
                self._eager_runs += 1
            for binding in self._outputs.values():
                cuda.copy_to_host(binding.host, binding.device, stream)
            stream.synchronize()
            if graph and self._graph is None:
                self._capture()
            return {name: binding.host.array.copy() for name, binding in self._outputs.items()}

    def _enqueue(self) -> None:
        ok(self._context.execute_async_v3(self._device.stream.address), f"{self.spec.name} execute_async_v3")

    def _capture(self) -> None:
        """Records the enqueue, after an eager run did TensorRT's lazy set-up, as a CUDA graph; the buffers never
        move, so every replay reads the inputs copied in before it. A failure leaves the engine eager."""
        try:
            self._graph = self._device.cuda.capture(self._device.stream, self._enqueue)
        except (CudaError, TrtError) as e:
            log.warning("%s: CUDA graph capture failed, running eagerly: %s", self.spec.name, e)
            self._cuda_graph_wanted = False


def graph_replay_difference(engine: TrtEngine, feeds_list: Sequence[Mapping[str, np.ndarray]]) -> float:
    """The largest |graph - eager| over the feeds: the first run is eager and captures, later ones replay."""
    return replay_difference(engine, feeds_list)


# --- The flow ------------------------------------------------------------------------------------------------------


def load_component(
    device: TrtDevice, folder: Path, manifest: Manifest, plans: PlanSet, component: str, options: TrtOptions
) -> tuple[TrtEngine, ...]:
    """One component's engine and a TrtEngine per shape over it, in the manifest's order."""
    graph = manifest.target(TENSORRT_TARGET).components[component]
    if component not in plans.components:
        raise PlanMismatchError(f"{component}: no plan in the set built; " + BUILD_HINT.format(folder=folder))
    engine = load_plan(device, folder, component, graph, plans.components[component])
    cuda_graph = options.cuda_graph and component == UNET
    return tuple(TrtEngine(device, engine, index, s.spec, cuda_graph) for index, s in enumerate(graph.shapes))


def load_tensorrt_engines(
    folder: str | Path,
    manifest: Manifest,
    components: Sequence[str],
    options: TrtOptions | None = None,
    device: TrtDevice | None = None,
) -> dict[str, tuple[TrtEngine, ...]]:
    folder, options = Path(folder), options or TrtOptions()
    device = device or TrtDevice.shared(options.device_id)
    manifest.require(TENSORRT_TARGET, components)
    plans = find_plans(folder, manifest, machine_key(device, manifest))
    return {name: load_component(device, folder, manifest, plans, name, options) for name in components}
