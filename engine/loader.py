"""Loading a built model folder: the backend chosen, its target's graphs, one Engine per component and shape."""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .base import Engine
from .manifest import CPU_TARGET, CUDA_TARGET, ComponentSpec, Manifest, TargetRecord
from .ort import BACKENDS, CUDA, BackendUnavailableError, import_onnxruntime, load_cpu_engines

log = logging.getLogger(__name__)

# The target whose graphs each backend runs.
BACKEND_TARGETS = {"cpu": CPU_TARGET, "cuda": CUDA_TARGET}


@dataclass(frozen=True)
class LoadedEngines:
    manifest: Manifest
    backend: str
    target: str
    # Per component, one engine per (batch, size) shape, in the manifest's order; all share one copy of the weights.
    engines: dict[str, tuple[Engine, ...]]
    providers: tuple[str, ...]
    device: str
    # Why this backend runs: asked for, or what `auto` found.
    reason: str = ""


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def auto_candidates(manifest: Manifest) -> tuple[list[str], str]:
    """The backends `auto` tries, best first, and why: CUDA where onnxruntime-gpu offers it and the folder has its
    target, then the CPU."""
    available = import_onnxruntime().get_available_providers()
    if CUDA not in available:
        return ["cpu"], "onnxruntime offers no CUDAExecutionProvider"
    if CUDA_TARGET not in manifest.targets:
        return ["cpu"], f"the model has no {CUDA_TARGET!r} target (export it with --target cuda)"
    return ["cuda", "cpu"], "onnxruntime offers CUDAExecutionProvider"


def load_component_engines(
    graph_path: Path, specs: Sequence[ComponentSpec], backend: str, threads: int | None = None, cuda_options=None
) -> tuple[Engine, ...]:
    """One component graph on a backend: an engine per shape, over one copy of its weights."""
    if backend == "cuda":
        from .ort_cuda import CudaOptions, load_cuda_engines

        return load_cuda_engines(graph_path, specs, cuda_options or CudaOptions())
    return load_cpu_engines(graph_path, specs, threads)


def load_target(
    folder: Path,
    model: str,
    target: TargetRecord,
    backend: str,
    components: Sequence[str],
    threads: int | None,
    cuda_options,
) -> dict[str, tuple[Engine, ...]]:
    engines = {}
    for name in components:
        start = time.perf_counter()
        graph = target.components[name]
        specs = [shape.spec for shape in graph.shapes]
        engines[name] = load_component_engines(folder / graph.graph_file, specs, backend, threads, cuda_options)
        elapsed = time.perf_counter() - start
        log.info("%s/%s: %d shapes loaded on %s in %.1f s", model, name, len(specs), backend, elapsed)
    return engines


def load_engines(
    folder: str | os.PathLike,
    components: Sequence[str],
    backend: str = "auto",
    threads: int | None = None,
    cuda_options=None,
    manifest: Manifest | None = None,
) -> LoadedEngines:
    """Loads every shape of the named components on the backend asked for; `auto` takes the best that really runs,
    and an explicitly asked backend that does not really run is an error."""
    folder = Path(folder)
    manifest = manifest or Manifest.load(folder)
    if backend == "auto":
        candidates, reason = auto_candidates(manifest)
    elif backend in BACKENDS:
        candidates, reason = [backend], "asked for"
    else:
        raise ValueError(f"backend must be one of {['auto', *BACKENDS]}, got {backend!r}")

    def load_on(candidate: str, reason: str) -> LoadedEngines:
        target = BACKEND_TARGETS[candidate]
        record = manifest.require(target, components)
        engines = load_target(folder, manifest.name, record, candidate, components, threads, cuda_options)
        first = engines[components[0]][0]
        device = first.device if candidate == "cuda" else cpu_name()
        return LoadedEngines(manifest, candidate, target, engines, tuple(first.providers), device, reason)

    # Every candidate but the last may fail to run here, and the next is tried; the last one's failure is the error.
    for candidate in candidates[:-1]:
        try:
            return load_on(candidate, reason)
        except BackendUnavailableError as e:
            log.warning("%s: backend %s does not run here (%s); trying the next", manifest.name, candidate, e)
            reason = f"{candidate} did not run: {e}"
    return load_on(candidates[-1], reason)
