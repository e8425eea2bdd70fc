"""Loading a built model folder: the backend chosen, its target's graphs, one Engine per component and shape."""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .base import Engine
from .manifest import CPU_TARGET, CUDA_TARGET, TENSORRT_TARGET, ComponentSpec, Manifest, TargetRecord
from .ort import CUDA, BackendUnavailableError, import_onnxruntime, load_cpu_engines
from .resident import ResidentEngines

log = logging.getLogger(__name__)

# The target whose graphs each backend runs, best first: the order `auto` tries them in.
BACKEND_TARGETS = {"tensorrt": TENSORRT_TARGET, "cuda": CUDA_TARGET, "cpu": CPU_TARGET}
BACKENDS = tuple(BACKEND_TARGETS)


@dataclass(frozen=True)
class LoadedEngines:
    manifest: Manifest
    backend: str
    target: str
    # Per component, one engine per (batch, size) shape, in the manifest's order; all share one copy of the weights.
    # A ResidentEngines in low memory: only the running stage's component is loaded.
    engines: Mapping[str, tuple[Engine, ...]]
    providers: tuple[str, ...]
    device: str
    # Why this backend runs: asked for, or what `auto` found.
    reason: str = ""
    # The GPU the engines run on (None on the CPU).
    device_id: int | None = None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def tensorrt_installed() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def auto_candidates(manifest: Manifest) -> tuple[list[str], str]:
    """The backends `auto` tries, best first, and why the others are not tried: TensorRT where it is installed and
    the folder has its target, CUDA where onnxruntime-gpu offers it and the folder has its target, then the CPU."""
    candidates, skipped = [], []
    if TENSORRT_TARGET not in manifest.targets:
        skipped.append(f"no {TENSORRT_TARGET!r} target (export it with --target tensorrt)")
    elif not tensorrt_installed():
        skipped.append("TensorRT is not installed")
    else:
        candidates.append("tensorrt")
    if CUDA_TARGET not in manifest.targets:
        skipped.append(f"no {CUDA_TARGET!r} target (export it with --target cuda)")
    elif CUDA not in import_onnxruntime().get_available_providers():
        skipped.append("onnxruntime offers no CUDAExecutionProvider")
    else:
        candidates.append("cuda")
    candidates.append("cpu")
    reason = f"auto: the first of {', '.join(candidates)} that runs here"
    return candidates, reason + (f" (not tried: {'; '.join(skipped)})" if skipped else "")


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
    level: int = logging.INFO,
) -> dict[str, tuple[Engine, ...]]:
    engines = {}
    for name in components:
        start = time.perf_counter()
        graph = target.components[name]
        specs = [shape.spec for shape in graph.shapes]
        engines[name] = load_component_engines(folder / graph.graph_file, specs, backend, threads, cuda_options)
        elapsed = time.perf_counter() - start
        log.log(level, "%s/%s: %d shapes loaded on %s in %.1f s", model, name, len(specs), backend, elapsed)
    return engines


def load_tensorrt(
    folder: Path, manifest: Manifest, components: Sequence[str], options
) -> tuple[dict[str, tuple[Engine, ...]], Manifest]:
    """The tensorrt target's plans for this machine; with `build_missing`, built first when the folder lacks them.
    Returns the manifest they were loaded from: after a build, the one that records the new plans."""
    from .trt import PlanMismatchError, TrtOptions, load_tensorrt_engines

    options = options or TrtOptions()
    try:
        return load_tensorrt_engines(folder, manifest, components, options), manifest
    except PlanMismatchError as e:
        if not options.build_missing:
            raise
        from .trt_build import BuildOptions, build_plans

        log.warning("%s: %s; building them now (--build-missing)", manifest.name, e)
        build_plans(folder, BuildOptions.from_trt_options(options))
        manifest = Manifest.load(folder)
        return load_tensorrt_engines(folder, manifest, components, options), manifest


def load_engines(
    folder: str | os.PathLike,
    components: Sequence[str],
    backend: str = "auto",
    threads: int | None = None,
    cuda_options=None,
    manifest: Manifest | None = None,
    trt_options=None,
    low_memory: bool = False,
) -> LoadedEngines:
    """Loads every shape of the named components on the backend asked for; `auto` takes the best that really runs,
    and an explicitly asked backend that does not really run is an error. With `low_memory`, each component is loaded
    once here and then only while its stage runs (ResidentEngines)."""
    folder = Path(folder)
    manifest = manifest or Manifest.load(folder)
    if backend == "auto":
        candidates, reason = auto_candidates(manifest)
    elif backend in BACKENDS:
        candidates, reason = [backend], "asked for"
    else:
        raise ValueError(f"backend must be one of {['auto', *BACKENDS]}, got {backend!r}")

    def load_on(candidate: str, reason: str) -> LoadedEngines:
        # A build at start (--build-missing) writes a new manifest; later stage loads (--low-memory) must read it.
        current = manifest

        def load(names: Sequence[str]) -> dict[str, tuple[Engine, ...]]:
            nonlocal current
            if candidate == "tensorrt":
                engines, current = load_tensorrt(folder, current, names, trt_options)
                return engines
            record = manifest.require(BACKEND_TARGETS[candidate], names)
            # Low memory loads a stage's engines on every request: not worth a line each at INFO.
            level = logging.DEBUG if low_memory else logging.INFO
            return load_target(folder, manifest.name, record, candidate, names, threads, cuda_options, level)

        engines = ResidentEngines(load, components, manifest.name) if low_memory else load(components)
        first = engines[components[0]][0]
        device = first.device if candidate != "cpu" else cpu_name()
        options = trt_options if candidate == "tensorrt" else cuda_options
        device_id = None if candidate == "cpu" else getattr(options, "device_id", 0)
        return LoadedEngines(
            current, candidate, BACKEND_TARGETS[candidate], engines, tuple(first.providers), device, reason, device_id
        )

    # Every candidate but the last may fail to run here, and the next is tried; the last one's failure is the error.
    for candidate in candidates[:-1]:
        try:
            return load_on(candidate, reason)
        except BackendUnavailableError as e:
            log.warning("%s: backend %s does not run here (%s); trying the next", manifest.name, candidate, e)
            reason = f"{reason}; {candidate} did not run: {e}"
    return load_on(candidates[-1], reason)
