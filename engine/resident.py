"""Low memory: only the engines of the pipeline stage running stay resident; each stage loads its own as it begins.

For boards whose CPU and GPU share a few GB (Jetson), where a model's text encoder, U-Net and VAE do not fit at once.
The mechanism knows nothing of a backend: it takes the loader that loads every component otherwise, and releases a
component by dropping its engines, which releases whatever they hold (ONNX Runtime sessions and their weights,
TensorRT execution contexts and the deserialised engine).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from .base import Engine

log = logging.getLogger(__name__)

# Loads the named components on one backend: per component, an engine per shape (what load_engines holds).
Loader = Callable[[Sequence[str]], Mapping[str, tuple[Engine, ...]]]


class ResidentEngines(Mapping[str, tuple[Engine, ...]]):
    """Per component, its engines, as LoadedEngines.engines holds them, with at most one component resident: asking
    for another releases the resident one, then loads the one asked for. Asking again for the resident one costs
    nothing, so a stage that asks several times (the U-Net's rows rebuilt when a request leaves) loads once.

    Thread-safe: one load at a time, and a caller asking for the component being loaded waits for it rather than
    loading it twice. Engines a caller still holds stay alive until it lets go; the bound of one resident component
    holds where one thread runs the stages, as the worker does."""

    def __init__(self, load: Loader, components: Sequence[str], model: str = ""):
        self._load = load
        self._components = tuple(components)
        self._model = model
        self._lock = threading.Lock()
        self._name: str | None = None
        self._engines: tuple[Engine, ...] = ()
        # Loads so far and the seconds they took, the start's included: the price of low memory (bench reads them).
        self.loads = 0
        self.load_s = 0.0
        self._load_each_once()

    def _load_each_once(self) -> None:
        """A backend or a graph that does not load fails at start here, as it does when every component stays
        resident. In reverse order, so the first stage's component, which the first request asks for, stays."""
        seconds = {}
        for name in reversed(self._components):
            before = self.load_s
            self[name]
            seconds[name] = self.load_s - before
        log.info(
            "%s: low memory: each stage loads its engines as it begins and releases the previous stage's; "
            "loaded once at start: %s",
            self._model,
            ", ".join(f"{name} in {seconds[name]:.2f} s" for name in self._components),
        )

    @property
    def resident(self) -> str | None:
        """The component whose engines are loaded now, if any (none while a load is under way or after one failed)."""
        return self._name

    def __getitem__(self, component: str) -> tuple[Engine, ...]:
        if component not in self._components:
            raise KeyError(component)
        with self._lock:
            if component != self._name:
                self._release()
                start = time.perf_counter()
                self._engines = self._load((component,))[component]
                self._name = component
                self.loads += 1
                self.load_s += time.perf_counter() - start
            return self._engines

    def _release(self) -> None:
        # Before the next load, not after: the peak is the largest component, never two of them.
        self._name, self._engines = None, ()

    def __contains__(self, component: object) -> bool:
        # Mapping's own would ask for the engines, loading them.
        return component in self._components

    def __iter__(self) -> Iterator[str]:
        return iter(self._components)

    def __len__(self) -> int:
        return len(self._components)
