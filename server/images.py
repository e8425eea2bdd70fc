"""Images in and out: a request's init image and mask, decoded and prepared exactly as diffusers' img2img and
inpainting pipelines prepare them, and the output images encoded for the wire with generation metadata inside.

numpy and Pillow only: the server never imports torch."""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageFilter, ImageOps, PngImagePlugin

MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# zlib level 1: a fraction of the default level's time for somewhat larger files; a latency server wants the former.
PNG_COMPRESS_LEVEL = 1
# EXIF tag ImageDescription (ASCII by the standard), where JPEG/WebP readers look for a free-text description.
EXIF_IMAGE_DESCRIPTION = 0x010E
# A JPEG marker segment holds at most 64 KB, the EXIF header included (Pillow refuses 65,534 bytes, takes 65,034).
JPEG_EXIF_MAX_BYTES = 65_000
# The free-text fields shortened, longest first, when the metadata would not fit; the rest are short and bounded.
SHORTENED_FIELDS = ("prompt", "negative_prompt")
# The key that lists which fields were shortened, so a reader knows the text is not the whole prompt.
TRUNCATED_KEY = "truncated"
# AUTOMATIC1111's PNG text chunk with the generation settings, which its "PNG Info" tab and image sites read.
A1111_PARAMETERS_KEY = "parameters"
# AUTOMATIC1111's names of our samplers; it has no Schedule type field before v1.9, so a Karras schedule stays part of
# the name (the form every version reads). Samplers not listed are title-cased.
A1111_SAMPLERS = MappingProxyType(
    {
        "euler": "Euler",
        "euler_ancestral": "Euler a",
        "heun": "Heun",
        "lms": "LMS",
        "dpmpp_2m": "DPM++ 2M",
        "dpmpp_2m_karras": "DPM++ 2M Karras",
        "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras",
        "ddim": "DDIM",
        "pndm": "PLMS",
        "unipc": "UniPC",
        "lcm": "LCM",
    }
)
# Our metadata keys that AUTOMATIC1111 writes too, with its labels, in its order; the others have no A1111 meaning.
A1111_LABELS = (
    ("steps", "Steps"),
    ("scheduler", "Sampler"),
    ("guidance_scale", "CFG scale"),
    ("seed", "Seed"),
    ("size", "Size"),
    ("model", "Model"),
    ("strength", "Denoising strength"),
)
# Values A1111 holds as Python floats, and so writes as str(float): "7.0", not our "7".
A1111_FLOAT_KEYS = ("guidance_scale", "strength")
# Characters that would break A1111's "Label: value, ..." line; it JSON-quotes a value that has one.
A1111_QUOTED_CHARS = (",", ":", "\n")

# The formats a request's images may be sent in, as Pillow names its decoders: only these are even tried.
INPUT_FORMATS = ("PNG", "JPEG", "WEBP")
# What those decoders report; MPO is a camera's multi-picture JPEG, which Pillow's JPEG decoder opens at its first.
DECODED_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP"})
# Decompression bombs: a small file can declare a huge image. 4096x4096 (16 megapixels) leaves room for a photo to be
# resized and is 64 MiB as RGBA; Pillow's own limit (~89 megapixels, an error at twice that) would let one request take
# gigabytes. Checked here rather than by setting Pillow's Image.MAX_IMAGE_PIXELS, which is process-wide.
MAX_INPUT_SIDE = 4096
MAX_INPUT_PIXELS = MAX_INPUT_SIDE * MAX_INPUT_SIDE
# What a corrupt or truncated file makes Pillow's decoders raise (SyntaxError: a PNG's bad chunk; struct and zlib
# errors: malformed headers and streams).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)
# Pillow's reasons quote the file object ("<_io.BytesIO object at 0x...>"): internals, not for the client.
OBJECT_REPR = re.compile(r"\s*<[^<>]*>")
# A decoder's reason is cut to this many characters, so the whole message stays short.
MAX_REASON_CHARS = 120
# Pillow's names of 16-bit grayscale (PNG): its convert() clips these at 255, so they are scaled to 8 bits first.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")
# 16-bit to 8-bit by the high byte, as Pillow reads 16-bit RGB PNGs.
SIXTEEN_TO_EIGHT_BITS = 8
# Mode I is 32-bit signed: clipped to the 16-bit range a PNG's values have before the shift.
MAX_SIXTEEN_BIT = 0xFFFF
# A mask is one channel: 8-bit grayscale or 1-bit (plus 16-bit grayscale, scaled). RGB, RGBA, LA or palette images are
# refused rather than guessed at (which channel, or the alpha, marks the area?).
MASK_MODES = ("L", "1", *SIXTEEN_BIT_MODES)
# diffusers' binarize: mask values (0..1) below this keep the image, the rest are repainted.
MASK_THRESHOLD = 0.5


def decode_image(data: bytes, field: str) -> Image.Image:
    """A request's PNG, JPEG or WebP file, fully decoded and turned upright; ValueError naming the field otherwise."""
    try:
        image = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"{field}: {too_many_pixels()}") from None
    except DECODE_ERRORS as error:
        raise ValueError(f"{field}: not a PNG, JPEG or WebP image ({decoder_reason(error)})") from None
    if image.format not in DECODED_FORMATS:
        raise ValueError(f"{field}: not a PNG, JPEG or WebP image (it is {image.format})")
    if image.width * image.height > MAX_INPUT_PIXELS:
        raise ValueError(f"{field}: {image.width}x{image.height} is {too_many_pixels()}")
    try:
        image.load()  # here, so a truncated file fails now and not in the pipeline
        # Upright as diffusers' load_image and AUTOMATIC1111 turn a camera's photo (EXIF Orientation).
        ImageOps.exif_transpose(image, in_place=True)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"{field}: {too_many_pixels()}") from None
    except DECODE_ERRORS as error:
        raise ValueError(f"{field}: cannot decode this {image.format} image ({decoder_reason(error)})") from None
    return image


def too_many_pixels() -> str:
    """The end of the message refusing a decompression bomb."""
    return f"more than the {MAX_INPUT_PIXELS} pixels ({MAX_INPUT_SIDE}x{MAX_INPUT_SIDE}) an input image may have"


def decoder_reason(error: Exception) -> str:
    """Pillow's reason, short and without Python object names."""
    return OBJECT_REPR.sub("", str(error)).strip()[:MAX_REASON_CHARS] or "unreadable"


def prepare_init_image(
    image: Image.Image, size: tuple[int, int], resize: bool, field: str = "init_image"
) -> np.ndarray:
    """The init image as diffusers' pipelines feed it to the VAE encoder: float32 [3, H, W] in -1..1."""
    rgb = sized(eight_bit(image).convert("RGB"), size, resize, field)
    pixels = np.asarray(rgb).astype(np.float32) / 255.0  # VaeImageProcessor.pil_to_numpy
    return np.ascontiguousarray((2.0 * pixels - 1.0).transpose(2, 0, 1))  # VaeImageProcessor.normalize


def prepare_mask(
    image: Image.Image, size: tuple[int, int], resize: bool, blur: int, field: str = "mask_image"
) -> np.ndarray:
    """The inpainting mask as diffusers' mask_processor makes it: float32 [1, H, W], 1 where the image is repainted."""
    if image.mode not in MASK_MODES:
        raise ValueError(f"{field}: must be a single-channel (grayscale) image, got {image.mode}")
    gray = eight_bit(image).convert("L")
    if blur > 0:  # VaeImageProcessor.blur, on the mask as sent: diffusers' documented use, and AUTOMATIC1111's order
        gray = gray.filter(ImageFilter.GaussianBlur(blur))
    values = np.asarray(sized(gray, size, resize, field)).astype(np.float32) / 255.0
    return np.where(values < MASK_THRESHOLD, np.float32(0.0), np.float32(1.0))[None]


def eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image scaled to 8-bit L; any other image as it is."""
    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    values = np.clip(np.asarray(image), 0, MAX_SIXTEEN_BIT) >> SIXTEEN_TO_EIGHT_BITS
    return Image.fromarray(values.astype(np.uint8))


def sized(image: Image.Image, size: tuple[int, int], resize: bool, field: str) -> Image.Image:
    """The image at size (width, height): resized as diffusers' VaeImageProcessor.resize (default mode), or refused."""
    width, height = size
    if image.size == (width, height):
        return image
    if not resize:
        raise ValueError(
            f"{field}: {image.width}x{image.height} does not match the requested {width}x{height}; "
            "send an image of that size or set resize_mode RESIZE_MODE_RESIZE"
        )
    # Lanczos, no reducing gap: VaeImageProcessor's defaults (resample="lanczos", reducing_gap=None).
    return image.resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None)


def masked_image(init_image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The init image [3, H, W] with the area to repaint zeroed: StableDiffusionInpaintPipeline's
    `init_image * (mask < 0.5)`."""
    return init_image * (mask < MASK_THRESHOLD)


def latent_mask(mask: np.ndarray, latent_hw: tuple[int, int]) -> np.ndarray:
    """The mask [1, H, W] at the latents' (h, w), as prepare_mask_latents' torch interpolate (mode "nearest")."""
    rows = nearest_indices(mask.shape[1], latent_hw[0])
    cols = nearest_indices(mask.shape[2], latent_hw[1])
    return mask[:, rows[:, None], cols[None, :]]


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """torch's "nearest" source index of each output index: floor(index * in/out), in float32 as torch computes it."""
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(source, in_size - 1)


def encode_image(
    pixels: np.ndarray, fmt: str, quality: int, metadata: Mapping[str, str] | None = None
) -> tuple[bytes, str]:
    """pixels: uint8 [H, W, 3]; returns the file's bytes and its MIME type."""
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    if fmt == "png":
        info = None
        if metadata:
            info = PngImagePlugin.PngInfo()
            # tEXt (latin-1) as AUTOMATIC1111 writes it; Pillow's add_text falls back to iTXt when it is not latin-1.
            info.add_text(A1111_PARAMETERS_KEY, a1111_parameters(metadata))
            for key, value in metadata.items():
                info.add_itxt(key, value)
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, pnginfo=info)
    elif fmt in ("jpeg", "webp"):
        extra = {}
        if metadata:
            extra["exif"] = exif_block(metadata, JPEG_EXIF_MAX_BYTES if fmt == "jpeg" else None)
        image.save(buffer, format=fmt.upper(), quality=quality, **extra)
    else:
        raise ValueError(f"image format must be one of {sorted(MIME_TYPES)}, got {fmt!r}")
    return buffer.getvalue(), MIME_TYPES[fmt]


def _exif(metadata: Mapping[str, str]) -> bytes:
    exif = Image.Exif()
    exif[EXIF_IMAGE_DESCRIPTION] = json.dumps(dict(metadata), ensure_ascii=True)
    return exif.tobytes()


def exif_block(metadata: Mapping[str, str], limit: int | None = None) -> bytes:
    """The metadata as an EXIF block of at most limit bytes: if the whole does not fit, the prompts are cut to the
    longest common length that does, and the "truncated" key names the fields that were cut."""
    whole = _exif(metadata)
    if limit is None or len(whole) <= limit:
        return whole

    def cut(chars: int) -> dict[str, str]:
        shortened = [k for k in SHORTENED_FIELDS if len(metadata.get(k, "")) > chars]
        return {**metadata, **{k: metadata[k][:chars] for k in shortened}, TRUNCATED_KEY: ",".join(shortened)}

    fits, too_long = 0, max(len(metadata.get(k, "")) for k in SHORTENED_FIELDS)
    if len(_exif(cut(fits))) > limit:
        raise ValueError(f"image metadata does not fit in {limit} bytes of EXIF even without the prompts")
    while too_long - fits > 1:  # binary search: the block's size grows with the characters kept
        middle = (fits + too_long) // 2
        fits, too_long = (middle, too_long) if len(_exif(cut(middle))) <= limit else (fits, middle)
    return _exif(cut(fits))


def a1111_parameters(metadata: Mapping[str, str]) -> str:
    """Our image metadata as AUTOMATIC1111's "parameters" text: the prompt, a "Negative prompt:" line when there is
    one, then "Steps: 20, Sampler: Euler, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: name"."""
    lines = [metadata.get("prompt", "")]
    if metadata.get("negative_prompt"):
        lines.append(f"Negative prompt: {metadata['negative_prompt']}")
    fields = (f"{label}: {a1111_value(key, metadata[key])}" for key, label in A1111_LABELS if key in metadata)
    lines.append(", ".join(fields))
    return "\n".join(lines)


def a1111_value(key: str, value: str) -> str:
    """One value as AUTOMATIC1111 writes it: its sampler names, floats as Python prints them, quoted when needed."""
    if key == "scheduler":
        value = A1111_SAMPLERS.get(value) or value.replace("_", " ").title()
    elif key in A1111_FLOAT_KEYS:
        value = a1111_float(value)
    if any(char in value for char in A1111_QUOTED_CHARS):
        return json.dumps(value, ensure_ascii=False)
    return value


def a1111_float(value: str) -> str:
    """A number as Python prints a float ("7" -> "7.0"), as AUTOMATIC1111 writes its float settings; else as it is."""
    try:
        return str(float(value))
    except ValueError:
        return value
