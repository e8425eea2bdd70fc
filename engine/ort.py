"""ONNX Runtime engine with explicit execution providers, verified to be the ones really running."""

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
# The --backend names this runtime serves, and the providers each asks for, most wanted first.
BACKEND_PROVIDERS: dict[str, tuple[str, ...]] = {"cpu": (CPU,), "cuda": (CUDA, CPU)}


class BackendUnavailableError(RuntimeError):
    """The requested backend is not what ONNX Runtime actually runs (it falls back to the CPU silently)."""


def _import_onnxruntime():
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
    ort = _import_onnxruntime()
    options = ort.SessionOptions()
    # ALL beat EXTENDED/BASIC/DISABLED on these graphs, and sequential beat parallel execution (doubled the time).
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or default_thread_count()
    # Idle pool threads would otherwise spin for the next run and steal cores from the other sessions and from
    # the Python step between U-Net calls: off, the whole pipeline ran 25% faster on 2 cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: ORT warns about every provider fallback on a CPU machine
    return options


def resolve_backend(backend: str) -> str:
    """'auto' becomes 'cuda' when onnxruntime offers CUDA, else 'cpu'; whether CUDA really runs is checked later."""
    if backend == "auto":
        available = _import_onnxruntime().get_available_providers()
        return "cuda" if CUDA in available else "cpu"
    if backend not in BACKEND_PROVIDERS:
        raise ValueError(f"backend must be one of {['auto', *BACKEND_PROVIDERS]}, got {backend!r}")
    return backend


class OrtEngine:
    """One component as an ONNX Runtime session; inputs are checked against the manifest's spec before running."""

    def __init__(self, spec: ComponentSpec, onnx_path: str | os.PathLike, backend: str, threads: int | None = None):
        ort = _import_onnxruntime()
        self.spec = spec
        self.backend = backend
        wanted = BACKEND_PROVIDERS[backend]
        self.session = ort.InferenceSession(str(onnx_path), sess_options=session_options(threads), providers=wanted)
        active = self.session.get_providers()
        if active[0] != wanted[0]:
            raise BackendUnavailableError(
                f"{spec.name}: backend {backend!r} asked ONNX Runtime for {wanted[0]} but it runs {active}; "
                "check the CUDA and cuDNN libraries onnxruntime-gpu needs, or serve with --backend cpu"
            )
        self._check_graph_matches_spec()
        self._output_names = [t.name for t in spec.outputs]

    def _check_graph_matches_spec(self) -> None:
        graph = {i.name: i.shape for i in self.session.get_inputs()} | {
            o.name: o.shape for o in self.session.get_outputs()
        }
        for t in (*self.spec.inputs, *self.spec.outputs):
            if t.name not in graph:
                raise ValueError(f"{self.spec.name}: the ONNX graph has no tensor {t.name!r} (it has {sorted(graph)})")
            if list(graph[t.name]) != list(t.shape):
                raise ValueError(
                    f"{self.spec.name}: graph shape of {t.name} is {graph[t.name]}, manifest says {t.shape}"
                )

    @property
    def providers(self) -> Sequence[str]:
        return self.session.get_providers()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.spec, feeds)
        outputs = self.session.run(self._output_names, dict(feeds))
        return dict(zip(self._output_names, outputs, strict=True))
