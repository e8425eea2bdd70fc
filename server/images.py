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
            exif = Image.Exif()
            exif[EXIF_IMAGE_DESCRIPTION] = json.dumps(dict(metadata), ensure_ascii=True)
            extra["exif"] = exif.tobytes()
        image.save(buffer, format=fmt.upper(), quality=quality, **extra)
    else:
        raise ValueError(f"image format must be one of {sorted(MIME_TYPES)}, got {fmt!r}")
    return buffer.getvalue(), MIME_TYPES[fmt]
