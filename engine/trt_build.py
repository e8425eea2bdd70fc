"""Building TensorRT plans from a folder's `tensorrt` target, on the machine that will serve them.

The flow of `build_plans`, top to bottom:
1. The machine's key: its GPU's compute capability, the TensorRT version, the target's precision and shapes.
2. Per component, `build_plan`: TensorRT's ONNX parser on the fp16 graph (errors name the node), a strongly typed
   network (the graph's casts decide every precision: TensorRT 11 builds nothing else, 10.x is asked for it), one
   static optimization profile per exported shape (min = opt = max) in one engine, so the weights are stored once, the
   timing cache read before and written after, progress reported while it builds.
3. The plan written beside the graphs (`tensorrt/plans/<key>/`), deserialised once to check it and to read each
   profile's activation memory, and recorded in the manifest under its key with its sha256.

Written against TensorRT's documented Python API (10.3 through 11.x); nothing here has run against a real TensorRT
(its builder cannot be installed where this was written): tests/fake_tensorrt.py stands in for it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .manifest import TENSORRT_TARGET, ComponentGraph, Manifest, PlanFile, PlanKey, PlanSet
from .ort import BackendUnavailableError
from .trt import TrtDevice, TrtOptions, check_engine, machine_key, plans_folder

log = logging.getLogger(__name__)

# TensorRT's default builder optimisation level (0-5: higher searches more tactics and builds longer).
DEFAULT_OPTIMIZATION_LEVEL = 3
# A progress line at most this often per phase (a U-Net build runs thousands of tactic steps).
PROGRESS_INTERVAL_S = 10.0


class PlanBuildError(RuntimeError):
    """TensorRT could not parse or build a component; the message names it and, from the parser, the node."""


@dataclass(frozen=True)
class BuildOptions:
    device_id: int = 0
    workspace_gb: float | None = None
    # Default: beside the plans, one per GPU architecture and TensorRT version, reused by every later build.
    timing_cache: str | None = None
    optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL

    def __post_init__(self) -> None:
        if not 0 <= self.optimization_level <= 5:
            raise ValueError(f"--optimization-level must be 0..5, got {self.optimization_level}")
        if self.workspace_gb is not None and self.workspace_gb <= 0:
            raise ValueError(f"--workspace-gb must be positive, got {self.workspace_gb}")

    @classmethod
    def from_trt_options(cls, options: TrtOptions) -> BuildOptions:
        return cls(options.device_id, options.workspace_gb, options.timing_cache)


def check_builder(trt) -> None:
    """TensorRT with its builder: the full package (tensorrt_lean, the lean runtime, cannot build)."""
    if not hasattr(trt, "Builder"):
        raise BackendUnavailableError(
            f"this TensorRT ({trt.__file__}) has no builder: install diffuserve[tensorrt] (tensorrt-cu13) on the "
            "machine that serves, or JetPack's python3-libnvinfer on Jetson"
        )


def make_progress_monitor(trt, component: str, report: Callable[[str], None]):
    """An IProgressMonitor that reports each top-level phase and, at most every PROGRESS_INTERVAL_S, its steps.
    TensorRT calls it from its own threads."""

    class Progress(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._phases: dict[str, tuple[int, float, float]] = {}  # name -> (steps, started, last reported)

        def phase_start(self, phase_name, parent_phase, num_steps) -> None:
            with self._lock:
                now = time.monotonic()
                self._phases[phase_name] = (num_steps, now, now)
            if parent_phase is None:
                report(f"{component}: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step) -> bool:
            with self._lock:
                steps, started, last = self._phases.get(phase_name, (0, time.monotonic(), 0.0))
                now = time.monotonic()
                due = now - last >= PROGRESS_INTERVAL_S
                if due:
                    self._phases[phase_name] = (steps, started, now)
            if due:
                report(f"{component}: {phase_name} {step + 1}/{steps}, {now - started:.0f} s")
            return True  # False would cancel the build

        def phase_finish(self, phase_name) -> None:
            with self._lock:
                steps, started, _ = self._phases.pop(phase_name, (0, time.monotonic(), 0.0))
            log.debug("%s: %s done in %.1f s", component, phase_name, time.monotonic() - started)

    return Progress()


def parser_errors(parser) -> list[str]:
    """The ONNX parser's errors, each with the node it failed on."""
    errors = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        errors.append(f"node {error.node()} ({error.node_operator()} {error.node_name()!r}): {error.desc()}")
    return errors


def strongly_typed_flags(trt) -> int:
    """Network creation flags: strongly typed (required on 10.x for an fp16 graph with casts; always on in 11)."""
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def add_profiles(builder, config, graph: ComponentGraph) -> None:
    """One static profile per shape, in the manifest's order: profile i serves shape i."""
    for shape in graph.shapes:
        profile = builder.create_optimization_profile()
        for t in shape.spec.inputs:
            profile.set_shape(t.name, t.shape, t.shape, t.shape)
        config.add_optimization_profile(profile)


@dataclass(frozen=True)
class BuildJob:
    """One component to build: its graph, where the timing cache lives, how to report."""

    component: str
    graph_path: Path
    graph: ComponentGraph
    cache_path: Path
    options: BuildOptions
    report: Callable[[str], None]


def build_plan(trt, logger, job: BuildJob) -> bytes:
    component, graph_path, cache_path, options = job.component, job.graph_path, job.cache_path, job.options
    builder = trt.Builder(logger)
    network = builder.create_network(strongly_typed_flags(trt))
    parser = trt.OnnxParser(network, logger)
    # From the file, so its external weights file beside it is read too.
    if not parser.parse_from_file(str(graph_path)):
        errors = "; ".join(parser_errors(parser))
        raise PlanBuildError(f"{component}: TensorRT's ONNX parser refused {graph_path}: {errors}")
    config = builder.create_builder_config()
    if options.workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * 2**30))
    config.builder_optimization_level = options.optimization_level
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    ok_cache = config.set_timing_cache(cache, ignore_mismatch=False)
    if not ok_cache:
        log.warning("%s: TensorRT refused the timing cache %s; building without it", component, cache_path)
    add_profiles(builder, config, job.graph)
    config.progress_monitor = make_progress_monitor(trt, component, job.report)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise PlanBuildError(f"{component}: TensorRT could not build a plan (its errors are logged above)")
    if ok_cache:
        # Written after each component, so a later failure keeps what was timed.
        write_atomically(cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.partial")
    staged.write_bytes(data)
    staged.replace(path)


def timing_cache_path(folder: Path, key: PlanKey, options: BuildOptions) -> Path:
    if options.timing_cache:
        return Path(options.timing_cache)
    sm = key.compute_capability.replace(".", "")
    return plans_folder(folder) / f"sm{sm}-trt{key.tensorrt_version}.timing-cache"


def record_plans(folder: Path, plans: PlanSet) -> Manifest:
    """Adds the plan set to the manifest (read again: another build may have added its own key meanwhile), replacing
    an older set with the same key."""
    manifest = Manifest.load(folder)
    target = manifest.target(TENSORRT_TARGET)
    kept = tuple(p for p in target.plans if p.key != plans.key)
    manifest = replace(manifest, targets={**manifest.targets, TENSORRT_TARGET: replace(target, plans=(*kept, plans))})
    manifest.save(folder)
    return manifest


def build_plans(
    folder: str | Path,
    options: BuildOptions | None = None,
    report: Callable[[str], None] = log.info,
    device: TrtDevice | None = None,
) -> PlanSet:
    """Builds every component of the folder's tensorrt target for this machine and records the plans."""
    folder, options = Path(folder), options or BuildOptions()
    device = device or TrtDevice.shared(options.device_id)
    trt = device.trt
    check_builder(trt)
    manifest = Manifest.load(folder)
    target = manifest.target(TENSORRT_TARGET)
    key = machine_key(device, manifest)
    out = plans_folder(folder) / key.folder_name
    cache_path = timing_cache_path(folder, key, options)
    report(f"building TensorRT plans for {device.name} ({key.describe()}) into {out}")
    start = time.perf_counter()
    files = {}
    for name, graph in target.components.items():
        began = time.perf_counter()
        job = BuildJob(name, folder / graph.graph_file, graph, cache_path, options, report)
        plan = build_plan(trt, device.logger, job)
        path = out / f"{name}.plan"
        write_atomically(path, plan)
        sizes = activation_sizes(device, plan, graph, name)
        files[name] = PlanFile(path.relative_to(folder).as_posix(), hashlib.sha256(plan).hexdigest(), sizes)
        elapsed = time.perf_counter() - began
        report(f"{name}: {len(graph.shapes)} profile(s), {len(plan) / 2**20:.1f} MiB, built in {elapsed:.0f} s")
    plans = PlanSet(key, files, device.name, round(time.perf_counter() - start, 1))
    record_plans(folder, plans)
    report(f"recorded the plans in {folder / 'manifest.json'} (timing cache: {cache_path})")
    return plans


def activation_sizes(device: TrtDevice, plan: bytes, graph: ComponentGraph, component: str) -> tuple[int, ...]:
    """Deserialises the new plan (it must load here) and reads each profile's activation memory."""
    engine = device.runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise PlanBuildError(f"{component}: the plan just built does not deserialise (TensorRT's log says why)")
    check_engine(device.trt, engine, graph, component)
    return tuple(int(engine.get_device_memory_size_for_profile_v2(i)) for i in range(len(graph.shapes)))
