"""The one place a request is checked: proto in, validated GenerateParams out, or an error naming every bad field."""

from __future__ import annotations

import math
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from diffuserve.engine.manifest import format_size
from diffuserve.v1 import diffusion_pb2 as pb

from .models import ServedModel
from .noise import DEFAULT_NOISE_MODE, NOISE_MODES
from .schedulers import make_plan

# A prompt is cut to the text encoder's 77 tokens anyway; this only keeps a caller from sending megabytes.
MAX_PROMPT_CHARS = 10_000
MAX_REQUEST_ID_CHARS = 128
# Longer than any model name a server is given; an unknown name is quoted in errors only up to QUOTE_CHARS.
MAX_MODEL_NAME_CHARS = 256
QUOTE_CHARS = 64
DEFAULT_QUALITY = 90
# 0 <= guidance; above this images saturate into noise, so a larger value is almost surely a mistake.
MAX_GUIDANCE_SCALE = 50.0
# Seeds are drawn below 2**63 so every client language can hold them in a signed 64-bit integer.
RANDOM_SEED_BITS = 63
# Prefix of each enum's value names in the proto (protobuf style: the enum name in upper snake case).
SCHEDULER_PREFIX = "SCHEDULER_"
FORMAT_PREFIX = "IMAGE_FORMAT_"
NOISE_MODE_PREFIX = "NOISE_MODE_"
IMAGE_FORMATS = ("png", "jpeg", "webp")  # the formats images.py encodes


class InvalidArgument(ValueError):
    """One or more request fields are invalid; the message names each and what is allowed."""


class ModelNotFound(LookupError):
    pass


@dataclass(frozen=True)
class GenerateParams:
    model: str
    request_id: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    seeds: tuple[int, ...]
    steps: int
    guidance_scale: float
    scheduler: str
    output_format: str
    quality: int
    embed_metadata: bool
    preview_interval: int = 0
    noise_mode: str = DEFAULT_NOISE_MODE

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as the manifest keys its shapes."""
        return (self.width, self.height)

    @property
    def uses_guidance(self) -> bool:
        """diffusers' rule: classifier-free guidance only when the scale is above 1."""
        return self.guidance_scale > 1.0


def scheduler_name(value: int) -> str:
    return pb.Scheduler.Name(value).removeprefix(SCHEDULER_PREFIX).lower()


def scheduler_enum(name: str) -> int:
    return pb.Scheduler.Value(SCHEDULER_PREFIX + name.upper())


def noise_mode_name(value: int) -> str:
    return pb.NoiseMode.Name(value).removeprefix(NOISE_MODE_PREFIX).lower()


def noise_mode_enum(name: str) -> int:
    return pb.NoiseMode.Value(NOISE_MODE_PREFIX + name.upper())


def format_enum(name: str) -> int:
    return pb.ImageFormat.Value(FORMAT_PREFIX + name.upper())


def format_name(value: int) -> str:
    return pb.ImageFormat.Name(value).removeprefix(FORMAT_PREFIX).lower()


def quote(text: str, limit: int = QUOTE_CHARS) -> str:
    """A client's string as an error may show it: repr'd, cut to limit characters, its full length said."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def resolve_model(name: str, models: Mapping[str, ServedModel], default_model: str) -> ServedModel:
    model = models.get(name or default_model)
    if model is None:
        raise ModelNotFound(f"model: no model named {quote(name)}; this server has {sorted(models)}")
    return model


# Bytes a string field can take on the wire: UTF-8 needs at most 4 per character, plus its tag and length prefix.
UTF8_MAX_BYTES = 4
FIELD_OVERHEAD_BYTES = 6
# Tags and values of every scalar field of GenerateRequest together, with room for fields added later.
SCALAR_FIELDS_BYTES = 1024
# A uint64 seed as a packed varint takes at most 10 bytes.
SEED_BYTES = 10


def max_request_bytes(max_images: int) -> int:
    """The largest GenerateRequest validate() can accept: what the server's receive limit is sized to."""
    strings = (2 * MAX_PROMPT_CHARS + MAX_REQUEST_ID_CHARS + MAX_MODEL_NAME_CHARS) * UTF8_MAX_BYTES
    return strings + 4 * FIELD_OVERHEAD_BYTES + max_images * SEED_BYTES + FIELD_OVERHEAD_BYTES + SCALAR_FIELDS_BYTES


def validate(request: pb.GenerateRequest, models: Mapping[str, ServedModel], default_model: str) -> GenerateParams:
    """Checks every field, collecting all problems so the caller can fix them in one go."""
    model = resolve_model(request.model, models, default_model)
    limits = model.defaults
    errors: list[str] = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    prompt = request.prompt
    check(bool(prompt.strip()), "prompt: must not be empty")
    check(len(prompt) <= MAX_PROMPT_CHARS, f"prompt: at most {MAX_PROMPT_CHARS} characters, got {len(prompt)}")
    negative = request.negative_prompt
    check(
        len(negative) <= MAX_PROMPT_CHARS,
        f"negative_prompt: at most {MAX_PROMPT_CHARS} characters, got {len(negative)}",
    )
    check(
        len(request.request_id) <= MAX_REQUEST_ID_CHARS and request.request_id.isprintable(),
        f"request_id: at most {MAX_REQUEST_ID_CHARS} printable characters",
    )

    default_width, default_height = model.manifest.default_size
    width = request.width or default_width
    height = request.height or default_height
    # Name the field that no served size has; the height when the width alone would do.
    field = "height" if width in {w for w, _ in model.sizes} else "width"
    check(
        (width, height) in model.sizes,
        f"{field}: model {model.name!r} serves the sizes {', '.join(format_size(s) for s in model.sizes)} "
        f"(width x height, static shapes; 0 takes {format_size(model.manifest.default_size)}), got {width}x{height}",
    )

    num_images = request.num_images or max(1, len(request.seeds))
    check(
        1 <= num_images <= limits.max_images,
        f"num_images: must be in 1..{limits.max_images}, got {request.num_images}",
    )
    check(
        len(request.seeds) <= num_images,
        f"seeds: got {len(request.seeds)} seeds for {num_images} image(s); give at most one per image",
    )

    steps = request.steps or limits.steps
    check(1 <= steps <= limits.max_steps, f"steps: must be in 1..{limits.max_steps}, got {request.steps}")

    guidance = request.guidance_scale if request.HasField("guidance_scale") else limits.guidance_scale
    check(
        math.isfinite(guidance) and 0.0 <= guidance <= MAX_GUIDANCE_SCALE,
        f"guidance_scale: must be a finite number in 0..{MAX_GUIDANCE_SCALE:g}, got {guidance}",
    )

    scheduler = model.default_scheduler
    if request.scheduler != pb.SCHEDULER_UNSPECIFIED:
        known = request.scheduler in pb.Scheduler.values()
        scheduler = scheduler_name(request.scheduler) if known else f"#{request.scheduler}"
        allowed = ", ".join(SCHEDULER_PREFIX + s.upper() for s in model.schedulers)
        check(scheduler in model.schedulers, f"scheduler: {scheduler!r} is not one of {allowed}")
    if scheduler in model.schedulers and 1 <= steps <= limits.max_steps:
        try:  # a sampler's own limits, e.g. LCM's steps at most its original_inference_steps
            make_plan(scheduler, model.scheduler_config, steps)
        except ValueError as error:
            errors.append(f"steps: {error} (scheduler {scheduler!r})")

    noise_mode = DEFAULT_NOISE_MODE
    if request.noise_mode != pb.NOISE_MODE_UNSPECIFIED:
        known = request.noise_mode in pb.NoiseMode.values()
        noise_mode = noise_mode_name(request.noise_mode) if known else f"#{request.noise_mode}"
        allowed = ", ".join(NOISE_MODE_PREFIX + m.upper() for m in NOISE_MODES)
        check(noise_mode in NOISE_MODES, f"noise_mode: {noise_mode!r} is not one of {allowed}")

    output_format = "png"
    if request.output_format != pb.IMAGE_FORMAT_UNSPECIFIED:
        known = request.output_format in pb.ImageFormat.values()
        output_format = format_name(request.output_format) if known else f"#{request.output_format}"
        allowed = ", ".join(FORMAT_PREFIX + f.upper() for f in IMAGE_FORMATS)
        check(output_format in IMAGE_FORMATS, f"output_format: {output_format!r} is not one of {allowed}")

    quality = request.quality or DEFAULT_QUALITY
    check(1 <= quality <= 100, f"quality: must be in 1..100 (0 for the default), got {request.quality}")

    check(
        0 <= request.preview_interval <= steps,
        f"preview_interval: must be in 0..{steps} (the steps), got {request.preview_interval}",
    )
    check(
        request.preview_interval == 0 or bool(model.manifest.latent_rgb),
        f"preview_interval: model {model.name!r} has no latent preview map; re-export it with this diffuserve",
    )

    if errors:
        raise InvalidArgument("; ".join(errors))
    seeds = tuple(request.seeds) + tuple(
        secrets.randbits(RANDOM_SEED_BITS) for _ in range(num_images - len(request.seeds))
    )
    return GenerateParams(
        model=model.name,
        request_id=request.request_id or uuid.uuid4().hex,
        prompt=prompt,
        negative_prompt=negative,
        width=width,
        height=height,
        seeds=seeds,
        steps=steps,
        guidance_scale=float(guidance),
        scheduler=scheduler,
        output_format=output_format,
        quality=quality,
        embed_metadata=request.embed_metadata,
        preview_interval=request.preview_interval,
        noise_mode=noise_mode,
    )
