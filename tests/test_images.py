"""The image side of img2img and inpainting against diffusers itself: request files are decoded safely, init images
and masks come out bit for bit as diffusers' pipelines prepare them, and output PNGs carry AUTOMATIC1111's
"parameters" text. torch and diffusers are imported here only, as the reference."""

from __future__ import annotations

import io
import random
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import load_image
from PIL import Image

from diffuserve.server.images import (
    MAX_INPUT_PIXELS,
    a1111_parameters,
    decode_image,
    encode_image,
    latent_mask,
    masked_image,
    prepare_init_image,
    prepare_mask,
)

# The longest error message a client should get for one field.
MAX_MESSAGE_CHARS = 300
# StableDiffusionInpaintPipeline's mask_processor, built with the arguments the pipeline's __init__ gives it.
MASK_PROCESSOR = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
METADATA = {
    "prompt": "a red fox in snow",
    "negative_prompt": "blurry",
    "model": "sd15",
    "seed": "42",
    "steps": "20",
    "guidance_scale": "7.5",
    "scheduler": "euler",
    "noise_mode": "torch_cpu",
    "size": "512x512",
    "task": "txt2img",
}


def photo(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: edges for Lanczos' ringing and values across the whole 0..255 range."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
        return Image.merge("RGBA", (*image.split(), alpha))
    return image.convert(mode)


def mask(width: int, height: int, seed: int = 0) -> Image.Image:
    """A soft-edged blob with noise: values on both sides of the 0.5 threshold near the edge."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    distance = np.hypot((x - width * 0.4) / width, (y - height * 0.6) / height)
    values = np.clip(255 * (1.5 - 4 * distance) + rng.normal(0, 30, distance.shape), 0, 255)
    return Image.fromarray(values.astype(np.uint8), "L")


def file_bytes(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height 8-bit grayscale, with almost no image data: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def same_bits(ours: np.ndarray, reference: np.ndarray) -> bool:
    """Equal bit for bit, signed zeros included."""
    return ours.dtype == reference.dtype == np.float32 and np.array_equal(
        ours.view(np.uint32), reference.view(np.uint32)
    )


def diffusers_init_image(image: Image.Image, width: int, height: int) -> np.ndarray:
    """What StableDiffusionImg2ImgPipeline feeds its VAE encoder for an image loaded the diffusers way."""
    return VaeImageProcessor().preprocess(load_image(image), height=height, width=width)[0].numpy()


def diffusers_mask(image: Image.Image, width: int, height: int, blur: int) -> np.ndarray:
    """diffusers' documented inpainting mask: load_image, mask_processor.blur when asked, then the pipeline's
    mask_processor.preprocess."""
    loaded = load_image(image)
    if blur:
        loaded = MASK_PROCESSOR.blur(loaded, blur)
    return MASK_PROCESSOR.preprocess(loaded, height=height, width=width)[0].numpy()


@pytest.mark.parametrize(("fmt", "mode"), [("PNG", "RGBA"), ("PNG", "L"), ("JPEG", "RGB"), ("WEBP", "RGB")])
def test_png_jpeg_and_webp_decode_fully_loaded(fmt: str, mode: str) -> None:
    image = decode_image(file_bytes(photo(40, 24, mode), fmt), "init_image")
    assert (image.size, image.mode, image.format) == ((40, 24), mode, fmt)
    assert image.im is not None  # decoded now, not lazily later


def test_a_camera_multi_picture_jpeg_decodes_as_its_first_picture() -> None:
    data = file_bytes(photo(32, 16), "MPO", save_all=True, append_images=[photo(8, 8, seed=1)])
    assert decode_image(data, "init_image").size == (32, 16)


def test_a_photo_is_turned_upright_by_its_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to view
    image = decode_image(file_bytes(photo(40, 24), "JPEG", exif=exif.tobytes()), "init_image")
    assert image.size == (24, 40)


@pytest.mark.parametrize(
    "data", [file_bytes(photo(8, 8), "GIF"), file_bytes(photo(8, 8), "BMP"), b"not an image", b""]
)
def test_other_formats_and_garbage_are_refused_naming_the_field(data: bytes) -> None:
    with pytest.raises(ValueError) as error:
        decode_image(data, "init_image")
    assert str(error.value) == "init_image: not a PNG, JPEG or WebP image (cannot identify image file)"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_a_truncated_file_fails_at_decoding(fmt: str) -> None:
    data = file_bytes(photo(64, 64), fmt)
    with pytest.raises(ValueError, match=rf"^mask_image: (cannot decode this {fmt} image|not a PNG, JPEG or WebP)"):
        decode_image(data[: len(data) * 2 // 3], "mask_image")


@pytest.mark.parametrize(
    ("width", "height"),
    [
        (4097, 4096),  # just over our limit, far under Pillow's
        (10_000, 10_000),  # over Pillow's warning threshold
        (20_000, 20_000),  # over Pillow's error threshold
    ],
)
def test_decompression_bombs_are_refused_before_decoding(width: int, height: int) -> None:
    for action in ("ignore", "error"):  # Pillow's DecompressionBombWarning, whether or not warnings are errors
        with warnings.catch_warnings(), pytest.raises(ValueError) as error:
            warnings.simplefilter(action)
            decode_image(png_header_only(width, height), "init_image")
        message = str(error.value)
        assert message.startswith("init_image: ") and f"the {MAX_INPUT_PIXELS} pixels (4096x4096)" in message


def test_an_image_at_the_pixel_limit_decodes() -> None:
    image = Image.new("L", (4096, 4096))
    assert decode_image(file_bytes(image), "init_image").size == (4096, 4096)


def test_corrupt_files_only_ever_raise_a_short_value_error_naming_the_field() -> None:
    rng = random.Random(0)
    sources = [
        file_bytes(photo(37, 29, mode), fmt) for fmt, mode in [("PNG", "RGBA"), ("JPEG", "RGB"), ("WEBP", "RGB")]
    ]
    for data in sources:
        for _ in range(150):
            corrupt = bytearray(data)
            for _ in range(rng.randrange(1, 6)):
                corrupt[rng.randrange(len(corrupt))] = rng.randrange(256)
            corrupt = corrupt[: rng.randrange(8, len(corrupt) + 1)]
            try:
                decode_image(bytes(corrupt), "init_image")
            except ValueError as error:
                message = str(error)
                assert message.startswith("init_image: ") and len(message) < MAX_MESSAGE_CHARS, message
                assert "0x" not in message and "<" not in message, message


def test_an_rgb_init_image_is_bit_equal_to_diffusers_preprocess() -> None:
    image = decode_image(file_bytes(photo(64, 48), "PNG"), "init_image")
    ours = prepare_init_image(image, (64, 48), resize=True)
    assert ours.shape == (3, 48, 64)
    assert same_bits(ours, VaeImageProcessor().preprocess(image, height=48, width=64)[0].numpy())


# The img2img pipeline's VaeImageProcessor has do_convert_rgb=False: diffusers' RGB conversion is load_image's.
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1"])
def test_init_image_is_bit_equal_to_diffusers_load_image_then_preprocess(mode: str) -> None:
    image = decode_image(file_bytes(photo(64, 48, mode), "PNG"), "init_image")
    assert image.mode == mode
    assert same_bits(prepare_init_image(image, (64, 48), resize=True), diffusers_init_image(image, 64, 48))


@pytest.mark.parametrize(("mode", "size"), [("RGB", (100, 80)), ("RGBA", (77, 131)), ("L", (300, 200))])
def test_a_resized_init_image_is_bit_equal_to_diffusers(mode: str, size: tuple[int, int]) -> None:
    image = decode_image(file_bytes(photo(*size, mode), "PNG"), "init_image")
    ours = prepare_init_image(image, (128, 96), resize=True)
    assert ours.shape == (3, 96, 128)
    assert same_bits(ours, diffusers_init_image(image, 128, 96))


def test_a_jpeg_init_image_from_bytes_matches_diffusers_load_image() -> None:
    data = file_bytes(photo(90, 70), "JPEG", quality=85)
    ours = prepare_init_image(decode_image(data, "init_image"), (64, 64), resize=True)
    assert same_bits(ours, diffusers_init_image(Image.open(io.BytesIO(data)), 64, 64))


def test_a_mismatched_init_image_is_refused_when_resizing_is_off() -> None:
    with pytest.raises(ValueError) as error:
        prepare_init_image(photo(100, 80), (128, 128), resize=False)
    assert str(error.value) == (
        "init_image: 100x80 does not match the requested 128x128; "
        "send an image of that size or set resize_mode RESIZE_MODE_RESIZE"
    )


def test_a_sixteen_bit_grayscale_init_image_is_scaled_not_clipped() -> None:
    values = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
    image = decode_image(file_bytes(Image.fromarray(values)), "init_image")
    ours = prepare_init_image(image, (5, 1), resize=False)
    expected = (values >> 8).astype(np.float32) / 255.0 * 2.0 - 1.0
    assert np.array_equal(ours, np.broadcast_to(expected, (3, 1, 5)))


@pytest.mark.parametrize(
    ("source_size", "blur"),
    [((64, 48), 0), ((64, 48), 4), ((100, 70), 0), ((100, 70), 4), ((50, 90), 9), ((256, 192), 33)],
)
def test_mask_is_equal_to_diffusers_mask_processor(source_size: tuple[int, int], blur: int) -> None:
    image = decode_image(file_bytes(mask(*source_size)), "mask_image")
    ours = prepare_mask(image, (64, 48), resize=True, blur=blur)
    reference = diffusers_mask(image, 64, 48, blur)
    assert ours.shape == (1, 48, 64) and set(np.unique(ours)) <= {0.0, 1.0}
    assert 0 < ours.mean() < 1  # both values occur: the test compares something
    assert same_bits(ours, reference)


def test_a_one_bit_mask_is_equal_to_diffusers_mask_processor() -> None:
    image = decode_image(file_bytes(mask(72, 48).convert("1")), "mask_image")
    assert image.mode == "1"
    for size, blur in [((72, 48), 0), ((72, 48), 3), ((64, 56), 0), ((64, 56), 5)]:
        assert same_bits(prepare_mask(image, size, resize=True, blur=blur), diffusers_mask(image, *size, blur))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P"])
def test_a_mask_with_colour_or_alpha_is_refused(mode: str) -> None:
    with pytest.raises(ValueError) as error:
        prepare_mask(mask(16, 16).convert(mode), (16, 16), resize=True, blur=0)
    assert str(error.value) == f"mask_image: must be a single-channel (grayscale) image, got {mode}"


def test_a_mismatched_mask_is_refused_naming_its_field() -> None:
    with pytest.raises(ValueError, match=r"^mask_image: 16x8 does not match the requested 16x16; "):
        prepare_mask(mask(16, 8), (16, 16), resize=False, blur=3)


def test_masked_image_is_the_inpaint_pipelines_formula() -> None:
    image = decode_image(file_bytes(photo(64, 48)), "init_image")
    init = prepare_init_image(image, (64, 48), resize=True)
    repaint = prepare_mask(mask(64, 48), (64, 48), resize=True, blur=0)
    reference = torch.from_numpy(init)[None] * (torch.from_numpy(repaint)[None] < 0.5)
    ours = masked_image(init, repaint)
    assert same_bits(ours, reference[0].numpy())
    assert np.signbit(ours[ours == 0]).any()  # -0.0 occurs (negative pixels masked), so same_bits checks signs too


@pytest.mark.parametrize(
    ("image_hw", "latent_hw"),
    [((128, 128), (16, 16)), ((128, 192), (16, 24)), ((192, 128), (24, 16)), ((100, 75), (13, 9)), ((7, 9), (3, 14))],
)
def test_latent_mask_is_torch_nearest_interpolate(image_hw: tuple[int, int], latent_hw: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    full = (rng.random((1, *image_hw)) < 0.5).astype(np.float32) * rng.random((1, *image_hw)).astype(np.float32)
    reference = torch.nn.functional.interpolate(torch.from_numpy(full)[None], size=latent_hw)[0].numpy()
    ours = latent_mask(full, latent_hw)
    assert ours.shape == (1, *latent_hw) and same_bits(ours, reference)


def test_latent_mask_picks_torchs_source_pixels_for_every_size_pair() -> None:
    for in_size in range(1, 70):
        for out_size in range(1, 70):
            line = np.arange(in_size, dtype=np.float32).reshape(1, 1, in_size)
            reference = torch.nn.functional.interpolate(torch.from_numpy(line)[None], size=(1, out_size))[0].numpy()
            assert np.array_equal(latent_mask(line, (1, out_size)), reference), (in_size, out_size)


def test_a1111_parameters_are_written_as_automatic1111_writes_them() -> None:
    assert a1111_parameters(METADATA) == (
        "a red fox in snow\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: Euler, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: sd15"
    )


def test_a1111_parameters_omit_an_empty_negative_prompt_and_add_denoising_strength() -> None:
    img2img = {**METADATA, "negative_prompt": "", "task": "img2img", "strength": "0.75", "guidance_scale": "7"}
    assert a1111_parameters(img2img) == (
        "a red fox in snow\n"
        "Steps: 20, Sampler: Euler, CFG scale: 7.0, Seed: 42, Size: 512x512, Model: sd15, Denoising strength: 0.75"
    )


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ("euler_ancestral", "Euler a"),
        ("pndm", "PLMS"),
        ("dpmpp_2m", "DPM++ 2M"),
        ("dpmpp_2m_karras", "DPM++ 2M Karras"),
        ("unipc", "UniPC"),
        ("lcm", "LCM"),
        ("some_new_sampler", "Some New Sampler"),
    ],
)
def test_a1111_parameters_use_automatic1111s_sampler_names(ours: str, theirs: str) -> None:
    assert f", Sampler: {theirs}, " in a1111_parameters({**METADATA, "scheduler": ours})


def test_a1111_values_that_would_break_the_line_are_json_quoted() -> None:
    text = a1111_parameters({**METADATA, "model": "sdxl: turbo, v2"})
    assert text.endswith(', Model: "sdxl: turbo, v2"')


def test_png_carries_the_a1111_parameters_as_a_latin1_text_chunk() -> None:
    pixels = np.zeros((8, 8, 3), np.uint8)
    data, mime = encode_image(pixels, "png", 90, METADATA)
    assert mime == "image/png" and b"tEXtparameters\0a red fox in snow\nNegative" in data
    text = Image.open(io.BytesIO(data)).text
    assert text["parameters"] == a1111_parameters(METADATA)
    assert {key: text[key] for key in METADATA} == METADATA  # our own chunks are still there


def test_a_non_latin1_prompt_round_trips_in_an_itxt_parameters_chunk() -> None:
    metadata = {**METADATA, "prompt": "一只狐狸 in Schnee 🦊", "negative_prompt": "flou, « bruit »"}
    data, _ = encode_image(np.zeros((8, 8, 3), np.uint8), "png", 90, metadata)
    assert b"iTXtparameters\0" in data and b"tEXtparameters" not in data
    parameters = Image.open(io.BytesIO(data)).text["parameters"]
    assert parameters.startswith("一只狐狸 in Schnee 🦊\nNegative prompt: flou, « bruit »\nSteps: 20, ")


def test_no_parameters_chunk_without_metadata() -> None:
    data, _ = encode_image(np.zeros((8, 8, 3), np.uint8), "png", 90)
    assert "parameters" not in Image.open(io.BytesIO(data)).text
