"""The main job end to end: a default model, exported, served on a loopback port, asked for one image over gRPC."""

from __future__ import annotations

import logging
from pathlib import Path

from diffuserve.engine.manifest import MANIFEST_NAME

from .app import BackgroundServer, ServerConfig
from .client import ClientRequest, request_generate, write_images

log = logging.getLogger(__name__)

DEMO_PROMPT = "a red circle on a blue background"
# The default model's exported size and static batch.
DEMO_SIZE = 128
DEMO_BATCH = 1


def ensure_default_model(workdir: Path) -> Path:
    """The tiny random SD-architecture model, built and exported on first use (needs the export extra)."""
    exported = workdir / "tiny-sd-onnx"
    if (exported / MANIFEST_NAME).is_file():
        return exported
    try:
        from diffuserve.export.exporter import ExportOptions, export_model
        from diffuserve.export.tiny import build_tiny_model
    except ImportError as e:
        message = f"building the default model needs the export extra (pip install diffuserve[export]): {e}"
        raise SystemExit(message) from e
    source = build_tiny_model(workdir / "tiny-sd")
    export_model(source, exported, ExportOptions(height=DEMO_SIZE, width=DEMO_SIZE, batch=DEMO_BATCH, name="tiny-sd"))
    return exported


def run_demo(workdir: Path, output: Path, prompt: str = DEMO_PROMPT, seed: int = 7) -> list[Path]:
    model_dir = ensure_default_model(workdir)
    config = ServerConfig(model_dirs=(str(model_dir),), host="127.0.0.1", port=0, backend="cpu")
    with BackgroundServer(config) as server:
        log.info("serving %s on %s", model_dir, server.address)
        response = request_generate(server.address, ClientRequest(prompt=prompt, seeds=(seed,)).to_proto())
    return list(write_images(response, output))
