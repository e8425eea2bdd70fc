"""Text-to-image as a numbered sequence of small steps around the engines; no gRPC in here."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

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
    Size,
)

from .images import encode_image
from .models import ServedModel
from .noise import NoiseGenerator, make_generator
from .params import GenerateParams
from .schedulers import INITIAL_STATE, Plan, get_sampler, make_plan, select_rows


@dataclass
class StageTimes:
    """Milliseconds per stage of one request; unet_ms is the engine share of denoise_ms."""

    queue_ms: float = 0.0
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


def plan_chunks(rows: int, engines: Sequence[Engine]) -> list[tuple[int, int, Engine]]:
    """Splits rows into engine calls: the largest batch while it fills, then the smallest batch that fits the rest."""
    by_size = sorted(engines, key=lambda e: e.spec.batch_size)
    largest = by_size[-1]
    chunks, start = [], 0
    while start < rows:
        remaining = rows - start
        engine = (
            largest
            if remaining >= largest.spec.batch_size
            else next(e for e in by_size if e.spec.batch_size >= remaining)
        )
        stop = min(start + engine.spec.batch_size, rows)
        chunks.append((start, stop, engine))
        start = stop
    return chunks


class RowRunner:
    """Runs a component over any number of rows through its static-batch engines, reusing padded input buffers."""

    def __init__(self, engines: Sequence[Engine], rows: int, fixed: Mapping[str, np.ndarray] | None = None):
        self.chunks = plan_chunks(rows, engines)
        self.outputs = [t.name for t in engines[0].spec.outputs]
        # Padding rows stay zero: every row is computed independently, so they never touch real rows.
        self.buffers = [{t.name: np.zeros(t.shape, t.np_dtype) for t in e.spec.inputs} for _, _, e in self.chunks]
        for name, array in (fixed or {}).items():
            self._fill(name, array)

    def _fill(self, name: str, array: np.ndarray) -> None:
        for (start, stop, _), buffers in zip(self.chunks, self.buffers, strict=True):
            buffers[name][: stop - start] = array[start:stop]

    def __call__(self, varying: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, array in varying.items():
            self._fill(name, array)
        results = [engine.run(buffers) for (_, _, engine), buffers in zip(self.chunks, self.buffers, strict=True)]
        counts = [stop - start for start, stop, _ in self.chunks]
        return {
            name: np.concatenate([r[name][:count] for r, count in zip(results, counts, strict=True)])
            for name in self.outputs
        }


# 1. Tokenize and 2. encode the prompt and the negative prompt.
def encode_prompts(model: ServedModel, prompts: Sequence[str]) -> np.ndarray:
    """[len(prompts), seq, hidden] text embeddings."""
    engines = model.engines(TEXT_ENCODER)
    (ids_spec,) = engines[0].spec.inputs
    ids = model.tokenizer.encode(prompts).astype(ids_spec.np_dtype)
    return RowRunner(engines, len(prompts))({INPUT_IDS: ids})[LAST_HIDDEN_STATE]


# 3. Initial latents: one generator per image, so an image never depends on what it was batched with.
def image_generators(params: GenerateParams) -> list[NoiseGenerator]:
    return [make_generator(params.noise_mode, seed) for seed in params.seeds]


def draw_noise(generators: Sequence[NoiseGenerator], latent_shape: tuple[int, ...]) -> np.ndarray:
    """[len(generators), *latent_shape] unit gaussian noise, each row the next draw of its image's generator."""
    # One [1, *latent_shape] draw per image, as diffusers draws from a list of generators.
    return np.concatenate([g.standard_normal((1, *latent_shape)) for g in generators])


def initial_latents(
    generators: Sequence[NoiseGenerator], latent_shape: tuple[int, ...], init_noise_sigma: float
) -> np.ndarray:
    noise = draw_noise(generators, latent_shape)
    noise *= np.float32(init_noise_sigma)
    return noise


# 4. Denoise: the sampler around the U-Net, with classifier-free guidance, for every member of a batch at once.
class Member(Protocol):
    """A request in a batch: its parameters and timings, whether it may go on, and where its progress goes."""

    params: GenerateParams
    times: StageTimes

    def proceed(self) -> bool: ...

    def on_step(self, step: int, total: int, latents: np.ndarray, step_ms: float) -> None: ...


@dataclass
class Solo:
    """A member that always proceeds and reports nowhere: one request run directly."""

    params: GenerateParams
    times: StageTimes = field(default_factory=StageTimes)

    def proceed(self) -> bool:
        return True

    def on_step(self, step: int, total: int, latents: np.ndarray, step_ms: float) -> None:
        pass


class UNetRows:
    """The U-Net's inputs for the images of the members still running; rebuilt only when one leaves."""

    def __init__(self, model: ServedModel, members: Sequence[Member], context: Sequence[np.ndarray], guided: bool):
        counts = [m.params.num_images for m in members]
        n = sum(counts)
        cond = np.concatenate([np.repeat(c[1:2], k, 0) for c, k in zip(context, counts, strict=True)])
        if guided:
            uncond = np.concatenate([np.repeat(c[0:1], k, 0) for c, k in zip(context, counts, strict=True)])
            cond = np.concatenate([uncond, cond])
        self.n, self.guided = n, guided
        size = members[0].params.size
        self.runner = RowRunner(model.engines(UNET, size), len(cond), {ENCODER_HIDDEN_STATES: cond})
        self.sample = np.empty((len(cond), *model.manifest.latent_shape(size)), np.float32)
        self.timestep = np.empty(len(cond), np.float32)
        # Per image, so requests with different scales share a call; shaped to broadcast over [n, C, h, w].
        scales = [np.full(k, m.params.guidance_scale, np.float32) for m, k in zip(members, counts, strict=True)]
        self.guidance = np.concatenate(scales).reshape(-1, 1, 1, 1)

    def predict(self, latents: np.ndarray, input_scale: np.float32, t: np.float32) -> np.ndarray:
        n = self.n
        np.multiply(latents, input_scale, out=self.sample[:n])
        if self.guided:
            self.sample[n:] = self.sample[:n]
        self.timestep.fill(t)
        model_output = self.runner({SAMPLE: self.sample, TIMESTEP: self.timestep})[MODEL_OUTPUT]
        if not self.guided:
            return model_output
        uncond, cond = model_output[:n], model_output[n:]
        return uncond + self.guidance * (cond - uncond)


def denoise(
    model: ServedModel,
    members: Sequence[Member],
    plan: Plan,
    latents: Sequence[np.ndarray],
    context: Sequence[np.ndarray],
    generators: Sequence[Sequence[NoiseGenerator]],
) -> list[np.ndarray | None]:
    """Steps every member in lockstep through the plan's U-Net calls; a member that may not proceed leaves at once
    and gets None. Noise the sampler asks for comes from each image's own generator."""
    sampler = get_sampler(plan.sampler)
    guided = members[0].params.uses_guidance
    latent_shape = model.manifest.latent_shape(members[0].params.size)
    final: list[np.ndarray | None] = [None] * len(members)
    active = list(range(len(members)))
    x, state = np.concatenate(latents), INITIAL_STATE
    bounds = row_bounds([members[i].params.num_images for i in active])
    rows = UNetRows(model, members, context, guided)
    for index, t in enumerate(plan.timesteps):
        running = [i for i in active if members[i].proceed()]
        if running != active:  # the batch changes: keep the rows (and sampler state) of those still running
            if not running:
                return final
            keep = np.concatenate([np.arange(a, b) for i, (a, b) in zip(active, bounds, strict=True) if i in running])
            x, state, active = x[keep], select_rows(state, keep), running
            bounds = row_bounds([members[i].params.num_images for i in active])
            rows = UNetRows(model, [members[i] for i in active], [context[i] for i in active], guided)
        start = time.perf_counter()
        model_output = rows.predict(x, plan.input_scales[index], t)
        unet_ms = _ms_since(start)
        noise = None
        if plan.noise_calls[index]:
            noise = draw_noise([g for i in active for g in generators[i]], latent_shape)
        x, state = sampler.step(plan, index, x, model_output, state, noise)
        step_ms = _ms_since(start)
        for i, (a, b) in zip(active, bounds, strict=True):
            members[i].times.unet_ms += unet_ms
            members[i].on_step(index + 1, plan.calls, x[a:b], step_ms)
    for i, (a, b) in zip(active, bounds, strict=True):
        final[i] = x[a:b]
    return final


# 5. VAE decode to pixels in 0..1, channels last.
def decode_latents(model: ServedModel, latents: np.ndarray, size: Size) -> np.ndarray:
    manifest = model.manifest
    scaled = latents / np.float32(manifest.vae_scaling_factor) + np.float32(manifest.vae_shift_factor)
    decoded = RowRunner(model.engines(VAE_DECODER, size), len(latents))({LATENT_SAMPLE: scaled})[SAMPLE]
    return np.clip(decoded / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)


# Previews while denoising: the VAE's colours, approximated per latent pixel by the manifest's linear map.
def preview_images(model: ServedModel, latents: np.ndarray) -> list[bytes]:
    projection = np.asarray(model.manifest.latent_rgb, np.float32)
    weights, bias = projection[:-1], projection[-1]
    rgb = np.einsum("nchw,cd->nhwd", latents / np.float32(model.manifest.vae_scaling_factor), weights) + bias
    return [encode_image(image, "png", 0)[0] for image in to_uint8(np.clip(rgb, 0.0, 1.0))]


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
        "noise_mode": params.noise_mode,
        "size": f"{params.width}x{params.height}",
    }


def render_members(model: ServedModel, members: Sequence[Member]) -> list[np.ndarray | None]:
    """Steps 1-5 for a batch of compatible requests (same size, steps, sampler: the worker's batch key): each
    member's float images [n, H, W, 3] in 0..1, or None for a member that stopped early. Shared engine calls count in
    full towards every member's times."""
    first = members[0].params
    plan = make_plan(first.scheduler, model.scheduler_config, first.steps)

    start = time.perf_counter()
    embeddings = encode_prompts(model, [p for m in members for p in (m.params.negative_prompt, m.params.prompt)])
    context = [embeddings[2 * i : 2 * i + 2] for i in range(len(members))]
    _record(members, "text_encoder_ms", start)

    start = time.perf_counter()
    generators = [image_generators(m.params) for m in members]
    latent_shape = model.manifest.latent_shape(first.size)
    latents = [initial_latents(g, latent_shape, plan.init_noise_sigma) for g in generators]
    final = denoise(model, members, plan, latents, context, generators)
    _record(members, "denoise_ms", start)

    done = [i for i, x in enumerate(final) if x is not None]
    if not done:
        return final
    start = time.perf_counter()
    pixels = decode_latents(model, np.concatenate([final[i] for i in done]), first.size)
    _record([members[i] for i in done], "vae_decode_ms", start)
    for i, (a, b) in zip(done, row_bounds([members[i].params.num_images for i in done]), strict=True):
        final[i] = pixels[a:b]
    return final


def encode_images(params: GenerateParams, pixels: np.ndarray, times: StageTimes) -> list[tuple[bytes, str]]:
    """Step 6 for one request: each image in its format, with metadata when asked."""
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
    times.image_encode_ms += _ms_since(start)
    return images


def render(model: ServedModel, params: GenerateParams, times: StageTimes | None = None) -> np.ndarray:
    """Steps 1-5 for one request: the float images [n, H, W, 3] in 0..1."""
    member = Solo(params, times if times is not None else StageTimes())
    (pixels,) = render_members(model, [member])
    return pixels


def generate(model: ServedModel, params: GenerateParams) -> GenerateResult:
    """One request, start to finish, on the calling thread."""
    start = time.perf_counter()
    times = StageTimes()
    pixels = render(model, params, times)
    images = encode_images(params, pixels, times)
    times.total_ms = _ms_since(start)
    return GenerateResult(images, pixels, times)


def row_bounds(counts: Sequence[int]) -> list[tuple[int, int]]:
    """[start, stop) of each member's rows when their images are stacked in order."""
    ends = np.cumsum(counts).tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


def _record(members: Sequence[Member], stage: str, start: float) -> None:
    elapsed = _ms_since(start)
    for member in members:
        setattr(member.times, stage, getattr(member.times, stage) + elapsed)


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1e3
