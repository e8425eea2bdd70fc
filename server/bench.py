"""`diffuserve bench`: per-stage latency of our pipeline in-process, and of diffusers' on the same model."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .images import encode_image
from .models import load_model
from .params import GenerateParams
from .pipeline import StageTimes, generate, initial_latents, to_uint8

BENCH_PROMPT = "a red circle on a blue background"
BENCH_SEED = 7
BENCH_GUIDANCE = 7.5


@dataclass(frozen=True)
class BenchOptions:
    model_dir: str
    reference: str | None = None
    steps: int = 20
    runs: int = 5
    scheduler: str = "euler"


# The rows of the table, in the order of the pipeline.
STAGES = (
    "text_encoder_ms",
    "unet_ms_per_step",
    "scheduler_ms_per_step",
    "vae_decode_ms",
    "image_encode_ms",
    "total_ms",
)


def our_stages(times: StageTimes, steps: int) -> dict[str, float]:
    return {
        "text_encoder_ms": times.text_encoder_ms,
        "unet_ms_per_step": times.unet_ms / steps,
        # Everything in the loop that is not the U-Net: the sampler step, guidance, buffer copies.
        "scheduler_ms_per_step": (times.denoise_ms - times.unet_ms) / steps,
        "vae_decode_ms": times.vae_decode_ms,
        "image_encode_ms": times.image_encode_ms,
        "total_ms": times.total_ms,
    }


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def bench_ours(options: BenchOptions) -> tuple[dict[str, float], GenerateParams, np.ndarray]:
    model = load_model(options.model_dir, backend="cpu")
    manifest = model.manifest
    params = GenerateParams(
        model=model.name,
        request_id="bench",
        prompt=BENCH_PROMPT,
        negative_prompt="",
        width=manifest.width,
        height=manifest.height,
        seeds=(BENCH_SEED,),
        steps=options.steps,
        guidance_scale=BENCH_GUIDANCE,
        scheduler=options.scheduler,
        output_format="png",
        quality=90,
        embed_metadata=False,
    )
    generate(model, params)  # warm-up: first runs pay for ORT's lazy allocations
    results = [generate(model, params) for _ in range(options.runs)]
    noise = initial_latents(params.seeds, manifest.latent_shape, 1.0)
    return median_of([our_stages(r.times, options.steps) for r in results]), params, noise


def bench_diffusers(options: BenchOptions, noise: np.ndarray) -> dict[str, float]:
    from diffuserve.export.reference import time_reference

    runs, images = time_reference(
        options.reference, options.scheduler, BENCH_PROMPT, noise, options.steps, BENCH_GUIDANCE, options.runs
    )
    rows = []
    for run, image in zip(runs, images, strict=True):
        # The same image encoding as ours, so the comparison is of the pipelines.
        start = time.perf_counter()
        encode_image(to_uint8(image)[0], "png", 90)
        encode_ms = (time.perf_counter() - start) * 1e3
        rows.append(
            {
                "text_encoder_ms": run["text_encoder"],
                "unet_ms_per_step": run["unet"] / options.steps,
                "scheduler_ms_per_step": float("nan"),
                "vae_decode_ms": run["vae_decode"],
                "image_encode_ms": encode_ms,
                "total_ms": run["render_ms"] + encode_ms,
            }
        )
    return median_of(rows)


def format_table(ours: dict[str, float], reference: dict[str, float] | None) -> str:
    header = f"{'stage':<24}{'diffuserve':>12}"
    if reference:
        header += f"{'diffusers':>12}{'ratio':>8}"
    lines = [header, "-" * len(header)]
    for stage in STAGES:
        line = f"{stage:<24}{ours[stage]:>12.2f}"
        if reference:
            ratio = ours[stage] / reference[stage] if reference[stage] else float("nan")
            line += f"{reference[stage]:>12.2f}{ratio:>8.2f}"
        lines.append(line)
    return "\n".join(lines)


def run_bench(options: BenchOptions, json_path: str | None = None) -> dict:
    ours, params, noise = bench_ours(options)
    reference = bench_diffusers(options, noise) if options.reference else None
    print(
        f"model {params.model}, {params.width}x{params.height}, {options.steps} steps {options.scheduler}, "
        f"guidance {BENCH_GUIDANCE}, median of {options.runs} runs (ms)"
    )
    print(format_table(ours, reference))
    report = {"options": asdict(options), "diffuserve": ours, "diffusers": reference}
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report
