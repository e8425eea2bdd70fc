"""The bundled shapes model: it draws what it is asked, and the bundle is the committed weights' export."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffuserve.engine.manifest import Manifest
from diffuserve.export.exporter import source_hash
from diffuserve.export.reference import DIFFUSERS_SCHEDULERS, load_reference_pipeline, reference_images
from diffuserve.server.models import BUNDLED_MODEL, load_model
from diffuserve.server.params import GenerateParams
from diffuserve.server.pipeline import render
from diffuserve.server.tools.evaluate import TARGETS, evaluate

WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "shapes-sd"


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return Manifest.load(BUNDLED_MODEL)


# The model's default and a sampler of each kind (first order, multistep on Karras sigmas, predictor-corrector). The
# README's table has them all: PNDM draws poorly with this model, as diffusers' PNDM does on the same weights (below).
GRADED_SAMPLERS = ("ddim", "euler", "dpmpp_2m_karras", "unipc")


def test_served_drawings_meet_the_quality_bar() -> None:
    results = evaluate(BUNDLED_MODEL, count=100, samplers=GRADED_SAMPLERS)
    assert set(results) == set(GRADED_SAMPLERS)
    for sampler, scores in results.items():
        for attribute, target in TARGETS.items():
            assert scores[attribute] >= target, (sampler, attribute, scores)


def test_the_bundle_is_built_from_the_committed_weights(manifest: Manifest) -> None:
    # `make bundle` re-exports whenever the weights change; a stale bundle would grade and serve other weights.
    assert manifest.source["sha256"] == source_hash(WEIGHTS)
    assert manifest.batch_sizes == (1, 4)
    assert set(manifest.targets["cpu"].components) >= {"text_encoder", "unet", "vae_decoder"}


def test_bundled_model_records_its_own_defaults(manifest: Manifest) -> None:
    model = load_model(BUNDLED_MODEL, backend="cpu")
    assert model.default_scheduler == "ddim"
    assert (model.defaults.steps, model.defaults.guidance_scale) == (20, 3.0)
    assert manifest.sizes == ((64, 64),)


@pytest.mark.parametrize("scheduler", list(DIFFUSERS_SCHEDULERS))
def test_bundled_model_matches_diffusers_on_its_weights(scheduler: str) -> None:
    model = load_model(BUNDLED_MODEL, backend="cpu")
    params = GenerateParams(
        model=model.name,
        request_id="parity",
        prompt="a small green triangle at the top left on white",
        negative_prompt="",
        width=64,
        height=64,
        seeds=(3, 8),
        steps=20,
        guidance_scale=3.0,
        scheduler=scheduler,
        output_format="png",
        quality=90,
        embed_metadata=False,
        noise_mode="torch_cpu",
    )
    pipe = load_reference_pipeline(WEIGHTS, scheduler)
    reference = reference_images(pipe, params.prompt, "", params.seeds, (64, 64), params.steps, params.guidance_scale)
    assert np.abs(render(model, params) - reference).max() <= 1e-4


BLOCK_EXPORT_STACK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "transformers", "diffusers", "optimum"):
            raise ImportError(f"{name} must not be needed to serve")
sys.meta_path.insert(0, Block())
from diffuserve.server.cli import main
sys.exit(main(["demo", "-o", sys.argv[1]]))
"""


def test_demo_runs_the_bundled_model_without_torch(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_EXPORT_STACK, str(tmp_path / "demo.png")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "demo.png").stat().st_size > 0
    assert "wrote" in result.stdout
