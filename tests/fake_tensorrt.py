"""Stand-ins for TensorRT and the CUDA runtime, which cannot exist on the machines these tests run on: there is no
NVIDIA GPU, and TensorRT's builder cannot be installed here (its libraries come only from NVIDIA's own index).

They implement only what diffuserve calls, under the real APIs' names (tests/test_trt.py checks every name against
the real `tensorrt_lean` and `cuda.bindings.runtime` modules, installed with the dev extra), check what the real
ones would refuse, record the calls, and compute for real:
- "device memory" is host memory, and `cudaMemcpyAsync` copies bytes, checking both ends are allocations that fit;
- a plan is JSON naming its ONNX graph and its profiles as the builder was given them; an engine runs that graph on
  ONNX Runtime's CPU provider, reading its inputs from the addresses its context was given and writing its outputs
  to theirs, so what comes out is exactly what diffuserve's bindings and copies put in;
- stream capture records `execute_async_v3` instead of running it, and a graph launch replays it.
"""

from __future__ import annotations

import ctypes
import enum
import json
import sys
from pathlib import Path

import numpy as np
import onnx

from diffuserve.engine.ort import cpu_session

# --- What diffuserve touches ----------------------------------------------------------------------------------------

# (class or module name, attribute) for every public attribute diffuserve's own code read from a stand-in: what
# test_trt.py checks against the real APIs.
ACCESSED: set[tuple[str, str]] = set()


def _record(owner: str, name: str) -> None:
    # Two frames up: the code that asked for the attribute (past __getattribute__).
    if not name.startswith("_") and sys._getframe(2).f_globals.get("__name__", "").startswith("diffuserve."):
        ACCESSED.add((owner, name))


class Recorded:
    """Instances record the attributes diffuserve reads from them."""

    def __getattribute__(self, name):
        _record(type(self).__name__, name)
        return object.__getattribute__(self, name)

    def __setattr__(self, name, value):
        _record(type(self).__name__, name)
        object.__setattr__(self, name, value)


class RecordedClass(type):
    """Classes record the class attributes diffuserve reads (ILogger.Severity)."""

    def __getattribute__(cls, name):
        _record(type.__getattribute__(cls, "__name__"), name)
        return type.__getattribute__(cls, name)


class RecordedEnum(enum.EnumMeta):
    """Enums record the members diffuserve reads."""

    def __getattribute__(cls, name):
        _record(type.__getattribute__(cls, "__name__"), name)
        return super().__getattribute__(name)


# --- CUDA runtime --------------------------------------------------------------------------------------------------


class cudaError_t(enum.IntEnum, metaclass=RecordedEnum):  # noqa: N801 - the real module's names
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidDevice = 101
    cudaErrorStreamCaptureUnsupported = 900


class cudaMemcpyKind(enum.IntEnum, metaclass=RecordedEnum):  # noqa: N801
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class cudaStreamCaptureMode(enum.IntEnum, metaclass=RecordedEnum):  # noqa: N801
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1


class FakeStream:
    def __init__(self, number: int):
        self.number = number
        self.captured: list | None = None

    def __int__(self) -> int:
        return self.number


class cudaDeviceProp(Recorded):  # noqa: N801
    def __init__(self, name: bytes, major: int, minor: int, total: int):
        self.name, self.major, self.minor, self.totalGlobalMem = name, major, minor, total


class FakeCudaRuntime(Recorded):
    """cuda.bindings.runtime: each call returns (status, *values), as cuda-python does."""

    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind
    cudaStreamCaptureMode = cudaStreamCaptureMode
    cudaStreamNonBlocking = 1

    def __init__(self, compute_capability: tuple[int, int] = (9, 0), name: str = "Fake H200", devices: int = 1):
        self.compute_capability, self.name, self.devices = compute_capability, name, devices
        self.calls: list[str] = []
        # address -> (kind, bytes): what is allocated, and on which side.
        self.allocations: dict[int, tuple[str, np.ndarray]] = {}
        self.streams: dict[int, FakeStream] = {}
        self.fail: dict[str, cudaError_t] = {}

    def _record(self, name: str):
        self.calls.append(name)
        return self.fail.get(name)

    def cudaGetErrorName(self, status):  # noqa: N802
        return cudaError_t.cudaSuccess, cudaError_t(status).name.encode()

    def cudaGetDeviceCount(self):  # noqa: N802
        return (self._record("cudaGetDeviceCount") or cudaError_t.cudaSuccess), self.devices

    def cudaSetDevice(self, device):  # noqa: N802
        failed = self._record("cudaSetDevice")
        return (failed or (cudaError_t.cudaSuccess if device < self.devices else cudaError_t.cudaErrorInvalidDevice),)

    def cudaGetDeviceProperties(self, device):  # noqa: N802
        major, minor = self.compute_capability
        props = cudaDeviceProp(self.name.encode(), major, minor, 141 * 2**30)
        return (self._record("cudaGetDeviceProperties") or cudaError_t.cudaSuccess), props

    def _allocate(self, kind: str, size: int):
        failed = self._record("cudaMalloc" if kind == "device" else "cudaMallocHost")
        if failed:
            return failed, 0
        # 256-byte aligned, as cudaMalloc's are (TensorRT requires it of the activation memory).
        raw = np.zeros(size + 256, np.uint8)
        address = (raw.ctypes.data + 255) // 256 * 256
        self.allocations[address] = (kind, raw[address - raw.ctypes.data :][:size])
        return cudaError_t.cudaSuccess, address

    def _release(self, kind: str, address: int):
        if self.allocations.get(address, ("?",))[0] != kind:
            return (cudaError_t.cudaErrorInvalidValue,)
        del self.allocations[address]
        return (cudaError_t.cudaSuccess,)

    def cudaMalloc(self, size):  # noqa: N802
        return self._allocate("device", size)

    def cudaFree(self, address):  # noqa: N802
        self._record("cudaFree")
        return self._release("device", address)

    def cudaMallocHost(self, size):  # noqa: N802
        return self._allocate("host", size)

    def cudaFreeHost(self, address):  # noqa: N802
        self._record("cudaFreeHost")
        return self._release("host", address)

    def memory(self, address: int, nbytes: int, kind: str) -> np.ndarray | None:
        """The bytes [address, address + nbytes) inside one allocation of that kind, or None."""
        for start, (k, data) in self.allocations.items():
            if k == kind and start <= address and address + nbytes <= start + data.nbytes:
                return data[address - start :][:nbytes]
        return None

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):  # noqa: N802
        self._record(f"cudaMemcpyAsync:{cudaMemcpyKind(kind).name}")
        ends = ("device", "host") if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else ("host", "device")
        target, source = self.memory(dst, count, ends[0]), self.memory(src, count, ends[1])
        if target is None or source is None or int(stream) not in self.streams:
            return (cudaError_t.cudaErrorInvalidValue,)
        ctypes.memmove(dst, src, count)
        return (cudaError_t.cudaSuccess,)

    def cudaStreamCreateWithFlags(self, flags):  # noqa: N802
        self._record("cudaStreamCreateWithFlags")
        stream = FakeStream(len(self.streams) + 1)
        self.streams[stream.number] = stream
        return cudaError_t.cudaSuccess, stream

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        self._record("cudaStreamSynchronize")
        return (cudaError_t.cudaSuccess,)

    def cudaStreamDestroy(self, stream):  # noqa: N802
        self.streams.pop(int(stream), None)
        return (cudaError_t.cudaSuccess,)

    def cudaStreamBeginCapture(self, stream, mode):  # noqa: N802
        self._record("cudaStreamBeginCapture")
        stream.captured = []
        return (cudaError_t.cudaSuccess,)

    def cudaStreamEndCapture(self, stream):  # noqa: N802
        self._record("cudaStreamEndCapture")
        ops, stream.captured = stream.captured, None
        return (self.fail.get("cudaStreamEndCapture") or cudaError_t.cudaSuccess), ops

    def cudaGraphInstantiate(self, graph, flags):  # noqa: N802
        self._record("cudaGraphInstantiate")
        return cudaError_t.cudaSuccess, list(graph)

    def cudaGraphDestroy(self, graph):  # noqa: N802
        return (cudaError_t.cudaSuccess,)

    def cudaGraphExecDestroy(self, executable):  # noqa: N802
        self._record("cudaGraphExecDestroy")
        return (cudaError_t.cudaSuccess,)

    def cudaGraphLaunch(self, executable, stream):  # noqa: N802
        self._record("cudaGraphLaunch")
        for op in executable:
            op()
        return (cudaError_t.cudaSuccess,)


# --- TensorRT ------------------------------------------------------------------------------------------------------


class Severity(enum.IntEnum, metaclass=RecordedEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class ILogger(metaclass=RecordedClass):
    Severity = Severity

    def __init__(self) -> None:
        pass


class IProgressMonitor(metaclass=RecordedClass):
    def __init__(self) -> None:
        pass


class NetworkDefinitionCreationFlag(enum.IntEnum, metaclass=RecordedEnum):
    STRONGLY_TYPED = 1


class MemoryPoolType(enum.IntEnum, metaclass=RecordedEnum):
    WORKSPACE = 0


class ExecutionContextAllocationStrategy(enum.IntEnum, metaclass=RecordedEnum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class TensorIOMode(enum.IntEnum, metaclass=RecordedEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.IntEnum, metaclass=RecordedEnum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    INT64 = 8


NUMPY_TYPES = {
    DataType.FLOAT: np.float32,
    DataType.HALF: np.float16,
    DataType.INT32: np.int32,
    DataType.INT64: np.int64,
}
ONNX_TYPES = {1: DataType.FLOAT, 10: DataType.HALF, 6: DataType.INT32, 7: DataType.INT64}


def nptype(data_type):
    return NUMPY_TYPES[data_type]


class ParserError(Recorded):
    def __init__(self, node: int, name: str, op: str, desc: str):
        self._node, self._name, self._op, self._desc = node, name, op, desc

    def node(self):
        return self._node

    def node_name(self):
        return self._name

    def node_operator(self):
        return self._op

    def desc(self):
        return self._desc


class INetworkDefinition(Recorded):
    def __init__(self, flags: int):
        self.flags = flags
        self.graph_path: str | None = None
        self.tensors: dict[str, tuple[int, DataType]] = {}  # name -> (TensorIOMode, DataType)


class OnnxParser(Recorded):
    """Reads the graph's I/O, and refuses ops outside the standard domains (the real parser has no kernels for
    onnxruntime's com.microsoft ops), naming the node."""

    def __init__(self, network: INetworkDefinition, logger):
        self.network = network
        self._errors: list[ParserError] = []

    def parse_from_file(self, path) -> bool:
        model = onnx.load(str(path), load_external_data=False)
        for index, node in enumerate(model.graph.node):
            if node.domain not in ("", "ai.onnx"):
                self._errors.append(ParserError(index, node.name, node.op_type, "No importer registered for op"))
        if self._errors:
            return False
        self.network.graph_path = str(path)
        for mode, values in ((TensorIOMode.INPUT, model.graph.input), (TensorIOMode.OUTPUT, model.graph.output)):
            for value in values:
                self.network.tensors[value.name] = (mode, ONNX_TYPES[value.type.tensor_type.elem_type])
        return True

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> ParserError:
        return self._errors[index]


class IOptimizationProfile(Recorded):
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name, min, opt, max):  # noqa: A002 - the real signature's names
        self.shapes[name] = (tuple(min), tuple(opt), tuple(max))


class ITimingCache(Recorded):
    """Serialises to JSON: the list of builds that timed with it, so reuse across builds shows."""

    def __init__(self, data: bytes):
        self.entries: list[str] = json.loads(data) if data else []

    def serialize(self) -> bytes:
        return json.dumps(self.entries).encode()


class IBuilderConfig(Recorded):
    def __init__(self) -> None:
        self.pools: dict[int, int] = {}
        self.profiles: list[IOptimizationProfile] = []
        self.builder_optimization_level = 3
        self.progress_monitor = None
        self._cache: ITimingCache | None = None

    def set_memory_pool_limit(self, pool, size) -> None:
        self.pools[int(pool)] = int(size)

    def create_timing_cache(self, serialized) -> ITimingCache:
        return ITimingCache(bytes(serialized))

    def set_timing_cache(self, cache, ignore_mismatch) -> bool:
        self._cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache:
        return self._cache

    def add_optimization_profile(self, profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1


class Builder(Recorded):
    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags: int) -> INetworkDefinition:
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig):
        """A plan as JSON; refuses what the real builder would: a network that is not strongly typed (an fp16 graph
        needs it on 10.x), and profiles that leave an input without a shape."""
        if not network.flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED):
            return None
        inputs = [name for name, (mode, _) in network.tensors.items() if mode == TensorIOMode.INPUT]
        if not config.profiles or any(set(p.shapes) != set(inputs) for p in config.profiles):
            return None
        monitor = config.progress_monitor
        if monitor is not None:
            monitor.phase_start("Building engine", None, len(config.profiles))
            for step in range(len(config.profiles)):
                monitor.step_complete("Building engine", step)
            monitor.phase_finish("Building engine")
        if config._cache is not None:
            config._cache.entries.append(Path(network.graph_path).name)
        return json.dumps(
            {
                "graph": network.graph_path,
                "tensors": {name: [int(m), int(t)] for name, (m, t) in network.tensors.items()},
                "profiles": [{name: list(map(list, s)) for name, s in p.shapes.items()} for p in config.profiles],
            }
        ).encode()


class Runtime(Recorded):
    # The CUDA runtime whose memory the engines' contexts read and write (a subclass per fake_tensorrt_modules).
    cuda: FakeCudaRuntime

    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine):
        try:
            plan = json.loads(bytes(serialized_engine))
        except (ValueError, UnicodeDecodeError):
            return None
        return ICudaEngine(plan, self.cuda)


class ICudaEngine(Recorded):
    def __init__(self, plan: dict, cuda: FakeCudaRuntime):
        self.plan, self.cuda = plan, cuda
        self._names = list(plan["tensors"])
        self._session = None
        self.contexts: list[IExecutionContext] = []

    @property
    def num_io_tensors(self) -> int:
        return len(self._names)

    def get_tensor_name(self, index: int) -> str:
        return self._names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode(self.plan["tensors"][name][0])

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType(self.plan["tensors"][name][1])

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.plan["profiles"])

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list:
        return [tuple(s) for s in self.plan["profiles"][profile_index][name]]

    def get_device_memory_size_for_profile_v2(self, profile_index: int) -> int:
        """Grows with the profile's input volume, so the profiles of a plan need different amounts."""
        shapes = self.plan["profiles"][profile_index]
        return 1024 + 16 * sum(int(np.prod(s[0])) for s in shapes.values())

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
        context = IExecutionContext(self, strategy)
        self.contexts.append(context)
        return context

    def session(self):
        if self._session is None:
            self._session = cpu_session(self.plan["graph"])
        return self._session


class IExecutionContext(Recorded):
    def __init__(self, engine: ICudaEngine, strategy):
        self.engine, self.strategy = engine, strategy
        self.calls: list[str] = []
        self.profile: int | None = None
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.device_memory: tuple[int, int] | None = None
        self.executions = 0

    def set_optimization_profile_async(self, profile_index, stream_handle) -> bool:
        self.calls.append("set_optimization_profile_async")
        if not 0 <= profile_index < self.engine.num_optimization_profiles:
            return False
        self.profile = profile_index
        return True

    def _profile_shape(self, name: str) -> tuple:
        return tuple(self.engine.get_tensor_profile_shape(name, self.profile)[0])

    def set_input_shape(self, name, shape) -> bool:
        self.calls.append("set_input_shape")
        if self.profile is None or self.engine.get_tensor_mode(name) != TensorIOMode.INPUT:
            return False
        if tuple(shape) != self._profile_shape(name):  # min = opt = max: only that shape is in the profile
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name) -> tuple:
        if self.engine.get_tensor_mode(name) == TensorIOMode.INPUT:
            return self.shapes.get(name, ())
        # The outputs' shapes, as shape inference gives them once every input shape is set.
        feeds = {n: np.zeros(s, nptype(self.engine.get_tensor_dtype(n))) for n, s in self.shapes.items()}
        return self.engine.session().run([name], feeds)[0].shape

    def set_tensor_address(self, name, memory) -> bool:
        self.calls.append("set_tensor_address")
        self.addresses[name] = int(memory)
        return True

    def set_device_memory(self, memory, size) -> None:
        self.calls.append("set_device_memory")
        self.device_memory = (int(memory), int(size))

    def execute_async_v3(self, stream_handle) -> bool:
        self.calls.append("execute_async_v3")
        stream = self.engine.cuda.streams.get(int(stream_handle))
        if stream is None or not self._ready():
            return False
        if stream.captured is not None:
            stream.captured.append(self._compute)
        else:
            self._compute()
        return True

    def _ready(self) -> bool:
        """What the real runtime requires before it runs: a profile, every input shape, every tensor's address, and
        with USER_MANAGED an activation block at least as large as the profile needs."""
        if self.profile is None or set(self.addresses) != set(self.engine._names):
            return False
        inputs = [n for n in self.engine._names if self.engine.get_tensor_mode(n) == TensorIOMode.INPUT]
        if set(self.shapes) != set(inputs):
            return False
        if self.strategy == ExecutionContextAllocationStrategy.USER_MANAGED:
            needed = self.engine.get_device_memory_size_for_profile_v2(self.profile)
            memory = self.device_memory
            return memory is not None and self.engine.cuda.memory(memory[0], needed, "device") is not None
        return True

    def _tensor(self, name: str, shape: tuple) -> np.ndarray:
        dtype = np.dtype(nptype(self.engine.get_tensor_dtype(name)))
        nbytes = int(np.prod(shape)) * dtype.itemsize
        memory = self.engine.cuda.memory(self.addresses[name], nbytes, "device")
        if memory is None:
            raise ValueError(f"{name}: its address does not hold {nbytes} bytes of device memory")
        return memory.view(dtype).reshape(shape)

    def _compute(self) -> None:
        self.executions += 1
        feeds = {name: self._tensor(name, shape).copy() for name, shape in self.shapes.items()}
        session = self.engine.session()
        names = [o.name for o in session.get_outputs()]
        for name, value in zip(names, session.run(names, feeds), strict=True):
            self._tensor(name, value.shape)[...] = value
        # Scribble on the activation block, as a real engine's scratch would: contexts sharing it must not care.
        if self.device_memory:
            self.engine.cuda.memory(self.device_memory[0], 8, "device")[...] = self.executions % 256


class FakeTensorRT(Recorded):
    """The tensorrt module."""

    def __init__(self, **attributes):
        self.__dict__.update(attributes)


def fake_tensorrt_modules(version: str = "10.3.0", **cuda) -> tuple[FakeTensorRT, FakeCudaRuntime]:
    """A tensorrt module and a cuda-python runtime module that work together."""
    cudart = FakeCudaRuntime(**cuda)
    trt = FakeTensorRT(
        __version__=version,
        __file__=__file__,
        ILogger=ILogger,
        IProgressMonitor=IProgressMonitor,
        Builder=Builder,
        OnnxParser=OnnxParser,
        Runtime=type("Runtime", (Runtime,), {"cuda": cudart}),
        NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag,
        MemoryPoolType=MemoryPoolType,
        ExecutionContextAllocationStrategy=ExecutionContextAllocationStrategy,
        TensorIOMode=TensorIOMode,
        DataType=DataType,
        nptype=nptype,
    )
    return trt, cudart
