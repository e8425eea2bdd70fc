"""What the serving process holds: its resident memory (Linux /proc) and the GPU memory in use on its device."""

from __future__ import annotations


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    return _proc_status_bytes("VmRSS")


def peak_rss_bytes() -> int | None:
    return _proc_status_bytes("VmHWM")


def reset_peak_rss() -> bool:
    """Starts a new high-water mark (Linux: writing 5 to clear_refs), so each phase's peak is its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def gpu_memory_bytes(device_id: int = 0) -> int | None:
    """Memory in use on the GPU (NVML, every process), or None without a driver."""
    from diffuserve.engine.nvml import gpu_memory_used

    return gpu_memory_used(device_id)
