"""Encoding images for the wire, with optional generation metadata inside the file."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping

import numpy as np
from PIL import Image, PngImagePlugin

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
