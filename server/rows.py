"""Running a component over any number of rows through its static-batch engines."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from diffuserve.engine.base import Engine


def plan_chunks(rows: int, engines: Sequence[Engine]) -> list[tuple[int, int, Engine]]:
    """Splits rows into engine calls: the largest batch while it fills, then the smallest batch that fits the rest."""
    by_size = sorted(engines, key=lambda e: e.spec.batch_size)
    largest = by_size[-1]
    chunks, start = [], 0
    while start < rows:
        remaining = rows - start
        engine = (
            largest
            if remaining >= largest.spec.batch_size
            else next(e for e in by_size if e.spec.batch_size >= remaining)
        )
        stop = min(start + engine.spec.batch_size, rows)
        chunks.append((start, stop, engine))
        start = stop
    return chunks


class RowRunner:
    """Runs a component over any number of rows through its static-batch engines, reusing padded input buffers."""

    def __init__(self, engines: Sequence[Engine], rows: int, fixed: Mapping[str, np.ndarray] | None = None):
        self.chunks = plan_chunks(rows, engines)
        self.outputs = [t.name for t in engines[0].spec.outputs]
        # Padding rows stay zero: every row is computed independently, so they never touch real rows.
        self.buffers = [{t.name: np.zeros(t.shape, t.np_dtype) for t in e.spec.inputs} for _, _, e in self.chunks]
        for name, array in (fixed or {}).items():
            self._fill(name, array)

    def _fill(self, name: str, array: np.ndarray) -> None:
        for (start, stop, _), buffers in zip(self.chunks, self.buffers, strict=True):
            buffers[name][: stop - start] = array[start:stop]

    def __call__(self, varying: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, array in varying.items():
            self._fill(name, array)
        results = [engine.run(buffers) for (_, _, engine), buffers in zip(self.chunks, self.buffers, strict=True)]
        counts = [stop - start for start, stop, _ in self.chunks]
        return {
            name: np.concatenate([r[name][:count] for r, count in zip(results, counts, strict=True)])
            for name in self.outputs
        }
