"""The manifest of a built model folder: the one record of what export produced and what the runtime may assume."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_NAME = "manifest.json"
# Bumped when a field changes meaning, so an old runtime refuses a folder it would misread.
# 3: per-target graphs (one graph per component and target, several sizes), sizes instead of one height/width.
# 4: model families (sd1, sd2, sdxl), U-Net shapes per rows and text length, the second text encoder, inpainting
#    and guidance-embedding U-Nets.
FORMAT_VERSION = 4

# The component names used everywhere: specs, ONNX files, engines, manifest.
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
UNET = "unet"
VAE_DECODER = "vae_decoder"
VAE_ENCODER = "vae_encoder"
# The components every family exports; SDXL adds its second text encoder.
COMPONENTS = (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER)
TEXT_ENCODERS = (TEXT_ENCODER, TEXT_ENCODER_2)

# Model families: how a prompt becomes the U-Net's conditioning. SD 1.x and 2.x: one CLIP text encoder's last hidden
# state; SDXL: two encoders' penultimate hidden states side by side, the second's pooled embedding and time ids.
SD1 = "sd1"
SD2 = "sd2"
SDXL = "sdxl"
FAMILIES = (SD1, SD2, SDXL)

# Tasks: where the start latents come from and whether a mask blends or conditions each step.
TXT2IMG = "txt2img"
IMG2IMG = "img2img"
INPAINT = "inpaint"
TASKS = (TXT2IMG, IMG2IMG, INPAINT)
# A U-Net trained for inpainting takes the latents, the mask and the masked image's latents stacked on channels.
INPAINT_EXTRA_CHANNELS = 1

# Tensor names: the same in the specs, the ONNX graphs, the engines' feeds and the pipeline (diffusers' names).
INPUT_IDS = "input_ids"
LAST_HIDDEN_STATE = "last_hidden_state"
PENULTIMATE_HIDDEN_STATE = "penultimate_hidden_state"
TEXT_EMBEDS = "text_embeds"
TIME_IDS = "time_ids"
TIMESTEP_COND = "timestep_cond"
SAMPLE = "sample"
TIMESTEP = "timestep"
ENCODER_HIDDEN_STATES = "encoder_hidden_states"
MODEL_OUTPUT = "model_output"
LATENT_SAMPLE = "latent_sample"
LATENT_MEAN = "latent_mean"
LATENT_LOGVAR = "latent_logvar"

DTYPES = ("float32", "float16", "int32", "int64")

# Export targets: the graphs each runtime needs. `cpu` keeps fp32 graphs as exported (fp16 is slower on a CPU);
# `cuda` holds fp16 graphs fused for ONNX Runtime's CUDA provider, whose fused ops have no CPU kernels; `tensorrt`
# holds fp16 graphs with explicit casts and standard ops only, from which TensorRT builds strongly typed plans on the
# machine that serves them.
CPU_TARGET = "cpu"
CUDA_TARGET = "cuda"
TENSORRT_TARGET = "tensorrt"
TARGETS = (CPU_TARGET, CUDA_TARGET, TENSORRT_TARGET)

# The dimensions each graph leaves symbolic, per component and tensor: one graph serves every batch and image size
# the manifest lists, and a runtime that wants static shapes pins these names to one shape's values.
_TEXT_AXES = {INPUT_IDS: {0: "batch"}, LAST_HIDDEN_STATE: {0: "batch"}, PENULTIMATE_HIDDEN_STATE: {0: "batch"}}
SYMBOLIC_AXES: dict[str, dict[str, dict[int, str]]] = {
    TEXT_ENCODER: _TEXT_AXES,
    TEXT_ENCODER_2: {**_TEXT_AXES, TEXT_EMBEDS: {0: "batch"}},
    UNET: {
        SAMPLE: {0: "unet_batch", 2: "latent_height", 3: "latent_width"},
        TIMESTEP: {0: "unet_batch"},
        # Long prompts: the text length is a multiple of the encoder's 77 tokens, one shape per length served.
        ENCODER_HIDDEN_STATES: {0: "unet_batch", 1: "text_length"},
        TEXT_EMBEDS: {0: "unet_batch"},
        TIME_IDS: {0: "unet_batch"},
        TIMESTEP_COND: {0: "unet_batch"},
        MODEL_OUTPUT: {0: "unet_batch", 2: "latent_height", 3: "latent_width"},
    },
    VAE_DECODER: {
        LATENT_SAMPLE: {0: "batch", 2: "latent_height", 3: "latent_width"},
        SAMPLE: {0: "batch", 2: "height", 3: "width"},
    },
    VAE_ENCODER: {
        SAMPLE: {0: "batch", 2: "height", 3: "width"},
        LATENT_MEAN: {0: "batch", 2: "latent_height", 3: "latent_width"},
        LATENT_LOGVAR: {0: "batch", 2: "latent_height", 3: "latent_width"},
    },
}


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output of a component, with its static shape."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"tensor {self.name!r}: dtype must be one of {DTYPES}, got {self.dtype!r}")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def describe(self) -> str:
        return f"{self.name} {list(self.shape)} {self.dtype}"


@dataclass(frozen=True)
class ComponentSpec:
    """A component's I/O contract at one shape: the source of the graph's names, the engine checks and the manifest."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def batch_size(self) -> int:
        """The static batch every input shares (dimension 0)."""
        return self.inputs[0].shape[0]

    def free_dimensions(self) -> dict[str, int]:
        """The graph's symbolic dimensions pinned to this shape (ONNX Runtime's free-dimension overrides)."""
        axes = SYMBOLIC_AXES[self.name]
        return {dim: t.shape[axis] for t in self.inputs for axis, dim in axes.get(t.name, {}).items()}

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [asdict(t) for t in self.inputs], "outputs": [asdict(t) for t in self.outputs]}

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any]) -> ComponentSpec:
        return cls(
            name=name,
            inputs=tuple(TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in d["inputs"]),
            outputs=tuple(TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in d["outputs"]),
        )


Size = tuple[int, int]  # (width, height) in pixels, as a request and AUTOMATIC1111's `Size:` give it


def format_size(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


@dataclass(frozen=True)
class ShapeRecord:
    """One (batch, image size) a component's graph serves: its static contract there, and the parity measured."""

    spec: ComponentSpec
    # Images per call. The U-Net has a shape for each batch at its rows (no guidance) and twice its rows (guidance).
    batch: int
    # The image size (width, height) it serves; None for a component whose shapes do not depend on it (text).
    size: Size | None
    parity: Mapping[str, float] = field(default_factory=dict)

    def serves(self, size: Size, text_length: int | None = None) -> bool:
        """Whether requests of this image size (width, height) and, for the U-Net, text length run on this shape."""
        return (self.size is None or self.size == tuple(size)) and (
            text_length is None or self.text_length in (None, text_length)
        )

    @property
    def text_length(self) -> int | None:
        """The tokens of text conditioning this shape takes (the U-Net's), None for other components."""
        for tensor in self.spec.inputs:
            if tensor.name == ENCODER_HIDDEN_STATES:
                return tensor.shape[1]
        return None

    def to_dict(self) -> dict[str, Any]:
        size = list(self.size) if self.size else None
        return {**self.spec.to_dict(), "batch": self.batch, "size": size, "parity": dict(self.parity)}

    @classmethod
    def from_dict(cls, component: str, d: Mapping[str, Any]) -> ShapeRecord:
        size = tuple(d["size"]) if d.get("size") else None
        return cls(ComponentSpec.from_dict(component, d), d["batch"], size, d.get("parity", {}))


@dataclass(frozen=True)
class ComponentGraph:
    """A component in one target: one graph file (its weights once) and every shape it serves."""

    graph_file: str
    shapes: tuple[ShapeRecord, ...]
    # Op types left in float32 inside an fp16 graph, where fp16 would overflow.
    fp32_ops: tuple[str, ...] = ()
    # The graph's own precision where it differs from its target's ("fp32": the SDXL VAE in an fp16 target).
    precision: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "graph_file": self.graph_file,
            "fp32_ops": list(self.fp32_ops),
            "precision": self.precision,
            "shapes": [shape.to_dict() for shape in self.shapes],
        }

    @classmethod
    def from_dict(cls, component: str, d: Mapping[str, Any]) -> ComponentGraph:
        shapes = tuple(ShapeRecord.from_dict(component, s) for s in d["shapes"])
        return cls(d["graph_file"], shapes, tuple(d.get("fp32_ops", ())), d.get("precision", ""))


@dataclass(frozen=True)
class PlanKey:
    """What a TensorRT plan is valid for: plans run only on the GPU architecture and TensorRT version that built them,
    at the precision and shapes they were built from."""

    compute_capability: str  # "9.0"
    tensorrt_version: str  # "10.3.0"
    precision: str
    # sha256 (first 16 hex digits) of the target's shapes, as shapes_digest computes it.
    shapes: str

    @property
    def folder_name(self) -> str:
        sm = self.compute_capability.replace(".", "")
        return f"sm{sm}-trt{self.tensorrt_version}-{self.precision}-{self.shapes}"

    def describe(self) -> str:
        return (
            f"compute capability {self.compute_capability}, TensorRT {self.tensorrt_version}, {self.precision}, "
            f"shapes {self.shapes}"
        )


@dataclass(frozen=True)
class PlanFile:
    """One component's TensorRT plan: an engine with one optimization profile per shape, in the shapes' order."""

    plan_file: str
    sha256: str
    # Activation memory each profile's context needs, bytes (what the shared block is sized from).
    device_memory: tuple[int, ...] = ()


@dataclass(frozen=True)
class PlanSet:
    """The plans `diffuserve build-engines` made on one kind of machine: a plan per component, under one key."""

    key: PlanKey
    components: Mapping[str, PlanFile]
    gpu: str = ""
    build_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": asdict(self.key),
            "gpu": self.gpu,
            "build_seconds": self.build_seconds,
            "components": {
                name: {**asdict(plan), "device_memory": list(plan.device_memory)}
                for name, plan in self.components.items()
            },
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PlanSet:
        components = {
            name: PlanFile(p["plan_file"], p["sha256"], tuple(p.get("device_memory", ())))
            for name, p in d["components"].items()
        }
        return cls(PlanKey(**d["key"]), components, d.get("gpu", ""), d.get("build_seconds", 0.0))


@dataclass(frozen=True)
class TargetRecord:
    """What one export target produced: its precision, a graph per component, and how its parity was checked."""

    precision: str
    components: Mapping[str, ComponentGraph]
    # The runtime and graph the parity gate ran, e.g. "fp16 graph before fusion, onnxruntime CPUExecutionProvider".
    checked_with: str = ""
    # The decoded image against the fp32 pipeline on the same latents (fp16 targets): psnr_db, mean/max_abs_diff.
    image_parity: Mapping[str, float] = field(default_factory=dict)
    # TensorRT plans built from this target's graphs, one set per machine kind (`diffuserve build-engines`).
    plans: tuple[PlanSet, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = {
            "precision": self.precision,
            "checked_with": self.checked_with,
            "image_parity": dict(self.image_parity),
            "components": {name: graph.to_dict() for name, graph in self.components.items()},
        }
        if self.plans:
            d["plans"] = [plans.to_dict() for plans in self.plans]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TargetRecord:
        components = {name: ComponentGraph.from_dict(name, c) for name, c in d["components"].items()}
        plans = tuple(PlanSet.from_dict(p) for p in d.get("plans", ()))
        return cls(d["precision"], components, d.get("checked_with", ""), d.get("image_parity", {}), plans)

    def shapes_digest(self) -> str:
        """A digest of every component's shapes (names, dimensions, dtypes, in order): a plan built for other shapes
        has other profiles."""
        shapes = {name: [shape.spec.to_dict() for shape in graph.shapes] for name, graph in self.components.items()}
        text = json.dumps(shapes, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def record(self, component: str, batch: int | None = None, size: Size | None = None) -> ShapeRecord:
        """The component's shape for one batch and size (the first exported of each by default)."""
        for shape in self.components[component].shapes:
            if (batch is None or shape.batch == batch) and (size is None or shape.serves(size)):
                return shape
        raise KeyError(f"{component}: no shape for batch {batch} at {size}")


@dataclass(frozen=True)
class Manifest:
    name: str
    family: str
    prediction_type: str
    vae_scaling_factor: float
    vae_shift_factor: float
    latent_channels: int
    vae_downsample: int
    # Every image size exported, (width, height); the first is what a request that names none gets.
    sizes: tuple[Size, ...]
    # Every static batch exported, ascending; each graph has one shape per batch size and image size.
    batch_sizes: tuple[int, ...]
    targets: Mapping[str, TargetRecord]
    source: Mapping[str, str] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)
    # Linear map from one latent pixel (channels, then 1 for the bias) to RGB in 0..1: cheap previews, no VAE call.
    latent_rgb: tuple[tuple[float, ...], ...] = ()
    # Request defaults the model was made for, e.g. {"steps": 20, "guidance_scale": 3.0}; the server's otherwise.
    defaults: Mapping[str, Any] = field(default_factory=dict)
    # Lengths of text conditioning the U-Net takes, in tokens, ascending: 77 per chunk of a long prompt.
    text_lengths: tuple[int, ...] = (77,)
    # The U-Net's input channels: latent_channels, or that plus the mask and masked-image latents (inpainting).
    unet_in_channels: int = 4
    # Width of the U-Net's guidance-scale embedding (LCM's timestep_cond); 0: guidance is classifier-free.
    timestep_cond_dim: int = 0
    # SDXL: an empty negative prompt conditions on zeros instead of the encoded empty text.
    force_zeros_for_empty_prompt: bool = False

    @property
    def default_size(self) -> Size:
        return self.sizes[0]

    @property
    def inpainting_unet(self) -> bool:
        return self.unet_in_channels == self.latent_channels * 2 + INPAINT_EXTRA_CHANNELS

    @property
    def tasks(self) -> tuple[str, ...]:
        """What requests the model serves: an inpainting U-Net only inpaints; the others need the VAE encoder for
        anything but text-to-image."""
        has_encoder = all(VAE_ENCODER in target.components for target in self.targets.values())
        if self.inpainting_unet:
            return (INPAINT,) if has_encoder else ()
        return (TXT2IMG, IMG2IMG, INPAINT) if has_encoder else (TXT2IMG,)

    @property
    def text_encoders(self) -> tuple[str, ...]:
        """The text encoders the family conditions on, in order."""
        return TEXT_ENCODERS if self.family == SDXL else (TEXT_ENCODER,)

    def latent_shape(self, size: Size) -> tuple[int, int, int]:
        """One image's latent shape (channels, height, width) at an image size (width, height)."""
        width, height = size
        return (self.latent_channels, height // self.vae_downsample, width // self.vae_downsample)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "targets"}
        d["format_version"] = FORMAT_VERSION
        d["sizes"] = [list(size) for size in self.sizes]
        d["text_lengths"] = list(self.text_lengths)
        # Derived, not read back: written for readers of the file (and tools without this class) to see.
        d["tasks"] = list(self.tasks)
        d["targets"] = {name: target.to_dict() for name, target in self.targets.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"manifest format_version is {version!r}; this diffuserve reads {FORMAT_VERSION}: export the model "
                "again with this version"
            )
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k != "targets" and k in d}
        fields["sizes"] = tuple(tuple(size) for size in fields["sizes"])
        fields["batch_sizes"] = tuple(fields["batch_sizes"])
        fields["latent_rgb"] = tuple(tuple(row) for row in fields.get("latent_rgb", ()))
        fields["text_lengths"] = tuple(fields.get("text_lengths", (77,)))
        return cls(targets={name: TargetRecord.from_dict(t) for name, t in d["targets"].items()}, **fields)

    def target(self, name: str) -> TargetRecord:
        """The target a backend runs; a folder without it is refused with the export flag that adds it."""
        if name not in self.targets:
            raise ValueError(
                f"model {self.name!r} has no {name!r} target (it has {sorted(self.targets)}): export it again with "
                f"--target {name}" + "".join(f" --target {t}" for t in sorted(self.targets))
            )
        return self.targets[name]

    def save(self, folder: str | os.PathLike) -> Path:
        """Written aside, then renamed over the old one: `build-engines` rewrites the manifest of a folder that a
        server may be reading."""
        path = Path(folder) / MANIFEST_NAME
        staged = path.with_name(f".{MANIFEST_NAME}.{os.getpid()}")
        staged.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        staged.replace(path)
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Manifest:
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no {MANIFEST_NAME}; is this a folder made by 'diffuserve export'?")
        return cls.from_dict(json.loads(path.read_text()))

    def require(self, target: str, names: Sequence[str]) -> TargetRecord:
        record = self.target(target)
        missing = [n for n in names if n not in record.components]
        if missing:
            raise ValueError(
                f"model {self.name!r} lacks component(s) {missing} in its {target!r} target; "
                f"it has {sorted(record.components)}"
            )
        return record
