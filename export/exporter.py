"""diffusers folder -> one ONNX graph per component and target + manifest, ending with the parity gates."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx
import torch
from torch import nn

from diffuserve.engine.base import Engine
from diffuserve.engine.loader import load_component_engines
from diffuserve.engine.manifest import (
    CPU_TARGET,
    CUDA_TARGET,
    MANIFEST_NAME,
    SDXL,
    SYMBOLIC_AXES,
    TARGETS,
    TENSORRT_TARGET,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
    ComponentGraph,
    ComponentSpec,
    Manifest,
    ShapeRecord,
    Size,
    TargetRecord,
    format_size,
)
from diffuserve.engine.versions import installed_versions

from .families import ExportError, SourceModel, check_unet, load_modules, model_dims, read_source
from .graphs import DEFAULT_FP32_OPS, fused_fp16_graph, save_graph, unfused_fp16_graph
from .parity import (
    DEFAULT_MIN_IMAGE_PSNR,
    DEFAULT_TOLERANCE,
    FP16_TOLERANCE,
    ImageParity,
    ParityError,
    compare_outputs,
    image_parity,
    random_feeds,
    reference_outputs,
)
from .previews import fit_latent_rgb
from .specs import ModelDims, check_text_length, text_encoder_spec, unet_spec, vae_specs
from .wrappers import wrap_components

log = logging.getLogger(__name__)

# The TorchScript exporter: onnxruntime.transformers' fusions (attention, GroupNorm, BiasSplitGelu) match the graphs
# it writes, and it names symbolic dimensions so one graph serves every shape; the dynamo exporter's graphs fused
# almost nothing (see NOTES). Opset 17 is the newest it writes LayerNormalization for.
OPSET = 17
# Precision of each target's graphs.
TARGET_PRECISION = {CPU_TARGET: "fp32", CUDA_TARGET: "fp16", TENSORRT_TARGET: "fp16"}
# The ONNX domains TensorRT's parser reads (the standard operator set); a graph with ops of another is not built.
TENSORRT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class ExportOptions:
    # Image sizes (width, height) to serve; the first is what a request that names none gets.
    sizes: tuple[Size, ...] = ((512, 512),)
    # Static batch sizes to build engines for; the server pads a batch to the smallest that fits.
    batches: tuple[int, ...] = (1,)
    targets: tuple[str, ...] = (CPU_TARGET,)
    parity_tolerance: float = DEFAULT_TOLERANCE
    fp16_tolerance: float = FP16_TOLERANCE
    min_image_psnr: float = DEFAULT_MIN_IMAGE_PSNR
    # Op types to keep in float32 in fp16 graphs, per component, added to DEFAULT_FP32_OPS.
    fp32_ops: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    name: str | None = None
    default_steps: int | None = None
    default_guidance_scale: float | None = None
    # Tokens of text conditioning the U-Net takes, each a shape: a prompt of k chunks of 75 tokens needs 77k. None:
    # one and two chunks of the model's text encoder.
    text_lengths: tuple[int, ...] | None = None
    # SDXL's VAE overflows in fp16, so fp16 targets keep it fp32; a model bringing an fp16-safe VAE sets this.
    fp16_vae: bool = False

    def __post_init__(self) -> None:
        if not self.batches or any(b < 1 for b in self.batches):
            raise ValueError(f"--batch values must be positive integers, got {list(self.batches)}")
        object.__setattr__(self, "batches", tuple(sorted(set(self.batches))))
        if not self.sizes:
            raise ValueError("--size: give at least one WIDTHxHEIGHT")
        object.__setattr__(self, "sizes", tuple(dict.fromkeys(tuple(s) for s in self.sizes)))
        unknown = sorted(set(self.targets) - set(TARGETS))
        if not self.targets or unknown:
            raise ValueError(f"--target must be among {list(TARGETS)}, got {list(self.targets)}")
        object.__setattr__(self, "targets", tuple(dict.fromkeys(self.targets)))
        for component in self.fp32_ops:
            if component not in DEFAULT_FP32_OPS:
                raise ValueError(
                    f"--fp32-ops: unknown component {component!r}; components are {list(DEFAULT_FP32_OPS)}"
                )

    @property
    def request_defaults(self) -> dict[str, float]:
        given = {"steps": self.default_steps, "guidance_scale": self.default_guidance_scale}
        return {key: value for key, value in given.items() if value is not None}

    def lengths_for(self, dims: ModelDims) -> tuple[int, ...]:
        lengths = self.text_lengths or (dims.text_seq_len, 2 * dims.text_seq_len)
        for length in lengths:
            check_text_length(dims, length)
        return tuple(sorted(set(lengths)))

    def fp32_ops_for(self, component: str) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*DEFAULT_FP32_OPS[component], *self.fp32_ops.get(component, ()))))


def export_onnx(module: nn.Module, spec: ComponentSpec, path: Path) -> None:
    """The fp32 graph of one component, its batch and image dimensions symbolic, weights in one data file."""
    feeds = random_feeds(spec, 1, 1)
    args = tuple(torch.from_numpy(feeds[t.name]) for t in spec.inputs)
    axes = SYMBOLIC_AXES[spec.name]
    # The exporter warns about its deprecation and narrates its passes; keep that for --verbose only.
    chatter = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp:
        # Above 2 GB it writes one file per tensor: export aside, then save as one graph and one data file.
        raw = Path(tmp) / "model.onnx"
        with torch.no_grad(), warnings.catch_warnings(), redirect_stdout(chatter), redirect_stderr(chatter):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(raw),
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_axes={t.name: axes[t.name] for t in (*spec.inputs, *spec.outputs) if t.name in axes},
                opset_version=OPSET,
                dynamo=False,
            )
        model = onnx.load(str(raw))
        declare_io_shapes(model, spec)
        save_graph(model, path)
    log.debug("torch.onnx.export of %s:\n%s", spec.name, chatter.getvalue())


def declare_io_shapes(model: onnx.ModelProto, spec: ComponentSpec) -> None:
    """The graph's inputs and outputs as the spec has them: symbolic where SYMBOLIC_AXES says, the spec's size
    elsewhere (the exporter leaves some output dimensions it could not trace as invented names)."""
    axes = SYMBOLIC_AXES[spec.name]
    tensors = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    for value in (*model.graph.input, *model.graph.output):
        tensor = tensors[value.name]
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            name = axes.get(tensor.name, {}).get(axis)
            if name:
                dim.dim_param = name
            else:
                dim.dim_value = tensor.shape[axis]


def source_hash(src: Path) -> str:
    """sha256 over the configs and weights export reads, so a manifest names exactly what it was built from."""
    digest = hashlib.sha256()
    files = [src / "model_index.json", src / "scheduler" / "scheduler_config.json"]
    for part in read_source(src).parts:
        files += sorted((src / part).glob("*.json")) + sorted((src / part).glob("*.safetensors"))
    for path in files:
        digest.update(path.relative_to(src).as_posix().encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    return installed_versions(("diffuserve", "torch", "diffusers", "transformers", "onnx", "onnxruntime"))


Shapes = dict[str, list[tuple[int, Size | None, ComponentSpec]]]


def shape_specs(dims: ModelDims, options: ExportOptions) -> Shapes:
    """Every (batch, size) each component serves, each spec once. The text encoders' shapes do not depend on the image
    size; the U-Net has one per text length and per rows: a batch's images, and twice that for guidance."""
    shapes: dict[str, dict[ComponentSpec, tuple[int, Size | None]]] = {}

    def add(spec: ComponentSpec, batch: int, size: Size | None) -> None:
        shapes.setdefault(spec.name, {}).setdefault(spec, (batch, size))

    for batch in options.batches:
        for encoder in dims.text_encoders:
            add(text_encoder_spec(dims, encoder, batch), batch, None)
    for size in options.sizes:
        for length in options.lengths_for(dims):
            for rows, batch in sorted({(rows, b) for b in options.batches for rows in (b, 2 * b)}):
                add(unet_spec(dims, size, rows, length), batch, size)
        for batch in options.batches:
            for spec in vae_specs(dims, size, batch).values():
                add(spec, batch, size)
    return {name: [(batch, size, spec) for spec, (batch, size) in specs.items()] for name, specs in shapes.items()}


# A graph as the gates run it: its file and the backend it runs on here.
CheckedGraph = tuple[Path, str]


@dataclass
class ExportRun:
    """What one export works with: the torch modules, their shapes, where graphs go, and how to report."""

    out: Path
    options: ExportOptions
    modules: dict[str, nn.Module]
    shapes: Shapes
    dims: ModelDims
    report: Callable[[str], None]
    # Components the fp16 targets keep in fp32 (their fp32 graph as it is).
    fp32_components: tuple[str, ...] = ()
    # spec -> the random feeds and PyTorch's outputs on them.
    references: dict = field(default_factory=dict)
    # (component, graph, backend, tolerance) -> the shapes' parity records.
    gated: dict = field(default_factory=dict)

    def compute_references(self) -> None:
        """PyTorch's outputs for every shape's random feeds, once for all targets; then the torch modules go, so
        fusing a full-size U-Net does not share memory with them."""
        for name, shapes in self.shapes.items():
            for *_, spec in shapes:
                feeds = random_feeds(spec, self.dims.vocab_size, self.dims.num_train_timesteps)
                self.references[spec] = (feeds, reference_outputs(self.modules[name], spec, feeds))
        self.modules.clear()
        gc.collect()

    def gate(self, target: str, name: str, graph: CheckedGraph, tolerance: float) -> list[ShapeRecord]:
        """Parity of each shape against PyTorch; over tolerance fails the export naming component and shape. A graph
        two targets check alike (their fp16 graph on the CPU) is run once."""
        key = (name, *graph, tolerance)
        if key not in self.gated:
            self.gated[key] = self._gate(target, name, load_checked(self, name, graph), tolerance)
        return self.gated[key]

    def _gate(self, target: str, name: str, engines: Sequence[Engine], tolerance: float) -> list[ShapeRecord]:
        records = []
        for (batch, size, spec), engine in zip(self.shapes[name], engines, strict=True):
            feeds, reference = self.references[spec]
            parity = compare_outputs(engine, feeds, reference, tolerance)
            shape = ShapeRecord(spec, batch, size, parity.to_dict())
            where = f"{target}/{shape_label(shape)}"
            self.report(
                f"{where}: parity max|torch - onnxruntime| = {parity.max_abs_diff:.2e} "
                f"(allowed {parity.allowed:.2e}) {'ok' if parity.passed else 'FAILED'}"
            )
            if not parity.passed:
                raise ParityError(
                    f"{where}: ONNX Runtime differs from PyTorch by {parity.max_abs_diff:.3e}, over the allowed "
                    f"{parity.tolerance:g} x {parity.reference_scale:.3g}; the export is not usable"
                )
            records.append(shape)
        return records


def shape_label(shape: ShapeRecord) -> str:
    """How reports and errors name one shape; the U-Net's also by its rows and text length, as a batch has several."""
    label = f"{shape.spec.name} batch {shape.batch}" + (f" {format_size(shape.size)}" if shape.size else "")
    if shape.spec.name != UNET:
        return label
    return f"{label} ({shape.spec.batch_size} rows, {shape.text_length} tokens)"


def export_fp32(run: ExportRun, folder: Path) -> dict[str, Path]:
    graphs = {}
    for index, (name, shapes) in enumerate(run.shapes.items(), start=1):
        start = time.perf_counter()
        graphs[name] = folder / f"{name}.onnx"
        export_onnx(run.modules[name], shapes[0][2], graphs[name])
        run.report(f"[{index}/{len(run.shapes)}] {name}: exported in {time.perf_counter() - start:.1f} s")
    return graphs


def load_checked(run: ExportRun, name: str, graph: CheckedGraph) -> tuple[Engine, ...]:
    path, backend = graph
    return load_component_engines(path, [spec for *_, spec in run.shapes[name]], backend)


def cpu_target(run: ExportRun, fp32: dict[str, Path]) -> TargetRecord:
    """The fp32 graphs as exported, checked on the CPU. Each component's engines are let go after its gate: at SD
    sizes a U-Net session holds gigabytes of activations."""
    components = {}
    for name, graph in fp32.items():
        shapes = run.gate(CPU_TARGET, name, (graph, "cpu"), run.options.parity_tolerance)
        components[name] = ComponentGraph(graph.relative_to(run.out).as_posix(), tuple(shapes))
    return TargetRecord("fp32", components, "fp32 graph, onnxruntime CPUExecutionProvider")


def cuda_runs_here() -> bool:
    from diffuserve.engine.ort_cuda import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason:
        log.info("no CUDA to check the cuda target on (%s): checking its fp16 graphs before fusion on the CPU", reason)
    return reason is None


def explicit_fp16_graphs(run: ExportRun, fp32: dict[str, Path], folder: Path) -> dict[str, Path]:
    """fp16 with float32 inputs and outputs, every change of precision an explicit Cast, standard ops only: the
    tensorrt target's graphs, and what the cuda target's gate runs where CUDA does not (the fused ops need it)."""
    graphs = {}
    for name, graph in fp32.items():
        start = time.perf_counter()
        graphs[name] = folder / f"{name}.onnx"
        if name in run.fp32_components:
            save_graph(onnx.load(str(graph)), graphs[name])
            run.report(f"{name}: kept in fp32")
            continue
        save_graph(unfused_fp16_graph(graph, run.options.fp32_ops_for(name)), graphs[name])
        run.report(f"{name}: converted to fp16 with explicit casts in {time.perf_counter() - start:.1f} s")
    return graphs


def component_record(run: ExportRun, name: str, graph: Path, shapes: Sequence[ShapeRecord]) -> ComponentGraph:
    """An fp16 target's entry for one component: its graph, shapes and what stayed in fp32."""
    if name in run.fp32_components:
        return ComponentGraph(graph.relative_to(run.out).as_posix(), tuple(shapes), precision="fp32")
    return ComponentGraph(graph.relative_to(run.out).as_posix(), tuple(shapes), run.options.fp32_ops_for(name))


def gate_tolerance(run: ExportRun, name: str) -> float:
    return run.options.parity_tolerance if name in run.fp32_components else run.options.fp16_tolerance


def cuda_target(
    run: ExportRun, fp32: dict[str, Path], fp16: dict[str, Path] | None
) -> tuple[TargetRecord, dict[str, CheckedGraph]]:
    """Fused fp16 graphs; the gate runs the final graph on CUDA where there is one, else the same fp16 graph before
    fusion on the CPU (`fp16`; the fused ops have no CPU kernels). Returns the graphs checked, for the image gate."""
    components, checked = {}, {}
    for name, graph in fp32.items():
        start = time.perf_counter()
        final = run.out / CUDA_TARGET / f"{name}.onnx"
        if name in run.fp32_components:
            save_graph(onnx.load(str(graph)), final)
        else:
            save_graph(fused_fp16_graph(graph, name, run.options.fp32_ops_for(name)), final)
            run.report(f"{CUDA_TARGET}/{name}: fused and converted to fp16 in {time.perf_counter() - start:.1f} s")
        checked[name] = (fp16[name], "cpu") if fp16 else (final, "cuda")
        # A CpuPlacementError here is a broken export (CUDA runs, the graph would not): it propagates.
        shapes = run.gate(CUDA_TARGET, name, checked[name], gate_tolerance(run, name))
        components[name] = component_record(run, name, final, shapes)
    checked_with = (
        "fp16 graph before fusion, onnxruntime CPUExecutionProvider"
        if fp16
        else "final graph, onnxruntime CUDAExecutionProvider"
    )
    return TargetRecord("fp16", components, checked_with), checked


def check_standard_ops(component: str, graph: Path) -> None:
    """TensorRT's ONNX parser reads the standard operator set only."""
    nodes = onnx.load(str(graph), load_external_data=False).graph.node
    foreign = sorted({f"{n.domain}.{n.op_type}" for n in nodes if n.domain not in TENSORRT_DOMAINS})
    if foreign:
        raise ExportError(f"{TENSORRT_TARGET}/{component}: ops outside the standard ONNX set: {foreign}")


def tensorrt_target(run: ExportRun, fp16: dict[str, Path]) -> tuple[TargetRecord, dict[str, CheckedGraph]]:
    """The explicit-cast fp16 graphs as they are, checked on the CPU: TensorRT builds its plans from them on the
    machine that serves (`diffuserve build-engines`)."""
    components, checked = {}, {}
    for name, graph in fp16.items():
        check_standard_ops(name, graph)
        checked[name] = (graph, "cpu")
        shapes = run.gate(TENSORRT_TARGET, name, checked[name], gate_tolerance(run, name))
        components[name] = component_record(run, name, graph, shapes)
    return TargetRecord("fp16", components, "final graph, onnxruntime CPUExecutionProvider"), checked


def export_model(
    src: str | Path, out: str | Path, options: ExportOptions, report: Callable[[str], None] = log.info
) -> Manifest:
    """Exports every component once in fp32, derives each target's graphs and checks them against PyTorch, then
    writes the manifest (last: it marks completion)."""
    src, out = Path(src), Path(out)
    source = read_source(src)
    modules = load_modules(source)
    dims = model_dims(source, modules)
    check_unet(source, dims, modules["unet"].config)
    shapes = shape_specs(dims, options)
    manifest = source_manifest(source, dims, modules["vae"], options)
    run = ExportRun(out, options, wrap_components(modules, dims), shapes, dims, report)
    run.fp32_components = fp32_components(source, options)
    del modules
    # Only once the model is known to fit does the export replace what the folder held.
    clear_output(out)
    copy_runtime_files(source, out)
    report(f"{src.name}: family {source.family} ({source.pipeline_class}), U-Net {dims.unet_in_channels} channels")
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        scratch = Path(tmp)
        # The cpu target is the fp32 export itself; other targets derive from it (kept aside when not served).
        fp32_folder = out / CPU_TARGET if CPU_TARGET in options.targets else scratch / "fp32"
        fp32 = export_fp32(run, fp32_folder)
        run.compute_references()
        cpu = cpu_target(run, fp32)
        targets = {CPU_TARGET: cpu, **fp16_targets(run, replace(manifest, targets={CPU_TARGET: cpu}), fp32, scratch)}
        targets = {name: record for name, record in targets.items() if name in options.targets}
    manifest = replace(manifest, targets=targets)
    manifest.save(out)
    report(f"wrote {out / MANIFEST_NAME} (targets {', '.join(targets)})")
    return manifest


def source_manifest(source: SourceModel, dims: ModelDims, vae: nn.Module, options: ExportOptions) -> Manifest:
    """Everything the manifest says about the model itself, before any target is built."""
    scheduler = json.loads((source.folder / "scheduler" / "scheduler_config.json").read_text())
    return Manifest(
        name=options.name or source.folder.resolve().name,
        family=source.family,
        prediction_type=scheduler.get("prediction_type", "epsilon"),
        vae_scaling_factor=float(vae.config.scaling_factor),
        vae_shift_factor=float(getattr(vae.config, "shift_factor", None) or 0.0),
        latent_channels=dims.latent_channels,
        vae_downsample=dims.vae_downsample,
        sizes=options.sizes,
        batch_sizes=options.batches,
        targets={},
        source={"path": str(source.folder), "sha256": source_hash(source.folder), "pipeline": source.pipeline_class},
        versions=versions(),
        defaults=options.request_defaults,
        latent_rgb=fit_latent_rgb(vae, options.sizes[0][1], options.sizes[0][0]),
        text_lengths=options.lengths_for(dims),
        unet_in_channels=dims.unet_in_channels,
        timestep_cond_dim=dims.timestep_cond_dim,
        force_zeros_for_empty_prompt=source.force_zeros_for_empty_prompt,
    )


def clear_output(out: Path) -> None:
    """The manifest first: a folder without one is never served, whatever graphs it still holds."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for target in TARGETS:
        shutil.rmtree(out / target, ignore_errors=True)


def fp16_targets(run: ExportRun, manifest: Manifest, fp32: dict[str, Path], scratch: Path) -> dict[str, TargetRecord]:
    """The fp16 targets asked for, each gated per component and on its decoded image against the fp32 pipeline's."""
    asked = [t for t in (CUDA_TARGET, TENSORRT_TARGET) if t in run.options.targets]
    cuda_on_cpu = CUDA_TARGET in asked and not cuda_runs_here()
    fp16 = None
    if TENSORRT_TARGET in asked or cuda_on_cpu:
        fp16 = explicit_fp16_graphs(run, fp32, run.out / TENSORRT_TARGET if TENSORRT_TARGET in asked else scratch)
    fp32_graphs = {name: (path, "cpu") for name, path in fp32.items()}
    targets, images = {}, {}
    for target in asked:
        if target == CUDA_TARGET:
            record, checked = cuda_target(run, fp32, fp16 if cuda_on_cpu else None)
        else:
            record, checked = tensorrt_target(run, fp16)
        # Where CUDA does not run, both targets check the same graphs on the CPU: one image gate serves both.
        graphs = tuple(sorted(checked.items()))
        if graphs not in images:
            with_target = replace(manifest, targets={**manifest.targets, target: record})
            images[graphs] = check_image(run, with_target, target, fp32_graphs, checked)
        targets[target] = replace(record, image_parity=images[graphs].to_dict())
    return targets


def fp32_components(source: SourceModel, options: ExportOptions) -> tuple[str, ...]:
    """Components the fp16 targets keep whole in fp32: SDXL's VAE overflows in fp16 (unless it is an fp16-safe one)."""
    return (VAE_DECODER, VAE_ENCODER) if source.family == SDXL and not options.fp16_vae else ()


def copy_runtime_files(source: SourceModel, out: Path) -> None:
    """What the server reads beside the graphs: the tokenizers and the scheduler config."""
    src = source.folder
    for tokenizer in source.tokenizers:
        shutil.copytree(src / tokenizer, out / tokenizer, dirs_exist_ok=True)
    (out / "scheduler").mkdir(exist_ok=True)
    shutil.copy2(src / "scheduler" / "scheduler_config.json", out / "scheduler" / "scheduler_config.json")


def check_image(
    run: ExportRun, manifest: Manifest, target: str, fp32: dict[str, CheckedGraph], fp16: dict[str, CheckedGraph]
) -> ImageParity:
    """An fp16 target's decoded image against the fp32 pipeline's on the same latents, at every size."""

    def engines(graphs: dict[str, CheckedGraph]) -> Callable[[str], tuple[Engine, ...]]:
        return lambda name: load_checked(run, name, graphs[name])

    results = []
    for size in run.options.sizes:
        result = image_parity(run.out, manifest, engines(fp32), engines(fp16), size, target)
        run.report(f"{target}: decoded image at {format_size(size)} against fp32: {result.describe()}")
        results.append(result)
    worst = min(results, key=lambda r: r.psnr_db)
    if worst.psnr_db < run.options.min_image_psnr:
        raise ParityError(
            f"{target}: the fp16 pipeline's image is {worst.psnr_db:.1f} dB PSNR from the fp32 one, under the "
            f"required {run.options.min_image_psnr:g} dB; keep the overflowing ops in fp32 with --fp32-ops"
        )
    return worst
