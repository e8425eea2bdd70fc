"""The shapes world of the bundled model: its prompt grammar, a renderer for training, and an analytic classifier.

Training draws scenes from here and evaluation reads generated images back with the same definitions, so what the
model was taught and what it is graded on cannot drift apart. numpy only: evaluation runs on the served pipeline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 140, 20),
    "purple": (140, 40, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
# Side (or diameter) as a fraction of the image; no size word means medium.
SIZES: dict[str, float] = {"small": 0.4, "medium": 0.55, "large": 0.72}
# Where the shape's bounding box sits, as the fraction of free space to its left and above it.
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "top left": (0.1, 0.1),
    "top right": (0.9, 0.1),
    "bottom left": (0.1, 0.9),
    "bottom right": (0.9, 0.9),
}
# Fill of the bounding box for each ideal shape: triangle 1/2, circle pi/4, square 1. The classifier splits halfway.
FILL_RATIOS = {"triangle": 0.5, "circle": np.pi / 4, "square": 1.0}
_FILL_BOUNDS = (
    (FILL_RATIOS["triangle"] + FILL_RATIOS["circle"]) / 2,
    (FILL_RATIOS["circle"] + FILL_RATIOS["square"]) / 2,
)

TEMPLATES = (
    "a {size}{fg} {shape}{pos} on a {bg} background",
    "{size}{fg} {shape}{pos}, {bg} background",
    "a {size}{fg} {shape}{pos} on {bg}",
    "a picture of a {size}{fg} {shape}{pos} on a {bg} background",
    "{bg} background with a {size}{fg} {shape}{pos}",
)
POSITION_PHRASES = ("at the {pos}", "in the {pos}")


@dataclass(frozen=True)
class Scene:
    shape: str
    fg: str
    bg: str
    size: str = "medium"
    position: str = "center"


def random_scene(rng: np.random.Generator) -> Scene:
    colours = list(COLOURS)
    fg, bg = rng.choice(len(colours), size=2, replace=False)
    return Scene(
        shape=SHAPES[rng.integers(len(SHAPES))],
        fg=colours[fg],
        bg=colours[bg],
        size=list(SIZES)[rng.integers(len(SIZES))],
        position=list(POSITIONS)[rng.integers(len(POSITIONS))],
    )


def describe(scene: Scene, rng: np.random.Generator) -> str:
    """One of several wordings; the default size and position are usually left unsaid, as people do."""
    size = "" if scene.size == "medium" and rng.random() < 0.8 else f"{scene.size} "
    pos = ""
    if scene.position != "center" or rng.random() < 0.2:
        pos = " " + POSITION_PHRASES[rng.integers(len(POSITION_PHRASES))].format(pos=scene.position)
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    text = template.format(size=size, fg=scene.fg, shape=scene.shape, pos=pos, bg=scene.bg)
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def shape_mask(scene: Scene, image_size: int) -> np.ndarray:
    """Boolean [H, W] mask of the shape, sampled at pixel centres."""
    side = SIZES[scene.size] * image_size
    free = image_size - side
    fx, fy = POSITIONS[scene.position]
    left, top = free * fx, free * fy
    y, x = np.mgrid[0:image_size, 0:image_size] + 0.5
    u, v = (x - left) / side, (y - top) / side  # 0..1 inside the bounding box
    inside_box = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if scene.shape == "square":
        return inside_box
    if scene.shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if scene.shape == "triangle":  # apex up: the half-width grows linearly from the apex to the base
        return inside_box & (np.abs(u - 0.5) <= v / 2)
    raise ValueError(f"shape must be one of {SHAPES}, got {scene.shape!r}")


def render(scene: Scene, image_size: int) -> np.ndarray:
    """uint8 [H, W, 3]."""
    image = np.empty((image_size, image_size, 3), np.uint8)
    image[:] = COLOURS[scene.bg]
    image[shape_mask(scene, image_size)] = COLOURS[scene.fg]
    return image


@dataclass(frozen=True)
class Reading:
    """What the classifier sees in an image."""

    shape: str
    fg: str
    bg: str
    fill_ratio: float


_PALETTE = np.array(list(COLOURS.values()), np.float32)
_NAMES = list(COLOURS)


def nearest_colour(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(np.sum((_PALETTE - rgb) ** 2, axis=1)))]


def majority(mask: np.ndarray) -> np.ndarray:
    """3x3 majority vote: drops stray pixels that would stretch the bounding box, keeps solid regions."""
    padded = np.pad(mask, 1).astype(np.uint8)
    h, w = mask.shape
    votes = sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))
    return votes >= 5


def classify(image: np.ndarray) -> Reading:
    """Background from the border, foreground from the pixels nearer another colour, shape from the box's fill."""
    pixels = image.astype(np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    bg = nearest_colour(np.median(border, axis=0))
    distance_to_bg = np.sqrt(np.sum((pixels - np.array(COLOURS[bg], np.float32)) ** 2, axis=-1))
    # Far from the background colour: a third of the way to the nearest other palette colour is clear of JPEG-like
    # noise and of the blur the VAE leaves at edges.
    candidates = distance_to_bg > 60
    if candidates.sum() == 0:
        return Reading("none", "none", bg, 0.0)
    fg = nearest_colour(np.median(pixels[candidates], axis=0))
    fg_rgb, bg_rgb = np.array(COLOURS[fg], np.float32), np.array(COLOURS[bg], np.float32)
    mask = majority(np.sum((pixels - fg_rgb) ** 2, axis=-1) < np.sum((pixels - bg_rgb) ** 2, axis=-1))
    if not mask.any():
        return Reading("none", fg, bg, 0.0)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box_area = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    fill = float(mask.sum() / box_area)
    shape = "triangle" if fill < _FILL_BOUNDS[0] else "circle" if fill < _FILL_BOUNDS[1] else "square"
    return Reading(shape, fg, bg, fill)
