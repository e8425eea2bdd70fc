"""Loading a built model folder into one Engine per component."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from .base import Engine
from .manifest import Manifest
from .ort import OrtEngine, resolve_backend

log = logging.getLogger(__name__)


def load_engines(
    folder: str | os.PathLike, components: Sequence[str], backend: str = "auto", threads: int | None = None
) -> tuple[Manifest, dict[str, tuple[Engine, ...]]]:
    """Loads every batch size of the named components; the backend is resolved once and must be really active."""
    manifest = Manifest.load(folder)
    manifest.require(components)
    resolved = resolve_backend(backend)
    engines: dict[str, tuple[Engine, ...]] = {}
    for name in components:
        start = time.perf_counter()
        engines[name] = tuple(
            OrtEngine(record.spec, Path(folder) / record.onnx_file, resolved, threads)
            for record in manifest.components[name]
        )
        log.info("%s/%s: loaded on %s in %.1f s", manifest.name, name, resolved, time.perf_counter() - start)
    return manifest, engines
