"""diffusers' own StableDiffusionPipeline on a source folder: the reference for parity tests and benchmarks."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

# Our sampler names and the diffusers scheduler classes they reproduce.
DIFFUSERS_SCHEDULERS = {"euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler"}


def load_reference_pipeline(src: str | Path, scheduler: str):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        src, use_safetensors=True, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    scheduler_class = getattr(diffusers, DIFFUSERS_SCHEDULERS[scheduler])
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def reference_images(
    pipe,
    prompt: str,
    negative_prompt: str,
    noise: np.ndarray,
    steps: int,
    guidance_scale: float,
) -> np.ndarray:
    """[n, H, W, 3] floats in 0..1 from unit-gaussian noise [n, C, h, w] (diffusers scales it by init_noise_sigma)."""
    n, _, h, w = noise.shape
    scale = pipe.vae_scale_factor
    return pipe(
        prompt=[prompt] * n,
        negative_prompt=[negative_prompt] * n,
        latents=torch.from_numpy(noise),
        height=h * scale,
        width=w * scale,
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
    src: str | Path, scheduler: str, prompt: str, noise: np.ndarray, steps: int, guidance_scale: float, runs: int
) -> tuple[list[dict[str, float]], Sequence[np.ndarray]]:
    """Per-run stage times (ms) of diffusers' pipeline after one warm-up, and its images."""
    pipe = load_reference_pipeline(src, scheduler)
    timer = StageTimer(pipe)
    reference_images(pipe, prompt, "", noise, steps, guidance_scale)
    results, images = [], []
    for _ in range(runs):
        timer.reset()
        start = time.perf_counter()
        images.append(reference_images(pipe, prompt, "", noise, steps, guidance_scale))
        results.append({**timer.ms, "render_ms": (time.perf_counter() - start) * 1e3})
    return results, images
