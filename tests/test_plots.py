"""bench --plot: a report of each mode draws to one readable PNG, gaps in the report included."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from PIL import Image

from diffuserve.server.metrics import MissingExtra
from diffuserve.server.tools import report
from diffuserve.server.tools.plots import plot_report

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="needs the plots extra (matplotlib)"
)

SERVER = {"model": "shapes", "backend": "cpu", "device": "test CPU", "precision": "fp32"}
SETTINGS = {"steps": 20, "scheduler": "euler", "guidance_scale": 3.0, "width": 64, "height": 64}
# Two panels at 12 inches by 100 dpi; a third (memory) adds 3.5 inches.
TWO_PANELS = (1200, 800)
THREE_PANELS = (1200, 1150)
# The colour of the error marks (matplotlib's "crimson"), which nothing else in the figure uses.
CRIMSON = (220, 20, 60)


def samples(count: int, queue_ms: float, errors: int = 0) -> list[report.Sample]:
    rng = np.random.default_rng(int(queue_ms))
    answered = []
    for i in range(count):
        stages = {
            "queue_ms": queue_ms * rng.uniform(0.5, 1.5),
            "text_encoder_ms": 4.0,
            "unet_ms": 60 + rng.uniform(0, 10),
            "unet_call_ms": 3.0,
            "sampler_ms": 2.0,
            "vae_decode_ms": 15.0,
            "image_encode_ms": 2.0,
        }
        stages["server_ms"] = sum(v for k, v in stages.items() if k != "unet_call_ms")
        answered.append(report.Sample(latency_ms=stages["server_ms"] + 1.5, done_s=i * 0.1, stages=stages))
    failed = [report.Sample(latency_ms=1.0, done_s=count * 0.1, error="RESOURCE_EXHAUSTED") for _ in range(errors)]
    return answered + failed


def sweep(memory: bool = False) -> dict:
    rows = [
        report.summarise(
            samples(20, queue_ms=clients * 5, errors=4 if clients == 8 else 0),
            wall_s=2.0,
            load={"kind": "clients", "value": clients},
            memory={"rss_mb": 300.0 + clients, "gpu_mb": None} if memory else None,
        )
        for clients in (1, 2, 4, 8)
    ]
    return report.new_report("closed", "in-process", SERVER, SETTINGS, rows)


def drawing(path, size: tuple[int, int]) -> np.ndarray:
    """The PNG's pixels, after checking it decodes at the expected size and holds a drawing rather than a blank."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == size
        pixels = np.asarray(image.convert("RGB"))
    packed = pixels.astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.uint32)
    colours = np.unique(packed)
    assert len(colours) > 50, f"only {len(colours)} colours: the figure looks empty"
    # The first panel's middle (lines, bars, grid) differs from the white background somewhere.
    height, width = pixels.shape[:2]
    panel = pixels[int(height * 0.1) : int(height * 0.35), int(width * 0.1) : int(width * 0.75)]
    assert (panel != 255).any(axis=2).mean() > 0.01
    return pixels


def crimson_pixels(pixels: np.ndarray) -> int:
    return int((pixels == CRIMSON).all(axis=2).sum())


@needs_matplotlib
def test_a_sweep_draws_latency_and_stages_with_its_failed_row_marked(tmp_path):
    path = tmp_path / "sweep.png"
    plot_report(sweep(), path)
    pixels = drawing(path, TWO_PANELS)
    assert crimson_pixels(pixels) > 10


@needs_matplotlib
def test_a_sweep_without_errors_has_no_error_marks(tmp_path):
    clean = sweep()
    for row in clean["rows"]:
        row["errors"] = {}
    plot_report(clean, tmp_path / "clean.png")
    assert crimson_pixels(drawing(tmp_path / "clean.png", TWO_PANELS)) == 0


@needs_matplotlib
def test_a_single_request_report_draws_its_percentiles(tmp_path):
    row = report.summarise(samples(10, queue_ms=0.0), 2.0, {"kind": "single", "value": 1}, None)
    plot_report(report.new_report("latency", "in-process", SERVER, SETTINGS, [row]), tmp_path / "latency.png")
    drawing(tmp_path / "latency.png", TWO_PANELS)


@needs_matplotlib
def test_a_report_per_task_draws_bars_per_task(tmp_path):
    rows = [
        report.summarise(
            samples(5, queue_ms=0.0, errors=int(task == "inpaint")), 2.0, {"kind": "task", "value": task}, None
        )
        for task in ("txt2img", "img2img", "inpaint")
    ]
    plot_report(report.new_report("tasks", "in-process", SERVER, SETTINGS, rows), tmp_path / "tasks.png")
    assert crimson_pixels(drawing(tmp_path / "tasks.png", TWO_PANELS)) > 10


@needs_matplotlib
def test_a_soak_adds_a_memory_panel(tmp_path):
    rows = [
        report.summarise(samples(10, queue_ms=1.0), 60.0, {"kind": "minute", "value": minute}, memory)
        for minute, memory in enumerate(
            ({"rss_mb": 400.0 + 5 * m, "gpu_mb": 900.0} for m in range(5)),
            start=1,
        )
    ]
    plot_report(report.new_report("soak", "in-process", SERVER, SETTINGS, rows), tmp_path / "soak.png")
    drawing(tmp_path / "soak.png", THREE_PANELS)


@needs_matplotlib
def test_a_sweep_that_followed_memory_shows_it(tmp_path):
    plot_report(sweep(memory=True), tmp_path / "memory.png")
    drawing(tmp_path / "memory.png", THREE_PANELS)


@needs_matplotlib
def test_missing_stages_and_figures_still_plot(tmp_path):
    rows = [
        # A client-side bench of a server that reports no stage times.
        report.summarise(
            [report.Sample(latency_ms=90.0 + i, done_s=i) for i in range(5)], 1.0, {"kind": "rate", "value": 0.5}, None
        ),
        # Every request failed: no latency, no throughput, no stages.
        report.summarise(
            [report.Sample(latency_ms=1.0, done_s=1.0, error="UNAVAILABLE")] * 3,
            0.0,
            {"kind": "rate", "value": 2},
            None,
        ),
        report.summarise(samples(5, queue_ms=3.0), 1.0, {"kind": "rate", "value": 8}, None),
    ]
    bare = report.new_report("open", "synthetic", {}, {}, rows)
    plot_report(bare, tmp_path / "gaps.png")
    drawing(tmp_path / "gaps.png", TWO_PANELS)

    no_stages = report.new_report("open", "synthetic", {}, {}, rows[:2])
    plot_report(no_stages, tmp_path / "no_stages.png")
    drawing(tmp_path / "no_stages.png", TWO_PANELS)


@needs_matplotlib
def test_write_outputs_plots_when_asked(tmp_path):
    path = tmp_path / "out.png"
    assert report.Outputs(plot=str(path)).write(sweep()) == [f"wrote {path}"]
    drawing(path, TWO_PANELS)


def test_without_matplotlib_the_error_names_the_extra(tmp_path, monkeypatch):
    # None in sys.modules makes the import fail as it does where matplotlib is not installed.
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(MissingExtra, match=r"bench --plot needs matplotlib: pip install 'diffuserve\[plots\]'"):
        plot_report(sweep(), tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()
