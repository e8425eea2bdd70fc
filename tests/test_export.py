"""Export: ONNX graphs and manifest derived from the component specs, safetensors only, the parity gate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from diffuserve.engine.manifest import COMPONENTS, SYMBOLIC_AXES, Manifest
from diffuserve.engine.ort import load_cpu_engines
from diffuserve.export.exporter import ExportError, ExportOptions, export_model
from diffuserve.export.parity import ParityError, check_parity, random_feeds
from diffuserve.export.specs import ModelDims, TextEncoderDims, vae_specs
from diffuserve.export.wrappers import UNet

from .conftest import TINY_SIZES


def test_manifest_records_every_component_with_parity_and_versions(tiny_export: Path) -> None:
    manifest = Manifest.load(tiny_export)
    assert set(manifest.targets) == {"cpu"}
    cpu = manifest.targets["cpu"]
    assert (cpu.precision, set(cpu.components)) == ("fp32", set(COMPONENTS))
    assert (manifest.sizes, manifest.batch_sizes) == (TINY_SIZES, (1, 2))
    assert manifest.latent_shape((192, 128)) == (4, 16, 24)
    assert manifest.vae_scaling_factor == pytest.approx(0.18215)
    for graph in cpu.components.values():
        assert (tiny_export / graph.graph_file).is_file()
        for shape in graph.shapes:
            assert shape.parity["max_abs_diff"] <= shape.parity["tolerance"] * shape.parity["reference_scale"]
    assert {"torch", "diffusers", "onnxruntime", "onnx"} <= set(manifest.versions)
    assert len(manifest.source["sha256"]) == 64
    assert (tiny_export / "tokenizer" / "tokenizer.json").is_file()
    assert (tiny_export / "scheduler" / "scheduler_config.json").is_file()


def test_every_batch_and_size_is_a_shape_of_one_graph(tiny_export: Path) -> None:
    cpu = Manifest.load(tiny_export).targets["cpu"]
    shapes = {name: [(s.batch, s.size) for s in graph.shapes] for name, graph in cpu.components.items()}
    assert shapes["text_encoder"] == [(1, None), (2, None)]  # text does not depend on the image size
    for name in ("vae_decoder", "vae_encoder"):
        assert sorted(shapes[name]) == sorted((b, s) for b in (1, 2) for s in TINY_SIZES), name
    # The U-Net: rows B (no guidance) and 2B (guidance) of each batch B, at text lengths 77 and 154 (long prompts).
    unet = cpu.components["unet"].shapes
    assert sorted((s.spec.batch_size, s.text_length, s.size) for s in unet) == sorted(
        (rows, length, size) for rows in (1, 2, 4) for length in (77, 154) for size in TINY_SIZES
    )
    for shape in unet:
        assert [t.shape[0] for t in shape.spec.inputs] == [shape.spec.batch_size] * 3
    for batch in (1, 2):
        assert cpu.record("vae_decoder", batch, (192, 128)).spec.inputs[0].shape == (batch, 4, 16, 24)
    assert cpu.record("unet").spec.inputs[1].dtype == "float32"  # fractional Euler timesteps must survive


def test_each_component_has_one_graph_with_its_weights_once(tiny_export: Path) -> None:
    files = sorted(p.name for p in (tiny_export / "cpu").iterdir())
    assert files == sorted(f"{c}.onnx{suffix}" for c in COMPONENTS for suffix in ("", ".data"))
    assert not list(tiny_export.glob(".export-*")), "the scratch folder is removed"


def test_onnx_graph_names_match_the_spec_and_dims_are_symbolic(tiny_export: Path) -> None:
    cpu = Manifest.load(tiny_export).targets["cpu"]
    for name, component in cpu.components.items():
        graph = onnx.load(tiny_export / component.graph_file, load_external_data=False).graph

        def dims(values):
            return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

        spec = component.shapes[0].spec
        expected = {
            t.name: [SYMBOLIC_AXES[name].get(t.name, {}).get(axis, n) for axis, n in enumerate(t.shape)]
            for t in (*spec.inputs, *spec.outputs)
        }
        assert dims(graph.input) | dims(graph.output) == expected, name


def test_pickle_only_weights_are_refused(tiny_source: Path, tmp_path: Path) -> None:
    src = tmp_path / "pickled"
    shutil.copytree(tiny_source, src)
    for weights in (src / "unet").glob("*.safetensors"):
        weights.rename(weights.with_name("diffusion_pytorch_model.bin"))
    with pytest.raises(ExportError, match=r"unet.*only pickle weights \(diffusion_pytorch_model.bin\).*safetensors"):
        export_model(src, tmp_path / "out", ExportOptions(sizes=((128, 128),)))


def test_folder_without_model_index_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no model_index.json"):
        export_model(tmp_path, tmp_path / "out", ExportOptions())


def test_size_not_divisible_by_the_models_downsampling_is_refused() -> None:
    dims = ModelDims(77, (TextEncoderDims("text_encoder", 32),), 1000, 4, 4, 4, 32, 3, 8, 2, 1000)
    with pytest.raises(ValueError, match="--size 128x100: height must be a positive multiple of 16 for this model"):
        vae_specs(dims, (128, 100), 1)


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
    graph = manifest.targets["cpu"].components["unet"]
    record = graph.shapes[0]
    (engine,) = load_cpu_engines(tiny_export / graph.graph_file, [record.spec])
    unet = UNet(UNet2DConditionModel.from_pretrained(tiny_source / "unet")).eval()
    feeds = random_feeds(record.spec, vocab_size=1000, num_train_timesteps=1000)
    assert check_parity(unet, engine, feeds).passed
    drifted = check_parity(_Drifted(unet, 0.5), engine, feeds)
    assert not drifted.passed
    assert drifted.max_abs_diff == pytest.approx(0.5, abs=1e-3)


def test_export_fails_naming_the_component_over_tolerance(tiny_source: Path, tmp_path: Path) -> None:
    # A tolerance no real export meets: the first component must fail the gate with its figures.
    expected = r"cpu/text_encoder batch 1: ONNX Runtime differs from PyTorch by \S+, over the allowed"
    with pytest.raises(ParityError, match=expected):
        export_model(tiny_source, tmp_path / "out", ExportOptions(sizes=((128, 128),), parity_tolerance=1e-30))
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
    spec = Manifest.load(tiny_export).targets["cpu"].record("text_encoder").spec
    feeds = random_feeds(spec, vocab_size=1000, num_train_timesteps=1000)
    assert feeds["input_ids"].dtype == np.int32 and feeds["input_ids"].max() < 1000
