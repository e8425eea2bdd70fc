"""diffusers folder -> ONNX graphs + manifest, ending with the parity gate."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from diffuserve.engine.manifest import MANIFEST_NAME, ComponentRecord, ComponentSpec, Manifest
from diffuserve.engine.ort import OrtEngine

from .parity import DEFAULT_TOLERANCE, ParityError, check_parity, random_feeds
from .previews import fit_latent_rgb
from .shared_weights import share_weights
from .specs import ModelDims, component_specs
from .wrappers import wrap_components

log = logging.getLogger(__name__)

# The dynamo exporter needs opset 18 or newer.
OPSET = 18
# The classes a Stable Diffusion 1.x/2.x folder must name in model_index.json for this exporter.
EXPECTED_CLASSES = {"text_encoder": "CLIPTextModel", "unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


class ExportError(RuntimeError):
    """The source folder cannot be exported as asked; the message says what to change."""


@dataclass(frozen=True)
class ExportOptions:
    height: int = 512
    width: int = 512
    # Static batch sizes to build engines for; the server pads a batch to the smallest that fits.
    batches: tuple[int, ...] = (1,)
    parity_tolerance: float = DEFAULT_TOLERANCE
    name: str | None = None
    default_steps: int | None = None
    default_guidance_scale: float | None = None

    def __post_init__(self) -> None:
        if not self.batches or any(b < 1 for b in self.batches):
            raise ValueError(f"--batch values must be positive integers, got {list(self.batches)}")
        object.__setattr__(self, "batches", tuple(sorted(set(self.batches))))

    @property
    def request_defaults(self) -> dict[str, float]:
        given = {"steps": self.default_steps, "guidance_scale": self.default_guidance_scale}
        return {key: value for key, value in given.items() if value is not None}


def read_model_index(src: Path) -> dict:
    index_path = src / "model_index.json"
    if not index_path.is_file():
        raise ExportError(f"{src}: no model_index.json; expected a diffusers model folder")
    index = json.loads(index_path.read_text())
    for part, cls in EXPECTED_CLASSES.items():
        declared = index.get(part, [None, None])[1]
        if declared != cls:
            raise ExportError(f"{src}: model_index.json names {part} as {declared!r}; diffuserve exports {cls}")
    return index


def check_safetensors(src: Path, part: str) -> None:
    """Pickled weights can run arbitrary code when loaded, so only safetensors are accepted."""
    folder = src / part
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ExportError(
            f"{folder}: only pickle weights ({', '.join(pickles)}); diffuserve loads safetensors only. "
            "Convert them first (load with diffusers and save_pretrained(..., safe_serialization=True))."
        )
    raise ExportError(f"{folder}: no *.safetensors weights found")


def load_components(src: Path) -> tuple[nn.Module, nn.Module, nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    for part in EXPECTED_CLASSES:
        check_safetensors(src, part)
    load = {"use_safetensors": True, "dtype": torch.float32}
    text_encoder = CLIPTextModel.from_pretrained(src / "text_encoder", **load)
    unet = UNet2DConditionModel.from_pretrained(src / "unet", **load)
    vae = AutoencoderKL.from_pretrained(src / "vae", **load)
    return text_encoder.eval(), unet.eval(), vae.eval()


def tokenizer_max_length(src: Path, fallback: int) -> int:
    config_path = src / "tokenizer" / "tokenizer_config.json"
    length = (
        json.loads(config_path.read_text()).get("model_max_length", fallback) if config_path.is_file() else fallback
    )
    # transformers writes a huge sentinel when the length is unset.
    return int(length) if length and length < 1_000_000 else fallback


def model_dims(src: Path, text_encoder: nn.Module, unet: nn.Module, vae: nn.Module) -> ModelDims:
    scheduler = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    max_positions = text_encoder.config.max_position_embeddings
    return ModelDims(
        text_seq_len=min(tokenizer_max_length(src, max_positions), max_positions),
        text_hidden_size=text_encoder.config.hidden_size,
        vocab_size=text_encoder.config.vocab_size,
        latent_channels=vae.config.latent_channels,
        unet_out_channels=unet.config.out_channels,
        cross_attention_dim=unet.config.cross_attention_dim,
        image_channels=vae.config.in_channels,
        vae_downsample=2 ** (len(vae.config.block_out_channels) - 1),
        unet_downsample=2 ** (len(unet.config.block_out_channels) - 1),
        num_train_timesteps=scheduler.get("num_train_timesteps", 1000),
    )


def export_onnx(module: nn.Module, spec: ComponentSpec, feeds: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    args = tuple(torch.from_numpy(feeds[t.name]) for t in spec.inputs)
    # The exporter narrates every pass and warns about optional packages; keep that for --verbose only.
    chatter = io.StringIO()
    with torch.no_grad(), warnings.catch_warnings(), redirect_stdout(chatter), redirect_stderr(chatter):
        warnings.simplefilter("ignore")
        for noisy in ("torch.onnx", "onnx_ir", "onnxscript"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
    log.debug("torch.onnx.export of %s:\n%s", spec.name, chatter.getvalue())


def source_hash(src: Path) -> str:
    """sha256 over the configs and weights export read, so a manifest names exactly what it was built from."""
    digest = hashlib.sha256()
    files = [src / "model_index.json", src / "scheduler" / "scheduler_config.json"]
    for part in EXPECTED_CLASSES:
        files += sorted((src / part).glob("*.json")) + sorted((src / part).glob("*.safetensors"))
    for path in files:
        digest.update(path.relative_to(src).as_posix().encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    names = ("diffuserve", "torch", "diffusers", "transformers", "onnx", "onnxscript", "onnxruntime")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def export_model(
    src: str | Path, out: str | Path, options: ExportOptions, report: Callable[[str], None] = log.info
) -> Manifest:
    """Exports every component, checks each against PyTorch, then writes the manifest (last: it marks completion)."""
    src, out = Path(src), Path(out)
    read_model_index(src)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)

    text_encoder, unet, vae = load_components(src)
    dims = model_dims(src, text_encoder, unet, vae)
    modules = wrap_components(text_encoder, unet, vae)
    jobs = [
        (batch, spec)
        for batch in options.batches
        for spec in component_specs(dims, options.height, options.width, batch).values()
    ]

    records: dict[str, list[ComponentRecord]] = defaultdict(list)
    for index, (batch, spec) in enumerate(jobs, start=1):
        name, step = spec.name, f"[{index}/{len(jobs)}] {spec.name}"
        report(f"{step}: exporting {', '.join(t.describe() for t in spec.inputs)}")
        start = time.perf_counter()
        feeds = random_feeds(spec, dims.vocab_size, dims.num_train_timesteps)
        onnx_file = f"{name}/model_b{batch}.onnx"
        export_onnx(modules[name], spec, feeds, out / onnx_file)
        parity = check_parity(modules[name], OrtEngine(spec, out / onnx_file, "cpu"), feeds, options.parity_tolerance)
        verdict = "ok" if parity.passed else "FAILED"
        report(
            f"{step}: {time.perf_counter() - start:.1f} s, parity max|torch - onnxruntime| = "
            f"{parity.max_abs_diff:.2e} (allowed {parity.tolerance * parity.reference_scale:.2e}) {verdict}"
        )
        if not parity.passed:
            raise ParityError(
                f"{name} (batch {batch}): ONNX Runtime differs from PyTorch by {parity.max_abs_diff:.3e}, over the "
                f"allowed {parity.tolerance:g} x {parity.reference_scale:.3g}; the export is not usable"
            )
        records[name].append(ComponentRecord(spec, onnx_file, batch, parity.to_dict()))

    for name, variants in records.items():
        freed = sum(share_weights(out / variants[0].onnx_file, out / v.onnx_file) for v in variants[1:])
        if freed:
            report(f"{name}: {len(variants)} batch sizes share one copy of the weights ({freed / 2**20:.1f} MB saved)")

    shutil.copytree(src / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    (out / "scheduler").mkdir(exist_ok=True)
    shutil.copy2(src / "scheduler" / "scheduler_config.json", out / "scheduler" / "scheduler_config.json")
    scheduler = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    manifest = Manifest(
        name=options.name or src.resolve().name,
        family="sd",
        prediction_type=scheduler.get("prediction_type", "epsilon"),
        vae_scaling_factor=float(vae.config.scaling_factor),
        vae_shift_factor=float(getattr(vae.config, "shift_factor", None) or 0.0),
        latent_channels=dims.latent_channels,
        vae_downsample=dims.vae_downsample,
        height=options.height,
        width=options.width,
        batch_sizes=options.batches,
        precision="fp32",
        components={name: tuple(rs) for name, rs in records.items()},
        source={"path": str(src), "sha256": source_hash(src)},
        versions=versions(),
        defaults=options.request_defaults,
        latent_rgb=fit_latent_rgb(vae, options.height, options.width),
    )
    manifest.save(out)
    report(f"wrote {out / MANIFEST_NAME}")
    return manifest
