"""The shapes grammar and the analytic classifier that grades the bundled model."""

from __future__ import annotations

import numpy as np
import pytest

from diffuserve.server.tools.shapes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    classify,
    describe,
    random_scene,
    render,
)


def test_classifier_reads_every_rendered_scene_correctly() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        scene = random_scene(rng)
        reading = classify(render(scene, 64))
        assert (reading.shape, reading.fg, reading.bg) == (scene.shape, scene.fg, scene.bg), (scene, reading)


def test_classifier_tolerates_blurred_edges_and_noise() -> None:
    """Decoded images have soft edges and speckle; the reading must not hinge on crisp pixels."""
    rng = np.random.default_rng(1)
    kernel = np.array([1, 2, 1], np.float32) / 4
    right = 0
    for _ in range(300):
        scene = random_scene(rng)
        image = render(scene, 64).astype(np.float32)
        for axis in (0, 1):
            padded = np.pad(image, [(1, 1) if a == axis else (0, 0) for a in range(3)], mode="edge")
            image = np.apply_along_axis(lambda line: np.convolve(line, kernel, mode="valid"), axis, padded)
        image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
        reading = classify(image)
        right += (reading.shape, reading.fg, reading.bg) == (scene.shape, scene.fg, scene.bg)
    assert right / 300 >= 0.97


@pytest.mark.parametrize("shape", SHAPES)
def test_fill_ratio_of_each_shape_is_near_its_ideal(shape: str) -> None:
    reading = classify(render(Scene(shape, "red", "blue", "large"), 128))
    assert reading.fill_ratio == pytest.approx({"triangle": 0.5, "circle": np.pi / 4, "square": 1.0}[shape], abs=0.03)


def test_a_flat_image_has_no_shape() -> None:
    assert classify(np.full((64, 64, 3), COLOURS["green"], np.uint8)).shape == "none"


def test_grammar_covers_every_word_in_varied_wordings() -> None:
    rng = np.random.default_rng(2)
    prompts = [describe(random_scene(rng), rng) for _ in range(2000)]
    text = " ".join(prompts)
    for word in (*COLOURS, *SHAPES, "small", "large", *POSITIONS):
        assert word in text
    assert len({p.split()[0] for p in prompts}) >= 5  # several sentence shapes, not one template
    assert " a orange" not in text and " an orange" in text


def test_foreground_and_background_always_differ() -> None:
    rng = np.random.default_rng(3)
    assert all(s.fg != s.bg for s in (random_scene(rng) for _ in range(1000)))


def test_positions_keep_shapes_inside_the_image() -> None:
    for size in SIZES:
        for position in POSITIONS:
            mask = render(Scene("square", "red", "blue", size, position), 64)[..., 0] == COLOURS["red"][0]
            assert mask.any() and not (mask[0].all() or mask[:, 0].all())
