"""diffusers' own StableDiffusionPipeline on a source folder: the reference for parity tests and benchmarks."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

# Our sampler names, the diffusers scheduler each reproduces, and the settings that make it that sampler. The model's
# scheduler_config.json fills in everything else, as `cls.from_config({**model_config, **settings})` does.
DIFFUSERS_SCHEDULERS: Mapping[str, tuple[str, Mapping[str, Any]]] = MappingProxyType(
    {
        "ddim": ("DDIMScheduler", {}),
        "pndm": ("PNDMScheduler", {}),
        "euler": ("EulerDiscreteScheduler", {}),
        "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
        "heun": ("HeunDiscreteScheduler", {}),
        "lms": ("LMSDiscreteScheduler", {}),
        "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        "dpmpp_2m_karras": (
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        ),
        "dpmpp_2m_sde_karras": (
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        ),
        "unipc": ("UniPCMultistepScheduler", {}),
        "lcm": ("LCMScheduler", {}),
    }
)


def diffusers_scheduler(name: str, config: Mapping[str, Any]):
    """diffusers' twin of our sampler name, configured from a scheduler_config.json dict."""
    import diffusers

    class_name, settings = DIFFUSERS_SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config({**config, **settings})


def load_reference_pipeline(src: str | Path, scheduler: str):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        src, use_safetensors=True, dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = diffusers_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def reference_images(
    pipe,
    prompt: str,
    negative_prompt: str,
    seeds: Sequence[int],
    size: tuple[int, int],
    steps: int,
    guidance_scale: float,
    latents: np.ndarray | None = None,
) -> np.ndarray:
    """[len(seeds), H, W, 3] floats in 0..1, one CPU torch generator per image seeded with its seed.

    The generators draw the initial latents, and any noise the scheduler needs, unless unit-gaussian latents
    [n, C, h, w] are given (diffusers scales them by init_noise_sigma); then they only draw the scheduler's noise.
    """
    n = len(seeds)
    height, width = size
    return pipe(
        prompt=[prompt] * n,
        negative_prompt=[negative_prompt] * n,
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        latents=None if latents is None else torch.from_numpy(latents),
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        output_type="np",
    ).images


class StageTimer:
    """Accumulates wall time spent inside chosen modules of a diffusers pipeline, via forward hooks."""

    def __init__(self, pipe):
        self.ms: dict[str, float] = defaultdict(float)
        self._starts: dict[str, float] = {}
        for name, module in (
            ("text_encoder", pipe.text_encoder),
            ("unet", pipe.unet),
            ("vae_decode", pipe.vae.decoder),
        ):
            module.register_forward_pre_hook(self._start(name))
            module.register_forward_hook(self._stop(name))

    def _start(self, name: str):
        def hook(*_):
            self._starts[name] = time.perf_counter()

        return hook

    def _stop(self, name: str):
        def hook(*_):
            self.ms[name] += (time.perf_counter() - self._starts[name]) * 1e3

        return hook

    def reset(self) -> None:
        self.ms.clear()


def time_reference(
    src: str | Path,
    scheduler: str,
    prompt: str,
    seed: int,
    size: tuple[int, int],
    steps: int,
    guidance_scale: float,
    runs: int,
) -> tuple[list[dict[str, float]], Sequence[np.ndarray]]:
    """Per-run stage times (ms) of diffusers' pipeline after one warm-up, and its images."""
    pipe = load_reference_pipeline(src, scheduler)
    timer = StageTimer(pipe)
    reference_images(pipe, prompt, "", [seed], size, steps, guidance_scale)
    results, images = [], []
    for _ in range(runs):
        timer.reset()
        start = time.perf_counter()
        images.append(reference_images(pipe, prompt, "", [seed], size, steps, guidance_scale))
        results.append({**timer.ms, "render_ms": (time.perf_counter() - start) * 1e3})
    return results, images
