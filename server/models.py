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
from diffuserve.engine.manifest import MANIFEST_NAME, TEXT_ENCODER, UNET, VAE_DECODER, Manifest, Size
from diffuserve.engine.resident import ResidentEngines

from .schedulers import SchedulerConfig, available_samplers, default_sampler_name
from .tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

# The model that ships inside the package: what `diffuserve serve` and the demo run when given no model folder.
# A build output (`make bundle` exports the committed weights into it), so a source checkout has it once built.
BUNDLED_MODEL = Path(__file__).resolve().parent / "bundled" / "shapes"

# Components text-to-image needs (the VAE encoder serves img2img, loaded when that arrives).
TEXT_TO_IMAGE = (TEXT_ENCODER, UNET, VAE_DECODER)


@dataclass(frozen=True)
class ModelDefaults:
    """What a request gets for fields it leaves unset, and the bounds it must stay within."""

    steps: int = 20
    guidance_scale: float = 7.5
    # Bounds requests so one caller cannot hold the engines for minutes.
    max_steps: int = 150
    max_images: int = 8


@dataclass(frozen=True)
class ServedModel:
    name: str
    folder: Path
    loaded: LoadedEngines
    tokenizer: ClipTokenizer
    scheduler_config: SchedulerConfig
    defaults: ModelDefaults
    # The samplers that can run this model's scheduler config, found once at load.
    schedulers: tuple[str, ...]

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

    @property
    def low_memory(self) -> bool:
        """Whether only the running stage's engines are resident (serve --low-memory)."""
        return isinstance(self.loaded.engines, ResidentEngines)

    def engines(self, component: str, size: Size | None = None) -> tuple[Engine, ...]:
        """The component's engines, one per batch size, at one image size (all of them if it has no image size)."""
        engines = self.loaded.engines[component]
        if size is None:
            return engines
        graph = self.manifest.targets[self.target].components[component]
        return tuple(e for e, shape in zip(engines, graph.shapes, strict=True) if shape.serves(size))


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
    loaded = load_engines(
        folder, TEXT_TO_IMAGE, backend, threads, cuda_options, trt_options=trt_options, low_memory=low_memory
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
        tokenizer=ClipTokenizer.from_folder(folder / "tokenizer"),
        scheduler_config=scheduler_config,
        defaults=defaults,
        schedulers=tuple(name for name, reason in reasons.items() if not reason),
    )
