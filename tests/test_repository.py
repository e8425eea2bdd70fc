"""The repository itself: small enough to travel to a lent GPU machine, with no build outputs committed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A lent GPU machine takes 64 MiB per call, wheels included (onnxruntime-gpu travels in pieces beside the tree).
MAX_TRACKED_BYTES = 24 * 2**20
# Exported graphs, engines, profiler dumps and logs are rebuilt or thrown away, never committed.
BUILD_OUTPUT_SUFFIXES = (".onnx", ".onnx.data", ".plan", ".engine", ".log", ".prof")


def tracked_files() -> list[Path]:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in listing.decode().split("\0") if name]


def test_tracked_tree_fits_in_a_gpu_machine_transfer() -> None:
    total = sum(path.lstat().st_size for path in tracked_files() if path.exists())
    assert total <= MAX_TRACKED_BYTES, f"tracked files take {total / 2**20:.1f} MiB, over {MAX_TRACKED_BYTES >> 20}"


def test_no_build_outputs_or_profiler_dumps_are_tracked() -> None:
    offenders = [
        path.relative_to(ROOT).as_posix()
        for path in tracked_files()
        if path.name.endswith(BUILD_OUTPUT_SUFFIXES) or path.name.startswith("onnxruntime_profile_")
    ]
    assert not offenders
