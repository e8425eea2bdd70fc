"""A served model: its manifest, engines, tokenizer, scheduler config and request defaults, loaded once."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from diffuserve.engine.base import Engine
from diffuserve.engine.loader import LoadedEngines, load_engines
from diffuserve.engine.manifest import (
    IMG2IMG,
    INPAINT,
    MANIFEST_NAME,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
    Manifest,
    Size,
)
from diffuserve.engine.resident import ResidentEngines

from .schedulers import SchedulerConfig, available_samplers, default_sampler_name
from .text_cache import DEFAULT_MAX_BYTES, TextEncoderCache
from .tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

# The model that ships inside the package: what `diffuserve serve` and the demo run when given no model folder.
# A build output (`make bundle` exports the committed weights into it), so a source checkout has it once built.
BUNDLED_MODEL = Path(__file__).resolve().parent / "bundled" / "shapes"

# Components text-to-image needs; image-to-image and inpainting add the VAE encoder.
TEXT_TO_IMAGE = (TEXT_ENCODER, UNET, VAE_DECODER)
# The tokenizer folder of each text encoder.
TOKENIZER_FOLDERS = {TEXT_ENCODER: "tokenizer", TEXT_ENCODER_2: "tokenizer_2"}


def served_components(manifest: Manifest) -> tuple[str, ...]:
    """The components a model's tasks need: its text encoders, the U-Net, the VAE decoder and, for editing, the VAE
    encoder."""
    editing = any(task in manifest.tasks for task in (IMG2IMG, INPAINT))
    return (*manifest.text_encoders, UNET, VAE_DECODER, *((VAE_ENCODER,) if editing else ()))


@dataclass(frozen=True)
class ModelDefaults:
    """What a request gets for fields it leaves unset, and the bounds it must stay within."""

    steps: int = 20
    guidance_scale: float = 7.5
    # Bounds requests so one caller cannot hold the engines for minutes.
    max_steps: int = 150
    max_images: int = 8
    # Memory for encoded prompt chunks kept per model (0: no cache).
    text_cache_bytes: int = DEFAULT_MAX_BYTES


@dataclass(frozen=True)
class ServedModel:
    name: str
    folder: Path
    loaded: LoadedEngines
    # One per text encoder, by component name.
    tokenizers: Mapping[str, ClipTokenizer]
    scheduler_config: SchedulerConfig
    defaults: ModelDefaults
    # The samplers that can run this model's scheduler config, found once at load.
    schedulers: tuple[str, ...]
    # Encoded prompt chunks (keys name the model and encoder); None: no cache.
    text_cache: TextEncoderCache | None = None

    @property
    def tokenizer(self) -> ClipTokenizer:
        """The first text encoder's: what prompts are measured in."""
        return self.tokenizers[TEXT_ENCODER]

    @property
    def family(self) -> str:
        return self.manifest.family

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.manifest.tasks

    @property
    def text_lengths(self) -> tuple[int, ...]:
        return self.manifest.text_lengths

    @property
    def guidance_embedded(self) -> bool:
        """An LCM U-Net with a guidance embedding: the scale conditions it and no unconditional pass runs."""
        return self.manifest.timestep_cond_dim > 0

    @property
    def manifest(self) -> Manifest:
        return self.loaded.manifest

    @property
    def default_scheduler(self) -> str:
        """The sampler of the config's own class; the first offered one if that cannot run the config."""
        name = default_sampler_name(self.scheduler_config)
        return name if name in self.schedulers else self.schedulers[0]

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """Images per engine call the model was exported for."""
        return self.manifest.batch_sizes

    @property
    def sizes(self) -> tuple[Size, ...]:
        return self.manifest.sizes

    @property
    def backend(self) -> str:
        return self.loaded.backend

    @property
    def target(self) -> str:
        return self.loaded.target

    @property
    def precision(self) -> str:
        return self.manifest.targets[self.target].precision

    @property
    def providers(self) -> list[str]:
        return list(self.loaded.providers)

    @property
    def device(self) -> str:
        return self.loaded.device

    def gpu_memory_bytes(self) -> int | None:
        """GPU memory in use on the device the engines run on (every process); None on the CPU or without NVML."""
        if self.loaded.device_id is None:
            return None
        from .resources import gpu_memory_bytes

        return gpu_memory_bytes(self.loaded.device_id)

    @property
    def low_memory(self) -> bool:
        """Whether only the running stage's engines are resident (serve --low-memory)."""
        return isinstance(self.loaded.engines, ResidentEngines)

    def engines(self, component: str, size: Size | None = None, text_length: int | None = None) -> tuple[Engine, ...]:
        """The component's engines, one per batch (the U-Net's: per rows), at one image size and text length (all of
        them where it has no image size)."""
        engines = self.loaded.engines[component]
        if size is None:
            return engines
        graph = self.manifest.targets[self.target].components[component]
        return tuple(e for e, shape in zip(engines, graph.shapes, strict=True) if shape.serves(size, text_length))


def load_model(
    folder: str | os.PathLike,
    backend: str = "auto",
    threads: int | None = None,
    defaults: ModelDefaults | None = None,
    overrides: Mapping[str, Any] | None = None,
    cuda_options=None,
    trt_options=None,
    low_memory: bool = False,
) -> ServedModel:
    folder = Path(folder)
    if folder.resolve() == BUNDLED_MODEL and not (folder / MANIFEST_NAME).is_file():
        raise FileNotFoundError(
            f"the bundled model is not built at {BUNDLED_MODEL}: in a source checkout, run `make bundle` "
            "(it exports models/shapes-sd, which needs diffuserve[export]); installed wheels carry it built"
        )
    manifest = Manifest.load(folder)
    loaded = load_engines(
        folder,
        served_components(manifest),
        backend,
        threads,
        cuda_options,
        manifest=manifest,
        trt_options=trt_options,
        low_memory=low_memory,
    )
    return served_model(folder, loaded, defaults, overrides)


def served_model(
    folder: Path,
    loaded: LoadedEngines,
    defaults: ModelDefaults | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServedModel:
    """Request defaults: the server's, then the model's own from its manifest, then the operator's overrides."""
    manifest = loaded.manifest
    defaults = replace(defaults or ModelDefaults(), **manifest.defaults, **(overrides or {}))
    scheduler_config = SchedulerConfig.from_file(folder / "scheduler" / "scheduler_config.json")
    reasons = available_samplers(scheduler_config)
    for sampler, reason in reasons.items():
        if reason:
            log.warning("model %s: sampler %s is not offered: %s", manifest.name, sampler, reason)
    if all(reasons.values()):
        raise ValueError(f"model {manifest.name}: no sampler can run its scheduler config; {reasons}")
    return ServedModel(
        name=manifest.name,
        folder=folder,
        loaded=loaded,
        tokenizers={
            name: ClipTokenizer.from_folder(folder / TOKENIZER_FOLDERS[name]) for name in manifest.text_encoders
        },
        scheduler_config=scheduler_config,
        defaults=defaults,
        schedulers=tuple(name for name, reason in reasons.items() if not reason),
        text_cache=TextEncoderCache(max_bytes=defaults.text_cache_bytes) if defaults.text_cache_bytes else None,
    )
