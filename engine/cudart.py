"""The CUDA runtime through cuda-python (no torch, no cupy): device and pinned host buffers, one stream, graph capture.

Every call's status is checked: cuda-python returns `(status, *values)` and never raises, so an unchecked error
would surface much later as wrong numbers. A failure raises CudaError naming the call and CUDA's error name.
"""

from __future__ import annotations

import ctypes
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .ort import BackendUnavailableError

log = logging.getLogger(__name__)


class CudaError(RuntimeError):
    """A CUDA runtime call failed; the message names the call and CUDA's error."""


def import_cudart():
    """cuda-python's runtime module: `cuda.bindings.runtime` since 12.6, `cuda.cudart` before."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as e:
            raise BackendUnavailableError(
                "the tensorrt backend drives CUDA through cuda-python, which is not installed: install "
                "diffuserve[tensorrt] (or, on Jetson, cuda-python matching JetPack's CUDA, e.g. cuda-python==12.6.*)"
            ) from e
    return runtime


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: str  # "9.0"
    total_memory: int


class CudaRuntime:
    """The calls this project makes, each checked; `rt` is cuda-python's runtime module (or a stand-in in tests)."""

    def __init__(self, rt=None):
        self.rt = rt if rt is not None else import_cudart()
        self._success = self.rt.cudaError_t.cudaSuccess

    def call(self, name: str, *args):
        """Runs rt.<name>(*args); returns its one value, a tuple of several, or None."""
        status, *values = getattr(self.rt, name)(*args)
        if status != self._success:
            raise CudaError(f"{name} failed: {self.error_name(status)}")
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

    def error_name(self, status) -> str:
        try:
            _, name = self.rt.cudaGetErrorName(status)
            return name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # noqa: BLE001 - naming an error must not hide it
            return str(status)

    def device_count(self) -> int:
        return int(self.call("cudaGetDeviceCount"))

    def set_device(self, device_id: int) -> None:
        self.call("cudaSetDevice", device_id)

    def device_info(self, device_id: int) -> DeviceInfo:
        props = self.call("cudaGetDeviceProperties", device_id)
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return DeviceInfo(name.rstrip("\x00"), f"{props.major}.{props.minor}", int(props.totalGlobalMem))

    # Buffers are freed when their Python object goes (weakref.finalize), so a released engine returns its memory.

    def device_buffer(self, nbytes: int) -> DeviceBuffer:
        ptr = int(self.call("cudaMalloc", max(nbytes, 1)))
        return DeviceBuffer(ptr, nbytes, self._releaser("cudaFree", ptr))

    def host_buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> HostBuffer:
        """Page-locked host memory viewed as an array: copies from it run asynchronously at full bus speed."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        ptr = int(self.call("cudaMallocHost", max(nbytes, 1)))
        memory = (ctypes.c_byte * max(nbytes, 1)).from_address(ptr)
        array = np.frombuffer(memory, dtype, count=nbytes // dtype.itemsize)
        return HostBuffer(ptr, nbytes, array.reshape(shape), self._releaser("cudaFreeHost", ptr))

    def stream(self) -> Stream:
        handle = self.call("cudaStreamCreateWithFlags", self.rt.cudaStreamNonBlocking)
        return Stream(self, handle, self._releaser("cudaStreamDestroy", handle))

    def copy_to_device(self, dst: DeviceBuffer, src: HostBuffer, stream: Stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.call("cudaMemcpyAsync", dst.ptr, src.ptr, src.nbytes, kind, stream.handle)

    def copy_to_host(self, dst: HostBuffer, src: DeviceBuffer, stream: Stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.call("cudaMemcpyAsync", dst.ptr, src.ptr, dst.nbytes, kind, stream.handle)

    def capture(self, stream: Stream, enqueue: Callable[[], None]) -> CudaGraph:
        """What `enqueue` puts on the stream, recorded as a CUDA graph instead of run (thread-local capture mode: other
        threads' CUDA calls are not affected). The capture is ended even when `enqueue` fails."""
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self.call("cudaStreamBeginCapture", stream.handle, mode)
        try:
            enqueue()
        finally:
            graph = self.call("cudaStreamEndCapture", stream.handle)
        try:
            executable = self.call("cudaGraphInstantiate", graph, 0)
        finally:
            self.call("cudaGraphDestroy", graph)
        return CudaGraph(self, executable, self._releaser("cudaGraphExecDestroy", executable))

    def _releaser(self, name: str, handle) -> Callable[[], None]:
        def release() -> None:
            try:
                self.call(name, handle)
            except CudaError as e:  # at exit the context may be gone already
                log.debug("%s", e)

        return release


class _Owned:
    """Something CUDA allocated, released once: explicitly by close(), or when the object is collected."""

    def _own(self, release: Callable[[], None]) -> None:
        self._finalizer = weakref.finalize(self, release)

    def close(self) -> None:
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive


class DeviceBuffer(_Owned):
    def __init__(self, ptr: int, nbytes: int, release: Callable[[], None]):
        self.ptr, self.nbytes = ptr, nbytes
        self._own(release)


class HostBuffer(_Owned):
    def __init__(self, ptr: int, nbytes: int, array: np.ndarray, release: Callable[[], None]):
        self.ptr, self.nbytes, self.array = ptr, nbytes, array
        self._own(release)


class Stream(_Owned):
    def __init__(self, cuda: CudaRuntime, handle, release: Callable[[], None]):
        self._cuda, self.handle = cuda, handle
        self._own(release)

    @property
    def address(self) -> int:
        """The cudaStream_t as the integer TensorRT's Python API takes."""
        return int(self.handle)

    def synchronize(self) -> None:
        self._cuda.call("cudaStreamSynchronize", self.handle)


class CudaGraph(_Owned):
    def __init__(self, cuda: CudaRuntime, executable, release: Callable[[], None]):
        self._cuda, self.executable = cuda, executable
        self._own(release)

    def launch(self, stream: Stream) -> None:
        self._cuda.call("cudaGraphLaunch", self.executable, stream.handle)
