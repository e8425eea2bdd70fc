"""The Engine protocol: one compiled component, run on named arrays with static shapes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from .manifest import ComponentSpec


class EngineInputError(ValueError):
    """A feed does not match the component's contract (a caller bug, reported before anything runs)."""


class Engine(Protocol):
    spec: ComponentSpec
    backend: str

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs the component once; feeds and outputs are keyed by the spec's tensor names."""
        ...


def check_feeds(spec: ComponentSpec, feeds: Mapping[str, np.ndarray]) -> None:
    """Refuses feeds whose names, shapes or dtypes differ from the spec, saying which and how."""
    expected = {t.name for t in spec.inputs}
    if set(feeds) != expected:
        raise EngineInputError(f"{spec.name}: inputs must be {sorted(expected)}, got {sorted(feeds)}")
    for t in spec.inputs:
        array = feeds[t.name]
        if array.shape != t.shape or array.dtype != t.np_dtype:
            raise EngineInputError(
                f"{spec.name}: input {t.name} must be {list(t.shape)} {t.dtype}, got {list(array.shape)} {array.dtype}"
            )


def replay_difference(engine, feeds_list: Sequence[Mapping[str, np.ndarray]]) -> float:
    """The largest |run - run_eager| over the feeds, for an engine that replays a CUDA graph in `run` (its first runs
    capture it, later ones replay) and has `run_eager` on the same buffers: different feeds show that replays read
    the updated inputs."""
    worst = 0.0
    for feeds in feeds_list:
        graph, eager = engine.run(feeds), engine.run_eager(feeds)
        for name, value in graph.items():
            worst = max(worst, float(np.max(np.abs(value.astype(np.float64) - eager[name]))))
    return worst
