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
) -> tuple[Manifest, dict[str, Engine]]:
    """Loads the named components of a built model; the backend is resolved once and must be really active."""
    manifest = Manifest.load(folder)
    manifest.require(components)
    resolved = resolve_backend(backend)
    engines: dict[str, Engine] = {}
    for name in components:
        record = manifest.components[name]
        start = time.perf_counter()
        engines[name] = OrtEngine(record.spec, Path(folder) / record.onnx_file, resolved, threads)
        log.info("%s/%s: loaded on %s in %.1f s", manifest.name, name, resolved, time.perf_counter() - start)
    return manifest, engines
