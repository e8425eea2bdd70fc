"""The manifest of a built model folder: the one record of what export produced and what the runtime may assume."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_NAME = "manifest.json"
# Bumped when a field changes meaning, so an old runtime refuses a folder it would misread.
FORMAT_VERSION = 2

# The component names used everywhere: specs, ONNX files, engines, manifest.
TEXT_ENCODER = "text_encoder"
UNET = "unet"
VAE_DECODER = "vae_decoder"
VAE_ENCODER = "vae_encoder"
COMPONENTS = (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER)

# Tensor names: the same in the specs, the ONNX graphs, the engines' feeds and the pipeline (diffusers' names).
INPUT_IDS = "input_ids"
LAST_HIDDEN_STATE = "last_hidden_state"
SAMPLE = "sample"
TIMESTEP = "timestep"
ENCODER_HIDDEN_STATES = "encoder_hidden_states"
MODEL_OUTPUT = "model_output"
LATENT_SAMPLE = "latent_sample"
LATENT_MEAN = "latent_mean"
LATENT_LOGVAR = "latent_logvar"

DTYPES = ("float32", "float16", "int32", "int64")


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
    """A component's I/O contract: the source of the ONNX graph's names, the engine checks and the manifest."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def batch_size(self) -> int:
        """The static batch every input shares (dimension 0)."""
        return self.inputs[0].shape[0]

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [asdict(t) for t in self.inputs], "outputs": [asdict(t) for t in self.outputs]}

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any]) -> ComponentSpec:
        return cls(
            name=name,
            inputs=tuple(TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in d["inputs"]),
            outputs=tuple(TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in d["outputs"]),
        )


@dataclass(frozen=True)
class ComponentRecord:
    """A component as built: its contract, its file and how far the runtime drifted from PyTorch at export."""

    spec: ComponentSpec
    onnx_file: str
    # Images per call it was exported for (the U-Net's spec has twice the rows, for guidance).
    batch: int
    parity: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    name: str
    family: str
    prediction_type: str
    vae_scaling_factor: float
    vae_shift_factor: float
    latent_channels: int
    vae_downsample: int
    height: int
    width: int
    # Every static batch exported, ascending; each component has one record (engine) per batch size.
    batch_sizes: tuple[int, ...]
    precision: str
    components: Mapping[str, tuple[ComponentRecord, ...]]
    source: Mapping[str, str] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)
    # Linear map from one latent pixel (channels, then 1 for the bias) to RGB in 0..1: cheap previews, no VAE call.
    latent_rgb: tuple[tuple[float, ...], ...] = ()
    # Request defaults the model was made for, e.g. {"steps": 20, "guidance_scale": 3.0}; the server's otherwise.
    defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """One image's latent shape (channels, height, width)."""
        return (self.latent_channels, self.height // self.vae_downsample, self.width // self.vae_downsample)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "components"}
        d["format_version"] = FORMAT_VERSION
        d["components"] = {
            name: [
                {**rec.spec.to_dict(), "onnx_file": rec.onnx_file, "batch": rec.batch, "parity": dict(rec.parity)}
                for rec in records
            ]
            for name, records in self.components.items()
        }
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"manifest format_version is {version!r}; this diffuserve reads {FORMAT_VERSION}")
        components = {
            name: tuple(
                ComponentRecord(ComponentSpec.from_dict(name, c), c["onnx_file"], c["batch"], c.get("parity", {}))
                for c in cs
            )
            for name, cs in d["components"].items()
        }
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k != "components" and k in d}
        fields["batch_sizes"] = tuple(fields["batch_sizes"])
        fields["latent_rgb"] = tuple(tuple(row) for row in fields.get("latent_rgb", ()))
        return cls(components=components, **fields)

    def record(self, component: str, batch: int | None = None) -> ComponentRecord:
        """The component's engine for one batch size (the smallest by default)."""
        for record in self.components[component]:
            if batch is None or record.batch == batch:
                return record
        raise KeyError(f"{component}: no engine for batch {batch}; exported batches are {list(self.batch_sizes)}")

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Manifest:
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no {MANIFEST_NAME}; is this a folder made by 'diffuserve export'?")
        return cls.from_dict(json.loads(path.read_text()))

    def require(self, names: Sequence[str]) -> None:
        missing = [n for n in names if n not in self.components]
        if missing:
            raise ValueError(f"model {self.name!r} lacks component(s) {missing}; it has {sorted(self.components)}")
