"""The Engine protocol: one compiled component, run on named arrays with static shapes."""

from __future__ import annotations

from collections.abc import Mapping
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
