"""The main job end to end: the bundled model served on a loopback port and asked for one image over gRPC."""

from __future__ import annotations

import logging
from pathlib import Path

from ..app import BackgroundServer, ServerConfig
from ..client import ClientRequest, request_generate, write_images
from ..models import BUNDLED_MODEL

log = logging.getLogger(__name__)

DEMO_PROMPT = "a red circle on a blue background"


def run_demo(output: Path, prompt: str = DEMO_PROMPT, seed: int = 7, model_dir: Path = BUNDLED_MODEL) -> list[Path]:
    config = ServerConfig(model_dirs=(str(model_dir),), host="127.0.0.1", port=0)
    with BackgroundServer(config) as server:
        log.info("serving %s on %s", model_dir, server.address)
        response = request_generate(server.address, ClientRequest(prompt=prompt, seeds=(seed,)).to_proto())
    return list(write_images(response, output))
