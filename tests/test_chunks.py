"""How rows are split over a component's static-batch engines."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from diffuserve.server.rows import plan_chunks


@dataclass
class _Spec:
    batch_size: int


@dataclass
class _Engine:
    """Only the static batch matters to the planner; no engine runs here."""

    spec: _Spec


ENGINES = [_Engine(_Spec(b)) for b in (8, 2, 4)]  # any order


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (1, [(0, 1, 2)]),
        (2, [(0, 2, 2)]),
        (3, [(0, 3, 4)]),
        (5, [(0, 5, 8)]),
        (8, [(0, 8, 8)]),
        (9, [(0, 8, 8), (8, 9, 2)]),
        (19, [(0, 8, 8), (8, 16, 8), (16, 19, 4)]),
    ],
)
def test_rows_fill_the_largest_engine_then_the_smallest_that_fits(rows: int, expected: list) -> None:
    assert [(start, stop, e.spec.batch_size) for start, stop, e in plan_chunks(rows, ENGINES)] == expected
