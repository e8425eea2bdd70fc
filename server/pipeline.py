"""Text-to-image as a numbered sequence of small steps around the engines; no gRPC in here."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from diffuserve.engine.base import Engine
from diffuserve.engine.manifest import (
    ENCODER_HIDDEN_STATES,
    INPUT_IDS,
    LAST_HIDDEN_STATE,
    LATENT_SAMPLE,
    MODEL_OUTPUT,
    SAMPLE,
    TEXT_ENCODER,
    TIMESTEP,
    UNET,
    VAE_DECODER,
)

from .images import encode_image
from .models import ServedModel
from .params import GenerateParams
from .schedulers import Plan, get_sampler, make_plan


@dataclass
class StageTimes:
    """Milliseconds per stage of one request; unet_ms is the engine share of denoise_ms."""

    text_encoder_ms: float = 0.0
    denoise_ms: float = 0.0
    unet_ms: float = 0.0
    vae_decode_ms: float = 0.0
    image_encode_ms: float = 0.0
    total_ms: float = 0.0


@dataclass
class GenerateResult:
    images: list[tuple[bytes, str]]  # (encoded file, mime type), one per seed
    pixels: np.ndarray  # float32 [n, H, W, 3] in 0..1, before quantisation
    times: StageTimes = field(default_factory=StageTimes)


class RowRunner:
    """Runs an engine over any number of rows in chunks of its static batch, reusing padded input buffers."""

    def __init__(self, engine: Engine, rows: int, fixed: Mapping[str, np.ndarray] | None = None):
        self.engine = engine
        self.rows = rows
        batch = engine.spec.batch_size
        self.chunks = [(start, min(start + batch, rows)) for start in range(0, rows, batch)]
        # Padding rows stay zero: every row is computed independently, so they never touch real rows.
        self.buffers = [{t.name: np.zeros(t.shape, t.np_dtype) for t in engine.spec.inputs} for _ in self.chunks]
        for name, array in (fixed or {}).items():
            self._fill(name, array)

    def _fill(self, name: str, array: np.ndarray) -> None:
        for (start, stop), buffers in zip(self.chunks, self.buffers, strict=True):
            buffers[name][: stop - start] = array[start:stop]

    def __call__(self, varying: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, array in varying.items():
            self._fill(name, array)
        results = [self.engine.run(buffers) for buffers in self.buffers]
        counts = [stop - start for start, stop in self.chunks]
        return {
            t.name: np.concatenate([r[t.name][:count] for r, count in zip(results, counts, strict=True)])
            for t in self.engine.spec.outputs
        }


# 1. Tokenize and 2. encode the prompt and the negative prompt.
def encode_prompts(model: ServedModel, prompts: Sequence[str]) -> np.ndarray:
    """[len(prompts), seq, hidden] text embeddings."""
    engine = model.engines[TEXT_ENCODER]
    (ids_spec,) = engine.spec.inputs
    ids = model.tokenizer.encode(prompts).astype(ids_spec.np_dtype)
    return RowRunner(engine, len(prompts))({INPUT_IDS: ids})[LAST_HIDDEN_STATE]


# 3. Initial latents: one generator per image, so an image never depends on what it was batched with.
def initial_latents(seeds: Sequence[int], latent_shape: tuple[int, ...], init_noise_sigma: float) -> np.ndarray:
    noise = np.stack([np.random.default_rng(seed).standard_normal(latent_shape, dtype=np.float32) for seed in seeds])
    return noise * np.float32(init_noise_sigma)


# 4. Denoise: the sampler around the U-Net, with classifier-free guidance.
def denoise(
    model: ServedModel, params: GenerateParams, plan: Plan, latents: np.ndarray, context: np.ndarray, times: StageTimes
) -> np.ndarray:
    """context holds [uncond, cond] embeddings (one row each); returns the final latents."""
    sampler = get_sampler(params.scheduler)
    n = len(latents)
    guided = params.uses_guidance
    uncond, cond = context[0:1], context[1:2]
    # Rows: the n unconditional predictions, then the n conditional ones (only the latter without guidance).
    rows_context = (
        np.concatenate([np.repeat(uncond, n, 0), np.repeat(cond, n, 0)]) if guided else np.repeat(cond, n, 0)
    )
    rows = len(rows_context)
    unet = RowRunner(model.engines[UNET], rows, {ENCODER_HIDDEN_STATES: rows_context})
    sample = np.empty((rows, *latents.shape[1:]), np.float32)
    timestep = np.empty(rows, np.float32)
    guidance = np.float32(params.guidance_scale)
    for index, t in enumerate(plan.timesteps):
        np.multiply(latents, plan.input_scales[index], out=sample[:n])
        if guided:
            sample[n:] = sample[:n]
        timestep.fill(t)
        start = time.perf_counter()
        out = unet({SAMPLE: sample, TIMESTEP: timestep})
        times.unet_ms += (time.perf_counter() - start) * 1e3
        model_output = out[MODEL_OUTPUT]
        if guided:
            uncond_out, cond_out = model_output[:n], model_output[n:]
            model_output = uncond_out + guidance * (cond_out - uncond_out)
        latents = sampler.step(plan, index, latents, model_output)
    return latents


# 5. VAE decode to pixels in 0..1, channels last.
def decode_latents(model: ServedModel, latents: np.ndarray) -> np.ndarray:
    manifest = model.manifest
    scaled = latents / np.float32(manifest.vae_scaling_factor) + np.float32(manifest.vae_shift_factor)
    decoded = RowRunner(model.engines[VAE_DECODER], len(latents))({LATENT_SAMPLE: scaled})[SAMPLE]
    return np.clip(decoded / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)


# 6. Quantise and encode each image.
def to_uint8(pixels: np.ndarray) -> np.ndarray:
    return (pixels * 255).round().astype(np.uint8)


def image_metadata(params: GenerateParams, seed: int) -> dict[str, str]:
    return {
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt,
        "model": params.model,
        "seed": str(seed),
        "steps": str(params.steps),
        "guidance_scale": f"{params.guidance_scale:g}",
        "scheduler": params.scheduler,
        "size": f"{params.width}x{params.height}",
    }


def render(model: ServedModel, params: GenerateParams, times: StageTimes | None = None) -> np.ndarray:
    """Steps 1-5: the float image [n, H, W, 3] in 0..1."""
    times = times if times is not None else StageTimes()
    plan = make_plan(params.scheduler, model.scheduler_config, params.steps)

    start = time.perf_counter()
    context = encode_prompts(model, [params.negative_prompt, params.prompt])
    times.text_encoder_ms = _ms_since(start)

    start = time.perf_counter()
    latents = initial_latents(params.seeds, model.manifest.latent_shape, plan.init_noise_sigma)
    latents = denoise(model, params, plan, latents, context, times)
    times.denoise_ms = _ms_since(start)

    start = time.perf_counter()
    pixels = decode_latents(model, latents)
    times.vae_decode_ms = _ms_since(start)
    return pixels


def generate(model: ServedModel, params: GenerateParams) -> GenerateResult:
    """The whole request: render, then encode each image in the requested format."""
    start_total = time.perf_counter()
    times = StageTimes()
    pixels = render(model, params, times)

    start = time.perf_counter()
    images = [
        encode_image(
            image,
            params.output_format,
            params.quality,
            image_metadata(params, seed) if params.embed_metadata else None,
        )
        for image, seed in zip(to_uint8(pixels), params.seeds, strict=True)
    ]
    times.image_encode_ms = _ms_since(start)
    times.total_ms = _ms_since(start_total)
    return GenerateResult(images, pixels, times)


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1e3
