"""The ONNX Runtime engine: contract checks before running, and no silent fallback from a requested backend."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffuserve.engine.base import EngineInputError
from diffuserve.engine.manifest import Manifest
from diffuserve.engine.ort import BackendUnavailableError, OrtEngine, resolve_backend


@pytest.fixture(scope="module")
def vae_decoder(tiny_export: Path) -> OrtEngine:
    record = Manifest.load(tiny_export).record("vae_decoder")
    return OrtEngine(record.spec, tiny_export / record.onnx_file, "cpu")


def test_engine_runs_named_static_feeds(vae_decoder: OrtEngine) -> None:
    out = vae_decoder.run({"latent_sample": np.zeros((1, 4, 16, 16), np.float32)})
    assert out["sample"].shape == (1, 3, 128, 128)


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        (
            {"latent_sample": np.zeros((2, 4, 16, 16), np.float32)},
            r"latent_sample must be \[1, 4, 16, 16\] float32, got \[2, 4, 16, 16\] float32",
        ),
        (
            {"latent_sample": np.zeros((1, 4, 16, 16), np.float64)},
            r"latent_sample must be \[1, 4, 16, 16\] float32, got \[1, 4, 16, 16\] float64",
        ),
        ({"latents": np.zeros((1, 4, 16, 16), np.float32)}, r"inputs must be \['latent_sample'\], got \['latents'\]"),
    ],
)
def test_bad_feeds_are_refused_naming_name_shape_and_dtype(vae_decoder: OrtEngine, feeds, message: str) -> None:
    with pytest.raises(EngineInputError, match=message):
        vae_decoder.run(feeds)


def test_cuda_requested_without_a_working_cuda_is_an_error(tiny_export: Path) -> None:
    # This machine has no GPU: ORT would quietly run on the CPU; the engine must refuse instead.
    record = Manifest.load(tiny_export).record("vae_decoder")
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
        OrtEngine(record.spec, tiny_export / record.onnx_file, "cuda")


def test_auto_backend_resolves_to_cpu_without_cuda() -> None:
    import onnxruntime

    expected = "cuda" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"
    assert resolve_backend("auto") == expected
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("tpu")


def test_runtime_does_not_import_the_export_stack(tiny_export: Path) -> None:
    code = (
        "import sys\n"
        "from diffuserve.server.models import load_model\n"
        "import diffuserve.server.app, diffuserve.server.cli, diffuserve.server.tools.bench\n"
        f"load_model({str(tiny_export)!r}, backend='cpu')\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'diffusers', 'optimum') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
