"""The parity gates: each exported component against PyTorch on the same random inputs, and an fp16 target's
decoded image against the fp32 pipeline's."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffuserve.engine.base import Engine
from diffuserve.engine.loader import LoadedEngines
from diffuserve.engine.manifest import (
    CPU_TARGET,
    TIME_IDS,
    TIMESTEP,
    TXT2IMG,
    ComponentSpec,
    Manifest,
    Size,
    TensorSpec,
)

# fp32 graphs agree with PyTorch to about 1e-6 on tiny models; full-size U-Nets accumulate more rounding across
# hundreds of kernels, so the gate allows 1e-3 of the output's magnitude before calling the export broken.
DEFAULT_TOLERANCE = 1e-3
# fp16 keeps 11 significant bits (4.9e-4 relative); across the depth of a U-Net the rounding adds up, so an fp16
# graph is held to 2e-2 of the output's magnitude per component, and judged as a whole on the decoded image.
FP16_TOLERANCE = 2e-2
# The least PSNR (dB, 0..1 images) of the fp16 pipeline's image against the fp32 pipeline's on the same latents: an
# overflow (inf/NaN) or a broken fusion lands far below; fp16 rounding alone stays far above.
DEFAULT_MIN_IMAGE_PSNR = 30.0
# Denoising steps of the image gate: enough for every component to run and the rounding to compound, few enough
# that a full-size model checks in minutes on a CPU.
IMAGE_PARITY_STEPS = 4
IMAGE_PARITY_PROMPT = "a photograph of an astronaut riding a horse"
# SDXL's time ids are pixel sizes and offsets; up to twice SDXL's 1024 covers what requests send, and values that
# large are what fp16 would round (the embedding of them must stay float32).
MAX_TIME_ID = 2048


class ParityError(RuntimeError):
    """An exported component's outputs drifted from PyTorch's beyond the tolerance."""


@dataclass(frozen=True)
class ParityResult:
    component: str
    max_abs_diff: float
    reference_scale: float
    tolerance: float

    @property
    def allowed(self) -> float:
        return self.tolerance * self.reference_scale

    @property
    def passed(self) -> bool:
        # A NaN difference (an overflow in fp16) never passes.
        return self.max_abs_diff <= self.allowed

    def to_dict(self) -> dict[str, float]:
        return {
            "max_abs_diff": self.max_abs_diff,
            "reference_scale": self.reference_scale,
            "tolerance": self.tolerance,
        }


def random_feeds(
    spec: ComponentSpec, vocab_size: int, num_train_timesteps: int, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def draw(t: TensorSpec) -> np.ndarray:
        if t.dtype.startswith("int"):
            return rng.integers(0, vocab_size, size=t.shape).astype(t.np_dtype)
        if t.name == TIMESTEP:
            return rng.uniform(0, num_train_timesteps - 1, size=t.shape).astype(t.np_dtype)
        if t.name == TIME_IDS:
            return rng.integers(0, MAX_TIME_ID, size=t.shape, endpoint=True).astype(t.np_dtype)
        return rng.standard_normal(t.shape).astype(t.np_dtype)

    return {t.name: draw(t) for t in spec.inputs}


@torch.no_grad()
def reference_outputs(module: nn.Module, spec: ComponentSpec, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """PyTorch's outputs on the feeds, float32, in the spec's order."""
    outputs = module(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs))
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs,)
    return [output.float().numpy() for output in outputs]


def check_parity(
    module: nn.Module, engine: Engine, feeds: dict[str, np.ndarray], tolerance: float = DEFAULT_TOLERANCE
) -> ParityResult:
    """Max |torch - runtime| over all outputs, against tolerance times the reference's magnitude (at least 1)."""
    return compare_outputs(engine, feeds, reference_outputs(module, engine.spec, feeds), tolerance)


def compare_outputs(
    engine: Engine, feeds: dict[str, np.ndarray], reference: Sequence[np.ndarray], tolerance: float
) -> ParityResult:
    spec = engine.spec
    actual = engine.run(feeds)
    diff, scale = 0.0, 1.0
    for t, ref in zip(spec.outputs, reference, strict=True):
        error = np.abs(actual[t.name].astype(np.float32) - ref)
        # An inf or NaN output (fp16 overflow) must fail the gate, and max() would drop a NaN.
        diff = max(diff, float(np.max(error)) if np.isfinite(error).all() else math.inf)
        scale = max(scale, float(np.max(np.abs(ref))))
    return ParityResult(spec.name, diff, scale, tolerance)


@dataclass(frozen=True)
class ImageParity:
    """How far one pipeline's decoded image is from another's on the same latents, as 0..1 images."""

    psnr_db: float
    mean_abs_diff: float
    max_abs_diff: float
    size: Size
    steps: int

    def describe(self) -> str:
        return f"PSNR {self.psnr_db:.1f} dB, mean |diff| {self.mean_abs_diff:.2e}, max |diff| {self.max_abs_diff:.2e}"

    def to_dict(self) -> dict:
        return {**asdict(self), "size": list(self.size)}


def compare_images(a: np.ndarray, b: np.ndarray, size: Size, steps: int) -> ImageParity:
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    mse = float(np.mean(diff**2))
    # A NaN image is as far as it gets; identical images have no finite PSNR: report the float64 ceiling.
    psnr = 0.0 if math.isnan(mse) else (10 * math.log10(1 / mse) if mse > 0 else 200.0)
    return ImageParity(psnr, float(np.mean(diff)), float(np.max(diff)), size, steps)


def image_parity(
    folder: Path,
    manifest: Manifest,
    fp32: Callable[[str], Sequence[Engine]],
    fp16: Callable[[str], Sequence[Engine]],
    size: Size,
    target: str,
) -> ImageParity:
    """Renders one request through the server's own pipeline on both sets of engines (made by component name, one
    pipeline at a time so only one is in memory), same seed and sampler."""
    from diffuserve.server.models import served_components, served_model
    from diffuserve.server.params import validate
    from diffuserve.server.pipeline import render

    def image(target: str, engines: Callable[[str], Sequence[Engine]]) -> np.ndarray:
        components = {c: tuple(engines(c)) for c in served_components(manifest)}
        served = served_model(folder, LoadedEngines(manifest, "cpu", target, components, (), ""))
        return render(served, validate(parity_request(manifest, size), {served.name: served}, served.name))

    reference = image(CPU_TARGET, fp32)
    return compare_images(reference, image(target, fp16), size, IMAGE_PARITY_STEPS)


def parity_request(manifest: Manifest, size: Size):
    """The image gate's request: one prompt, and for a model that only inpaints, an image and the half of it to
    repaint."""
    from diffuserve.v1 import diffusion_pb2 as pb

    request = pb.GenerateRequest(
        prompt=IMAGE_PARITY_PROMPT, seeds=[0], steps=IMAGE_PARITY_STEPS, width=size[0], height=size[1]
    )
    if TXT2IMG not in manifest.tasks:
        request.init_image, request.mask_image = parity_image_and_mask(size)
    return request


def parity_image_and_mask(size: Size) -> tuple[bytes, bytes]:
    """PNG bytes of a smooth colour gradient, and of a mask whose right half is white (repainted)."""
    from PIL import Image

    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), np.full(x.shape, 0.5)], axis=-1)
    mask = np.where(x >= width // 2, 255, 0)

    def png(pixels: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    return png(rgb * 255), png(mask)
