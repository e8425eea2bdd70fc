"""Export of every model family: SD 1.x, SD 2.x, SDXL, inpainting and LCM U-Nets, from tiny random folders that load
in diffusers' own pipelines; the manifest says what the server needs, the parity gates pass, and families diffuserve
does not serve are refused by name.

The exports are the conftest's `family` fixture's, which the serving tests (test_families.py) share.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

from diffuserve.engine.manifest import (
    IMG2IMG,
    INPAINT,
    SD1,
    SD2,
    SDXL,
    TXT2IMG,
    Manifest,
)
from diffuserve.engine.ort import load_cpu_engines
from diffuserve.export.exporter import ExportError, ExportOptions, export_model, fp32_components
from diffuserve.export.families import read_source
from diffuserve.export.parity import DEFAULT_MIN_IMAGE_PSNR, FP16_TOLERANCE
from diffuserve.export.tiny import TEXT_ENCODERS, TINY_MODELS, build_tiny_model, tiny_unet

from .conftest import FAMILY_OPTIONS, FAMILY_TARGETS

log = logging.getLogger(__name__)

# One small size, both batch sizes (so the U-Net has rows 1, 2 and 4) and one long-prompt length: enough to pin every
# shape rule down while each family exports in seconds.
(SIZE,) = FAMILY_OPTIONS["sizes"]
BATCHES = FAMILY_OPTIONS["batches"]
TEXT_LENGTHS = FAMILY_OPTIONS["text_lengths"]
# The families exported here; SDXL also to the fp16 targets (its VAE stays fp32 there, its time ids too).
EXPORTED = ("sd1", "sd2", "sdxl", "sd1-inpaint", "sdxl-inpaint", "sd1-lcm")
TARGETS = FAMILY_TARGETS
# fp32 graphs agree with PyTorch to about 1e-6 on these models; this is far below the gate's own 1e-3 x scale.
FP32_CLOSE = 1e-4

PIPELINES = {
    "sd1": "StableDiffusionPipeline",
    "sd2": "StableDiffusionPipeline",
    "sd2-zero-snr": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd1-inpaint": "StableDiffusionInpaintPipeline",
    "sdxl-inpaint": "StableDiffusionXLInpaintPipeline",
    "sd1-lcm": "LatentConsistencyModelPipeline",
    # LCM-SDXL ships as an SDXL pipeline with LCMScheduler.
    "sdxl-lcm": "StableDiffusionXLPipeline",
}
SCHEDULERS = {
    "sd1": "PNDMScheduler",
    "sd2": "DDIMScheduler",
    "sd2-zero-snr": "DDIMScheduler",
    "sdxl": "EulerDiscreteScheduler",
    "sd1-inpaint": "PNDMScheduler",
    "sdxl-inpaint": "EulerDiscreteScheduler",
    "sd1-lcm": "LCMScheduler",
    "sdxl-lcm": "LCMScheduler",
}
EVERY_TASK = (TXT2IMG, IMG2IMG, INPAINT)


@dataclass(frozen=True)
class Expected:
    """What the manifest must say about one tiny model."""

    family: str
    prediction_type: str
    vae_scaling_factor: float
    unet_in_channels: int = 4
    timestep_cond_dim: int = 0
    force_zeros_for_empty_prompt: bool = False
    tasks: tuple[str, ...] = EVERY_TASK


EXPECTED = {
    "sd1": Expected(SD1, "epsilon", 0.18215),
    "sd2": Expected(SD2, "v_prediction", 0.18215),
    "sdxl": Expected(SDXL, "epsilon", 0.13025, force_zeros_for_empty_prompt=True),
    "sd1-inpaint": Expected(SD1, "epsilon", 0.18215, unet_in_channels=9, tasks=(INPAINT,)),
    "sdxl-inpaint": Expected(SDXL, "epsilon", 0.13025, 9, force_zeros_for_empty_prompt=True, tasks=(INPAINT,)),
    "sd1-lcm": Expected(SD1, "epsilon", 0.18215, timestep_cond_dim=32),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: build_tiny_model(root / name, **kwargs) for name, kwargs in TINY_MODELS.items()}


@pytest.fixture(scope="module")
def exports(family) -> dict[str, Path]:
    """Each family exported once per session (the conftest's `family`, which the serving tests share)."""
    folders = {}
    for name in EXPORTED:
        start = time.perf_counter()
        folders[name] = family(name)[0].folder
        log.info("export %s: %.1f s", name, time.perf_counter() - start)
    return folders


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_each_tiny_folder_loads_and_runs_in_its_diffusers_pipeline(sources: dict[str, Path], name: str) -> None:
    import diffusers
    import torch
    from PIL import Image

    pipe = getattr(diffusers, PIPELINES[name]).from_pretrained(sources[name], use_safetensors=True)
    assert type(pipe).__name__ == PIPELINES[name]
    assert type(pipe.scheduler).__name__ == SCHEDULERS[name]
    pipe.set_progress_bar_config(disable=True)
    call = {"prompt": "a red circle", "num_inference_steps": 2, "height": SIZE[1], "width": SIZE[0]}
    if "inpaint" in name:
        call["image"] = Image.new("RGB", SIZE, (200, 40, 40))
        call["mask_image"] = Image.new("L", SIZE, 255)
    images = pipe(**call, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, SIZE[1], SIZE[0], 3) and np.isfinite(images).all()


def test_the_tiny_folders_have_their_releases_layouts(sources: dict[str, Path]) -> None:
    def config(name: str, part: str, file: str = "config.json") -> dict:
        return json.loads((sources[name] / part / file).read_text())

    # SD 2.x: OpenCLIP's text tower (plain GELU) and tokenizer ("!" pads), per-level heads, linear projections.
    assert config("sd1", "text_encoder")["hidden_act"] == "quick_gelu"
    assert config("sd2", "text_encoder")["hidden_act"] == "gelu"
    assert config("sd2", "tokenizer", "tokenizer_config.json")["pad_token"] == "!"
    assert config("sd2", "unet")["use_linear_projection"] and config("sd2", "unet")["attention_head_dim"] == [2, 4]
    assert config("sd2", "scheduler", "scheduler_config.json")["timestep_spacing"] == "leading"
    zero_snr = config("sd2-zero-snr", "scheduler", "scheduler_config.json")
    assert zero_snr["rescale_betas_zero_snr"] and zero_snr["timestep_spacing"] == "trailing"
    # SDXL: two encoders side by side, the second's pooled projection and six time ids in the added conditioning.
    unet = config("sdxl", "unet")
    assert (
        unet["cross_attention_dim"]
        == config("sdxl", "text_encoder")["hidden_size"] + config("sdxl", "text_encoder_2")["hidden_size"]
    )
    assert (
        unet["projection_class_embeddings_input_dim"]
        == 6 * unet["addition_time_embed_dim"] + config("sdxl", "text_encoder_2")["projection_dim"]
    )
    assert (unet["addition_embed_type"], unet["transformer_layers_per_block"]) == ("text_time", [1, 2])
    assert config("sdxl", "tokenizer", "tokenizer_config.json")["pad_token"] == "<|endoftext|>"
    assert config("sdxl", "tokenizer_2", "tokenizer_config.json")["pad_token"] == "!"
    assert config("sdxl", "vae")["scaling_factor"] == pytest.approx(0.13025)
    index = json.loads((sources["sdxl"] / "model_index.json").read_text())
    assert index["force_zeros_for_empty_prompt"] and index["text_encoder_2"][1] == "CLIPTextModelWithProjection"
    scheduler = config("sdxl", "scheduler", "scheduler_config.json")
    assert (scheduler["timestep_spacing"], scheduler["steps_offset"]) == ("leading", 1)
    assert config("sd1-inpaint", "unet")["in_channels"] == config("sdxl-inpaint", "unet")["in_channels"] == 9
    assert config("sd1-lcm", "unet")["time_cond_proj_dim"] == config("sdxl-lcm", "unet")["time_cond_proj_dim"] == 32


def test_variants_no_pipeline_has_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="inpainting or lcm"):
        build_tiny_model(tmp_path / "a", inpainting=True, lcm=True)
    with pytest.raises(ValueError, match="PNDMScheduler has no zero-terminal-SNR"):
        build_tiny_model(tmp_path / "b", zero_snr=True)
    with pytest.raises(ValueError, match="family must be one of"):
        build_tiny_model(tmp_path / "c", family="flux")


@pytest.mark.parametrize("name", EXPORTED)
def test_the_manifest_says_what_the_family_needs(exports: dict[str, Path], name: str) -> None:
    manifest = Manifest.load(exports[name])
    expected = EXPECTED[name]
    assert manifest.family == expected.family
    assert manifest.prediction_type == expected.prediction_type
    assert manifest.vae_scaling_factor == pytest.approx(expected.vae_scaling_factor)
    assert manifest.text_lengths == TEXT_LENGTHS
    assert manifest.unet_in_channels == expected.unet_in_channels
    assert manifest.timestep_cond_dim == expected.timestep_cond_dim
    assert manifest.force_zeros_for_empty_prompt == expected.force_zeros_for_empty_prompt
    assert manifest.tasks == expected.tasks
    assert manifest.source["pipeline"] == PIPELINES[name]
    # Derived fields are written for readers of the file too.
    assert json.loads((exports[name] / "manifest.json").read_text())["tasks"] == list(expected.tasks)
    encoders = ("text_encoder", "text_encoder_2") if expected.family == SDXL else ("text_encoder",)
    for target in manifest.targets.values():
        assert set(target.components) == {*encoders, "unet", "vae_decoder", "vae_encoder"}
    assert (exports[name] / "tokenizer").is_dir() and (exports[name] / "tokenizer_2").is_dir() == (
        expected.family == SDXL
    )


@pytest.mark.parametrize("name", EXPORTED)
def test_the_unet_has_a_shape_per_rows_text_length_and_size(exports: dict[str, Path], name: str) -> None:
    cpu = Manifest.load(exports[name]).targets["cpu"]
    shapes = cpu.components["unet"].shapes
    # Rows B (no guidance, or LCM's embedded guidance) and 2B (classifier-free guidance) for each batch B; one graph.
    rows = sorted({r for b in BATCHES for r in (b, 2 * b)})
    assert sorted((s.spec.batch_size, s.text_length, s.size) for s in shapes) == sorted(
        (r, length, SIZE) for r in rows for length in TEXT_LENGTHS
    )
    expected = EXPECTED[name]
    width = 96 if expected.family == SDXL else 32
    for shape in shapes:
        inputs = {t.name: t.shape for t in shape.spec.inputs}
        r = shape.spec.batch_size
        extra = {}
        if expected.family == SDXL:
            extra = {"text_embeds": (r, 40), "time_ids": (r, 6)}
        if expected.timestep_cond_dim:
            extra["timestep_cond"] = (r, expected.timestep_cond_dim)
        assert inputs == {
            "sample": (r, expected.unet_in_channels, 8, 8),
            "timestep": (r,),
            "encoder_hidden_states": (r, shape.text_length, width),
            **extra,
        }
        assert shape.spec.outputs[0].shape == (r, 4, 8, 8)
    for encoder in cpu.components:
        if encoder.startswith("text_encoder"):
            assert [s.batch for s in cpu.components[encoder].shapes] == list(BATCHES)


def test_sdxl_text_encoders_give_penultimate_states_and_the_second_one_pooled(exports: dict[str, Path]) -> None:
    outputs = {
        name: [(t.name, t.shape) for t in graph.shapes[0].spec.outputs]
        for name, graph in Manifest.load(exports["sdxl"]).targets["cpu"].components.items()
        if name.startswith("text_encoder")
    }
    assert outputs == {
        "text_encoder": [("penultimate_hidden_state", (1, 77, 32))],
        "text_encoder_2": [("penultimate_hidden_state", (1, 77, 64)), ("text_embeds", (1, 40))],
    }


@pytest.mark.parametrize("name", ["sd2", "sdxl"])
def test_the_exported_text_encoders_give_what_the_diffusers_pipeline_conditions_on(
    sources: dict[str, Path], exports: dict[str, Path], name: str
) -> None:
    """The wrappers against the pipeline's own encode_prompt, not only against themselves: SD 2.x's final-layer
    state; SDXL's penultimate states of both encoders side by side and the second encoder's pooled embedding."""
    import diffusers
    import torch

    prompt = "a photograph of an astronaut riding a horse"
    pipe = getattr(diffusers, PIPELINES[name]).from_pretrained(sources[name], use_safetensors=True)
    cpu = Manifest.load(exports[name]).targets["cpu"]
    tokenizers = {"text_encoder": pipe.tokenizer, "text_encoder_2": getattr(pipe, "tokenizer_2", None)}
    hidden, pooled = [], None
    for encoder in ("text_encoder", "text_encoder_2") if name == "sdxl" else ("text_encoder",):
        graph = cpu.components[encoder]
        (engine,) = load_cpu_engines(exports[name] / graph.graph_file, [graph.shapes[0].spec])
        ids = tokenizers[encoder](prompt, padding="max_length", max_length=77, truncation=True).input_ids
        out = list(engine.run({"input_ids": np.array([ids], np.int32)}).values())
        hidden.append(out[0])
        pooled = out[1] if len(out) > 1 else pooled
    with torch.no_grad():
        expected = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    np.testing.assert_allclose(np.concatenate(hidden, axis=-1), expected[0].numpy(), atol=1e-4)
    if name == "sdxl":
        np.testing.assert_allclose(pooled, expected[2].numpy(), atol=1e-4)


@pytest.mark.parametrize("name", EXPORTED)
def test_every_shape_passed_its_parity_gate_with_small_errors(exports: dict[str, Path], name: str) -> None:
    manifest = Manifest.load(exports[name])
    assert set(manifest.targets) == set(TARGETS.get(name, ("cpu",)))
    for target_name, target in manifest.targets.items():
        for component, graph in target.components.items():
            assert graph.shapes, component
            for shape in graph.shapes:
                parity = shape.parity
                assert parity["max_abs_diff"] <= parity["tolerance"] * parity["reference_scale"], (component, shape)
                if target_name == "cpu" or graph.precision == "fp32":
                    assert parity["max_abs_diff"] < FP32_CLOSE, (target_name, component, parity)
                else:
                    assert parity["tolerance"] == pytest.approx(FP16_TOLERANCE)


def test_sdxl_fp16_targets_keep_the_vae_fp32_and_pass_the_image_gate(exports: dict[str, Path]) -> None:
    folder = exports["sdxl"]
    manifest = Manifest.load(folder)
    for target in ("cuda", "tensorrt"):
        record = manifest.targets[target]
        assert record.precision == "fp16"
        assert record.image_parity["psnr_db"] >= DEFAULT_MIN_IMAGE_PSNR
        for component, graph in record.components.items():
            kinds = {t.data_type for t in onnx.load(str(folder / graph.graph_file)).graph.initializer}
            if component.startswith("vae"):
                assert graph.precision == "fp32" and onnx.TensorProto.FLOAT16 not in kinds, (target, component)
            else:
                assert graph.precision == "" and onnx.TensorProto.FLOAT16 in kinds, (target, component)


def test_sdxl_timestep_and_time_id_embeddings_stay_float32_in_fp16_graphs(exports: dict[str, Path]) -> None:
    """Time ids are pixel sizes (1024 and more): in fp16, size x frequency rounds by whole units and its sine is
    noise. Both sinusoidal embeddings (timestep and time ids) must compute in float32."""
    for target in ("cuda", "tensorrt"):
        path = exports["sdxl"] / Manifest.load(exports["sdxl"]).targets[target].components["unet"].graph_file
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
        types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input)}
        sinusoids = [n for n in model.graph.node if n.op_type in ("Sin", "Cos")]
        assert len(sinusoids) == 4, target  # sin and cos of the timestep's embedding and of the time ids'
        assert all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in sinusoids), target
        time_ids = next(i for i in model.graph.input if i.name == "time_ids")
        assert time_ids.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_only_sdxl_keeps_its_vae_fp32_unless_told_it_is_fp16_safe(sources: dict[str, Path]) -> None:
    sdxl, sd1 = read_source(sources["sdxl"]), read_source(sources["sd1"])
    assert fp32_components(sdxl, ExportOptions()) == ("vae_decoder", "vae_encoder")
    assert fp32_components(sdxl, ExportOptions(fp16_vae=True)) == ()
    assert fp32_components(sd1, ExportOptions()) == ()


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def refused(source: Path, out: Path, match: str) -> None:
    """Refused with an ExportError saying why, leaving a previous export in the output folder alone."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text("{}")
    with pytest.raises(ExportError, match=match):
        export_model(source, out, ExportOptions(sizes=(SIZE,)))
    assert (out / "manifest.json").read_text() == "{}"


def test_a_pipeline_of_another_family_is_refused_naming_it(sources: dict[str, Path], tmp_path: Path) -> None:
    flux = shutil.copytree(sources["sd1"], tmp_path / "flux")
    edit_json(flux / "model_index.json", _class_name="FluxPipeline")
    refused(
        flux, tmp_path / "out", r"names the pipeline 'FluxPipeline'; diffuserve exports Stable Diffusion 1\.x/2\.x"
    )


def test_an_sdxl_refiner_is_refused(sources: dict[str, Path], tmp_path: Path) -> None:
    # As the refiner's folder has it: no first text encoder, aesthetic-score conditioning, an image-to-image pipeline.
    refiner = shutil.copytree(sources["sdxl"], tmp_path / "refiner")
    edit_json(
        refiner / "model_index.json",
        _class_name="StableDiffusionXLImg2ImgPipeline",
        requires_aesthetics_score=True,
        text_encoder=[None, None],
        tokenizer=[None, None],
    )
    refused(refiner, tmp_path / "out", "an SDXL refiner .* is not supported; export the SDXL base model")


def test_a_unet_with_refiner_conditioning_is_refused(sources: dict[str, Path], tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    folder = shutil.copytree(sources["sdxl"], tmp_path / "refiner-unet")
    config = dict(UNet2DConditionModel.load_config(folder / "unet"))
    # Five time ids (an aesthetic score where the target size was) x 8, and the pooled embedding's 40.
    config["projection_class_embeddings_input_dim"] = 5 * config["addition_time_embed_dim"] + 40
    UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    refused(
        folder, tmp_path / "out", "takes 80 numbers; SDXL base's is 6 time ids x 8 .* = 88; this is an SDXL refiner"
    )


def test_a_unet_of_five_input_channels_is_refused(sources: dict[str, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(sources["sd1"], tmp_path / "five")
    tiny_unet(SD1, TEXT_ENCODERS[SD1], 5, None).save_pretrained(folder / "unet")
    refused(folder, tmp_path / "out", "the U-Net takes 5 input channels; diffuserve serves 4 .* or 9 ")


def test_a_unet_not_attending_to_the_text_encoders_width_is_refused(sources: dict[str, Path], tmp_path: Path) -> None:
    # An SD 1.x U-Net beside SDXL's encoders: it attends to 32 numbers per token where they give 32 + 64.
    folder = shutil.copytree(sources["sdxl"], tmp_path / "narrow")
    tiny_unet(SD1, TEXT_ENCODERS[SD1], 4, None).save_pretrained(folder / "unet")
    refused(
        folder,
        tmp_path / "out",
        "cross_attention_dim is 32; the text encoders give text_encoder 32 \\+ text_encoder_2 64",
    )


def test_the_cli_passes_text_lengths_and_fp16_vae_to_the_export(monkeypatch: pytest.MonkeyPatch) -> None:
    from diffuserve.export import exporter
    from diffuserve.server.cli import build_parser

    given = {}
    monkeypatch.setattr(exporter, "export_model", lambda src, out, options, report: given.update(options=options))
    argv = ["export", "src", "-o", "out", "--size", "64x64", "--text-length", "77", "--text-length", "231"]
    args = build_parser().parse_args([*argv, "--fp16-vae"])
    assert args.func(args) == 0
    assert (given["options"].text_lengths, given["options"].fp16_vae) == ((77, 231), True)
    args = build_parser().parse_args(argv[:6])
    assert args.func(args) == 0
    assert (given["options"].text_lengths, given["options"].fp16_vae) == (None, False)
