"""Full-size Stable Diffusion architectures with seeded random weights: a benchmark model anyone can build offline.

The configs are the published ones (the model folders' config.json files as Stable Diffusion 1.5 and 2.1 ship them
for diffusers), so every graph, shape and FLOP is the real model's; only the weights are random. Images are noise,
but speed and memory are those of the real model.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from .reference import StageTimer, diffusers_scheduler
from .scheduler_configs import SD1_SCHEDULER_CONFIG, SD21_SCHEDULER_CONFIG
from .sd_folder import save_sd_folder

log = logging.getLogger(__name__)

SYNTHETIC_KINDS = ("sd15", "sd21")
# Written last into a built folder: its presence says the build finished, its content what was built.
MARKER_NAME = "synthetic.json"
# Bumped when the builder writes different weights or files for the same kind and seed.
BUILDER_VERSION = 1
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "LICENSE", "SOURCE.md")

# The real CLIP BPE files: committed beside the bundled model's weights in a source checkout, and carried inside
# the installed package by the bundled model's export.
_REPO = Path(__file__).resolve().parent.parent
TOKENIZER_SOURCES = (
    _REPO / "models" / "shapes-sd" / "tokenizer",
    _REPO / "server" / "bundled" / "shapes" / "tokenizer",
)

_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


def _frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


# CLIP ViT-L/14's text tower, as SD 1.5's text_encoder/config.json gives it. Its bos/eos/pad ids (0, 2, 1) are the
# published config's own placeholders, not the tokenizer's; only the pooled output reads them, and SD uses the
# last hidden state.
SD15_TEXT_ENCODER = _frozen(
    {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "projection_dim": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }
)

SD15_UNET = _frozen(
    {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": _DOWN_BLOCKS,
        "up_block_types": _UP_BLOCKS,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    }
)

SD15_VAE = _frozen(
    {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }
)

# OpenCLIP ViT-H/14's text tower as diffusers stores it for SD 2.x: 23 of its 24 layers, since SD 2 conditions on
# the penultimate layer's output; plain GELU instead of CLIP's quick GELU.
SD21_TEXT_ENCODER = _frozen(
    {
        **SD15_TEXT_ENCODER,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "projection_dim": 512,
        "num_hidden_layers": 23,
        "num_attention_heads": 16,
        "hidden_act": "gelu",
    }
)

# SD 2.1 (768 px, v-prediction): head counts per level instead of one head width, linear projections in the
# transformer blocks, and attention upcast to float32 (its fp16 softmax overflows otherwise).
SD21_UNET = _frozen(
    {
        **SD15_UNET,
        "sample_size": 96,
        "cross_attention_dim": 1024,
        "attention_head_dim": (5, 10, 20, 20),
        "use_linear_projection": True,
        "upcast_attention": True,
    }
)

SD21_VAE = _frozen({**SD15_VAE, "sample_size": 768})

SD21_SCHEDULER = _frozen(SD21_SCHEDULER_CONFIG)


@dataclass(frozen=True)
class SyntheticArchitecture:
    """One Stable Diffusion release's component configs, as its diffusers folder publishes them."""

    kind: str
    description: str
    text_encoder: Mapping[str, Any]
    unet: Mapping[str, Any]
    vae: Mapping[str, Any]
    scheduler: Mapping[str, Any]
    # The release's native image size (width, height): what the benchmark exports and runs.
    size: tuple[int, int]
    # Keys of tokenizer_config.json that differ from SD 1.5's (the committed file's).
    tokenizer_overrides: Mapping[str, Any] = field(default_factory=dict)

    @property
    def scheduler_class(self) -> str:
        return self.scheduler["_class_name"]


ARCHITECTURES: Mapping[str, SyntheticArchitecture] = MappingProxyType(
    {
        "sd15": SyntheticArchitecture(
            kind="sd15",
            description="Stable Diffusion 1.5 architecture (CLIP ViT-L/14 text encoder), random weights",
            text_encoder=SD15_TEXT_ENCODER,
            unet=SD15_UNET,
            vae=SD15_VAE,
            scheduler=_frozen(SD1_SCHEDULER_CONFIG),
            size=(512, 512),
        ),
        "sd21": SyntheticArchitecture(
            kind="sd21",
            description="Stable Diffusion 2.1 architecture (OpenCLIP ViT-H/14 text encoder, v-prediction), "
            "random weights",
            text_encoder=SD21_TEXT_ENCODER,
            unet=SD21_UNET,
            vae=SD21_VAE,
            scheduler=SD21_SCHEDULER,
            size=(768, 768),
            # SD 2.x pads prompts with "!" (id 0), not with the end-of-text token as SD 1.x does.
            tokenizer_overrides=_frozen({"pad_token": "!"}),
        ),
    }
)


def architecture(kind: str) -> SyntheticArchitecture:
    if kind not in ARCHITECTURES:
        raise ValueError(f"synthetic model kind must be one of {list(ARCHITECTURES)}, got {kind!r}")
    return ARCHITECTURES[kind]


def _text_encoder(arch: SyntheticArchitecture) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**arch.text_encoder))


def _unet(arch: SyntheticArchitecture) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(dict(arch.unet))


def _vae(arch: SyntheticArchitecture) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(dict(arch.vae))


_COMPONENT_BUILDERS = (_text_encoder, _unet, _vae)


def make_components(arch: SyntheticArchitecture) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(text_encoder, unet, vae) with diffusers' and transformers' default initialisation, on torch's current
    default device (`with torch.device("meta"):` builds them without allocating)."""
    text_encoder, unet, vae = (build(arch) for build in _COMPONENT_BUILDERS)
    return text_encoder, unet, vae


def parameter_counts(arch: SyntheticArchitecture) -> dict[str, int]:
    """Parameters per component, counted on the meta device (nothing allocated, well under a second)."""
    with torch.device("meta"):
        components = make_components(arch)
    return {
        name: sum(p.numel() for p in module.parameters())
        for name, module in zip(("text_encoder", "unet", "vae"), components, strict=True)
    }


def seeded_components(arch: SyntheticArchitecture, seed: int) -> tuple[torch.nn.Module, ...]:
    """The components with random weights, each from its own seed, so one component's weights never depend on
    another's size or on the order they are built in. The libraries' default initialisation keeps activations
    well inside fp16's range (it is what their pipeline tests build models with)."""
    modules = []
    for offset, build in enumerate(_COMPONENT_BUILDERS):
        torch.manual_seed(seed + offset)
        modules.append(build(arch))
    return tuple(module.eval() for module in modules)


def tokenizer_source() -> Path:
    for folder in TOKENIZER_SOURCES:
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return folder
    raise FileNotFoundError(
        f"no CLIP BPE tokenizer files (vocab.json, merges.txt) in {', '.join(str(f) for f in TOKENIZER_SOURCES)}: "
        "in a source checkout they are committed under models/shapes-sd/tokenizer"
    )


def write_tokenizer(arch: SyntheticArchitecture, folder: Path) -> Path:
    """The real CLIP BPE vocabulary and merges, with the release's own tokenizer_config.json."""
    source = tokenizer_source()
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.update(arch.tokenizer_overrides)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def read_marker(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MARKER_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def is_built(folder: Path, kind: str, seed: int) -> bool:
    """Whether the folder holds a finished build of this kind and seed by this builder version."""
    marker = read_marker(folder)
    return bool(marker) and (marker["kind"], marker["seed"], marker["builder_version"]) == (
        kind,
        seed,
        BUILDER_VERSION,
    )


def build_architecture_folder(arch: SyntheticArchitecture, folder: str | Path, seed: int = 0) -> Path:
    """Writes a diffusers folder (model_index.json, tokenizer/, scheduler/, text_encoder/, unet/, vae/, fp32
    safetensors) of this architecture with seeded random weights; the marker file last."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    start = time.perf_counter()
    (folder / MARKER_NAME).unlink(missing_ok=True)
    text_encoder, unet, vae = seeded_components(arch, seed)
    write_tokenizer(arch, folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    scheduler = diffusers_scheduler_from_config(arch.scheduler)
    save_sd_folder(folder, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    # save_pretrained rewrites both with derived defaults; keep them byte for byte as the release ships them.
    shutil.rmtree(folder / "tokenizer")
    write_tokenizer(arch, folder / "tokenizer")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(arch.scheduler), indent=2) + "\n")
    marker = {
        "kind": arch.kind,
        "seed": seed,
        "builder_version": BUILDER_VERSION,
        "description": arch.description,
        "parameters": {
            name: sum(p.numel() for p in module.parameters())
            for name, module in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae))
        },
        "build_s": round(time.perf_counter() - start, 1),
        "bytes": folder_bytes(folder),
    }
    (folder / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
    log.info("built %s in %s: %.1f s, %.2f GB", arch.kind, folder, marker["build_s"], marker["bytes"] / 1e9)
    return folder


def diffusers_scheduler_from_config(config: Mapping[str, Any]):
    import diffusers

    return getattr(diffusers, config["_class_name"]).from_config(dict(config))


def build_synthetic_model(kind: str, folder: str | Path, seed: int = 0) -> Path:
    """The published architecture of `kind` (sd15 or sd21) as a diffusers folder with seeded random weights."""
    return build_architecture_folder(architecture(kind), folder, seed)


# diffusers' own StableDiffusionPipeline on the same weights, on any device and dtype, for the benchmark's ratios.


class SyncedStageTimer(StageTimer):
    """The reference's stage timer, waiting for the GPU at each boundary (kernels run asynchronously, so a hook
    alone would time their launch), and counting U-Net calls."""

    def __init__(self, pipe, synchronize):
        self._synchronize = synchronize
        self.calls: dict[str, int] = {}
        super().__init__(pipe)

    def _start(self, name: str):
        hook = super()._start(name)

        def synced(*args):
            self._synchronize()
            hook(*args)

        return synced

    def _stop(self, name: str):
        hook = super()._stop(name)

        def synced(*args):
            self._synchronize()
            hook(*args)
            self.calls[name] = self.calls.get(name, 0) + 1

        return synced

    def reset(self) -> None:
        super().reset()
        self.calls.clear()


@dataclass(frozen=True)
class DiffusersRun:
    """diffusers' stage times per run (ms), U-Net calls per run, its images and memory, and how it ran."""

    runs: list[dict[str, float]]
    unet_calls: int
    images: np.ndarray
    peak_gpu_bytes: int | None
    setup: dict[str, str]


def load_diffusers_pipeline(src: str | Path, scheduler: str, device: str, dtype: torch.dtype):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        src, use_safetensors=True, dtype=dtype, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = diffusers_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def attention_processors(pipe) -> str:
    return ", ".join(sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()}))


@torch.no_grad()
def _pipe_images(pipe, prompt: str, latents: torch.Tensor, steps: int, guidance_scale: float) -> np.ndarray:
    n, _, h, w = latents.shape
    factor = pipe.vae_scale_factor
    return pipe(
        prompt=[prompt] * n,
        negative_prompt=[""] * n,
        latents=latents,
        height=h * factor,
        width=w * factor,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        output_type="np",
    ).images


def time_diffusers(
    src: str | Path,
    *,
    scheduler: str,
    prompt: str,
    noise: np.ndarray,
    steps: int,
    guidance_scale: float,
    runs: int,
    device: str = "cpu",
    half: bool = False,
) -> DiffusersRun:
    """diffusers' pipeline on the unit-gaussian latents `noise` [n, C, h, w] (it scales them by the scheduler's
    init_noise_sigma), after one warm-up: per-run stage times and its images of the last run.

    On a GPU, `half` runs it as diffusers users do (fp16 weights, torch's SDPA attention, its default)."""
    dtype = torch.float16 if half else torch.float32
    cuda = device.startswith("cuda")
    synchronize = torch.cuda.synchronize if cuda else _no_op
    pipe = load_diffusers_pipeline(src, scheduler, device, dtype)
    timer = SyncedStageTimer(pipe, synchronize)
    latents = torch.from_numpy(noise).to(device=device, dtype=dtype)
    _pipe_images(pipe, prompt, latents, steps, guidance_scale)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    results, images, calls = [], None, 0
    for _ in range(runs):
        timer.reset()
        start = time.perf_counter()
        images = _pipe_images(pipe, prompt, latents, steps, guidance_scale)
        synchronize()
        results.append({**timer.ms, "render_ms": (time.perf_counter() - start) * 1e3})
        calls = timer.calls.get("unet", 0)
    setup = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "attention": attention_processors(pipe),
        "scheduler": type(pipe.scheduler).__name__,
    }
    peak = torch.cuda.max_memory_allocated() if cuda else None
    del pipe
    if cuda:
        torch.cuda.empty_cache()
    return DiffusersRun(results, calls, images, peak, setup)


def _no_op() -> None:
    pass


def scaled_down(arch: SyntheticArchitecture, **changes: Mapping[str, Any]) -> SyntheticArchitecture:
    """The same release with some config keys changed, e.g. narrow widths for a quick test of the builder."""
    merged = {name: _frozen({**getattr(arch, name), **values}) for name, values in changes.items()}
    return replace(arch, **merged)
