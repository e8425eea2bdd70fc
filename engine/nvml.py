"""The GPU's name and memory through NVML (the NVIDIA driver's management library), over ctypes.

No Python package is needed: NVML comes with the driver as libnvidia-ml.so.1. Where it is absent (a CPU machine,
a container started without the driver's libraries) the `gpu_*` functions return None and `query` raises
NvmlUnavailableError saying what is missing.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)

LIBRARY = "libnvidia-ml.so.1"
NVML_SUCCESS = 0
# NVML_DEVICE_NAME_V2_BUFFER_SIZE in nvml.h: the longest name NVML writes, terminator included.
NAME_BUFFER_SIZE = 96


class NvmlUnavailableError(RuntimeError):
    """NVML cannot be loaded or does not answer for the device asked about."""


class _Memory(ctypes.Structure):
    # nvmlMemory_t (version 1), all in bytes; "used" counts every process on the device, as nvidia-smi shows it.
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


@dataclass(frozen=True)
class GpuInfo:
    name: str
    memory_used: int
    memory_total: int


def nvml_index(device_id: int, visible_devices: str | None) -> int | str:
    """The NVML handle key for a CUDA device ordinal: NVML numbers every GPU in PCI order and ignores
    CUDA_VISIBLE_DEVICES, which renumbers them for CUDA; a UUID entry there is returned as the UUID."""
    if not visible_devices:
        return device_id
    entries = [e.strip() for e in visible_devices.split(",") if e.strip()]
    if device_id >= len(entries):
        raise NvmlUnavailableError(
            f"CUDA device {device_id} is not visible: CUDA_VISIBLE_DEVICES={visible_devices!r} lists {len(entries)}"
        )
    entry = entries[device_id]
    return int(entry) if entry.isdigit() else entry


def _load() -> ctypes.CDLL:
    try:
        return ctypes.CDLL(LIBRARY)
    except OSError as e:
        raise NvmlUnavailableError(f"NVML ({LIBRARY}, installed with the NVIDIA driver) cannot be loaded: {e}") from e


def _check(lib: ctypes.CDLL, status: int, call: str) -> None:
    if status != NVML_SUCCESS:
        lib.nvmlErrorString.restype = ctypes.c_char_p
        message = lib.nvmlErrorString(status) or b"unknown error"
        raise NvmlUnavailableError(f"{call} failed: NVML error {status} ({message.decode(errors='replace')})")


@contextmanager
def _initialized() -> Iterator[ctypes.CDLL]:
    lib = _load()
    _check(lib, lib.nvmlInit_v2(), "nvmlInit_v2")
    try:
        yield lib
    finally:
        lib.nvmlShutdown()


def _handle(lib: ctypes.CDLL, device_id: int) -> ctypes.c_void_p:
    key = nvml_index(device_id, os.environ.get("CUDA_VISIBLE_DEVICES"))
    handle = ctypes.c_void_p()
    if isinstance(key, int):
        _check(lib, lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(key), ctypes.byref(handle)), f"device {key}")
    else:
        _check(lib, lib.nvmlDeviceGetHandleByUUID(key.encode(), ctypes.byref(handle)), f"device {key}")
    return handle


def query(device_id: int = 0) -> GpuInfo:
    """The CUDA device's name and memory (bytes, device-wide); raises NvmlUnavailableError without NVML."""
    with _initialized() as lib:
        handle = _handle(lib, device_id)
        name = ctypes.create_string_buffer(NAME_BUFFER_SIZE)
        _check(lib, lib.nvmlDeviceGetName(handle, name, ctypes.c_uint(NAME_BUFFER_SIZE)), "nvmlDeviceGetName")
        memory = _Memory()
        _check(lib, lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)), "nvmlDeviceGetMemoryInfo")
    return GpuInfo(name.value.decode(errors="replace"), int(memory.used), int(memory.total))


def _query_or_none(device_id: int) -> GpuInfo | None:
    try:
        return query(device_id)
    except NvmlUnavailableError as e:
        log.debug("no GPU figures for device %d: %s", device_id, e)
        return None


def gpu_name(device_id: int = 0) -> str | None:
    """The GPU's name, e.g. "NVIDIA H200", or None where NVML is absent."""
    info = _query_or_none(device_id)
    return info.name if info else None


def gpu_memory_used(device_id: int = 0) -> int | None:
    """Bytes in use on the GPU (every process, as nvidia-smi counts), or None where NVML is absent."""
    info = _query_or_none(device_id)
    return info.memory_used if info else None


def gpu_memory_total(device_id: int = 0) -> int | None:
    info = _query_or_none(device_id)
    return info.memory_total if info else None
