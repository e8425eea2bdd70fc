"""The one place a request is checked: proto in, validated GenerateParams out, or an error naming every bad field."""

from __future__ import annotations

import math
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import numpy as np

from diffuserve.engine.manifest import IMG2IMG, INPAINT, SDXL, TXT2IMG, format_size
from diffuserve.v1 import diffusion_pb2 as pb

from .images import decode_image, prepare_init_image, prepare_mask
from .models import ServedModel
from .noise import DEFAULT_NOISE_MODE, NOISE_MODES
from .prompts import chunk_prompt
from .schedulers import img2img_start, make_plan

# Long prompts are encoded in chunks up to the model's longest text length; this only keeps a caller from sending
# megabytes of text to tokenize.
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
TASK_PREFIX = "TASK_"
# diffusers' defaults: img2img keeps a fifth of the image's structure; inpainting repaints the masked area from noise.
DEFAULT_STRENGTH = {IMG2IMG: 0.8, INPAINT: 1.0}
# AUTOMATIC1111's (word:w) weights in use stay within a few units; this bars overflow when embeddings are scaled.
MAX_PROMPT_WEIGHT = 100.0
# A blur wider than this smears a mask past any image this server serves; larger is almost surely a mistake.
MAX_MASK_BLUR = 256
# SDXL's size conditioning in pixels: beyond the largest images it was trained on by far.
MAX_CONDITIONING_SIZE = 16_384


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
    # Classifier-free guidance: a scale above 1 on a model without a guidance embedding (diffusers' rule).
    guided: bool = True
    task: str = TXT2IMG
    # How much of the schedule runs (img2img, inpainting), and the plan's U-Net call the run starts from.
    strength: float = 1.0
    start: int = 0
    # img2img and inpainting: the init image [3, H, W] in -1..1 and the mask [1, H, W] of 0/1 (1 = repaint).
    init_image: np.ndarray | None = dataclass_field(default=None, compare=False, repr=False)
    mask: np.ndarray | None = dataclass_field(default=None, compare=False, repr=False)
    # Long prompts: the prompt and negative prompt each become this many chunks of the text encoder's length.
    text_chunks: int = 1
    text_length: int = 77
    prompt_tokens: int = 0
    negative_prompt_tokens: int = 0
    # SDXL's micro-conditioning: original and target size (width, height) in pixels, crop (top, left).
    original_size: tuple[int, int] = (0, 0)
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] = (0, 0)

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as the manifest keys its shapes."""
        return (self.width, self.height)


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


def task_enum(name: str) -> int:
    return pb.Task.Value(TASK_PREFIX + name.upper())


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
# An init image or mask file: a 2048x2048 photo as PNG is about 12 MB.
MAX_IMAGE_BYTES = 16 * 1024 * 1024


def max_request_bytes(max_images: int) -> int:
    """The largest GenerateRequest validate() can accept: what the server's receive limit is sized to."""
    strings = (2 * MAX_PROMPT_CHARS + MAX_REQUEST_ID_CHARS + MAX_MODEL_NAME_CHARS) * UTF8_MAX_BYTES
    images = 2 * (MAX_IMAGE_BYTES + FIELD_OVERHEAD_BYTES)
    return (
        strings
        + 4 * FIELD_OVERHEAD_BYTES
        + images
        + max_images * SEED_BYTES
        + FIELD_OVERHEAD_BYTES
        + SCALAR_FIELDS_BYTES
    )


class Errors(list):
    """Every problem of one request, each naming its field, so the caller can fix them in one go."""

    def check(self, ok: bool, message: str) -> bool:
        if not ok:
            self.append(message)
        return ok


def validate(request: pb.GenerateRequest, models: Mapping[str, ServedModel], default_model: str) -> GenerateParams:
    """Checks every field, collecting all problems so the caller can fix them in one go."""
    model = resolve_model(request.model, models, default_model)
    limits = model.defaults
    errors = Errors()
    check = errors.check

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

    init = decoded_image(request, "init_image", errors)
    mask = decoded_image(request, "mask_image", errors)
    task = request_task(model, request, errors)
    width, height = request_size(model, request, init, errors)

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
    # diffusers' rule: classifier-free guidance only above 1, and never where the U-Net embeds the scale (LCM).
    guided = guidance > 1.0 and not model.guidance_embedded

    scheduler = model.default_scheduler
    if request.scheduler != pb.SCHEDULER_UNSPECIFIED:
        known = request.scheduler in pb.Scheduler.values()
        scheduler = scheduler_name(request.scheduler) if known else f"#{request.scheduler}"
        allowed = ", ".join(SCHEDULER_PREFIX + s.upper() for s in model.schedulers)
        check(scheduler in model.schedulers, f"scheduler: {scheduler!r} is not one of {allowed}")
    plan = None
    if scheduler in model.schedulers and 1 <= steps <= limits.max_steps:
        try:  # a sampler's own limits, e.g. LCM's steps at most its original_inference_steps
            plan = make_plan(scheduler, model.scheduler_config, steps)
        except ValueError as error:
            errors.append(f"steps: {error} (scheduler {scheduler!r})")
    strength, start = request_strength(request, task, plan, errors)

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
    texts = prompt_texts(model, prompt, negative, guided, errors)
    conditioning = size_conditioning(model, request, (width, height), errors)
    # Images are sized only to a size the model serves: resizing to a refused one could take minutes and gigabytes.
    sized = (width, height) in model.sizes
    pixels = task_images(request, task, (width, height), init if sized else None, mask if sized else None, errors)

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
        guided=guided,
        task=task,
        strength=strength,
        start=start,
        **pixels,
        **texts,
        **conditioning,
    )


def decoded_image(request: pb.GenerateRequest, field: str, errors: Errors):
    """The field's image, decoded (not yet sized), or None when absent or broken (an error is recorded)."""
    data = getattr(request, field)
    if not data:
        return None
    if not errors.check(len(data) <= MAX_IMAGE_BYTES, f"{field}: at most {MAX_IMAGE_BYTES} bytes, got {len(data)}"):
        return None
    try:
        return decode_image(data, field)
    except ValueError as error:
        errors.append(str(error))
        return None


def request_task(model: ServedModel, request: pb.GenerateRequest, errors: Errors) -> str:
    """The task the request's images ask for, if the model serves it."""
    task = INPAINT if request.mask_image else IMG2IMG if request.init_image else TXT2IMG
    errors.check(
        not request.mask_image or bool(request.init_image),
        "mask_image: inpainting needs init_image too (the image the mask applies to)",
    )
    if task not in model.tasks:
        served = ", ".join(model.tasks) or "none"
        hint = {
            TXT2IMG: "send init_image and mask_image",
            IMG2IMG: "its export has no VAE encoder" if not model.manifest.inpainting_unet else "send mask_image too",
            INPAINT: "its export has no VAE encoder",
        }[task]
        field = "mask_image" if task == INPAINT else "init_image"
        errors.append(f"{field}: model {model.name!r} serves {served}, not {task} ({hint})")
    return task


def request_size(model: ServedModel, request: pb.GenerateRequest, init, errors: Errors) -> tuple[int, int]:
    """(width, height): the request's, else the init image's where the model serves it, else the model's default."""
    default_width, default_height = model.manifest.default_size
    if init is not None and init.size in model.sizes:
        default_width, default_height = init.size
    width = request.width or default_width
    height = request.height or default_height
    # Name the field that no served size has; the height when the width alone would do.
    field = "height" if width in {w for w, _ in model.sizes} else "width"
    errors.check(
        (width, height) in model.sizes,
        f"{field}: model {model.name!r} serves the sizes {', '.join(format_size(s) for s in model.sizes)} "
        f"(width x height, static shapes; 0 takes {format_size(model.manifest.default_size)}), got {width}x{height}",
    )
    return width, height


def request_strength(request: pb.GenerateRequest, task: str, plan, errors: Errors) -> tuple[float, int]:
    """The strength and the plan's call it starts the run from (0 for text-to-image)."""
    if task == TXT2IMG:
        errors.check(not request.HasField("strength"), "strength: applies only with init_image (image-to-image)")
        return 1.0, 0
    # The float32 the wire carries, read back as the decimal the client wrote: 0.7 must run 7 of 10 steps, as in
    # diffusers, not int(10 * 0.699999988) = 6.
    strength = float(str(np.float32(request.strength))) if request.HasField("strength") else DEFAULT_STRENGTH[task]
    if not errors.check(
        math.isfinite(strength) and 0.0 < strength <= 1.0, f"strength: must be in (0, 1], got {strength}"
    ):
        return 1.0, 0
    if plan is None:
        return strength, 0
    try:
        return strength, img2img_start(plan, strength)
    except ValueError as error:
        errors.append(f"strength: {error}")
        return 1.0, 0


def prompt_texts(model: ServedModel, prompt: str, negative: str, guided: bool, errors: Errors) -> dict:
    """The chunks a long prompt takes (its negative prompt's too, under guidance), if the model serves that length."""
    if len(prompt) > MAX_PROMPT_CHARS or len(negative) > MAX_PROMPT_CHARS:
        return {}
    positive = chunk_prompt(model.tokenizer, prompt)
    counted = chunk_prompt(model.tokenizer, negative)
    for field, chunks in (("prompt", positive), ("negative_prompt", counted)):
        errors.check(
            bool(np.isfinite(chunks.weights).all()) and float(np.abs(chunks.weights).max()) <= MAX_PROMPT_WEIGHT,
            f"{field}: attention weights (word:w) must be finite, at most {MAX_PROMPT_WEIGHT:g} in size",
        )
    chunks = max(positive.chunks, counted.chunks if guided else 1)
    seq_len = model.tokenizer.max_length
    length = chunks * seq_len
    served = model.text_lengths
    field = "prompt" if positive.chunks >= counted.chunks or not guided else "negative_prompt"
    errors.check(
        length <= max(served),
        f"{field}: needs {chunks} chunks of {seq_len - 2} tokens; model {model.name!r} takes at most "
        f"{max(served) // seq_len} ({max(served) // seq_len * (seq_len - 2)} tokens; text lengths {list(served)})",
    )
    # The shortest text length served that holds the chunks: prompts pad to it with empty chunks.
    fits = [n for n in served if n >= length]
    length = fits[0] if fits else length
    return {
        "text_chunks": length // seq_len,
        "text_length": length,
        "prompt_tokens": positive.tokens,
        "negative_prompt_tokens": counted.tokens,
    }


def size_conditioning(model: ServedModel, request: pb.GenerateRequest, size: tuple[int, int], errors: Errors) -> dict:
    """SDXL's original size, crop and target size; diffusers' defaults: the image's size, no crop."""
    given = (
        request.HasField("original_size") or request.HasField("target_size") or request.crop_top or request.crop_left
    )
    if model.family != SDXL:
        errors.check(
            not given,
            f"original_size: size conditioning (original_size, crop_top, crop_left, target_size) is SDXL's; "
            f"model {model.name!r} is {model.family}",
        )
        return {}

    def pixels(field: str) -> tuple[int, int]:
        value = getattr(request, field)
        if not request.HasField(field):
            return size
        errors.check(
            0 < value.width <= MAX_CONDITIONING_SIZE and 0 < value.height <= MAX_CONDITIONING_SIZE,
            f"{field}: width and height must be in 1..{MAX_CONDITIONING_SIZE}, got {value.width}x{value.height}",
        )
        return (value.width, value.height)

    for field in ("crop_top", "crop_left"):
        value = getattr(request, field)
        errors.check(
            0 <= value <= MAX_CONDITIONING_SIZE, f"{field}: must be in 0..{MAX_CONDITIONING_SIZE}, got {value}"
        )
    return {
        "original_size": pixels("original_size"),
        "crop_top_left": (request.crop_top, request.crop_left),
        "target_size": pixels("target_size"),
    }


def task_images(request: pb.GenerateRequest, task: str, size: tuple[int, int], init, mask, errors: Errors) -> dict:
    """The init image and mask as the pipeline takes them, sized to the request (resized or refused)."""
    check = errors.check
    resize_known = request.resize_mode in pb.ResizeMode.values()
    allowed = ", ".join(pb.ResizeMode.keys())
    check(resize_known, f"resize_mode: #{request.resize_mode} is not one of {allowed}")
    check(
        0 <= request.mask_blur <= MAX_MASK_BLUR,
        f"mask_blur: must be in 0..{MAX_MASK_BLUR} pixels, got {request.mask_blur}",
    )
    if task != INPAINT:
        check(request.mask_blur == 0, "mask_blur: applies only with mask_image (inpainting)")
    if task == TXT2IMG:
        check(
            request.resize_mode == pb.RESIZE_MODE_UNSPECIFIED,
            "resize_mode: applies only with init_image (image-to-image or inpainting)",
        )
        return {}
    if init is not None and mask is not None and mask.size != init.size:
        errors.append(
            f"mask_image: {format_size(mask.size)} does not match init_image's {format_size(init.size)}; a mask "
            "covers its image pixel for pixel"
        )
        mask = None
    if not resize_known:
        return {}
    resize = request.resize_mode != pb.RESIZE_MODE_REFUSE
    result = {}
    try:
        if init is not None:
            result["init_image"] = prepare_init_image(init, size, resize, "init_image")
        if mask is not None and 0 <= request.mask_blur <= MAX_MASK_BLUR:
            result["mask"] = prepare_mask(mask, size, resize, request.mask_blur, "mask_image")
    except ValueError as error:
        errors.append(str(error))
    return result
