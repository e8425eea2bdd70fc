"""ONNX graph files per target: the fp32 export, the fused fp16 graph for ONNX Runtime's CUDA provider, saving."""

from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

import onnx

from diffuserve.engine.manifest import TEXT_ENCODER, TEXT_ENCODER_2, TIME_IDS, TIMESTEP, UNET, VAE_DECODER, VAE_ENCODER

log = logging.getLogger(__name__)

# The onnxruntime.transformers optimizer's model type for each component.
FUSION_MODEL_TYPES = {
    TEXT_ENCODER: "clip",
    TEXT_ENCODER_2: "clip",
    UNET: "unet",
    VAE_DECODER: "vae",
    VAE_ENCODER: "vae",
}
# Op types kept in float32 inside the fp16 graphs, per component, beyond the converter's own list of ops without
# fp16 kernels. Empty, as onnxruntime's own Stable Diffusion tools ship them for SD 1.x/2.x; `--fp32-ops` adds to
# them where a model overflows (the SDXL VAE, next, stays fp32 as a whole).
DEFAULT_FP32_OPS: Mapping[str, tuple[str, ...]] = {name: () for name in FUSION_MODEL_TYPES}
# The fused op types the CUDA provider runs and ONNX Runtime's CPU build has no kernels for (MultiHeadAttention has
# both): a graph holding any of these is for CUDA only.
CUDA_ONLY_OPS = ("GroupNorm", "SkipGroupNorm", "NhwcConv", "BiasSplitGelu", "BiasAdd")
# Tensors at or above this size go to the graph's external data file, so a graph over protobuf's 2 GB limit (an
# SD-1.5-size U-Net is 3.4 GB in fp32) still saves, and the graph itself stays small to parse.
EXTERNAL_DATA_MIN_BYTES = 1024


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    """Writes the graph with all its weights in one `<name>.data` file beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The optimizer's fused ops are in com.microsoft without declaring it; ONNX Runtime tolerates that, other
    # consumers (TensorRT's parser, onnx.checker) do not.
    declared = {o.domain for o in model.opset_import}
    for domain in sorted({n.domain for n in model.graph.node} - declared - {"ai.onnx"}):
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=EXTERNAL_DATA_MIN_BYTES,
    )


@contextmanager
def quiet_optimizer() -> Iterator[None]:
    """onnxruntime.transformers logs every fusion at INFO under its own module names and draws progress bars on
    stderr; keep that for --verbose."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    logging.disable(logging.INFO)
    try:
        with redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


# The ops that end the timestep embedding's float32 island: its first matrix product (time_embedding.linear_1).
MATRIX_PRODUCTS = ("MatMul", "Gemm")


def timestep_embedding_nodes(graph: onnx.GraphProto) -> list[str]:
    """The nodes of the U-Net's sinusoidal timestep embedding, to keep in float32: from the `timestep` input up to its
    first matrix product, plus the constants only they read. In fp16, t x frequency at t near 1000 is rounded to 0.5
    and its sine is off by up to 0.25; diffusers' own fp16 pipeline computes this embedding in float32 too. SDXL's
    time ids (sizes up to thousands of pixels) go through the same kind of embedding and stay float32 alike."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    island: dict[str, onnx.NodeProto] = {}
    frontier = [TIMESTEP, TIME_IDS]
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.op_type in MATRIX_PRODUCTS or node.name in island:
                continue
            island[node.name] = node
            frontier.extend(node.output)
    read_by_island = {name for node in island.values() for name in node.input}
    constants = [
        node.name
        for node in graph.node
        if node.op_type == "Constant"
        and set(node.output) <= read_by_island
        and all(c.name in island for out in node.output for c in consumers.get(out, []))
    ]
    return [*island, *constants]


def drop_fp16_round_trips(graph: onnx.GraphProto) -> int:
    """Removes Cast(to fp16) -> Cast(to fp32) pairs, which only round a float32 value to fp16: the converter leaves one
    where a float32 island's input passed through a Cast of the original graph (the timestep's, rounded to 0.5 near
    1000 otherwise). Returns how many it removed."""
    float16, float32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    graph_outputs = {o.name for o in graph.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def cast_to(node: onnx.NodeProto) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    removed: list[onnx.NodeProto] = []
    for down in graph.node:
        readers = consumers.get(down.output[0], []) if cast_to(down) == float16 else []
        if not readers or down.output[0] in graph_outputs or any(cast_to(r) != float32 for r in readers):
            continue
        for up in readers:
            for reader in consumers.get(up.output[0], []):
                reader.input[:] = [down.input[0] if i == up.output[0] else i for i in reader.input]
            removed.append(up)
        removed.append(down)
    for node in removed:
        graph.node.remove(node)
    return sum(1 for node in removed if cast_to(node) == float16)


def _fp16_block_list(fp32_ops: Sequence[str]) -> list[str]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    # An explicit list replaces the converter's own (ops with no fp16 kernel), so extend it rather than pass ours.
    return sorted({*DEFAULT_OP_BLOCK_LIST, *fp32_ops})


def to_fp16(model, fp32_ops: Sequence[str]) -> onnx.ModelProto:
    """fp16 inside, float32 at the graph's inputs and outputs, so the pipeline around it stays float32; every change
    of precision is an explicit Cast in the graph (what TensorRT's strongly typed networks build from)."""
    model.convert_float_to_float16(
        keep_io_types=True,
        op_block_list=_fp16_block_list(fp32_ops),
        node_block_list=timestep_embedding_nodes(model.model.graph),
    )
    drop_fp16_round_trips(model.model.graph)
    return model.model


def fused_fp16_graph(fp32_graph: Path, component: str, fp32_ops: Sequence[str]) -> onnx.ModelProto:
    """Fuse first, then convert: the optimizer fuses attention, GroupNorm, BiasSplitGelu and NhwcConv for the CUDA
    provider, and its packed-QKV attention fusions apply only to a graph that will be fp16."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = FUSION_MODEL_TYPES[component]
    options = FusionOptions(model_type)

    def fuse():
        # opt_level 0: the optimizer's own fusions only; ONNX Runtime's graph optimisations run at session creation
        # on the serving machine, for its provider.
        return optimize_model(
            str(fp32_graph), model_type=model_type, optimization_options=options, opt_level=0, use_gpu=True
        )

    with quiet_optimizer():
        try:
            model = fuse()
        except TypeError as e:
            # The VAE attention fusion of onnxruntime 1.32 converts a 1-element array with int(), which numpy 2.4
            # refuses; the VAE has one attention block, at its lowest resolution, so fuse the rest without it.
            if model_type != "vae":
                raise
            log.warning("%s: attention left unfused (onnxruntime's VAE attention fusion failed: %s)", component, e)
            options.enable_attention = False
            model = fuse()
        log.debug("%s fused: %s", component, model.get_fused_operator_statistics())
        return to_fp16(model, fp32_ops)


def unfused_fp16_graph(fp32_graph: Path, fp32_ops: Sequence[str]) -> onnx.ModelProto:
    """The same conversion without the CUDA-only fusions: what the parity gate runs on a machine without a GPU."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    with quiet_optimizer():
        return to_fp16(OnnxModel(onnx.load(str(fp32_graph))), fp32_ops)


def op_counts(path: Path) -> Counter:
    return Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)
