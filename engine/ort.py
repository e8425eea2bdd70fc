"""ONNX Runtime on the CPU: one session per component graph, serving every shape the manifest lists."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np

from .base import check_feeds
from .manifest import ComponentSpec

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class BackendUnavailableError(RuntimeError):
    """The requested backend is not what ONNX Runtime actually runs (it falls back to the CPU silently)."""


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailableError(
            "onnxruntime is not installed: install diffuserve[cpu] or, for NVIDIA GPUs, diffuserve[cuda]"
        ) from e
    return onnxruntime


def default_thread_count() -> int:
    """Intra-op threads: the cores this process may use (explicit counts beat ORT's default here)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def session_options(threads: int | None = None):
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    # ALL beat EXTENDED/BASIC/DISABLED on these graphs, and sequential beat parallel execution (doubled the time).
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or default_thread_count()
    # Idle pool threads would otherwise spin for the next run and steal cores from the other sessions and from
    # the Python step between U-Net calls: off, the whole pipeline ran 25% faster on 2 cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # The memory pattern caches one activation plan per input shape; with one session serving several shapes it
    # held every shape's plan (bundled model, batches {1, 4}: 1.08x the resident memory of {1} without it, 1.18x
    # with it) and made no difference to speed.
    options.enable_mem_pattern = False
    options.log_severity_level = 3  # errors only: ORT warns about every provider fallback on a CPU machine
    return options


def check_graph_matches_spec(session, spec: ComponentSpec) -> None:
    """Every tensor of the spec is in the graph, each dimension either equal or left symbolic for all shapes."""
    graph = {i.name: i.shape for i in session.get_inputs()} | {o.name: o.shape for o in session.get_outputs()}
    for t in (*spec.inputs, *spec.outputs):
        if t.name not in graph:
            raise ValueError(f"{spec.name}: the ONNX graph has no tensor {t.name!r} (it has {sorted(graph)})")
        dims = graph[t.name]
        if len(dims) != len(t.shape) or any(isinstance(d, int) and d != s for d, s in zip(dims, t.shape, strict=True)):
            raise ValueError(f"{spec.name}: graph shape of {t.name} is {dims}, manifest says {list(t.shape)}")


def cpu_session(graph_path: str | os.PathLike, threads: int | None = None):
    ort = import_onnxruntime()
    return ort.InferenceSession(str(graph_path), sess_options=session_options(threads), providers=[CPU])


class OrtEngine:
    """One shape of a component on a CPU session shared by all its shapes; feeds are checked against the spec."""

    backend = "cpu"

    def __init__(self, session, spec: ComponentSpec):
        check_graph_matches_spec(session, spec)
        self.session = session
        self.spec = spec
        self._output_names = [t.name for t in spec.outputs]

    @property
    def weights(self) -> object:
        """What holds the component's weights: the one session every shape runs on."""
        return self.session

    @property
    def providers(self) -> Sequence[str]:
        return self.session.get_providers()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.spec, feeds)
        outputs = self.session.run(self._output_names, dict(feeds))
        return dict(zip(self._output_names, outputs, strict=True))


def load_cpu_engines(
    graph_path: str | os.PathLike, specs: Sequence[ComponentSpec], threads: int | None = None
) -> tuple[OrtEngine, ...]:
    """One session (one copy of the weights) and an engine per shape over it."""
    session = cpu_session(graph_path, threads)
    return tuple(OrtEngine(session, spec) for spec in specs)
