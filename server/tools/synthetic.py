"""`diffuserve bench --synthetic sd15|sd21`: the full-size architecture with random weights, built, exported and
timed against diffusers on the same weights and device in one run, on any machine, with no model hub.

Speed and memory are the real model's (the same graphs and shapes); the images are noise. Export-side code (torch,
diffusers) is imported inside the functions that need it, as the server's dependency rule asks.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffuserve.engine.manifest import MODEL_OUTPUT, UNET, Manifest
from diffuserve.v1 import diffusion_pb2 as pb

from ..images import encode_image
from ..models import ServedModel, load_model
from ..noise import make_generator
from ..params import GenerateParams, scheduler_enum, validate
from ..pipeline import StageTimes, generate, to_uint8
from ..resources import gpu_memory_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes
from ..schedulers import make_plan
from .bench import bench_settings, generate_uncached, in_process_row, median_of
from .load import BENCH_GUIDANCE, BENCH_PROMPT, BENCH_SEED
from .report import NO_OUTPUTS, Outputs, machine, new_report

log = logging.getLogger(__name__)

# The kinds export/synthetic.py builds (tests check the two lists agree; this one needs no torch to import).
SYNTHETIC_KINDS = ("sd15", "sd21")
SYNTHETIC_TARGETS = ("cpu", "cuda", "tensorrt")
# The targets that run on the GPU, where diffusers runs in fp16 on it too.
GPU_TARGETS = ("cuda", "tensorrt")
# Per target: (steps, timed runs). 30 steps is the common serving setting; on a CPU one guided U-Net call at 512x512
# takes 12-17 s on 2 cores, so two steps already make a run of about a minute with the VAE decode.
TARGET_DEFAULTS = {"cpu": (2, 1), "cuda": (30, 5), "tensorrt": (30, 5)}
# The graphs each target's export builds: the fp16 targets derive theirs from the fp32 (cpu) export.
EXPORT_TARGETS = {"cpu": ("cpu",), "cuda": ("cpu", "cuda"), "tensorrt": ("cpu", "tensorrt")}
# Least PSNR of our decoded image against diffusers' on the same latents: fp32 against fp32 agrees to float
# rounding (far above 40 dB); fp16 against fp16 runs different kernels, and 30 dB is the exporter's own fp16 gate.
MIN_IMAGE_PSNR_DB = {"cpu": 40.0, "cuda": 30.0, "tensorrt": 30.0}
# CUDA-graph replay against an eager run of the same session: the same kernels on the same buffers, so anything
# beyond fp16 rounding of the output's magnitude means a replay read stale inputs or wrote elsewhere.
GRAPH_TOLERANCE = 1e-3
MB = 2**20


@dataclass(frozen=True)
class Anchor:
    """A published or derived end-to-end latency to put our figure beside."""

    label: str
    total_ms: float
    steps: int
    hardware: str
    source: str


# SD 1.5, 512x512, batch 1, every stage included.
ANCHORS = (
    Anchor("TensorRT 8.6", 1000.0, 50, "A100-PCIE-80GB", "onnxruntime's Stable Diffusion README"),
    Anchor("ORT CUDA + CUDA graph", 1040.0, 50, "A100-PCIE-80GB", "onnxruntime's Stable Diffusion README"),
    # 30 guided U-Net calls (1.607 TFLOP each at batch 2, 64x64 latents), the VAE decode (2.515 TFLOP) and the text
    # encoder (0.027 TFLOP) counted with torch's FLOP counter: 50.7 TFLOP at the H100 SXM's (and H200's) dense
    # fp16 peak of 989 TFLOP/s.
    Anchor("compute floor", 51.0, 30, "H100 SXM / H200, FLOPs at dense fp16 peak", "derived"),
)
ANCHOR_KIND, ANCHOR_BATCH = "sd15", 1


class SyntheticBenchError(RuntimeError):
    """The synthetic benchmark cannot run as asked here; the message says why and what to change."""


@dataclass(frozen=True)
class SyntheticOptions:
    kind: str = "sd15"
    target: str = "cpu"
    # The backend our pipeline is served on; None: the target's own (cpu or cuda).
    backend: str | None = None
    batches: tuple[int, ...] = (1,)
    # None: the target's default (TARGET_DEFAULTS).
    steps: int | None = None
    runs: int | None = None
    scheduler: str = "euler"
    # Where the synthetic folder and its export are kept and reused; None: ~/.cache/diffuserve/synthetic/KIND.
    work: str | None = None
    seed: int = 0
    # Also time diffusers' pipeline on the same weights and device.
    reference: bool = True
    # engine.ort_cuda.CudaOptions for the cuda backend (device, CUDA graphs, provider options); None: its defaults.
    cuda_options: Any = None
    # engine.trt.TrtOptions for the tensorrt backend; its plans are built on the first run (build_missing).
    trt_options: Any = None

    def __post_init__(self) -> None:
        if self.kind not in SYNTHETIC_KINDS:
            raise ValueError(f"--synthetic must be one of {list(SYNTHETIC_KINDS)}, got {self.kind!r}")
        if self.target not in SYNTHETIC_TARGETS:
            raise ValueError(f"--target must be one of {list(SYNTHETIC_TARGETS)}, got {self.target!r}")
        if not self.batches or any(b < 1 for b in self.batches):
            raise ValueError(f"--batch values must be positive integers, got {list(self.batches)}")
        steps, runs = TARGET_DEFAULTS[self.target]
        object.__setattr__(self, "batches", tuple(sorted(set(self.batches))))
        object.__setattr__(self, "backend", self.backend or self.target)
        object.__setattr__(self, "steps", self.steps or steps)
        object.__setattr__(self, "runs", self.runs or runs)
        object.__setattr__(self, "work", str(Path(self.work or default_work_dir(self.kind)).expanduser()))
        if self.steps < 1 or self.runs < 1:
            raise ValueError(f"--steps and --runs must be positive, got {self.steps} and {self.runs}")

    @property
    def source_dir(self) -> Path:
        return Path(self.work) / "source"

    @property
    def export_dir(self) -> Path:
        return Path(self.work) / f"export-{self.target}"

    @property
    def name(self) -> str:
        return f"{self.kind}-synthetic"

    @property
    def device_id(self) -> int:
        return getattr(self.cuda_options or self.trt_options, "device_id", 0)


def default_work_dir(kind: str) -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "diffuserve" / "synthetic" / kind


def emit(text: str = "") -> None:
    """The benchmark's table and summary lines: its CLI output (progress goes to the log)."""
    print(text, flush=True)  # noqa: T201


# Memory: the process's resident set (peak per phase, via Linux's resettable high-water mark) and the GPU's use.


@dataclass
class MemoryProbe:
    """Resident and GPU memory of one phase: what was in use at its start, its peak RSS, GPU use at its end."""

    device_id: int = 0
    rss_start: int | None = None
    gpu_start: int | None = None
    rss_peak: int | None = None
    gpu_end: int | None = None

    @classmethod
    def start(cls, device_id: int = 0) -> MemoryProbe:
        gc.collect()
        reset_peak_rss()
        return cls(device_id, rss_start=rss_bytes(), gpu_start=gpu_memory_bytes(device_id))

    def stop(self) -> MemoryProbe:
        self.rss_peak, self.gpu_end = peak_rss_bytes(), gpu_memory_bytes(self.device_id)
        return self

    def to_dict(self) -> dict[str, float | None]:
        def delta(end: int | None, start: int | None) -> float | None:
            return None if end is None or start is None else (end - start) / MB

        return {
            "rss_start_mb": None if self.rss_start is None else self.rss_start / MB,
            "rss_peak_mb": None if self.rss_peak is None else self.rss_peak / MB,
            "rss_added_mb": delta(self.rss_peak, self.rss_start),
            "gpu_added_mb": delta(self.gpu_end, self.gpu_start),
        }


# 1. The synthetic diffusers folder, built once per kind and seed.


def prepare_source(options: SyntheticOptions) -> dict[str, Any]:
    from diffuserve.export.synthetic import build_synthetic_model, is_built, read_marker

    source = options.source_dir
    if is_built(source, options.kind, options.seed):
        log.info("reusing the synthetic %s folder %s", options.kind, source)
        return {"path": str(source), "reused": True, **read_marker(source)}
    log.info("building the synthetic %s folder in %s (about 4-6 GB of fp32 weights)", options.kind, source)
    # An export of an earlier build would no longer match the weights.
    (options.export_dir / "manifest.json").unlink(missing_ok=True)
    build_synthetic_model(options.kind, source, options.seed)
    return {"path": str(source), "reused": False, **read_marker(source)}


# 2. Its export for the target, reused while it covers the size, batches and graphs asked for.


def native_size(kind: str) -> tuple[int, int]:
    from diffuserve.export.synthetic import architecture

    return architecture(kind).size


def export_covers(folder: Path, size: tuple[int, int], batches: Sequence[int], targets: Sequence[str]) -> bool:
    try:
        manifest = Manifest.load(folder)
    except (FileNotFoundError, ValueError, KeyError):
        return False
    return (
        tuple(size) in {tuple(s) for s in manifest.sizes}
        and set(batches) <= set(manifest.batch_sizes)
        and set(targets) <= set(manifest.targets)
    )


def prepare_export(options: SyntheticOptions, source: Path) -> dict[str, Any]:
    from diffuserve.export.exporter import ExportOptions, export_model
    from diffuserve.export.synthetic import folder_bytes

    out, size, targets = options.export_dir, native_size(options.kind), EXPORT_TARGETS[options.target]
    info = {"path": str(out), "size": list(size), "batches": list(options.batches), "targets": list(targets)}
    if export_covers(out, size, options.batches, targets):
        log.info("reusing the export %s", out)
        return {**info, "reused": True, "bytes": folder_bytes(out)}
    export_options = ExportOptions(sizes=(size,), batches=options.batches, targets=targets, name=options.name)
    log.info("exporting %s for %s at %dx%d, batches %s", source, "+".join(targets), *size, list(options.batches))
    start = time.perf_counter()
    export_model(source, out, export_options, report=log.info)
    return {**info, "reused": False, "export_s": time.perf_counter() - start, "bytes": folder_bytes(out)}


# 3. Our pipeline, in process, on the exported graphs.


def bench_request(model: ServedModel, batch: int, steps: int, scheduler: str) -> GenerateParams:
    """The request a client would send, validated as the server does it: one seed per image."""
    width, height = model.sizes[0]
    request = pb.GenerateRequest(
        prompt=BENCH_PROMPT,
        seeds=[BENCH_SEED + i for i in range(batch)],
        steps=steps,
        guidance_scale=BENCH_GUIDANCE,
        scheduler=scheduler_enum(scheduler),
        width=width,
        height=height,
    )
    return validate(request, {model.name: model}, model.name)


def unit_noise(model: ServedModel, params: GenerateParams) -> np.ndarray:
    """The unit-gaussian initial latents our pipeline draws for these seeds, to hand diffusers the same ones."""
    shape = (1, *model.manifest.latent_shape(params.size))
    return np.concatenate([make_generator(params.noise_mode, seed).standard_normal(shape) for seed in params.seeds])


def our_stages(times: StageTimes, calls: int, steps: int, batch: int) -> dict[str, float]:
    return {
        "text_encoder_ms": times.text_encoder_ms,
        "unet_ms_per_call": times.unet_ms / calls,
        # Everything in the loop that is not the U-Net: the sampler step, guidance, buffer copies.
        "sampler_ms_per_step": (times.denoise_ms - times.unet_ms) / steps,
        "vae_decode_ms": times.vae_decode_ms,
        "image_encode_ms": times.image_encode_ms,
        "total_ms": times.total_ms,
        "total_ms_per_step": times.total_ms / steps,
        "total_ms_per_image": times.total_ms / batch,
        # The text encoder, VAE and encoding once, and the loop 50 times: what the 50-step anchors measure.
        "projected_50_steps_ms": times.total_ms - times.denoise_ms + 50 * times.denoise_ms / steps,
    }


@dataclass(frozen=True)
class OurRun:
    stages: dict[str, float]
    pixels: np.ndarray
    noise: np.ndarray
    unet_calls: int
    # The runs as a bench report row (server/tools/report.py), so --compare, --csv and --plot read this report too.
    row: dict


def bench_ours(model: ServedModel, options: SyntheticOptions, batch: int) -> OurRun:
    params = bench_request(model, batch, options.steps, options.scheduler)
    calls = make_plan(params.scheduler, model.scheduler_config, params.steps).calls
    generate(model, params)  # warm-up: first runs pay for lazy allocations (and CUDA-graph capture)
    # Each run encodes its prompt, as diffusers' does: a cached prompt would time a dictionary lookup instead.
    results = [generate_uncached(model, params) for _ in range(options.runs)]
    stages = median_of([our_stages(r.times, calls, params.steps, batch) for r in results])
    row = in_process_row(results, model, {"kind": "batch", "value": batch}, images=batch)
    return OurRun(stages, results[-1].pixels, unit_noise(model, params), calls, row)


# 4. diffusers' pipeline on the same weights, device and latents.


def bench_diffusers(
    options: SyntheticOptions, source: Path, ours: OurRun
) -> tuple[dict[str, float], np.ndarray, dict]:
    """diffusers' median stage times on our initial latents, its images, and how it ran."""
    from diffuserve.export.synthetic import time_diffusers

    batch = len(ours.noise)
    run = time_diffusers(
        source,
        scheduler=options.scheduler,
        prompt=BENCH_PROMPT,
        noise=ours.noise,
        steps=options.steps,
        guidance_scale=BENCH_GUIDANCE,
        runs=options.runs,
        device=f"cuda:{options.device_id}" if options.target in GPU_TARGETS else "cpu",
        half=options.target in GPU_TARGETS,
    )
    calls = run.unet_calls or ours.unet_calls
    rows = []
    for timed in run.runs:
        # The same image encoding as ours, so the comparison is of the pipelines.
        start = time.perf_counter()
        for image in to_uint8(run.images):
            encode_image(image, "png", 90)
        encode_ms = (time.perf_counter() - start) * 1e3
        total = timed["render_ms"] + encode_ms
        rows.append(
            {
                "text_encoder_ms": timed.get("text_encoder", math.nan),
                "unet_ms_per_call": timed.get("unet", math.nan) / calls,
                # diffusers' loop has no separable sampler time: its scheduler runs between un-hooked torch ops.
                "sampler_ms_per_step": math.nan,
                "vae_decode_ms": timed.get("vae_decode", math.nan),
                "image_encode_ms": encode_ms,
                "total_ms": total,
                "total_ms_per_step": total / options.steps,
                "total_ms_per_image": total / batch,
                "projected_50_steps_ms": math.nan,
            }
        )
    setup = {**run.setup, "unet_calls": calls, "peak_torch_gpu_mb": _mb(run.peak_gpu_bytes)}
    return median_of(rows), run.images, setup


def _mb(value: int | None) -> float | None:
    return None if value is None else value / MB


def image_agreement(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Max and mean |difference| and PSNR of two 0..1 images."""
    diff = np.abs(ours.astype(np.float64) - reference.astype(np.float64))
    mse = float(np.mean(diff**2))
    psnr = math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "psnr_db": psnr}


# 5. On a GPU: CUDA-graph replay against eager execution of the same U-Net graph.


def cuda_graph_check(model: ServedModel, batch: int) -> dict[str, Any]:
    """The served U-Net's CUDA-graph replays against eager runs of the same session, on three different inputs (the
    first runs capture, later ones replay; a replay that ignored new inputs would repeat an old answer)."""
    from diffuserve.engine.base import replay_difference
    from diffuserve.export.parity import random_feeds

    check: dict[str, Any] = {"name": "CUDA-graph replay equals eager U-Net", "batch": batch}
    rows = 2 * batch  # guided: the U-Net's rows are twice the images
    engine = next(e for e in model.engines(UNET, model.sizes[0]) if e.spec.batch_size == rows)
    if not getattr(engine, "uses_cuda_graph", False):
        return {**check, "passed": None, "skipped": "the U-Net runs without CUDA graphs here (--no-cuda-graph?)"}
    feeds = [random_feeds(engine.spec, 1, 1000, seed) for seed in (0, 1, 2)]
    scale = max(1.0, float(np.abs(engine.run_eager(feeds[0])[MODEL_OUTPUT]).max()))
    difference = replay_difference(engine, feeds)
    allowed = GRAPH_TOLERANCE * scale
    return {**check, "max_abs_diff_graph_vs_eager": difference, "allowed": allowed, "passed": difference <= allowed}


# The environment a figure belongs to.


def onnxruntime_in_use() -> dict[str, Any]:
    """The onnxruntime actually imported: with onnxruntime and onnxruntime-gpu both installed in different
    folders, package metadata names both, and only the module says which one runs."""
    import onnxruntime

    return {
        "version": onnxruntime.__version__,
        "path": str(Path(onnxruntime.__file__).parent),
        "available_providers": onnxruntime.get_available_providers(),
    }


def environment(model: ServedModel, options: SyntheticOptions, reference: Mapping[str, Any] | None) -> dict:
    """The bench report's environment: the machine (as every bench's, with the onnxruntime actually imported) and
    what serves in-process."""
    host = {**machine(options.device_id), "onnxruntime": onnxruntime_in_use()}
    server = {
        "kind": options.kind,
        "model": model.name,
        "backend": model.backend,
        "target": model.target,
        "precision": model.precision,
        "providers": model.providers,
        "device": model.device,
        "sizes": [list(s) for s in model.sizes],
        "batches": list(model.batch_sizes),
        "cuda_options": asdict(options.cuda_options) if options.cuda_options is not None else None,
        "trt_options": asdict(options.trt_options) if options.trt_options is not None else None,
        "diffusers_pipeline": dict(reference) if reference else None,
    }
    return {"machine": host, "server": server}


def table_environment(report: Mapping[str, Any]) -> dict[str, Any]:
    """What the tables print, in one mapping: the machine, what served, and the run's settings."""
    settings, environment = report["settings"], report["environment"]
    run = {key: settings[key] for key in ("steps", "guidance_scale", "runs")} | {"sampler": settings["scheduler"]}
    return {**run, **environment["machine"], **environment["server"]}


# The whole run.


def preflight(options: SyntheticOptions) -> None:
    """Fails before minutes of building and exporting when the target cannot run here."""
    if options.backend == "cuda":
        from diffuserve.engine.ort_cuda import check_cuda_available

        check_cuda_available(options.device_id)
    if options.backend == "tensorrt":
        from diffuserve.engine.ort import BackendUnavailableError
        from diffuserve.engine.trt import tensorrt_unavailable_reason

        reason = tensorrt_unavailable_reason(options.device_id)
        if reason:
            raise BackendUnavailableError(reason)
    if options.target not in GPU_TARGETS or not options.reference:
        return
    import torch

    if not torch.cuda.is_available():
        raise SyntheticBenchError(
            f"--target {options.target} times diffusers on the GPU too, and torch sees no CUDA device here"
        )
    # A CUDA context first, so neither side's GPU memory figure includes the context itself.
    torch.zeros(1, device=f"cuda:{options.device_id}")


def serve_and_time(options: SyntheticOptions) -> tuple[dict[str, OurRun], dict[str, Any], list[dict], dict]:
    """Our pipeline: load, then every batch size; memory over all of it, as a server holding the model has it."""
    probe = MemoryProbe.start(options.device_id)
    start = time.perf_counter()
    model = load_model(
        options.export_dir,
        backend=options.backend,
        cuda_options=options.cuda_options,
        trt_options=options.trt_options,
    )
    load_s = time.perf_counter() - start
    runs = {batch: bench_ours(model, options, batch) for batch in options.batches}
    memory = {"load_s": load_s, **probe.stop().to_dict()}
    # After the memory figure: the check loads a second U-Net session.
    checks = [cuda_graph_check(model, options.batches[0])] if model.backend in GPU_TARGETS else []
    return runs, memory, checks, environment(model, options, None)


def compare_with_diffusers(options: SyntheticOptions, ours: OurRun) -> tuple[dict[str, Any], dict]:
    """diffusers on the same weights and latents (its load included in its memory figure), and the image check."""
    probe = MemoryProbe.start(options.device_id)
    stages, images, setup = bench_diffusers(options, options.source_dir, ours)
    memory = probe.stop().to_dict()
    agreement = image_agreement(ours.pixels, images)
    limit = MIN_IMAGE_PSNR_DB[options.target]
    check = {
        "name": f"decoded image against diffusers {setup['dtype']} (batch {len(ours.noise)})",
        **agreement,
        "min_psnr_db": limit,
        "passed": agreement["psnr_db"] >= limit,
    }
    result = {"diffusers": stages, "diffusers_setup": setup, "diffusers_memory": memory, "image_agreement": agreement}
    return result, check


def run_synthetic_bench(options: SyntheticOptions) -> dict:
    """Builds (or reuses) the synthetic model, exports it for the target, times our pipeline and then diffusers' on
    it per batch size, prints the tables and returns the results with their environment."""
    preflight(options)
    build = prepare_source(options)
    exported = prepare_export(options, options.source_dir)
    ours, our_memory, checks, env = serve_and_time(options)
    gc.collect()  # our sessions are gone before diffusers loads, so neither shares the other's memory
    results = []
    for batch, run in ours.items():
        result = {"batch": batch, "unet_calls": run.unet_calls, "diffuserve": run.stages}
        if options.reference:
            compared, check = compare_with_diffusers(options, run)
            result.update(compared)
            checks.append(check)
        results.append(result)
    reference_memory = results[-1].get("diffusers_memory")
    env["server"]["diffusers_pipeline"] = results[0].get("diffusers_setup")
    settings = bench_settings(
        options.steps, options.scheduler, native_size(options.kind), options.runs, list(options.batches)
    )
    report = new_report(
        "latency",
        "synthetic",
        env["server"],
        settings,
        [run.row for run in ours.values()],
        host=env["machine"],
        options=asdict(options),
        build=build,
        export=exported,
        # Ours: load and every batch size; diffusers: load and its largest batch (it loads anew per batch).
        memory={"diffuserve": our_memory, "diffusers": reference_memory},
        results=results,
        anchors=[asdict(a) for a in ANCHORS],
        checks=checks,
    )
    emit(format_report(report))
    return report


# Formatting (pure: the report dict in, text out).

TABLE_ROWS = (
    ("text_encoder_ms", "text encoder"),
    ("unet_ms_per_call", "U-Net per call (guided)"),
    ("sampler_ms_per_step", "sampler per step"),
    ("vae_decode_ms", "VAE decode"),
    ("image_encode_ms", "image encode (png)"),
    ("total_ms", "total"),
    ("total_ms_per_step", "total / steps"),
    ("total_ms_per_image", "total / images"),
    ("projected_50_steps_ms", "projected to 50 steps"),
)
MEMORY_ROWS = (("rss_added_mb", "peak RSS added, MB"), ("gpu_added_mb", "GPU memory added, MB"))


def _cell(value: float | None, width: int = 12) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{width}}"
    return f"{value:>{width}.2f}"


def _ratio(ours: float | None, theirs: float | None) -> str:
    if not ours or not theirs or math.isnan(ours) or math.isnan(theirs):
        return f"{'-':>8}"
    return f"{ours / theirs:>8.2f}"


def format_header(report: Mapping[str, Any]) -> list[str]:
    env, options, build, exported = table_environment(report), report["options"], report["build"], report["export"]
    params = ", ".join(f"{name} {count / 1e6:.1f}M" for name, count in build.get("parameters", {}).items())
    built = "reused" if build.get("reused") else f"built in {build.get('build_s', 0):.0f} s"
    made = "reused" if exported.get("reused") else f"exported in {exported.get('export_s', 0):.0f} s"
    reference = env.get("diffusers_pipeline") or {}
    lines = [
        f"diffuserve bench --synthetic {options['kind']}: {build.get('description', options['kind'])}",
        f"  weights: {params} parameters; folder {build.get('bytes', 0) / 1e9:.2f} GB ({built})",
        f"  export: {'+'.join(exported['targets'])} graphs at {exported['size'][0]}x{exported['size'][1]}, "
        f"batches {exported['batches']}: {exported.get('bytes', 0) / 1e9:.2f} GB ({made})",
        f"  diffuserve: backend {env['backend']} ({', '.join(env['providers'])}), {env['precision']}, on "
        f"{env['device']}; onnxruntime {env['onnxruntime']['version']}",
    ]
    if reference:
        lines.append(
            f"  diffusers {env['versions'].get('diffusers', '?')}: {reference['dtype']} on {reference['device']}, "
            f"attention {reference['attention']}, scheduler {reference['scheduler']}"
        )
    load = env.get("load_average_1m")
    busy = "" if load is None else f", load average {load:.1f} over 1 min with this run"
    lines.append(f"  CPU {env['cpu']} ({env['cores']} cores{busy}); torch {env['versions'].get('torch', '-')}")
    if env["backend"] == "cpu" and options["steps"] < TARGET_DEFAULTS["cuda"][0]:
        call_s = report["results"][0]["diffuserve"]["unet_ms_per_call"] / 1e3
        lines.append(
            f"  CPU RUN WITH {options['steps']} STEPS, NOT {TARGET_DEFAULTS['cuda'][0]}: one guided U-Net call took "
            f"{call_s:.1f} s here; compare the per-call and per-step rows, not the totals"
        )
    return lines


def format_batch_table(result: Mapping[str, Any], report: Mapping[str, Any]) -> list[str]:
    env = table_environment(report)
    ours, theirs = result["diffuserve"], result.get("diffusers")
    width, height = env["sizes"][0]
    lines = [
        f"batch {result['batch']}: {width}x{height}, {env['steps']} steps {env['sampler']} ({result['unet_calls']} "
        f"U-Net calls), guidance {env['guidance_scale']}, median of {env['runs']} run(s) after 1 warm-up (ms)"
    ]
    header = f"{'stage':<28}{'diffuserve':>12}"
    if theirs:
        header += f"{'diffusers':>12}{'ratio':>8}"
    lines += [header, "-" * len(header)]
    for key, label in TABLE_ROWS:
        line = f"{label:<28}{_cell(ours.get(key))}"
        if theirs:
            line += f"{_cell(theirs.get(key))}{_ratio(ours.get(key), theirs.get(key))}"
        lines.append(line)
    if theirs:
        lines.append("(ratio: diffuserve / diffusers, below 1 is faster)")
    return lines


def format_memory(report: Mapping[str, Any]) -> list[str]:
    mine, theirs = report["memory"]["diffuserve"], report["memory"].get("diffusers")
    largest = report["results"][-1]["batch"]
    lines = [
        f"memory: diffuserve loading and running batches {[r['batch'] for r in report['results']]} (loaded in "
        f"{mine['load_s']:.1f} s)" + (f"; diffusers loading and running batch {largest}" if theirs else ""),
        f"  the process held {mine['rss_start_mb']:.0f} MB before (torch and the export are in this process)"
        if mine.get("rss_start_mb") is not None
        else "  (no resident-memory figures on this OS)",
    ]
    header = f"{'':<28}{'diffuserve':>12}" + (f"{'diffusers':>12}{'ratio':>8}" if theirs else "")
    lines += [header, "-" * len(header)]
    for key, label in MEMORY_ROWS:
        other = (theirs or {}).get(key)
        if mine.get(key) is None and other is None:
            continue
        line = f"{label:<28}{_cell(mine.get(key))}"
        if theirs:
            line += f"{_cell(other)}{_ratio(mine.get(key), other)}"
        lines.append(line)
    return lines


def format_anchors(report: Mapping[str, Any]) -> list[str]:
    env, options = table_environment(report), report["options"]
    mine = next((r for r in report["results"] if r["batch"] == ANCHOR_BATCH), None)
    if options["kind"] != ANCHOR_KIND or mine is None:
        return [f"(the published anchors are for SD 1.5 at batch {ANCHOR_BATCH}; none is shown for this run)"]
    lines = ["published anchors: SD 1.5, 512x512, batch 1, all stages, each at its own steps on its own hardware"]
    for anchor in report["anchors"]:
        label = f"{anchor['label']} ({anchor['hardware']})"
        per_step = anchor["total_ms"] / anchor["steps"]
        lines.append(
            f"  {label:<58}{anchor['total_ms']:>7.0f} ms / {anchor['steps']} steps = {per_step:>6.2f} ms/step"
        )
    ours, label = mine["diffuserve"], f"diffuserve, this run ({env['device']})"
    lines.append(
        f"  {label:<58}{ours['total_ms']:>7.0f} ms / {env['steps']} steps = {ours['total_ms_per_step']:>6.2f} ms/step"
        f" (projected to 50 steps: {ours['projected_50_steps_ms']:.0f} ms)"
    )
    sources = dict.fromkeys(a["source"] for a in report["anchors"])
    lines.append(f"  sources: {'; '.join(sources)} (the floor: 50.7 TFLOP per 30 steps at 989 TFLOP/s dense fp16)")
    if env["backend"] == "cpu":
        lines.append("  (the anchors are GPU figures; this run is on a CPU and shows them for scale only)")
    return lines


def format_checks(report: Mapping[str, Any]) -> list[str]:
    lines = []
    for check in report["checks"]:
        verdict = {True: "ok", False: "FAILED", None: "skipped"}[check.get("passed")]
        if "psnr_db" in check:
            detail = (
                f"max|diff| {check['max_abs_diff']:.2e}, mean {check['mean_abs_diff']:.2e}, PSNR "
                f"{check['psnr_db']:.1f} dB (at least {check['min_psnr_db']:g})"
            )
        elif "skipped" in check:
            detail = check["skipped"]
        else:
            detail = f"max|graph - eager| {check['max_abs_diff_graph_vs_eager']:.2e} (allowed {check['allowed']:.2e})"
        lines.append(f"check: {check['name']}: {detail} {verdict}")
    return lines


def format_report(report: Mapping[str, Any]) -> str:
    lines = format_header(report)
    for result in report["results"]:
        lines += ["", *format_batch_table(result, report)]
    lines += ["", *format_memory(report)]
    lines += ["", *format_anchors(report)]
    checks = format_checks(report)
    if checks:
        lines += ["", *checks]
    return "\n".join(lines)


def checks_passed(report: Mapping[str, Any]) -> bool:
    return all(check.get("passed") is not False for check in report["checks"])


# The command line: flags added to `diffuserve bench`, which already has --steps, --runs, --scheduler, --json,
# --backend, --device-id, --no-cuda-graph and --cuda-option.


class DefaultInt(int):
    """A bench default that says it was not given (an int to every other use), so --synthetic can put its own
    per-target default in its place."""


class DefaultStr(str):
    """The same for string defaults (--backend)."""


_DEFAULT_TYPES = {int: DefaultInt, str: DefaultStr}
# The bench flags whose defaults --synthetic replaces with its own per target.
TARGET_DEFAULTED = ("steps", "runs", "backend")


def add_synthetic_arguments(bench_parser: argparse.ArgumentParser) -> None:
    bench_parser.add_argument(
        "--synthetic",
        choices=SYNTHETIC_KINDS,
        help="instead of MODEL: build the full-size architecture with random weights (once, cached), export it and "
        "time it against diffusers on the same weights and device",
    )
    bench_parser.add_argument(
        "--target",
        choices=SYNTHETIC_TARGETS,
        default="cpu",
        help="with --synthetic: the graphs to export and the device both pipelines run on (default cpu: 2 steps, 1 "
        "run; cuda, tensorrt: 30 steps, 5 runs, diffusers in fp16; tensorrt builds its plans on the first run)",
    )
    bench_parser.add_argument(
        "--batch", type=int, action="append", help="with --synthetic: images per request; repeat (default 1)"
    )
    bench_parser.add_argument(
        "--work", metavar="DIR", help="with --synthetic: where the built model and its export are kept and reused"
    )
    marked = {}
    for name in TARGET_DEFAULTED:
        value = bench_parser.get_default(name)
        if type(value) in _DEFAULT_TYPES:
            marked[name] = _DEFAULT_TYPES[type(value)](value)
    bench_parser.set_defaults(**marked)


def given(args: argparse.Namespace, name: str) -> Any:
    """A flag's value when the command line gave it, else None."""
    value = getattr(args, name, None)
    return None if isinstance(value, DefaultInt | DefaultStr) else value


def options_from_args(args: argparse.Namespace) -> SyntheticOptions:
    backend = given(args, "backend")
    cuda = trt = None
    if "cuda" in (backend, args.target) or backend == "auto":
        from ..cli import cuda_options

        cuda = cuda_options(args)
    if "tensorrt" in (backend, args.target) or backend == "auto":
        from dataclasses import replace

        from ..cli import trt_options

        trt = replace(trt_options(args), build_missing=True)
    return SyntheticOptions(
        kind=args.synthetic,
        target=args.target,
        backend=backend,
        batches=tuple(args.batch or [1]),
        steps=given(args, "steps"),
        runs=given(args, "runs"),
        scheduler=getattr(args, "scheduler", None) or "euler",
        work=args.work,
        cuda_options=cuda,
        trt_options=trt,
    )


# Flags of `bench` that choose another benchmark, or a model folder, which --synthetic replaces.
EXCLUSIVE_FLAGS = {
    "model": "MODEL",
    "reference": "--reference",
    "faults": "--faults",
    "fuzz": "--fuzz",
    "memory": "--memory",
}


def cmd_synthetic_load(args: argparse.Namespace, bench_folder: Callable[[argparse.Namespace], int]) -> int:
    """bench --synthetic KIND with a load mode (--load, --rate, --soak): the model built and exported as for the
    latency bench (or reused), then served on a loopback port and measured by `bench_folder` as a model folder is."""
    from diffuserve.engine.ort import BackendUnavailableError
    from diffuserve.export.exporter import ExportError
    from diffuserve.export.parity import ParityError

    clashing = [flag for name, flag in EXCLUSIVE_FLAGS.items() if getattr(args, name, None)]
    if clashing:
        print(f"bench --synthetic: drop {', '.join(clashing)}: it builds its own model", file=sys.stderr)  # noqa: T201
        return 2
    try:
        options = options_from_args(args)
        preflight(options)
        prepare_source(options)
        prepare_export(options, options.source_dir)
    except (SyntheticBenchError, ExportError, ParityError, BackendUnavailableError, ValueError) as e:
        print(f"bench --synthetic failed: {e}", file=sys.stderr)  # noqa: T201
        return 1
    # The target's own step count unless --steps was given (a CPU runs a full-size U-Net call in seconds).
    folder_args = {"model": str(options.export_dir), "backend": options.backend, "steps": options.steps}
    return bench_folder(argparse.Namespace(**{**vars(args), **folder_args}))


def cmd_synthetic(args: argparse.Namespace, outputs: Outputs = NO_OUTPUTS) -> int:
    from diffuserve.engine.ort import BackendUnavailableError
    from diffuserve.export.exporter import ExportError
    from diffuserve.export.parity import ParityError

    clashing = [flag for name, flag in EXCLUSIVE_FLAGS.items() if getattr(args, name, None)]
    if clashing:
        print(  # noqa: T201
            f"bench --synthetic: drop {', '.join(clashing)}: it builds its own model and times diffusers on it",
            file=sys.stderr,
        )
        return 2
    try:
        options = options_from_args(args)
        report = run_synthetic_bench(options)
    except (SyntheticBenchError, ExportError, ParityError, BackendUnavailableError, ValueError) as e:
        print(f"bench --synthetic failed: {e}", file=sys.stderr)  # noqa: T201
        return 1
    for line in outputs.write(report):
        emit(line)
    return 0 if checks_passed(report) else 1
