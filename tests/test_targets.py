"""The cuda export target on a machine without a GPU: fused fp16 graphs with float32 I/O, the fp32 block list, the
parity gates (per component before fusion, and the decoded image), and serving its unfused fp16 graphs on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from diffuserve.engine.manifest import COMPONENTS, Manifest
from diffuserve.engine.ort import load_cpu_engines
from diffuserve.export.exporter import ExportOptions, export_model
from diffuserve.export.graphs import CUDA_ONLY_OPS, op_counts, save_graph, unfused_fp16_graph
from diffuserve.export.parity import DEFAULT_MIN_IMAGE_PSNR, compare_images

from .conftest import TINY_SIZES

# The fp32 ops block list of the export below: an op the fused U-Net still has many of.
BLOCKED = {"unet": ("Gemm",)}


@pytest.fixture(scope="module")
def blocked_export(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("blocked") / "tiny"
    export_model(tiny_source, out, ExportOptions(sizes=TINY_SIZES[:1], targets=("cuda",), fp32_ops=BLOCKED))
    return out


def graph(folder: Path, component: str) -> onnx.ModelProto:
    return onnx.load(str(folder / Manifest.load(folder).targets["cuda"].components[component].graph_file))


def test_the_manifest_records_both_targets_and_how_cuda_was_checked(tiny_cuda_export: Path) -> None:
    manifest = Manifest.load(tiny_cuda_export)
    assert set(manifest.targets) == {"cpu", "cuda"}
    cuda = manifest.targets["cuda"]
    assert cuda.precision == "fp16" and set(cuda.components) == set(COMPONENTS)
    assert cuda.checked_with == "fp16 graph before fusion, onnxruntime CPUExecutionProvider"
    for component in cuda.components.values():
        assert (tiny_cuda_export / component.graph_file).is_file()
        assert [(s.batch, s.size) for s in component.shapes] == [
            (s.batch, s.size) for s in manifest.targets["cpu"].components[component.shapes[0].spec.name].shapes
        ]
        for shape in component.shapes:
            assert shape.parity["max_abs_diff"] <= shape.parity["tolerance"] * shape.parity["reference_scale"]
            assert shape.parity["tolerance"] == pytest.approx(2e-2)
    image = cuda.image_parity
    assert image["psnr_db"] >= DEFAULT_MIN_IMAGE_PSNR and image["size"] == list(TINY_SIZES[0])


@pytest.mark.parametrize("component", COMPONENTS)
def test_cuda_graphs_are_fp16_inside_with_float32_inputs_and_outputs(tiny_cuda_export: Path, component: str) -> None:
    model = graph(tiny_cuda_export, component)
    io = [*model.graph.input, *model.graph.output]
    assert {v.type.tensor_type.elem_type for v in io} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT32}
    # By element count: the fused GroupNorm ops take float32 gamma and beta, small beside the weights.
    sizes = {onnx.TensorProto.FLOAT: 0, onnx.TensorProto.FLOAT16: 0}
    for t in model.graph.initializer:
        if t.data_type in sizes:
            sizes[t.data_type] += int(np.prod(t.dims))
    assert sizes[onnx.TensorProto.FLOAT16] / sum(sizes.values()) > 0.95


def test_the_fusions_for_the_cuda_provider_are_in_the_graphs(tiny_cuda_export: Path) -> None:
    unet = op_counts(tiny_cuda_export / "cuda" / "unet.onnx")
    assert unet["MultiHeadAttention"] > 0 and unet["BiasSplitGelu"] > 0 and unet["NhwcConv"] > 0
    assert unet["GroupNorm"] + unet["SkipGroupNorm"] > 0
    vae = op_counts(tiny_cuda_export / "cuda" / "vae_decoder.onnx")
    assert vae["GroupNorm"] > 0 and vae["NhwcConv"] > 0
    assert op_counts(tiny_cuda_export / "cuda" / "text_encoder.onnx")["SkipLayerNormalization"] > 0
    # The cpu target keeps graphs ONNX Runtime's CPU build can run.
    for component in COMPONENTS:
        assert not set(op_counts(tiny_cuda_export / "cpu" / f"{component}.onnx")) & set(CUDA_ONLY_OPS)


def test_the_fused_graph_cannot_run_on_the_cpu_which_is_why_cpu_keeps_its_own(tiny_cuda_export: Path) -> None:
    spec = Manifest.load(tiny_cuda_export).targets["cuda"].record("vae_decoder").spec
    with pytest.raises(Exception, match="GroupNorm|NhwcConv|NOT_IMPLEMENTED|not implemented"):
        load_cpu_engines(tiny_cuda_export / "cuda" / "vae_decoder.onnx", [spec])


def test_the_fp32_block_list_is_honoured_and_recorded(blocked_export: Path) -> None:
    manifest = Manifest.load(blocked_export)
    assert set(manifest.targets) == {"cuda"}  # the fp32 graphs it derives from are not kept
    assert not (blocked_export / "cpu").exists()
    assert manifest.targets["cuda"].components["unet"].fp32_ops == BLOCKED["unet"]
    model = onnx.shape_inference.infer_shapes(graph(blocked_export, "unet"))
    types = {t.name: t.data_type for t in model.graph.initializer}
    types |= {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input)}
    blocked = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert blocked
    for node in blocked:
        for name in node.input:
            assert types[name] == onnx.TensorProto.FLOAT, (node.name, name)


def test_unfused_fp16_graphs_served_on_the_cpu_give_the_fp32_image_within_fp16_rounding(
    tiny_cuda_export: Path, tmp_path: Path
) -> None:
    from diffuserve.engine.loader import LoadedEngines
    from diffuserve.server.models import TEXT_TO_IMAGE, served_model
    from diffuserve.server.params import validate
    from diffuserve.server.pipeline import render
    from diffuserve.v1 import diffusion_pb2 as pb

    manifest = Manifest.load(tiny_cuda_export)
    engines = {}
    for target in ("cpu", "cuda"):
        engines[target] = {}
        for name in TEXT_TO_IMAGE:
            component = manifest.targets[target].components[name]
            path = tiny_cuda_export / manifest.targets["cpu"].components[name].graph_file
            if target == "cuda":
                path = tmp_path / f"{name}.onnx"
                save_graph(unfused_fp16_graph(tiny_cuda_export / "cpu" / f"{name}.onnx", component.fp32_ops), path)
            engines[target][name] = load_cpu_engines(path, [s.spec for s in component.shapes])
    images = []
    for target in ("cpu", "cuda"):
        model = served_model(tiny_cuda_export, LoadedEngines(manifest, "cpu", target, engines[target], (), ""))
        request = pb.GenerateRequest(prompt="a red circle", seeds=[3, 4], steps=12, guidance_scale=7.5)
        images.append(render(model, validate(request, {model.name: model}, model.name)))
    fp32, fp16 = images
    result = compare_images(fp32, fp16, TINY_SIZES[0], 12)
    print(f"fp16 (unfused, CPU) against fp32, 12 PNDM steps, 2 images: {result.describe()}")
    assert result.psnr_db >= 40 and result.max_abs_diff < 0.05
    assert not np.array_equal(fp32, fp16)  # the fp16 graphs really ran
