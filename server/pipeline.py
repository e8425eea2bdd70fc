"""Generation as a numbered sequence of small steps around the engines; no gRPC in here."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from diffuserve.engine.manifest import (
    LATENT_SAMPLE,
    MODEL_OUTPUT,
    SAMPLE,
    TIMESTEP,
    TIMESTEP_COND,
    TXT2IMG,
    UNET,
    VAE_DECODER,
    Size,
)

from .families import condition
from .images import encode_image
from .models import ServedModel
from .noise import NoiseGenerator, draw_noise, make_generator
from .params import GenerateParams
from .rows import RowRunner
from .schedulers import INITIAL_STATE, Plan, get_sampler, make_plan, select_rows
from .tasks import Start, starts


@dataclass
class StageTimes:
    """Milliseconds per stage of one request; unet_ms is the engine share of denoise_ms."""

    queue_ms: float = 0.0
    text_encoder_ms: float = 0.0
    vae_encode_ms: float = 0.0
    denoise_ms: float = 0.0
    unet_ms: float = 0.0
    vae_decode_ms: float = 0.0
    image_encode_ms: float = 0.0
    total_ms: float = 0.0
    # The U-Net calls unet_ms covers, so a call's time can be told apart from the steps' count.
    unet_calls: int = 0


@dataclass
class GenerateResult:
    images: list[tuple[bytes, str]]  # (encoded file, mime type), one per seed
    pixels: np.ndarray  # float32 [n, H, W, 3] in 0..1, before quantisation
    times: StageTimes = field(default_factory=StageTimes)


# 1. Tokenize and 2. encode the prompts: the family's conditioning (server/families/).
# 3. Start latents: the task's (server/tasks.py), from each image's own generator, so an image never depends on what
#    it was batched with.
def image_generators(params: GenerateParams) -> list[NoiseGenerator]:
    return [make_generator(params.noise_mode, seed) for seed in params.seeds]


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


@dataclass(frozen=True)
class MemberInputs:
    """What one member brings to the U-Net besides the latents: its conditioning (name -> [1 or 2, ...], the
    unconditional row first under guidance) and per image extra channels and inputs (name -> [n, ...])."""

    conditioning: Mapping[str, np.ndarray]
    channels: np.ndarray | None = None
    per_image: Mapping[str, np.ndarray] = field(default_factory=dict)


class UNetRows:
    """The U-Net's inputs for the images of the members still running; rebuilt only when one leaves. Under guidance
    the first n rows are the unconditional ones, the next n the conditional ones."""

    def __init__(self, model: ServedModel, members: Sequence[Member], inputs: Sequence[MemberInputs], guided: bool):
        counts = [m.params.num_images for m in members]
        n = sum(counts)
        copies = 2 if guided else 1
        self.n, self.guided = n, guided
        size = members[0].params.size
        length = members[0].params.text_length
        rows = copies * n
        self.runner = RowRunner(model.engines(UNET, size, length), rows, fixed_inputs(inputs, counts, copies))
        latent_shape = model.manifest.latent_shape(size)
        self.channels = latent_shape[0]
        self.sample = np.zeros((rows, model.manifest.unet_in_channels, *latent_shape[1:]), np.float32)
        if inputs[0].channels is not None:  # an inpainting U-Net's mask and masked-image latents, fixed per image
            self.sample[:, self.channels :] = np.concatenate([i.channels for i in inputs] * copies)
        self.timestep = np.empty(rows, np.float32)
        # Per image, so requests with different scales share a call; shaped to broadcast over [n, C, h, w].
        scales = [np.full(k, m.params.guidance_scale, np.float32) for m, k in zip(members, counts, strict=True)]
        self.guidance = np.concatenate(scales).reshape(-1, 1, 1, 1)

    def predict(self, latents: np.ndarray, input_scale: np.float32, t: np.float32) -> np.ndarray:
        n, c = self.n, self.channels
        np.multiply(latents, input_scale, out=self.sample[:n, :c])
        if self.guided:
            self.sample[n:, :c] = self.sample[:n, :c]
        self.timestep.fill(t)
        model_output = self.runner({SAMPLE: self.sample, TIMESTEP: self.timestep})[MODEL_OUTPUT]
        if not self.guided:
            return model_output
        uncond, cond = model_output[:n], model_output[n:]
        return uncond + self.guidance * (cond - uncond)


def fixed_inputs(inputs: Sequence[MemberInputs], counts: Sequence[int], copies: int) -> dict[str, np.ndarray]:
    """The U-Net inputs that stay the same every step, one row per image and copy: each conditioning's first row for
    every image of every member, then its second (under guidance), and the per-image inputs once per copy."""
    fixed = {}
    for name, first in inputs[0].conditioning.items():
        fixed[name] = np.concatenate(
            [
                np.repeat(i.conditioning[name][r : r + 1], k, 0)
                for r in range(first.shape[0])
                for i, k in zip(inputs, counts, strict=True)
            ]
        )
    for name in inputs[0].per_image:
        fixed[name] = np.concatenate([np.concatenate([i.per_image[name] for i in inputs])] * copies)
    return fixed


def member_inputs(
    model: ServedModel, params: GenerateParams, conditioning: Mapping[str, np.ndarray], start: Start
) -> MemberInputs:
    """A member's fixed U-Net inputs: its family's conditioning, its task's channels, LCM's guidance embedding."""
    per_image = {}
    if model.manifest.timestep_cond_dim:
        per_image[TIMESTEP_COND] = guidance_embedding(params, model.manifest.timestep_cond_dim)
    return MemberInputs(conditioning, start.channels, per_image)


def guidance_embedding(params: GenerateParams, dim: int) -> np.ndarray:
    """LCM's guidance-scale embedding [n, dim] (diffusers' get_guidance_scale_embedding of w = scale - 1): the
    sinusoidal embedding of 1000 w, sines then cosines."""
    w = np.full(params.num_images, (params.guidance_scale - 1) * 1000.0, np.float32)
    half = dim // 2
    frequencies = np.exp(np.arange(half, dtype=np.float32) * -np.float32(np.log(10000.0) / (half - 1)))
    angles = w[:, None] * frequencies[None, :]
    embedding = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    if dim % 2:  # odd widths are zero-padded, as diffusers pads them
        embedding = np.pad(embedding, ((0, 0), (0, 1)))
    return embedding.astype(np.float32)


def denoise(
    model: ServedModel,
    members: Sequence[Member],
    plan: Plan,
    starts: Sequence[Start],
    inputs: Sequence[MemberInputs],
    generators: Sequence[Sequence[NoiseGenerator]],
) -> list[np.ndarray | None]:
    """Steps every member in lockstep through the plan's U-Net calls from their shared start; a member that may not
    proceed leaves at once and gets None. Noise the sampler asks for comes from each image's own generator."""
    sampler = get_sampler(plan.sampler)
    first = members[0].params
    guided, begin = first.guided, first.start
    latent_shape = model.manifest.latent_shape(first.size)
    final: list[np.ndarray | None] = [None] * len(members)
    active = list(range(len(members)))
    x, state = np.concatenate([s.latents for s in starts]), INITIAL_STATE
    blends = [s.blend for s in starts]
    bounds = row_bounds([members[i].params.num_images for i in active])
    rows = UNetRows(model, members, inputs, guided)
    total = plan.calls - begin
    for index in range(begin, plan.calls):
        running = [i for i in active if members[i].proceed()]
        if running != active:  # the batch changes: keep the rows (and sampler state) of those still running
            if not running:
                return final
            keep = np.concatenate([np.arange(a, b) for i, (a, b) in zip(active, bounds, strict=True) if i in running])
            x, state, active = x[keep], select_rows(state, keep), running
            bounds = row_bounds([members[i].params.num_images for i in active])
            rows = UNetRows(model, [members[i] for i in active], [inputs[i] for i in active], guided)
        start = time.perf_counter()
        model_output = rows.predict(x, plan.input_scales[index], plan.timesteps[index])
        unet_ms = _ms_since(start)
        noise = None
        if plan.noise_calls[index]:
            noise = draw_noise([g for i in active for g in generators[i]], latent_shape)
        x, state = sampler.step(plan, index, x, model_output, state, noise)
        for i, (a, b) in zip(active, bounds, strict=True):
            if blends[i] is not None:
                x[a:b] = blends[i].apply(plan, index, x[a:b])
        step_ms = _ms_since(start)
        for i, (a, b) in zip(active, bounds, strict=True):
            members[i].times.unet_ms += unet_ms
            members[i].times.unet_calls += 1
            members[i].on_step(index - begin + 1, total, x[a:b], step_ms)
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
        "task": params.task,
        **({"strength": f"{params.strength:g}"} if params.task != TXT2IMG else {}),
    }


def render_members(model: ServedModel, members: Sequence[Member]) -> list[np.ndarray | None]:
    """Steps 1-5 for a batch of compatible requests (the worker's batch key: same size, steps, sampler, start, text
    length): each member's float images [n, H, W, 3] in 0..1, or None for a member that stopped early. Shared engine
    calls count in full towards every member's times."""
    params = [m.params for m in members]
    first = params[0]
    plan = make_plan(first.scheduler, model.scheduler_config, first.steps)

    start = time.perf_counter()
    conditioning = condition(model, params)
    _record(members, "text_encoder_ms", start)

    start = time.perf_counter()
    generators = [image_generators(p) for p in params]
    begins = starts(model, params, plan, generators)
    _record(members, "vae_encode_ms", start)

    start = time.perf_counter()
    inputs = [member_inputs(model, p, c, b) for p, c, b in zip(params, conditioning, begins, strict=True)]
    final = denoise(model, members, plan, begins, inputs, generators)
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
