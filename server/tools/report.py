"""Bench reports: one shape for every mode (single requests, closed and open loop, sweeps, soak), so any two runs
can be compared, tabled, written as JSON or CSV and plotted.

A report is a dict:
  schema       REPORT_SCHEMA
  created      UTC time, ISO 8601
  mode         "latency" (requests one at a time), "closed" (N clients), "open" (Poisson arrivals), "soak",
               "tasks" (each task the model serves, one at a time)
  target       what was measured: "in-process", "server" (with addresses), "synthetic"
  environment  {"machine": where the bench ran, "server": what served (backend, device, precision, model, ...)}
  settings     the requests: prompt, steps, scheduler, guidance, size, images per request, ...
  rows         one per load point (a single row for latency), each with
                 load: {"kind": "single" | "clients" | "rate" | "minute" | "task" | "batch", "value": a number
                 (the task's name for "task")}
                 requests, ok, errors {grpc code: count}, wall_s, images_per_s, mean_batch
                 latency_ms: {p50, p90, p99, max, mean} end to end as the client saw it
                 stages_ms: {stage: {p50, p90, p99, max, mean}} for each of STAGES the server reported
                 memory: {rss_mb, gpu_mb} of the serving process after the row (None where unknown)
  ...          mode-specific extras (the diffusers reference, sampler costs, gRPC overhead)
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from diffuserve.engine.loader import cpu_name
from diffuserve.engine.versions import installed_versions

from ..client import bar

REPORT_SCHEMA = "diffuserve-bench/1"
PERCENTILES = (50, 90, 99)

# The stages of one request, in the order of the pipeline: the server's timings, plus the client's end to end.
STAGES = (
    "queue_ms",
    "text_encoder_ms",
    "vae_encode_ms",
    "unet_ms",
    "unet_call_ms",
    "sampler_ms",
    "vae_decode_ms",
    "image_encode_ms",
    "server_ms",
)
STAGE_LABELS = {
    "queue_ms": "queue wait",
    "text_encoder_ms": "text encoder",
    "vae_encode_ms": "start latents",
    "unet_ms": "U-Net, all calls",
    "unet_call_ms": "U-Net, one call",
    "sampler_ms": "sampler and guidance",
    "vae_decode_ms": "VAE decode",
    "image_encode_ms": "image encode",
    "server_ms": "server total",
    "latency_ms": "end to end",
}
# The stages that add up to the server's total, for the breakdown plot (the per-call figure is a part of unet_ms).
ADDITIVE_STAGES = (
    "queue_ms",
    "text_encoder_ms",
    "vae_encode_ms",
    "unet_ms",
    "sampler_ms",
    "vae_decode_ms",
    "image_encode_ms",
)
MODE_LABELS = {
    "latency": "one request at a time",
    "closed": "closed loop",
    "open": "open loop (Poisson arrivals)",
    "soak": "soak",
    "tasks": "each task",
}
LOAD_LABELS = {
    "single": "one at a time",
    "clients": "clients",
    "rate": "requests/s",
    "minute": "minute",
    "task": "task",
    "batch": "images per request",
}

# Libraries whose versions change the figures.
LIBRARIES = (
    "diffuserve",
    "numpy",
    "onnxruntime",
    "onnxruntime-gpu",
    "tensorrt",
    "tensorrt-cu13",
    "grpcio",
    "protobuf",
    "onnx",
    "torch",
    "diffusers",
    "transformers",
    "safetensors",
    "tokenizers",
)


@dataclass(frozen=True)
class Sample:
    """One request as the bench saw it: its end-to-end latency, the server's stage times, or its error."""

    latency_ms: float
    # Seconds from the start of the run to the answer (soak windows group by it).
    done_s: float
    stages: Mapping[str, float] = field(default_factory=dict)
    batch_size: int = 1
    images: int = 1
    # The gRPC status code's name for a failed request; None when it succeeded.
    error: str | None = None


def stages_of(timings: Any) -> dict[str, float]:
    """The stages of a request from the server's Timings (or the pipeline's StageTimes: the same names)."""
    calls = getattr(timings, "unet_calls", 0)
    stages = {
        "queue_ms": timings.queue_ms,
        "text_encoder_ms": timings.text_encoder_ms,
        "vae_encode_ms": timings.vae_encode_ms,
        "unet_ms": timings.unet_ms,
        # Everything in the loop that is not the U-Net: the sampler's steps, guidance, mask blends.
        "sampler_ms": timings.denoise_ms - timings.unet_ms,
        "vae_decode_ms": timings.vae_decode_ms,
        "image_encode_ms": timings.image_encode_ms,
        "server_ms": timings.total_ms,
    }
    if calls:
        stages["unet_call_ms"] = timings.unet_ms / calls
    return stages


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not len(values):
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    p50, p90, p99 = np.percentile(values, PERCENTILES)
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(max(values)), "mean": mean(values)}


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values))


def summarise(
    samples: Sequence[Sample], wall_s: float, load: Mapping[str, Any], memory: Mapping[str, float | None] | None
) -> dict[str, Any]:
    """One row of a report from the samples of one load point."""
    ok = [s for s in samples if s.error is None]
    errors: dict[str, int] = {}
    for sample in samples:
        if sample.error is not None:
            errors[sample.error] = errors.get(sample.error, 0) + 1
    stages = {
        stage: percentiles([s.stages[stage] for s in ok if stage in s.stages])
        for stage in STAGES
        if any(stage in s.stages for s in ok)
    }
    return {
        "load": dict(load),
        "requests": len(samples),
        "ok": len(ok),
        "errors": errors,
        "wall_s": wall_s,
        "images_per_s": sum(s.images for s in ok) / wall_s if wall_s > 0 else None,
        "mean_batch": mean([s.batch_size for s in ok]) if ok else None,
        "latency_ms": percentiles([s.latency_ms for s in ok]),
        "stages_ms": stages,
        "memory": dict(memory or {"rss_mb": None, "gpu_mb": None}),
    }


def machine(device_id: int = 0) -> dict[str, Any]:
    """Where the bench ran: CPU, cores, the GPU (device_id's), Python, OS and the libraries that change the figures."""
    from diffuserve.engine.nvml import gpu_name

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {
        "host": platform.node(),
        "cpu": cpu_name(),
        "cores": cores,
        # Other work on the machine slows a CPU run; the figures are only as good as this was low.
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "gpu": gpu_name(device_id),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": installed_versions(LIBRARIES),
    }


def new_report(
    mode: str,
    target: str,
    server: Mapping[str, Any],
    settings: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    host: Mapping[str, Any] | None = None,
    **extras: Any,
) -> dict[str, Any]:
    """A report; `host` is the bench machine's environment when the caller adds to it (else machine())."""
    return {
        "schema": REPORT_SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": mode,
        "target": target,
        "environment": {"machine": dict(host or machine()), "server": dict(server)},
        "settings": dict(settings),
        "rows": list(rows),
        **extras,
    }


# Reading and writing.


class ReportError(ValueError):
    """A file that is not a bench report (or is from another schema)."""


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    try:
        report = json.loads(Path(path).read_text())
    except OSError as error:
        raise ReportError(f"{path}: cannot read: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise ReportError(f"{path}: not JSON ({error})") from None
    if not isinstance(report, dict) or report.get("schema") != REPORT_SCHEMA:
        found = report.get("schema") if isinstance(report, dict) else type(report).__name__
        raise ReportError(
            f"{path}: not a diffuserve bench report (schema {found!r}, expected {REPORT_SCHEMA!r}); write one with "
            "diffuserve bench ... --json FILE"
        )
    return report


def write_json(report: Mapping[str, Any], path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(report, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# The environment columns every CSV line carries, so a line read alone says what it measured.
CSV_ENVIRONMENT = (
    ("server", "backend"),
    ("server", "device"),
    ("server", "precision"),
    ("server", "model"),
    ("machine", "cpu"),
)
CSV_SETTINGS = ("steps", "scheduler", "guidance_scale", "width", "height", "images_per_request")


def csv_text(report: Mapping[str, Any]) -> str:
    """One line per row: the load, throughput, end-to-end and per-stage percentiles, memory, and the settings."""
    out = io.StringIO()
    writer = csv.writer(out)
    stages = [stage for stage in (*STAGES, "latency_ms") if any(_stage(row, stage) for row in report["rows"])]
    stats = ("p50", "p90", "p99", "max")
    header = ["mode", "load", "load_value", "requests", "ok", "errors", "images_per_s", "mean_batch"]
    header += [f"{stage.removesuffix('_ms')}_{stat}_ms" for stage in stages for stat in stats]
    header += ["rss_mb", "gpu_mb", *(key for _, key in CSV_ENVIRONMENT), *CSV_SETTINGS]
    writer.writerow(header)
    environment, settings = report["environment"], report["settings"]
    for row in report["rows"]:
        line = [report["mode"], row["load"]["kind"], row["load"]["value"], row["requests"], row["ok"]]
        line += [sum(row["errors"].values()), _csv(row["images_per_s"]), _csv(row["mean_batch"])]
        line += [_csv((_stage(row, stage) or {}).get(stat)) for stage in stages for stat in stats]
        line += [_csv(row["memory"].get("rss_mb")), _csv(row["memory"].get("gpu_mb"))]
        line += [environment.get(part, {}).get(key, "") for part, key in CSV_ENVIRONMENT]
        line += [settings.get(key, "") for key in CSV_SETTINGS]
        writer.writerow(line)
    return out.getvalue()


def _stage(row: Mapping[str, Any], stage: str) -> Mapping[str, Any] | None:
    return row["latency_ms"] if stage == "latency_ms" else row["stages_ms"].get(stage)


def _csv(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


@dataclass(frozen=True)
class Outputs:
    """The files a bench writes its report to, besides printing it: None for those not asked for."""

    json: str | None = None
    csv: str | None = None
    plot: str | None = None

    def write(self, report: Mapping[str, Any]) -> list[str]:
        """Writes what was asked for; returns the lines saying where."""
        if self.json:
            write_json(report, self.json)
        if self.csv:
            Path(self.csv).write_text(csv_text(report))
        if self.plot:
            from .plots import plot_report

            plot_report(report, self.plot)
        return [f"wrote {path}" for path in (self.json, self.csv, self.plot) if path]


NO_OUTPUTS = Outputs()


# Tables.


def load_label(load: Mapping[str, Any]) -> str:
    kind, value = load["kind"], load["value"]
    if kind == "single":
        return "one at a time"
    if kind == "rate":
        return f"{value:g}/s"
    if kind == "task":
        return str(value)
    if kind == "batch":
        return f"batch {value}"
    if kind == "minute":  # a soak window, by when it ended
        seconds = round(value * 60)
        return f"to {seconds // 60}:{seconds % 60:02d}"
    return f"{LOAD_LABELS[kind]} {value:g}"


def _number(value: float | None, width: int, digits: int = 1) -> str:
    return f"{'-':>{width}}" if value is None or math.isnan(value) else f"{value:>{width}.{digits}f}"


def format_header(report: Mapping[str, Any]) -> str:
    server, host, settings = report["environment"]["server"], report["environment"]["machine"], report["settings"]
    where = report["target"] + (f" {', '.join(server['addresses'])}" if server.get("addresses") else "")
    mode = MODE_LABELS.get(report["mode"], report["mode"])
    return (
        f"{mode}, {where}: model {server.get('model', '?')} ({server.get('precision', '?')}), "
        f"{server.get('backend', '?')} backend on {server.get('device', '?')}; "
        f"{settings.get('width')}x{settings.get('height')}, {settings.get('steps')} steps "
        f"{settings.get('scheduler') or 'default sampler'}, guidance {settings.get('guidance_scale')}, "
        f"{settings.get('images_per_request', 1)} image(s) per request\n"
        f"bench ran on {host['cpu']} ({host['cores']} cores), Python {host['python']}, "
        f"diffuserve {host['versions'].get('diffuserve', '?')}"
    )


def format_rows(report: Mapping[str, Any]) -> str:
    """One line per load point: throughput, end to end and the per-stage p50s."""
    stages = [s for s in STAGES if s != "server_ms" and any(s in row["stages_ms"] for row in report["rows"])]
    header = f"{'load':<16}{'reqs':>6}{'errors':>7}{'img/s':>8}{'batch':>7}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}"
    header += "".join(f"{_short(stage):>10}" for stage in stages) + f"{'RSS MB':>9}"
    lines = [header, "-" * len(header)]
    for row in report["rows"]:
        latency = row["latency_ms"]
        line = f"{load_label(row['load']):<16}{row['requests']:>6}{sum(row['errors'].values()):>7}"
        line += _number(row["images_per_s"], 8, 2) + _number(row["mean_batch"], 7, 2)
        line += "".join(_number(latency[stat], 9) for stat in ("p50", "p90", "p99", "max"))
        line += "".join(_number(row["stages_ms"].get(stage, {}).get("p50"), 10) for stage in stages)
        line += _number(row["memory"].get("rss_mb"), 9)
        lines.append(line)
    lines.append(
        "(ms; p50..max: end to end as the client saw it; the stage columns are the server's p50s"
        + (", queue wait included" if "queue_ms" in stages else "")
        + ")"
    )
    return "\n".join(lines)


def _short(stage: str) -> str:
    return {
        "queue_ms": "queue",
        "text_encoder_ms": "text",
        "vae_encode_ms": "start",
        "unet_ms": "unet",
        "unet_call_ms": "unet/call",
        "sampler_ms": "sampler",
        "vae_decode_ms": "vae dec",
        "image_encode_ms": "encode",
    }[stage]


def format_stage_table(row: Mapping[str, Any]) -> str:
    """Every stage of one load point with its percentiles."""
    header = f"{'stage (ms)':<24}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}{'mean':>10}"
    lines = [header, "-" * len(header)]
    for stage, stats in [*row["stages_ms"].items(), ("latency_ms", row["latency_ms"])]:
        cells = "".join(_number(stats.get(stat), 10) for stat in ("p50", "p90", "p99", "max", "mean"))
        lines.append(f"{STAGE_LABELS[stage]:<24}{cells}")
    return "\n".join(lines)


def format_errors(report: Mapping[str, Any]) -> str | None:
    failed = [(load_label(row["load"]), row["errors"]) for row in report["rows"] if row["errors"]]
    if not failed:
        return None
    return "errors: " + "; ".join(
        f"{label}: " + ", ".join(f"{count} {code}" for code, count in errors.items()) for label, errors in failed
    )


def format_report(report: Mapping[str, Any]) -> str:
    parts = [format_header(report), format_rows(report)]
    if len(report["rows"]) == 1 or report["mode"] == "latency":
        parts.append(format_stage_table(report["rows"][-1]))
    if report["mode"] == "soak":
        parts.append(format_soak_trend(report["rows"]))
    errors = format_errors(report)
    if errors:
        parts.append(errors)
    return "\n\n".join(parts)


def format_soak_trend(rows: Sequence[Mapping[str, Any]]) -> str:
    """First window against last: what a leak or a slowdown over time looks like."""
    first, last = rows[0], rows[-1]

    def change(get, unit: str) -> str:
        a, b = get(first), get(last)
        if a is None or b is None:
            return "-"
        return f"{a:.1f} -> {b:.1f}{f' {unit}' if unit else ''} ({b - a:+.1f})"

    return (
        f"first window against last: resident memory {change(lambda r: r['memory'].get('rss_mb'), 'MB')}; "
        f"end-to-end p99 {change(lambda r: r['latency_ms']['p99'], 'ms')}; "
        f"images/s {change(lambda r: r['images_per_s'], '')}"
    )


# Comparing two reports.

# What is compared per matched row: (label, getter, whether a larger value is better, the smallest difference worth
# calling: timer and scheduling noise on sub-millisecond stages makes ratios of tiny numbers meaningless).
COMPARED = (
    ("images/s", lambda row: row["images_per_s"], True, 0.0),
    ("end to end p50", lambda row: row["latency_ms"]["p50"], False, 0.5),
    ("end to end p90", lambda row: row["latency_ms"]["p90"], False, 0.5),
    ("end to end p99", lambda row: row["latency_ms"]["p99"], False, 0.5),
    *(
        (f"{STAGE_LABELS[stage]} p50", lambda row, stage=stage: row["stages_ms"].get(stage, {}).get("p50"), False, 0.5)
        for stage in STAGES
    ),
    ("RSS MB", lambda row: row["memory"].get("rss_mb"), False, 1.0),
    ("GPU MB", lambda row: row["memory"].get("gpu_mb"), False, 1.0),
)
# Relative differences below this are not called better or worse.
CALLED_DIFFERENCE = 0.02


def verdict(a: float, b: float, higher_is_better: bool, floor: float) -> str | None:
    """ "better" or "worse" for B against A, or None when the difference is within noise."""
    if not a or abs(b / a - 1) < CALLED_DIFFERENCE or abs(b - a) < floor:
        return None
    return "better" if (b > a) == higher_is_better else "worse"


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


# Environment entries that differ between any two runs and say nothing about the figures.
VOLATILE = ("machine.load_average_1m", "machine.host")


def environment_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, A's value, B's value) for every setting and environment entry that differs."""
    left = flatten({"settings": a["settings"], **a["environment"]})
    right = flatten({"settings": b["settings"], **b["environment"]})
    keys = [k for k in dict.fromkeys([*left, *right]) if k not in VOLATILE]
    return [(k, left.get(k), right.get(k)) for k in keys if left.get(k) != right.get(k)]


def _row_key(row: Mapping[str, Any]) -> tuple[str, str]:
    value = row["load"]["value"]
    return row["load"]["kind"], f"{value:g}" if isinstance(value, (int, float)) else str(value)


def compare_reports(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """B against A: per load point both have, each figure's ratio B/A; and what differs in their environments."""
    rows_b = {_row_key(row): row for row in b["rows"]}
    matched = []
    for row_a in a["rows"]:
        row_b = rows_b.get(_row_key(row_a))
        if row_b is None:
            continue
        figures = []
        for label, get, higher_is_better, floor in COMPARED:
            value_a, value_b = get(row_a), get(row_b)
            if value_a is None or value_b is None:
                continue
            ratio = value_b / value_a if value_a else None
            called = verdict(value_a, value_b, higher_is_better, floor)
            figures.append({"figure": label, "a": value_a, "b": value_b, "ratio": ratio, "verdict": called})
        matched.append({"load": row_a["load"], "figures": figures})
    return {"rows": matched, "differences": environment_differences(a, b)}


def format_comparison(comparison: Mapping[str, Any], names: tuple[str, str]) -> str:
    a, b = names
    lines = [f"A = {a}", f"B = {b}"]
    if comparison["differences"]:
        lines.append("differences (A -> B):")
        lines += [f"  {key}: {left!r} -> {right!r}" for key, left, right in comparison["differences"]]
    else:
        lines.append("same settings and environment")
    if not comparison["rows"]:
        lines.append("no load point is in both reports: nothing to compare")
        return "\n".join(lines)
    for row in comparison["rows"]:
        lines += ["", f"{load_label(row['load'])}", f"{'figure':<30}{'A':>12}{'B':>12}{'B/A':>8}  ", "-" * 64]
        for figure in row["figures"]:
            shown = "-" if figure["ratio"] is None else f"{figure['ratio']:.2f}"
            called = f"B {figure['verdict']}" if figure["verdict"] else ""
            lines.append(f"{figure['figure']:<30}{figure['a']:>12.2f}{figure['b']:>12.2f}{shown:>8}  {called}")
    lines.append("")
    lines.append(
        f"(B/A: below 1 is less time or memory, above 1 more images/s; differences under {CALLED_DIFFERENCE:.0%}, or "
        "under 0.5 ms or 1 MB, are not called)"
    )
    return "\n".join(lines)


# Progress.


class ProgressBar:
    """A one-line bar on stderr while a bench runs (only on a terminal: logs and pipes stay clean)."""

    WIDTH = 28

    def __init__(self, label: str, total: float, unit: str = "requests", stream=None) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream or sys.stderr
        self.shown = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0.0
        self.start = time.perf_counter()

    def advance(self, amount: float = 1) -> None:
        self.update(self.done + amount)

    def update(self, done: float) -> None:
        self.done = done
        if self.shown:
            self.stream.write(f"\r\033[K{self.line()}")
            self.stream.flush()

    def line(self) -> str:
        share = min(1.0, self.done / self.total) if self.total else 1.0
        elapsed = time.perf_counter() - self.start
        left = elapsed / share - elapsed if share > 0 else float("nan")
        eta = f", {left:.0f} s left" if share < 1 and not math.isnan(left) else ""
        count = f"{self.done:.0f}/{self.total:.0f} {self.unit}"
        return f"{self.label} {bar(share, self.WIDTH)} {count}, {elapsed:.0f} s{eta}"

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
