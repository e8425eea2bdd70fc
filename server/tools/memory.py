"""`diffuserve bench MODEL --memory`: resident memory with every exported batch size served against the smallest
alone (and with --low-memory, with one stage's engines resident at a time), each in a fresh process, after one request
at each batch size and image size."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from diffuserve.engine.manifest import MANIFEST_NAME, ComponentGraph, Manifest, format_size
from diffuserve.v1 import diffusion_pb2 as pb

from ..resources import peak_rss_bytes, rss_bytes

# Steps of the probe's requests: enough to run every engine at each shape once.
PROBE_STEPS = 2


def restricted_copy(folder: Path, batches: tuple[int, ...], dest: Path) -> Path:
    """The model served with only some batch sizes: the same graph files (linked), a manifest listing fewer shapes."""
    manifest = Manifest.load(folder)
    targets = {
        name: replace(
            target,
            components={
                c: ComponentGraph(g.graph_file, tuple(s for s in g.shapes if s.batch in batches), g.fp32_ops)
                for c, g in target.components.items()
            },
        )
        for name, target in manifest.targets.items()
    }
    dest.mkdir(parents=True, exist_ok=True)
    for entry in folder.iterdir():
        if entry.name != MANIFEST_NAME:
            (dest / entry.name).symlink_to(entry.resolve())
    replace(manifest, batch_sizes=batches, targets=targets).save(dest)
    return dest


def probe(folder: str, backend: str, low_memory: bool = False) -> dict:
    """In this process: load, run one request per batch size and size, and report resident memory (MB)."""
    from ..models import load_model
    from ..params import validate
    from ..pipeline import generate

    model = load_model(folder, backend=backend, low_memory=low_memory)
    for width, height in model.sizes:
        for batch in model.batch_sizes:
            request = pb.GenerateRequest(
                prompt="a red circle", num_images=batch, steps=PROBE_STEPS, width=width, height=height
            )
            generate(model, validate(request, {model.name: model}, model.name))
    report = {"backend": model.backend, "rss_mb": rss_bytes() / 2**20, "peak_rss_mb": peak_rss_bytes() / 2**20}
    if model.backend == "cuda":
        from diffuserve.engine.nvml import gpu_memory_used

        used = gpu_memory_used(0)
        report["gpu_mb"] = used / 2**20 if used is not None else None
    return report


def measure(folder: Path, backend: str, low_memory: bool = False) -> dict:
    call = f"probe({str(folder)!r}, {backend!r}, {low_memory!r})"
    code = f"import json; from {__name__} import probe; print(json.dumps({call}))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory_report(
    model_dir: str, backend: str = "cpu", json_path: str | None = None, low_memory: bool = False
) -> dict:
    """Resident memory of every batch size against the smallest alone; with `low_memory`, also of every batch size
    with one stage's engines resident at a time."""
    folder = Path(model_dir)
    manifest = Manifest.load(folder)
    smallest = manifest.batch_sizes[:1]
    with tempfile.TemporaryDirectory() as tmp:
        alone = measure(restricted_copy(folder, smallest, Path(tmp) / "smallest"), backend)
    every = measure(folder, backend)
    report = {
        "model": manifest.name,
        "backend": every["backend"],
        "sizes": [format_size(s) for s in manifest.sizes],
        "rows": [
            {"batches": list(smallest), **alone},
            {"batches": list(manifest.batch_sizes), **every},
        ],
        "rss_ratio": every["rss_mb"] / alone["rss_mb"],
    }
    if low_memory:
        low = measure(folder, backend, low_memory=True)
        report["rows"].append({"batches": list(manifest.batch_sizes), "low_memory": True, **low})
        report["low_memory_peak_ratio"] = low["peak_rss_mb"] / every["peak_rss_mb"]
    print(format_report(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_report(report: dict) -> str:
    lines = [
        f"model {report['model']} on {report['backend']}, sizes {', '.join(report['sizes'])}; "
        f"one request at each batch size and size, {PROBE_STEPS} steps, fresh process each",
        f"{'batches served':<24}{'RSS MB':>10}{'peak MB':>10}{'GPU MB':>10}",
    ]
    for row in report["rows"]:
        gpu = row.get("gpu_mb")
        lines.append(
            f"{row_label(row):<24}{row['rss_mb']:>10.0f}{row['peak_rss_mb']:>10.0f}"
            f"{(f'{gpu:.0f}' if gpu is not None else '-'):>10}"
        )
    lines.append(f"resident memory, all batch sizes against the smallest alone: {report['rss_ratio']:.2f}x")
    if "low_memory_peak_ratio" in report:
        lines.append(f"peak resident memory, low memory against all resident: {report['low_memory_peak_ratio']:.2f}x")
    return "\n".join(lines)


def row_label(row: dict) -> str:
    return str(row["batches"]) + (", low memory" if row.get("low_memory") else "")
