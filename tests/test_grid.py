"""`diffuserve grid`: the real CLI against a real server on a loopback port (the tiny model: 128x128, batches 1, 2)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffuserve.server.cli import main
from diffuserve.server.client import connection
from diffuserve.server.tools.grid import (
    GridSpec,
    SheetStyle,
    draw_sheet,
    grid_axes,
    make_grid,
    parse_steps,
    plan_cells,
    wrap,
)
from diffuserve.server.tools.grid import font as grid_font

from .serving_helpers import serving

PROMPT = "a red circle on a blue background"
# Long enough that the cells sent together always meet in the batcher, however slow the machine.
BATCH_WAIT_MS = 200.0


@pytest.fixture(scope="module")
def grid_server(tiny_model):
    with serving(tiny_model, max_batch_wait_ms=BATCH_WAIT_MS) as (server, _, _):
        yield server


@pytest.fixture(scope="module")
def grid_2x3(grid_server, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rows steps 2 and 3, columns seeds 1, 2, 3: the sheet, the cells and grid.json under one folder."""
    out = tmp_path_factory.mktemp("grid")
    args = ["grid", PROMPT, "--server", grid_server.address, "--steps", "2,3", "--seeds", "1,2,3"]
    assert main([*args, "-o", str(out / "grid.png"), "--cells", str(out / "cells")]) == 0
    return out


def report(folder: Path) -> dict:
    return json.loads((folder / "cells" / "grid.json").read_text())


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_each_cell_is_the_image_a_single_generate_gives(grid_server, grid_2x3: Path, tmp_path: Path) -> None:
    for steps, seed in (("2", "1"), ("3", "2"), ("3", "3")):
        single = tmp_path / f"single-{steps}-{seed}.png"
        args = ["generate", PROMPT, "--server", grid_server.address, "--steps", steps, "--seed", seed]
        assert main([*args, "-o", str(single)]) == 0
        # Byte for byte: the server is deterministic per seed, batched or not, metadata included.
        assert (grid_2x3 / "cells" / f"steps{steps}_seed{seed}.png").read_bytes() == single.read_bytes()
    # The cells differ from each other, so equality above is not trivial.
    cells = [pixels(Image.open(grid_2x3 / "cells" / f"steps3_seed{s}.png")) for s in (1, 2)]
    assert not np.array_equal(*cells)


def test_the_sheet_holds_each_cell_in_its_row_and_column(grid_2x3: Path) -> None:
    sheet = Image.open(grid_2x3 / "grid.png")
    entries = report(grid_2x3)["cells"]
    assert len(entries) == 6 and report(grid_2x3)["scale"] == 1
    lefts = sorted({e["box"][0] for e in entries})
    tops = sorted({e["box"][1] for e in entries})
    assert len(lefts) == 3 and len(tops) == 2
    for entry in entries:
        left, top, right, bottom = entry["box"]
        assert (right - left, bottom - top) == (128, 128)
        assert 0 <= left and right <= sheet.width and 0 <= top and bottom <= sheet.height
        # Columns are the seeds, rows the steps, in the order given.
        assert lefts[entry["column"]] == left and tops[entry["row"]] == top
        assert entry["seed"] == (1, 2, 3)[entry["column"]]
        assert entry["settings"]["steps"] == (2, 3)[entry["row"]]
        cell = pixels(Image.open(grid_2x3 / "cells" / entry["file"]))
        assert np.array_equal(pixels(sheet.crop(entry["box"])), cell)
    assert sheet.width >= 3 * 128 and sheet.height >= 2 * 128


def test_titles_and_the_caption_are_drawn(grid_2x3: Path) -> None:
    sheet = pixels(Image.open(grid_2x3 / "grid.png")).min(axis=2)
    boxes = [e["box"] for e in report(grid_2x3)["cells"]]
    grid_left, grid_top = min(b[0] for b in boxes), min(b[1] for b in boxes)
    dark = 100  # text is black on white; anti-aliased edges are lighter, its strokes' cores are dark
    column_titles = sheet[grid_top - 30 : grid_top - 2, grid_left:]
    row_titles = sheet[grid_top:, : grid_left - 2]
    caption = sheet[: grid_top - 30, :]
    for strip in (column_titles, row_titles, caption):
        assert (strip < dark).sum() > 50


def test_a_cell_scaled_up_on_the_sheet_is_the_cell_repeated(grid_2x3: Path) -> None:
    spec = GridSpec(PROMPT, steps=(2, 3), seed=(1, 2, 3))
    axes = grid_axes(spec)
    cells = plan_cells(spec, axes)
    entries = report(grid_2x3)["cells"]
    images = [Image.open(grid_2x3 / "cells" / e["file"]) for e in entries]
    sheet = draw_sheet(images, cells, axes, ["prompt: " + PROMPT, "fixed"], SheetStyle(min_cell_px=300))
    assert sheet.scale == 3
    for image, box in zip(images, sheet.boxes, strict=True):
        shown = pixels(sheet.image.crop(box))
        assert np.array_equal(shown, pixels(image).repeat(3, axis=0).repeat(3, axis=1))


def test_cells_carry_their_settings_and_grid_json_lists_them(grid_2x3: Path) -> None:
    listing = report(grid_2x3)
    assert listing["columns"] == "seed" and listing["rows"] == ["steps"]
    assert listing["axes"] == {"steps": [2, 3], "seed": [1, 2, 3]}
    files = {e["file"] for e in listing["cells"]}
    assert files == {f"steps{s}_seed{seed}.png" for s in (2, 3) for seed in (1, 2, 3)}
    for entry in listing["cells"]:
        parameters = Image.open(grid_2x3 / "cells" / entry["file"]).text["parameters"]
        settings = entry["settings"]
        assert parameters.startswith(PROMPT + "\n")
        assert f"Steps: {settings['steps']}," in parameters and f"Seed: {entry['seed']}," in parameters
        assert settings["width"] == settings["height"] == 128
        assert entry["timings"]["total_ms"] > 0 and entry["latency_ms"] > 0
    assert listing["summary"]["cells"] == 6


def test_cells_sent_together_are_batched_by_the_server(grid_2x3: Path) -> None:
    # Six cells in flight at once, three per step count, a batch of at most 2 on the tiny export.
    assert 1 < report(grid_2x3)["summary"]["mean_batch_size"] <= 2


def test_one_call_in_flight_is_never_batched(grid_server, tmp_path: Path, capsys) -> None:
    args = ["grid", PROMPT, "--server", grid_server.address, "--steps", "2", "--seeds", "1,2,3", "--concurrency", "1"]
    assert main([*args, "-o", str(tmp_path / "grid.png"), "--cells", str(tmp_path / "cells")]) == 0
    assert report(tmp_path)["summary"]["mean_batch_size"] == 1
    out = capsys.readouterr().out
    assert "3 cells in" in out and "mean batch 1.00" in out and "latency p50" in out


def test_three_varied_settings_nest_in_the_rows(grid_server, tmp_path: Path) -> None:
    args = ["grid", PROMPT, "--server", grid_server.address, "--steps", "2,3", "--guidance", "1,4", "--seeds", "5,6"]
    assert main([*args, "-o", str(tmp_path / "grid.png"), "--cells", str(tmp_path / "cells")]) == 0
    listing = report(tmp_path)
    assert listing["columns"] == "seed" and listing["rows"] == ["steps", "guidance"]
    for entry in listing["cells"]:
        steps, guidance = entry["settings"]["steps"], entry["settings"]["guidance_scale"]
        assert entry["row"] == 2 * [2, 3].index(steps) + [1.0, 4.0].index(guidance)
        assert entry["file"] == f"steps{steps}_guidance{guidance:g}_seed{entry['seed']}.png"
    sheet = Image.open(tmp_path / "grid.png")
    assert len({tuple(e["box"][1::2]) for e in listing["cells"]}) == 4  # four rows
    assert sheet.height > 4 * 128


def test_the_column_setting_can_be_chosen(grid_server, tmp_path: Path) -> None:
    args = ["grid", PROMPT, "--server", grid_server.address, "--steps", "2,3", "--seeds", "5,6", "--columns", "steps"]
    assert main([*args, "-o", str(tmp_path / "grid.png"), "--cells", str(tmp_path / "cells")]) == 0
    listing = report(tmp_path)
    assert listing["columns"] == "steps" and listing["rows"] == ["seed"]
    assert all(e["column"] == e["settings"]["steps"] - 2 for e in listing["cells"])


def test_without_seeds_every_cell_shares_one(grid_server, tmp_path: Path) -> None:
    args = ["grid", PROMPT, "--server", grid_server.address, "--steps", "2,3"]
    assert main([*args, "-o", str(tmp_path / "grid.png"), "--cells", str(tmp_path / "cells")]) == 0
    listing = report(tmp_path)
    assert listing["columns"] == "steps" and listing["rows"] == []
    assert len({e["seed"] for e in listing["cells"]}) == 1


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--steps", "20,x", "--steps: a comma-separated list of integers, got '20,x'"),
        ("--steps", "0,4", "--steps: each at least 1"),
        ("--steps", "4,4", "--steps: 4 is listed twice"),
        ("--seeds", "1,-2", "--seeds: each in 0..18446744073709551615"),
        ("--guidance", "3,much", "--guidance: a comma-separated list of numbers"),
        ("--guidance", "3,nan", "--guidance: finite numbers"),
        ("--scheduler", "ddim,nope", "--scheduler: 'nope' is not a sampler; the samplers are ddim, pndm, euler"),
        ("--columns", "guidance", "--columns: guidance does not vary"),
        ("--concurrency", "0", "--concurrency: at least 1, got 0"),
    ],
)
def test_a_bad_list_is_refused_naming_the_flag(
    grid_server, tmp_path: Path, capsys, flag: str, value: str, message: str
) -> None:
    args = ["grid", PROMPT, "--server", grid_server.address, "--steps", "2,3", flag, value]
    assert main([*args, "-o", str(tmp_path / "grid.png")]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_refused_cell_fails_the_grid_naming_the_field_and_writes_nothing(
    grid_server, tmp_path: Path, capsys
) -> None:
    args = ["grid", PROMPT, "--server", grid_server.address, "--steps", "2,151", "--seeds", "1,2"]
    assert main([*args, "-o", str(tmp_path / "grid.png"), "--cells", str(tmp_path / "cells")]) == 1
    err = capsys.readouterr().err
    # Either refused cell may answer first.
    assert re.search(
        r"cell steps 151, seed [12]: INVALID_ARGUMENT: steps: must be in 1\.\.150, got 151; nothing written", err
    )
    assert not list(tmp_path.iterdir())


def test_the_module_draws_a_grid_without_the_cli(grid_server, tmp_path: Path) -> None:
    spec = GridSpec(PROMPT, steps=parse_steps("2"), seed=(1, 2))
    run, sheet = make_grid(connection(grid_server.address), spec, tmp_path / "grid.png")
    assert [r.response.images[0].seed for r in run.results] == [1, 2]
    assert Image.open(tmp_path / "grid.png").size == sheet.image.size
    assert not (tmp_path / "cells").exists()
    # Nothing varied: one cell, no titles.
    run, sheet = make_grid(
        connection(grid_server.address), GridSpec(PROMPT, steps=(2,), seed=(4,)), tmp_path / "1.png"
    )
    assert len(run.results) == 1 and len(sheet.boxes) == 1


def test_a_grid_has_a_bounded_number_of_cells() -> None:
    spec = GridSpec(PROMPT, steps=tuple(range(1, 20)), seed=tuple(range(14)))
    with pytest.raises(ValueError, match="a grid of at most 256 cells; these lists make 266"):
        plan_cells(spec, grid_axes(spec))


def test_long_text_wraps_within_the_width() -> None:
    face = grid_font(14)
    lines = wrap("a prompt " * 30 + "dpmpp_2m_sde_karras" * 5, face, 120)
    assert len(lines) > 5 and all(face.getlength(line) <= 120 for line in lines)
    assert "".join(lines).replace(" ", "") == ("a prompt " * 30 + "dpmpp_2m_sde_karras" * 5).replace(" ", "")
