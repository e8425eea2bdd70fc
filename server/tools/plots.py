"""Bench reports as one picture (`diffuserve bench --plot FILE`; the `plots` extra).

Top to bottom: end-to-end latency against load with throughput beside it (or, for load points that are not a scale,
such as a single one or the tasks, their percentiles as bars), the server's per-stage p50s stacked per load point,
and the serving process's memory per load point when the report follows it (soak). Everything is read from the
report's dict (see report.py), so a report written as JSON yesterday plots the same as one measured now.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..metrics import MissingExtra
from .report import ADDITIVE_STAGES, LOAD_LABELS, MODE_LABELS, STAGE_LABELS, load_label

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

WIDTH_IN = 12
# Per panel, plus room for the two-line title and the footer; at 100 dpi a two-panel figure is 1200x800 pixels.
# Halves and wholes, so the sum is exact in binary and no matplotlib version rounds a pixel off the height.
PANEL_HEIGHT_IN = 3.5
TITLE_AND_FOOTER_IN = 1.0
DPI = 100
# Load values spanning more than this ratio go on a log axis, where a sweep of 1, 2, 4 ... 64 clients spreads evenly.
LOG_SPAN = 20
# Beyond this many load points the category labels are slanted so neighbours do not overlap.
UPRIGHT_LABELS_MAX = 6
PERCENTILE_STYLES = (("p50", "tab:blue"), ("p90", "tab:orange"), ("p99", "tab:red"))
ERROR_COLOR = "crimson"
THROUGHPUT_COLOR = "tab:green"
# Formats the caller may name by the file's suffix; any other suffix still gets the PNG that --plot promises.
FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
# Room above the highest latency for the error marks, which sit along the top edge.
HEADROOM = 1.2
# With this few load points there is room to write figures on the bars (stage segments only when tall enough) and
# the error codes beside their marks.
LABELLED_BARS_MAX = 4
LABELLED_SHARE = 0.06


def plot_report(report: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Draws the report to path (PNG unless path ends in .svg or .pdf)."""
    figure = draw_report(report)
    figure.savefig(path, format=FORMATS.get(Path(path).suffix.lower(), "png"))


def draw_report(report: Mapping[str, Any]) -> Figure:
    """The report's figure, on an Agg canvas of its own: no pyplot, so no global state and no display needed."""
    figure_type, canvas_type = _matplotlib()
    rows = report["rows"]
    panels = 3 if _has_memory_panel(report) else 2
    figure = figure_type(
        figsize=(WIDTH_IN, TITLE_AND_FOOTER_IN + PANEL_HEIGHT_IN * panels), dpi=DPI, layout="constrained"
    )
    canvas_type(figure)
    axes = figure.subplots(panels, 1, squeeze=False)[:, 0]
    loads = _numeric_loads(rows)
    if len(rows) > 1 and loads is not None:
        _draw_latency_against_load(axes[0], rows, loads)
    else:
        _draw_percentile_bars(axes[0], rows)
    _draw_stage_breakdown(axes[1], rows)
    if panels == 3:
        _draw_memory(axes[2], rows)
    figure.suptitle(_title(report), fontsize=11)
    figure.supxlabel(_footer(report), fontsize=8, x=0.01, ha="left", color="dimgray")
    return figure


def _matplotlib() -> tuple[type, type]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise MissingExtra("bench --plot needs matplotlib: pip install 'diffuserve[plots]'") from error
    return Figure, FigureCanvasAgg


def _has_memory_panel(report: Mapping[str, Any]) -> bool:
    rows = report["rows"]
    followed = any(_memory(row, "rss_mb") is not None or _memory(row, "gpu_mb") is not None for row in rows)
    return report.get("mode") == "soak" or (len(rows) > 1 and followed)


# Panels.


def _draw_latency_against_load(ax: Axes, rows: Sequence[Mapping[str, Any]], xs: Sequence[float]) -> None:
    """End-to-end percentiles and images/s against the load; red crosses where requests failed."""
    for stat, color in PERCENTILE_STYLES:
        ax.plot(xs, [_value(row["latency_ms"].get(stat)) for row in rows], "o-", color=color, label=stat, ms=4)
    ax.plot(xs, [_value(row["latency_ms"].get("max")) for row in rows], "v", color="gray", alpha=0.5, label="max")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.set_ylim(0, _top([row["latency_ms"].get("max") for row in rows]))
    _mark_errors(ax, xs, rows)
    throughput = ax.twinx()
    throughput.plot(
        xs, [_value(row.get("images_per_s")) for row in rows], "s--", color=THROUGHPUT_COLOR, ms=4, label="images/s"
    )
    throughput.set_ylabel("images/s", color=THROUGHPUT_COLOR)
    throughput.tick_params(axis="y", colors=THROUGHPUT_COLOR)
    throughput.set_ylim(0, _top([row.get("images_per_s") for row in rows]))
    kind = rows[0]["load"]["kind"]
    ax.set_xlabel("minutes into the run" if kind == "minute" else f"load ({LOAD_LABELS.get(kind, kind)})")
    if min(xs) > 0 and max(xs) / min(xs) > LOG_SPAN:
        ax.set_xscale("log")
    if len(xs) <= 2 * UPRIGHT_LABELS_MAX:
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.set_title("latency over the run" if kind == "minute" else "latency against load", fontsize=10, loc="left")
    handles, labels = ax.get_legend_handles_labels()
    more_handles, more_labels = throughput.get_legend_handles_labels()
    # Outside the axes, on the right: the error annotations sit along the top edge inside.
    ax.legend(handles + more_handles, labels + more_labels, loc="upper left", bbox_to_anchor=(1.07, 1), fontsize=8)


def _numeric_loads(rows: Sequence[Mapping[str, Any]]) -> list[float] | None:
    """The rows' load values when they form a scale (distinct numbers); None for tasks, repeats or gaps."""
    values = [row["load"].get("value") for row in rows]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values) or len(set(values)) < len(values):
        return None
    return [float(v) for v in values]


def _mark_errors(ax: Axes, xs: Sequence[float], rows: Sequence[Mapping[str, Any]]) -> None:
    # Drawn near the top edge in axes coordinates: a row where every request failed has no latency to mark.
    transform = ax.get_xaxis_transform()
    labelled = False
    for x, row in zip(xs, rows, strict=True):
        errors = row.get("errors") or {}
        count = sum(errors.values())
        if not count:
            continue
        # The codes fit beside the mark when there are few load points; the count alone otherwise.
        text = ", ".join(f"{n} {code}" for code, n in errors.items()) if len(rows) <= LABELLED_BARS_MAX else f"{count}"
        ax.plot(
            [x],
            [0.92],
            "x",
            color=ERROR_COLOR,
            ms=9,
            mew=2,
            transform=transform,
            label=None if labelled else "errors (count)",
        )
        ax.annotate(
            text,
            (x, 0.92),
            xytext=(6, -3),
            textcoords="offset points",
            xycoords=transform,
            color=ERROR_COLOR,
            fontsize=8,
        )
        labelled = True


def _draw_percentile_bars(ax: Axes, rows: Sequence[Mapping[str, Any]]) -> None:
    """Load points that are not a scale (a single one, or the tasks): each one's end-to-end percentiles as bars."""
    stats = [*PERCENTILE_STYLES, ("max", "gray")]
    width = 0.8 / len(stats)
    everything = []
    for i, (stat, color) in enumerate(stats):
        values = [_value(row["latency_ms"].get(stat)) for row in rows]
        offsets = [position + (i - (len(stats) - 1) / 2) * width for position in range(len(rows))]
        bars = ax.bar(offsets, [0 if math.isnan(v) else v for v in values], width, color=color, label=stat)
        if len(rows) <= LABELLED_BARS_MAX:
            ax.bar_label(bars, labels=["-" if math.isnan(v) else f"{v:.1f}" for v in values], fontsize=8)
        everything += values
    ax.set_ylabel("end-to-end latency (ms)")
    ax.set_ylim(0, _top(everything))
    ax.grid(axis="y", alpha=0.3)
    _category_ticks(ax, rows, throughput=True)
    _mark_errors(ax, range(len(rows)), rows)
    title = "end-to-end latency"
    if len(rows) == 1:
        title += f": {rows[0].get('ok', 0)} of {rows[0].get('requests', 0)} requests answered"
    ax.set_title(title, fontsize=10, loc="left")
    ax.legend(loc="upper left", bbox_to_anchor=(1.07, 1), fontsize=8)


def _draw_stage_breakdown(ax: Axes, rows: Sequence[Mapping[str, Any]]) -> None:
    """The server's p50 of each stage stacked per load point, with the client's end-to-end p50 beside it."""
    positions = list(range(len(rows)))
    stages = [s for s in ADDITIVE_STAGES if any(_stage_p50(row, s) is not None for row in rows)]
    ax.set_title("per-stage p50 (server)", fontsize=10, loc="left")
    _category_ticks(ax, rows)
    if not stages:
        ax.text(0.5, 0.5, "no per-stage timings in this report", transform=ax.transAxes, ha="center", color="gray")
        ax.set_yticks([])
        return
    stacks = [[_stage_p50(row, stage) or 0.0 for row in rows] for stage in stages]
    tallest = max(map(sum, zip(*stacks, strict=True)))
    bottoms = [0.0] * len(rows)
    # tab10 has ten distinct colours, more than the seven additive stages.
    for i, (stage, heights) in enumerate(zip(stages, stacks, strict=True)):
        bars = ax.bar(positions, heights, bottom=bottoms, width=0.6, color=f"C{i}", label=STAGE_LABELS[stage])
        if len(rows) <= LABELLED_BARS_MAX:
            shown = [f"{h:.1f}" if h >= LABELLED_SHARE * tallest else "" for h in heights]
            ax.bar_label(bars, labels=shown, label_type="center", fontsize=8, color="white")
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ends = [_value(row["latency_ms"].get("p50")) for row in rows]
    ax.hlines(ends, [x - 0.35 for x in positions], [x + 0.35 for x in positions], color="black", lw=2)
    # A line of its own for the legend: the short bars above would show in it as a dot.
    ax.plot([], [], "-", color="black", lw=2, label="end-to-end p50")
    ax.set_ylabel("ms")
    ax.grid(axis="y", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    # Reversed so the legend reads top to bottom like the stack.
    ax.legend(handles[::-1], labels[::-1], loc="upper left", bbox_to_anchor=(1.07, 1), fontsize=8)


def _draw_memory(ax: Axes, rows: Sequence[Mapping[str, Any]]) -> None:
    """The serving process's memory after each load point: a leak shows as a line that keeps rising."""
    positions = list(range(len(rows)))
    ax.set_title("memory of the serving process after each load point", fontsize=10, loc="left")
    ax.plot(positions, [_value(_memory(row, "rss_mb")) for row in rows], "o-", color="tab:purple", label="RSS")
    if any(_memory(row, "gpu_mb") is not None for row in rows):
        gpu = [_value(_memory(row, "gpu_mb")) for row in rows]
        ax.plot(positions, gpu, "s-", color="tab:olive", label="GPU memory")
    ax.set_ylabel("MB")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    _category_ticks(ax, rows)
    ax.legend(loc="upper left", bbox_to_anchor=(1.07, 1), fontsize=8)


def _category_ticks(ax: Axes, rows: Sequence[Mapping[str, Any]], throughput: bool = False) -> None:
    labels = [load_label(row["load"]) for row in rows]
    if throughput:
        # Bars have no x scale to put images/s against: each load point's figure goes under its name.
        labels = [
            label if row.get("images_per_s") is None else f"{label}\n{row['images_per_s']:.2f} images/s"
            for label, row in zip(labels, rows, strict=True)
        ]
    slanted = len(rows) > UPRIGHT_LABELS_MAX
    ax.set_xticks(range(len(rows)), labels, rotation=30 if slanted else 0, ha="right" if slanted else "center")
    # At least three bars' room, so one or two load points do not become slabs as wide as the figure.
    pad = max(0, 3 - len(rows)) / 2 + 0.6
    ax.set_xlim(-pad, len(rows) - 1 + pad)


# Text.


def _title(report: Mapping[str, Any]) -> str:
    server = report.get("environment", {}).get("server", {})
    settings = report.get("settings", {})
    where = report.get("target", "?")
    if server.get("addresses"):
        where += " " + ", ".join(server["addresses"])
    served = [
        f"model {server.get('model', '?')}",
        f"{server.get('backend', '?')} backend on {server.get('device', '?')}",
        server.get("precision"),
    ]
    asked = [
        f"{settings['width']}x{settings['height']}" if "width" in settings and "height" in settings else None,
        f"{settings['steps']} steps" if settings.get("steps") is not None else None,
        settings.get("scheduler") or "default sampler",
    ]
    return (
        f"diffuserve bench: {MODE_LABELS.get(report.get('mode'), report.get('mode', '?'))}, target {where}\n"
        + ", ".join(filter(None, served))
        + "; "
        + ", ".join(filter(None, asked))
    )


def _footer(report: Mapping[str, Any]) -> str:
    host = report.get("environment", {}).get("machine", {})
    where = f"bench ran on {host.get('cpu') or 'an unknown CPU'}"
    if host.get("cores"):
        where += f" ({host['cores']} cores)"
    if host.get("gpu"):
        where += f" with {host['gpu']}"
    footer = f"{where}; report created {report.get('created', '?')}"
    if any(_stage_p50(row, stage) is not None for row in report["rows"] for stage in ADDITIVE_STAGES):
        # Percentiles do not add: the stages' p50s come from different requests, and the client also waits on the wire.
        footer = (
            "Stacked bars are per-stage p50s: their sum approximates the end-to-end p50 (black line) but does not "
            f"equal it.\n{footer}"
        )
    return footer


# Values.


def _value(value: float | None) -> float:
    """None (no figure for that row) as NaN, which matplotlib leaves out of a line instead of drawing at zero."""
    return math.nan if value is None else float(value)


def _top(values: Sequence[float | None]) -> float:
    """An axis' upper limit: the highest value with headroom (1 when there is none, so the axis still draws)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return max(finite) * HEADROOM if finite and max(finite) > 0 else 1.0


def _stage_p50(row: Mapping[str, Any], stage: str) -> float | None:
    return (row.get("stages_ms", {}).get(stage) or {}).get("p50")


def _memory(row: Mapping[str, Any], key: str) -> float | None:
    return (row.get("memory") or {}).get(key)
