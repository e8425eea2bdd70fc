"""`diffuserve grid`: every combination of a few settings, drawn concurrently over gRPC and laid out on one contact
sheet whose rows and columns are titled by their values, with the settings held fixed in a caption.

The flow: parse the lists -> plan the cells -> one request per cell (exactly what `diffuserve generate` sends for those
settings) -> run them concurrently over one channel -> lay out the sheet -> write it (and the cells as sent).
"""

from __future__ import annotations

import io
import itertools
import json
import math
import queue
import secrets
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from PIL import Image, ImageDraw, ImageFont

from diffuserve.v1 import diffusion_pb2 as pb
from diffuserve.v1 import diffusion_pb2_grpc as pb_grpc

from ..client import ClientRequest, Connection, float32_decimal
from ..params import RANDOM_SEED_BITS, noise_mode_name, scheduler_name
from ..schedulers import SAMPLERS

# The settings a grid can vary, in the order rows are nested (the first varies slowest) and cell files are named.
AXES = ("steps", "guidance", "scheduler", "seed")
# The flag that lists each axis's values, for error messages.
AXIS_FLAGS = {"steps": "--steps", "guidance": "--guidance", "scheduler": "--scheduler", "seed": "--seeds"}
# Calls in flight at once: enough to fill the batches servers are usually exported with (1-4 images) twice over, so
# the batcher always finds company, and far below the server's default queue capacity (64), so one grid never fills
# the queue other clients share. A refused call (RESOURCE_EXHAUSTED) is retried by the channel's retry policy.
DEFAULT_CONCURRENCY = 8
# 16 x 16 cells: a sheet of 512-pixel cells is then 8192 pixels a side (about 200 MB in memory); beyond that a grid is
# almost surely a typo in a list.
MAX_CELLS = 256
# Light grey: visible around a white cell, quieter than the black text.
FRAME_COLOUR = (200, 200, 200)
# uint64 on the wire.
MAX_SEED = 2**64 - 1


class GridError(RuntimeError):
    """A grid that cannot be drawn: a cell the server refused (its message names the field), or no server answered."""


@dataclass(frozen=True)
class GridSpec:
    """What to draw. An empty tuple leaves that setting to the server (its default), the same in every cell."""

    prompt: str
    negative_prompt: str = ""
    model: str = ""
    width: int = 0
    height: int = 0
    noise_mode: str = ""
    steps: tuple[int, ...] = ()
    guidance: tuple[float, ...] = ()
    scheduler: tuple[str, ...] = ()
    seed: tuple[int, ...] = ()
    # The axis laid out as columns; "": the seeds when they vary, else the last varied axis.
    columns: str = ""

    def values(self, axis: str) -> tuple:
        """The axis's values; (None,) when it is left to the server."""
        return getattr(self, axis) or (None,)

    @property
    def varied(self) -> tuple[str, ...]:
        return tuple(axis for axis in AXES if len(getattr(self, axis)) > 1)


@dataclass(frozen=True)
class GridAxes:
    """Which varied axis runs along the columns, and which along the rows (nested, the first slowest)."""

    column: str | None
    rows: tuple[str, ...]


@dataclass(frozen=True)
class Cell:
    row: int
    column: int
    steps: int | None
    guidance: float | None
    scheduler: str | None
    seed: int

    def value(self, axis: str):
        return getattr(self, axis)


@dataclass(frozen=True)
class CellResult:
    cell: Cell
    response: pb.GenerateResponse
    # Client-side: from sending the call to its answer, queueing and retries included.
    latency_s: float


@dataclass(frozen=True)
class SheetStyle:
    # Cells smaller than this (the bundled model's 64x64) are scaled up by a whole factor with nearest-neighbour, so
    # titles fit above them and no detail is invented.
    min_cell_px: int = 128
    # Between cells, so each reads as its own image.
    gap_px: int = 4
    # The caption is wrapped to at least this width, however narrow the grid.
    min_text_width_px: int = 480
    # A row title wider than this wraps.
    max_row_title_px: int = 240
    # A longer prompt is cut, with an ellipsis: the whole prompt is in each cell's metadata and in grid.json.
    max_prompt_lines: int = 6


@dataclass(frozen=True)
class Sheet:
    image: Image.Image
    # Each cell's place on the sheet (left, top, right, bottom), in the order of the cells.
    boxes: tuple[tuple[int, int, int, int], ...]
    scale: int


@dataclass(frozen=True)
class GridRun:
    results: tuple[CellResult, ...]
    wall_s: float
    concurrency: int

    @property
    def mean_batch_size(self) -> float:
        return statistics.fmean(r.response.timings.batch_size for r in self.results)

    @property
    def p50_latency_s(self) -> float:
        return statistics.median(r.latency_s for r in self.results)


# 1. Parse the lists.
def parse_list(text: str, flag: str, kind: str, convert: Callable[[str], object]) -> tuple:
    """A comma-separated list, each item converted; ValueError naming the flag, what it takes and the text given."""
    items = [item.strip() for item in text.split(",")] if text.strip() else []
    try:
        values = tuple(convert(item) for item in items)
    except ValueError:
        raise ValueError(f"{flag}: a comma-separated list of {kind}, got {text!r}") from None
    repeated = [item for item, value in zip(items, values, strict=True) if values.count(value) > 1]
    if repeated:
        raise ValueError(f"{flag}: {repeated[0]} is listed twice; each value once, got {text!r}")
    return values


def parse_steps(text: str) -> tuple[int, ...]:
    steps = parse_list(text, "--steps", "integers", int)
    if any(s < 1 for s in steps):
        raise ValueError(f"--steps: each at least 1, got {text!r}")
    return steps


def parse_seeds(text: str) -> tuple[int, ...]:
    seeds = parse_list(text, "--seeds", "integers", int)
    if any(not 0 <= s <= MAX_SEED for s in seeds):
        raise ValueError(f"--seeds: each in 0..{MAX_SEED}, got {text!r}")
    return seeds


def parse_guidance(text: str) -> tuple[float, ...]:
    guidance = parse_list(text, "--guidance", "numbers", float)
    if any(not math.isfinite(g) for g in guidance):
        raise ValueError(f"--guidance: finite numbers, got {text!r}")
    return guidance


def parse_schedulers(text: str) -> tuple[str, ...]:
    names = parse_list(text, "--scheduler", "sampler names", str)
    unknown = [name for name in names if name not in SAMPLERS]
    if unknown:
        raise ValueError(f"--scheduler: {unknown[0]!r} is not a sampler; the samplers are {', '.join(SAMPLERS)}")
    return names


def grid_axes(spec: GridSpec) -> GridAxes:
    """Columns: the chosen axis, else the seeds when they vary, else the last varied axis; rows: the other varied."""
    varied = spec.varied
    if spec.columns and spec.columns not in varied:
        raise ValueError(
            f"--columns: {spec.columns} does not vary; give {AXIS_FLAGS.get(spec.columns, spec.columns)} two or more "
            f"values, or choose one of the varied settings ({', '.join(varied) or 'none'})"
        )
    column = spec.columns or ("seed" if "seed" in varied else (varied[-1] if varied else None))
    return GridAxes(column, tuple(axis for axis in varied if axis != column))


# 2. The cells.
def with_seed(spec: GridSpec) -> GridSpec:
    """Without --seeds every cell shares one seed, drawn here: a grid compares settings on the same noise."""
    return spec if spec.seed else replace(spec, seed=(secrets.randbelow(2**RANDOM_SEED_BITS),))


def plan_cells(spec: GridSpec, axes: GridAxes) -> list[Cell]:
    """Every combination, row by row, the column setting changing fastest. With the seeds along the columns (the
    default) the calls sent together share steps, sampler and size, so the server's batcher runs them together."""
    if not spec.seed:
        raise ValueError("seed: a grid needs its seeds (with_seed draws one when none are given)")
    columns = spec.values(axes.column) if axes.column else (None,)
    count = math.prod(len(spec.values(axis)) for axis in AXES)
    if count > MAX_CELLS:
        raise ValueError(f"a grid of at most {MAX_CELLS} cells; these lists make {count}")
    cells = []
    for row, row_values in enumerate(itertools.product(*(spec.values(axis) for axis in axes.rows))):
        for column, column_value in enumerate(columns):
            chosen = dict(zip(axes.rows, row_values, strict=True))
            if axes.column:
                chosen[axes.column] = column_value
            settings = {axis: chosen.get(axis, spec.values(axis)[0]) for axis in AXES}
            cells.append(Cell(row, column, **settings))
    return cells


# 3. The requests.
def cell_request(spec: GridSpec, cell: Cell) -> pb.GenerateRequest:
    """What `diffuserve generate` sends for the cell's settings (one --seed), as a PNG with its settings inside."""
    return ClientRequest(
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        model=spec.model,
        seeds=(cell.seed,),
        steps=cell.steps or 0,
        guidance_scale=cell.guidance,
        scheduler=cell.scheduler or "",
        noise_mode=spec.noise_mode,
        width=spec.width,
        height=spec.height,
        output_format="png",
        embed_metadata=True,
    ).to_proto()


# 4. Run them concurrently.
def run_cells(
    link: Connection,
    spec: GridSpec,
    cells: Sequence[Cell],
    concurrency: int = DEFAULT_CONCURRENCY,
    timeout_s: float | None = None,
) -> GridRun:
    """Every cell over one channel, at most `concurrency` in flight. gRPC's own futures rather than a thread per call:
    the first refusal cancels the calls still running (the server drops them before their next step), and the grid
    fails with the server's message."""
    if concurrency < 1:
        raise ValueError(f"--concurrency: at least 1, got {concurrency}")
    answered: queue.SimpleQueue[tuple[int, float]] = queue.SimpleQueue()
    in_flight: dict[int, tuple[grpc.Future, float]] = {}
    results: list[CellResult | None] = [None] * len(cells)
    waiting = iter(range(len(cells)))
    start = time.perf_counter()
    with link.channel() as channel:
        generate = pb_grpc.DiffusionServiceStub(channel).Generate

        def send(index: int) -> None:
            call = generate.future(cell_request(spec, cells[index]), timeout=timeout_s, metadata=link.metadata)
            in_flight[index] = (call, time.perf_counter())
            call.add_done_callback(lambda _, index=index: answered.put((index, time.perf_counter())))

        try:
            for index in itertools.islice(waiting, concurrency):
                send(index)
            while in_flight:
                index, done = answered.get()
                call, sent = in_flight.pop(index)
                try:
                    results[index] = CellResult(cells[index], call.result(), done - sent)
                except grpc.RpcError as error:
                    raise GridError(
                        f"cell {cell_name(cells[index], spec)}: {error.code().name}: {error.details()}"
                    ) from None
                for following in itertools.islice(waiting, 1):
                    send(following)
        finally:
            for call, _ in in_flight.values():
                call.cancel()
    return GridRun(tuple(r for r in results if r is not None), time.perf_counter() - start, concurrency)


def cell_name(cell: Cell, spec: GridSpec) -> str:
    """The cell's varied settings, as in its title: "steps 20, seed 1"."""
    axes = spec.varied or ("seed",)
    return ", ".join(f"{axis} {format_value(cell.value(axis))}" for axis in axes)


def format_value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# 5. Lay out the sheet.
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled scalable font: no system font needed."""
    return ImageFont.load_default(size=size)


def wrap(text: str, face, width: float) -> list[str]:
    """Lines of at most `width` pixels, broken at spaces; a word longer than a line is broken where it must be."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if face.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        *whole, line = split_word(word, face, width)
        lines.extend(whole)
    return [*lines, line] if line or not lines else lines


def split_word(word: str, face, width: float) -> list[str]:
    """A word in pieces of at most `width` pixels (at least one character each)."""
    pieces = []
    while len(word) > 1 and face.getlength(word) > width:
        cut = 1
        while cut < len(word) - 1 and face.getlength(word[: cut + 1]) <= width:
            cut += 1
        pieces.append(word[:cut])
        word = word[cut:]
    return [*pieces, word]


def wrap_parts(parts: Sequence[str], face, width: float) -> list[str]:
    """Parts joined by " · " as far as they fit on a line, so a line breaks between settings, not inside one."""
    lines: list[str] = []
    for part in parts:
        candidate = f"{lines[-1]} · {part}" if lines else part
        if lines and face.getlength(candidate) <= width:
            lines[-1] = candidate
        else:
            lines.extend(wrap(part, face, width))
    return lines or [""]


def row_title(axes: GridAxes, cells: Sequence[Cell], row: int) -> list[str]:
    """The row's settings, one part each: ["steps 20", "guidance 7.5"]."""
    cell = next(c for c in cells if c.row == row)
    return [f"{axis} {format_value(cell.value(axis))}" for axis in axes.rows]


def column_title(axes: GridAxes, cells: Sequence[Cell], column: int) -> str:
    cell = next(c for c in cells if c.column == column)
    return f"{axes.column} {format_value(cell.value(axes.column))}" if axes.column else ""


def caption(spec: GridSpec, axes: GridAxes, first: pb.GenerateResponse, scale: int = 1) -> list[str]:
    """The settings every cell shares, as the server resolved them (its defaults included): prompt, negative prompt,
    then one line of model, size and the fixed sampler, steps, guidance, seed and noise mode."""
    varied = {axes.column, *axes.rows}
    image = first.images[0]
    size = f"{image.width}x{image.height}" + (f" (shown at {scale}x)" if scale > 1 else "")
    fixed = [f"model {first.model}", size]
    if "scheduler" not in varied:
        fixed.append(f"scheduler {scheduler_name(first.scheduler)}")
    if "steps" not in varied:
        fixed.append(f"{first.steps} steps")
    if "guidance" not in varied:
        fixed.append(f"guidance {float32_decimal(first.guidance_scale):g}")
    if "seed" not in varied:
        fixed.append(f"seed {image.seed}")
    fixed.append(f"noise {noise_mode_name(first.noise_mode)}")
    lines = [f"prompt: {spec.prompt}"]
    if spec.negative_prompt:
        lines.append(f"negative: {spec.negative_prompt}")
    return [*lines, " · ".join(fixed)]


def cell_scale(size: tuple[int, int], style: SheetStyle) -> int:
    """The whole factor that brings the smaller side of a cell to at least style.min_cell_px."""
    return max(1, math.ceil(style.min_cell_px / min(size)))


def draw_sheet(
    images: Sequence[Image.Image],
    cells: Sequence[Cell],
    axes: GridAxes,
    caption_lines: Sequence[str],
    style: SheetStyle = SheetStyle(),
) -> Sheet:
    """The contact sheet: the caption, column titles above, row titles to the left, the cells in their places."""
    width, height = images[0].size
    scale = cell_scale(images[0].size, style)
    cell_w, cell_h = width * scale, height * scale
    # Text an eighth of a cell wide per character height, between the smallest that stays legible (12 px) and one
    # that leaves the room to the cells (24 px); lines 1.3 times the glyphs' height, as a word processor spaces them.
    face = font(max(12, min(24, cell_w // 8)))
    line_h = math.ceil(face.getbbox("Ag")[3] * 1.3)
    pad = line_h // 2
    rows = 1 + max(c.row for c in cells)
    columns = 1 + max(c.column for c in cells)

    row_titles = [wrap_parts(row_title(axes, cells, r), face, style.max_row_title_px) for r in range(rows)]
    row_title_w = (max(face.getlength(line) for t in row_titles for line in t) + pad) if axes.rows else 0
    row_title_w = math.ceil(row_title_w)
    column_titles = [wrap(column_title(axes, cells, c), face, cell_w) for c in range(columns)]
    column_title_h = (max(map(len, column_titles)) * line_h + pad // 2) if axes.column else 0
    grid_w = row_title_w + columns * cell_w + (columns - 1) * style.gap_px
    text_w = max(grid_w, style.min_text_width_px)
    caption_wrapped = caption_text(caption_lines, face, text_w, style.max_prompt_lines)

    top = pad + len(caption_wrapped) * line_h + pad + column_title_h
    left = pad + row_title_w
    sheet = Image.new("RGB", (2 * pad + text_w, top + rows * cell_h + (rows - 1) * style.gap_px + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(caption_wrapped):
        draw.text((pad, pad + i * line_h), line, fill="black", font=face)

    boxes = []
    for cell, image in zip(cells, images, strict=True):
        x = left + cell.column * (cell_w + style.gap_px)
        y = top + cell.row * (cell_h + style.gap_px)
        shown = image.convert("RGB")
        if scale > 1:
            shown = shown.resize((cell_w, cell_h), Image.Resampling.NEAREST)
        sheet.paste(shown, (x, y))
        # A frame in the gap, outside the cell's pixels: cells with a white background stay apart from the sheet.
        draw.rectangle((x - 1, y - 1, x + cell_w, y + cell_h), outline=FRAME_COLOUR)
        boxes.append((x, y, x + cell_w, y + cell_h))
    for c, lines in enumerate(column_titles):
        x = left + c * (cell_w + style.gap_px)
        for i, line in enumerate(lines):
            y = top - column_title_h + i * line_h
            draw.text((x + (cell_w - face.getlength(line)) / 2, y), line, fill="black", font=face)
    for r, lines in enumerate(row_titles if axes.rows else []):
        y = top + r * (cell_h + style.gap_px) + (cell_h - len(lines) * line_h) // 2
        for i, line in enumerate(lines):
            draw.text((pad, y + i * line_h), line, fill="black", font=face)
    return Sheet(sheet, tuple(boxes), scale)


def caption_text(paragraphs: Sequence[str], face, width: float, max_prompt_lines: int) -> list[str]:
    """The prompts (all but the last paragraph) wrapped to the width and cut to max_prompt_lines; the last, the fixed
    settings, broken between settings."""
    *prompts, settings = paragraphs
    lines: list[str] = []
    for paragraph in prompts:
        wrapped = wrap(paragraph, face, width)
        if len(wrapped) > max_prompt_lines:
            wrapped = [*wrapped[: max_prompt_lines - 1], wrapped[max_prompt_lines - 1] + " …"]
        lines.extend(wrapped)
    return [*lines, *wrap_parts(settings.split(" · "), face, width)]


# 6. Write.
def cell_file(cell: Cell, spec: GridSpec) -> str:
    """The file name of a cell: its varied values, e.g. steps20_seed1.png (a sampler by its name alone)."""
    axes = spec.varied or ("seed",)
    parts = [format_value(cell.value(a)) if a == "scheduler" else f"{a}{format_value(cell.value(a))}" for a in axes]
    return "_".join(parts) + ".png"


def decode(result: CellResult) -> Image.Image:
    image = Image.open(io.BytesIO(result.response.images[0].data))
    image.load()
    return image


def write_cells(directory: Path, spec: GridSpec, axes: GridAxes, run: GridRun, sheet: Sheet, output: Path) -> Path:
    """Each cell's bytes as the server sent them (its settings in AUTOMATIC1111's `parameters` chunk) and grid.json:
    each cell's file, settings as the server resolved them, seed, place on the sheet and timings."""
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for result, box in zip(run.results, sheet.boxes, strict=True):
        name = cell_file(result.cell, spec)
        (directory / name).write_bytes(result.response.images[0].data)
        entries.append(cell_entry(result, name, box))
    report = {
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt,
        "sheet": str(output),
        "columns": axes.column,
        "rows": list(axes.rows),
        "axes": {axis: list(getattr(spec, axis)) for axis in spec.varied},
        "scale": sheet.scale,
        "summary": summary(run),
        "cells": entries,
    }
    path = directory / "grid.json"
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return path


def cell_entry(result: CellResult, name: str, box: tuple[int, int, int, int]) -> dict:
    response, image = result.response, result.response.images[0]
    timings = response.timings
    return {
        "file": name,
        "row": result.cell.row,
        "column": result.cell.column,
        "seed": image.seed,
        "settings": {
            "model": response.model,
            "width": image.width,
            "height": image.height,
            "steps": response.steps,
            "guidance_scale": float32_decimal(response.guidance_scale),
            "scheduler": scheduler_name(response.scheduler),
            "noise_mode": noise_mode_name(response.noise_mode),
            "seed": image.seed,
        },
        "box": list(box),
        "request_id": response.request_id,
        "latency_ms": round(result.latency_s * 1e3, 2),
        "timings": {
            "queue_ms": timings.queue_ms,
            "text_encoder_ms": timings.text_encoder_ms,
            "denoise_ms": timings.denoise_ms,
            "vae_decode_ms": timings.vae_decode_ms,
            "image_encode_ms": timings.image_encode_ms,
            "total_ms": timings.total_ms,
            "batch_size": timings.batch_size,
        },
    }


def summary(run: GridRun) -> dict:
    return {
        "cells": len(run.results),
        "wall_s": round(run.wall_s, 3),
        "concurrency": run.concurrency,
        "mean_batch_size": round(run.mean_batch_size, 3),
        "p50_latency_ms": round(run.p50_latency_s * 1e3, 2),
    }


def make_grid(
    link: Connection,
    spec: GridSpec,
    output: Path,
    cells_dir: Path | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    timeout_s: float | None = None,
    style: SheetStyle = SheetStyle(),
) -> tuple[GridRun, Sheet]:
    """The whole flow. Every cell is drawn before anything is written: a refused cell (GridError, with the server's
    message naming the field) leaves no sheet and no cells behind."""
    spec = with_seed(spec)
    axes = grid_axes(spec)
    cells = plan_cells(spec, axes)
    run = run_cells(link, spec, cells, concurrency, timeout_s)
    images = [decode(r) for r in run.results]
    scale = cell_scale(images[0].size, style)
    sheet = draw_sheet(images, cells, axes, caption(spec, axes, run.results[0].response, scale), style)
    output.parent.mkdir(parents=True, exist_ok=True)
    sheet.image.save(output)
    if cells_dir is not None:
        write_cells(cells_dir, spec, axes, run, sheet, output)
    return run, sheet
