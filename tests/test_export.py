"""Export: ONNX graphs and manifest derived from the component specs, safetensors only, the parity gate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from diffuserve.engine.manifest import COMPONENTS, Manifest
from diffuserve.engine.ort import OrtEngine
from diffuserve.export.exporter import ExportError, ExportOptions, export_model
from diffuserve.export.parity import ParityError, check_parity, random_feeds
from diffuserve.export.specs import ModelDims, component_specs
from diffuserve.export.wrappers import UNet


def test_manifest_records_every_component_with_parity_and_versions(tiny_export: Path) -> None:
    manifest = Manifest.load(tiny_export)
    assert set(manifest.components) == set(COMPONENTS)
    assert (manifest.height, manifest.width, manifest.batch_sizes) == (128, 128, (1, 2))
    assert manifest.latent_shape == (4, 16, 16)
    assert manifest.vae_scaling_factor == pytest.approx(0.18215)
    for record in (r for records in manifest.components.values() for r in records):
        assert record.parity["max_abs_diff"] <= record.parity["tolerance"] * record.parity["reference_scale"]
        assert (tiny_export / record.onnx_file).is_file()
    assert {"torch", "diffusers", "onnxruntime", "onnx"} <= set(manifest.versions)
    assert len(manifest.source["sha256"]) == 64
    assert (tiny_export / "tokenizer" / "tokenizer.json").is_file()
    assert (tiny_export / "scheduler" / "scheduler_config.json").is_file()


def test_unet_runs_at_twice_the_batch_for_guidance(tiny_export: Path) -> None:
    manifest = Manifest.load(tiny_export)
    for batch in (1, 2):
        assert [t.shape[0] for t in manifest.record("unet", batch).spec.inputs] == [2 * batch] * 3
        assert manifest.record("vae_decoder", batch).spec.batch_size == batch
    unet = manifest.record("unet").spec
    assert unet.inputs[1].dtype == "float32"  # fractional Euler timesteps must survive


@pytest.mark.parametrize("component", COMPONENTS)
def test_batch_sizes_share_one_copy_of_the_weights(tiny_export: Path, component: str) -> None:
    folder = tiny_export / component
    weights = (folder / "model_b1.onnx.data").stat().st_size
    own = folder / "model_b2.onnx.data"  # only constants folded for batch 2 may live here
    assert not own.exists() or own.stat().st_size < 0.1 * weights


def test_onnx_graph_names_and_shapes_match_the_spec(tiny_export: Path) -> None:
    manifest = Manifest.load(tiny_export)
    for name, record in ((name, r) for name, records in manifest.components.items() for r in records):
        graph = onnx.load(tiny_export / record.onnx_file, load_external_data=False).graph

        def shapes(values):
            return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

        expected_inputs = {t.name: list(t.shape) for t in record.spec.inputs}
        expected_outputs = {t.name: list(t.shape) for t in record.spec.outputs}
        assert shapes(graph.input) == expected_inputs, name
        assert shapes(graph.output) == expected_outputs, name


def test_pickle_only_weights_are_refused(tiny_source: Path, tmp_path: Path) -> None:
    src = tmp_path / "pickled"
    shutil.copytree(tiny_source, src)
    for weights in (src / "unet").glob("*.safetensors"):
        weights.rename(weights.with_name("diffusion_pytorch_model.bin"))
    with pytest.raises(ExportError, match=r"unet.*only pickle weights \(diffusion_pytorch_model.bin\).*safetensors"):
        export_model(src, tmp_path / "out", ExportOptions(height=128, width=128))


def test_folder_without_model_index_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no model_index.json"):
        export_model(tmp_path, tmp_path / "out", ExportOptions())


def test_size_not_divisible_by_the_models_downsampling_is_refused() -> None:
    dims = ModelDims(77, 32, 1000, 4, 4, 32, 3, 8, 2, 1000)
    with pytest.raises(ValueError, match="--height must be a positive multiple of 16 for this model, got 100"):
        component_specs(dims, 100, 128, 1)


class _Drifted(torch.nn.Module):
    """The U-Net wrapper plus an offset: what a broken export would look like from the runtime's side."""

    def __init__(self, inner: torch.nn.Module, offset: float):
        super().__init__()
        self.inner, self.offset = inner, offset

    def forward(self, *args):
        return self.inner(*args) + self.offset


def test_parity_gate_measures_drift_against_pytorch(tiny_source: Path, tiny_export: Path) -> None:
    from diffusers import UNet2DConditionModel

    manifest = Manifest.load(tiny_export)
    record = manifest.record("unet")
    engine = OrtEngine(record.spec, tiny_export / record.onnx_file, "cpu")
    unet = UNet(UNet2DConditionModel.from_pretrained(tiny_source / "unet")).eval()
    feeds = random_feeds(record.spec, vocab_size=1000, num_train_timesteps=1000)
    assert check_parity(unet, engine, feeds).passed
    drifted = check_parity(_Drifted(unet, 0.5), engine, feeds)
    assert not drifted.passed
    assert drifted.max_abs_diff == pytest.approx(0.5, abs=1e-3)


def test_export_fails_naming_the_component_over_tolerance(tiny_source: Path, tmp_path: Path) -> None:
    # A tolerance no real export meets: the first component must fail the gate with its figures.
    expected = r"text_encoder \(batch 1\): ONNX Runtime differs from PyTorch by \S+, over the allowed"
    with pytest.raises(ParityError, match=expected):
        export_model(tiny_source, tmp_path / "out", ExportOptions(height=128, width=128, parity_tolerance=1e-30))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_batch_sizes_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"--batch values must be positive integers, got \[0\]"):
        ExportOptions(batches=(0,))


def test_manifest_round_trips_and_rejects_other_format_versions(tiny_export: Path, tmp_path: Path) -> None:
    manifest = Manifest.load(tiny_export)
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    data = json.loads((tiny_export / "manifest.json").read_text())
    data["format_version"] = 999
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format_version is 999"):
        Manifest.load(tmp_path)


def test_random_feeds_follow_the_spec(tiny_export: Path) -> None:
    spec = Manifest.load(tiny_export).record("text_encoder").spec
    feeds = random_feeds(spec, vocab_size=1000, num_train_timesteps=1000)
    assert feeds["input_ids"].dtype == np.int32 and feeds["input_ids"].max() < 1000
