"""The ONNX Runtime engine: contract checks before running, and no silent fallback from a requested backend."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffuserve.engine.base import EngineInputError
from diffuserve.engine.loader import load_engines
from diffuserve.engine.manifest import Manifest
from diffuserve.engine.ort import BackendUnavailableError, OrtEngine, load_cpu_engines
from diffuserve.server.models import TEXT_TO_IMAGE


@pytest.fixture(scope="module")
def vae_decoder(tiny_export: Path) -> OrtEngine:
    graph = Manifest.load(tiny_export).targets["cpu"].components["vae_decoder"]
    return load_cpu_engines(tiny_export / graph.graph_file, [graph.shapes[0].spec])[0]


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


def cuda_really_runs() -> bool:
    from diffuserve.engine.ort_cuda import cuda_unavailable_reason

    return cuda_unavailable_reason() is None


@pytest.mark.skipif(cuda_really_runs(), reason="this machine has a working CUDA")
def test_cuda_asked_for_without_a_working_cuda_fails_at_startup_naming_what_is_missing(
    tiny_cuda_export: Path,
) -> None:
    # No GPU here: ORT would quietly run on the CPU; loading must refuse instead and say what to install.
    with pytest.raises(BackendUnavailableError, match=r"CUDAExecutionProvider.*diffuserve\[cuda\]"):
        load_engines(tiny_cuda_export, TEXT_TO_IMAGE, "cuda")


def test_a_folder_without_the_backends_target_is_refused_naming_the_flag(tiny_export: Path) -> None:
    with pytest.raises(ValueError, match=r"no 'cuda' target \(it has \['cpu'\]\): export it again with --target cuda"):
        load_engines(tiny_export, TEXT_TO_IMAGE, "cuda")


def test_auto_takes_the_cpu_without_a_working_cuda_and_says_why(tiny_cuda_export: Path) -> None:
    if cuda_really_runs():
        pytest.skip("this machine has a working CUDA")
    loaded = load_engines(tiny_cuda_export, TEXT_TO_IMAGE, "auto")
    assert (loaded.backend, loaded.target, loaded.providers) == ("cpu", "cpu", ("CPUExecutionProvider",))
    assert loaded.reason and loaded.device
    with pytest.raises(ValueError, match="backend must be one of"):
        load_engines(tiny_cuda_export, TEXT_TO_IMAGE, "tpu")


def test_every_shape_of_a_component_shares_one_copy_of_the_weights(tiny_export: Path) -> None:
    loaded = load_engines(tiny_export, TEXT_TO_IMAGE, "cpu")
    for name, engines in loaded.engines.items():
        assert len(engines) == len(loaded.manifest.targets["cpu"].components[name].shapes) > 1
        assert len({id(engine.weights) for engine in engines}) == 1, name
        assert len({engine.spec for engine in engines}) == len(engines), name


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
