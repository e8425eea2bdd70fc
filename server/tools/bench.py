"""`diffuserve bench`: per-stage latency of our pipeline in-process, and of diffusers' on the same model."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from diffuserve.v1 import diffusion_pb2 as pb
from diffuserve.v1 import diffusion_pb2_grpc as pb_grpc

from ..families import condition
from ..images import encode_image
from ..models import ServedModel, load_model
from ..noise import NOISE_MODES, make_generator
from ..params import GenerateParams, scheduler_enum, validate
from ..pipeline import MemberInputs, Solo, StageTimes, UNetRows, generate, to_uint8
from ..resources import rss_bytes
from ..schedulers import INITIAL_STATE, get_sampler, make_plan
from .load import BENCH_GUIDANCE, BENCH_PROMPT, BENCH_SEED, served_here
from .report import (
    NO_OUTPUTS,
    Outputs,
    ProgressBar,
    Sample,
    format_header,
    format_report,
    new_report,
    stages_of,
    summarise,
)

# Timing repeats of the micro-benchmarks (a sampler step, a noise draw): the median of this many.
MICRO_REPEATS = 30


@dataclass(frozen=True)
class BenchOptions:
    model_dir: str
    reference: str | None = None
    steps: int = 20
    runs: int = 5
    scheduler: str = "euler"
    backend: str = "cpu"
    # diffuserve.engine.ort_cuda.CudaOptions for the cuda backend (None: its defaults).
    cuda_options: object = None
    trt_options: object = None
    # Also time the same request with only the running stage's engines resident (serve --low-memory).
    low_memory: bool = False


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


def load_bench_model(options: BenchOptions, low_memory: bool = False) -> ServedModel:
    return load_model(
        options.model_dir,
        backend=options.backend,
        cuda_options=options.cuda_options,
        trt_options=options.trt_options,
        low_memory=low_memory,
    )


def bench_request(options: BenchOptions, **fields) -> pb.GenerateRequest:
    """The benchmark's request: its prompt and seed, the options' steps and sampler."""
    return pb.GenerateRequest(
        prompt=BENCH_PROMPT,
        seeds=[BENCH_SEED],
        steps=options.steps,
        guidance_scale=BENCH_GUIDANCE,
        scheduler=scheduler_enum(options.scheduler),
        **fields,
    )


def bench_ours(options: BenchOptions) -> tuple[list, GenerateParams, ServedModel]:
    """The benchmark's request `runs` times in-process after a warm-up, each with a new prompt's text encoding."""
    model = load_bench_model(options)
    # The request a client would send, validated exactly as the server does it.
    params = validate(bench_request(options), {model.name: model}, model.name)
    generate(model, params)  # warm-up: first runs pay for ORT's lazy allocations
    with ProgressBar("bench latency", options.runs) as progress:
        results = []
        for _ in range(options.runs):
            results.append(generate_uncached(model, params))
            progress.advance()
    return results, params, model


def in_process_row(results: list, model: ServedModel, load: dict, images: int = 1) -> dict:
    """The runs as a report row: in-process, a request's end to end is the pipeline's total."""
    clock, samples = 0.0, []
    for result in results:
        clock += result.times.total_ms / 1e3
        samples.append(Sample(result.times.total_ms, clock, stages_of(result.times), images, images))
    return summarise(samples, clock, load, process_memory(model))


def process_memory(model: ServedModel) -> dict[str, float | None]:
    """This process's resident memory, and the GPU memory in use where the model runs on one."""
    rss, gpu = rss_bytes(), model.gpu_memory_bytes()
    return {"rss_mb": rss / 2**20 if rss else None, "gpu_mb": gpu / 2**20 if gpu is not None else None}


def generate_uncached(model: ServedModel, params: GenerateParams):
    """One request whose prompts go through the text encoder: what a new prompt costs."""
    if model.text_cache is not None:
        model.text_cache.clear()
    return generate(model, params)


def bench_diffusers(options: BenchOptions, params: GenerateParams) -> tuple[dict[str, float], np.ndarray]:
    """diffusers' stage times, and its image for the same seed (a CPU torch generator, as torch_cpu noise is)."""
    from diffuserve.export.reference import time_reference

    size = (params.height, params.width)
    runs, images = time_reference(
        options.reference,
        options.scheduler,
        BENCH_PROMPT,
        params.seeds[0],
        size,
        options.steps,
        BENCH_GUIDANCE,
        options.runs,
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
    return median_of(rows), images[0]


def _median_ms(run, repeats: int = MICRO_REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def unet_call_ms(model: ServedModel, params: GenerateParams) -> float:
    """One guided U-Net call for one image: what a sampler step is weighed against."""
    guided = replace(params, guided=True)
    (conditioning,) = condition(model, [guided])
    rows = UNetRows(model, [Solo(guided)], [MemberInputs(conditioning)], guided=True)
    latents = np.random.default_rng(0).standard_normal(
        (1, *model.manifest.latent_shape(params.size)), dtype=np.float32
    )
    rows.predict(latents, np.float32(1), np.float32(500))
    return _median_ms(lambda: rows.predict(latents, np.float32(1), np.float32(500)), repeats=9)


def sampler_costs(model: ServedModel, params: GenerateParams, steps: int) -> list[dict[str, float | str]]:
    """Per sampler, the ms of its own work per U-Net call for one image (arithmetic, and drawing the noise it takes,
    in the request's noise mode), and the share of a guided U-Net call that is."""
    unet_ms = unet_call_ms(model, params)
    shape = (1, *model.manifest.latent_shape(params.size))
    rng = np.random.default_rng(0)
    rows = []
    for name in model.schedulers:
        plan, sampler = make_plan(name, model.scheduler_config, steps), get_sampler(name)
        outputs = rng.standard_normal((plan.calls, *shape), dtype=np.float32)

        def run_plan(plan=plan, sampler=sampler, outputs=outputs) -> None:
            generator = make_generator(params.noise_mode, BENCH_SEED)
            x, state = outputs[0], INITIAL_STATE
            for index in range(plan.calls):
                noise = generator.standard_normal(shape) if plan.noise_calls[index] else None
                x, state = sampler.step(plan, index, x, outputs[index], state, noise)

        step_ms = _median_ms(run_plan) / plan.calls
        rows.append({"sampler": name, "calls": plan.calls, "step_ms": step_ms, "unet_share": step_ms / unet_ms})
    return [{"sampler": "(U-Net call, guided)", "calls": 1, "step_ms": unet_ms, "unet_share": 1.0}, *rows]


def noise_costs(model: ServedModel) -> dict[str, float]:
    """ms to draw one image's latent noise in each noise mode."""
    shape = (1, *model.manifest.latent_shape(model.manifest.default_size))
    return {
        mode: _median_ms(lambda mode=mode: make_generator(mode, BENCH_SEED).standard_normal(shape))
        for mode in NOISE_MODES
    }


def format_table(
    ours: dict[str, float], reference: dict[str, float] | None, names: tuple[str, str] = ("diffuserve", "diffusers")
) -> str:
    header = f"{'stage':<24}{names[0]:>12}"
    if reference:
        header += f"{names[1]:>12}{'ratio':>8}"
    lines = [header, "-" * len(header)]
    for stage in STAGES:
        line = f"{stage:<24}{ours[stage]:>12.2f}"
        if reference:
            ratio = ours[stage] / reference[stage] if reference[stage] else float("nan")
            line += f"{reference[stage]:>12.2f}{ratio:>8.2f}"
        lines.append(line)
    return "\n".join(lines)


def format_sampler_table(rows: list[dict[str, float | str]], steps: int) -> str:
    lines = [f"{'sampler (one image)':<24}{'calls':>7}{'ms/call':>10}{'of U-Net':>10}", "-" * 51]
    for row in rows:
        lines.append(f"{row['sampler']:<24}{row['calls']:>7}{row['step_ms']:>10.3f}{row['unet_share']:>10.2%}")
    return (
        "\n".join(lines) + f"\n(ms/call: the sampler's own work per U-Net call at {steps} steps, noise draws included)"
    )


def served_environment(model: ServedModel) -> dict:
    """What serves the requests in-process, with the keys a server's GetServerInfo gives a remote bench."""
    from importlib.metadata import version

    return {
        "version": version("diffuserve"),
        "model": model.name,
        "family": model.manifest.family,
        "backend": model.backend,
        "target": model.target,
        "precision": model.precision,
        "device": model.device,
        "providers": model.providers,
        "batch_sizes": list(model.batch_sizes),
        "sizes": [list(size) for size in model.sizes],
    }


def bench_settings(
    steps: int, scheduler: str, size: tuple[int, int], runs: int, images_per_request=1, noise_mode: str | None = None
) -> dict:
    """The settings of an in-process bench's requests, for its report."""
    width, height = size
    settings = {
        "prompt": BENCH_PROMPT,
        "steps": steps,
        "scheduler": scheduler,
        "guidance_scale": BENCH_GUIDANCE,
        "width": width,
        "height": height,
        "images_per_request": images_per_request,
    }
    return settings | ({"noise_mode": noise_mode} if noise_mode else {}) | {"runs": runs}


def run_bench(options: BenchOptions, outputs: Outputs = NO_OUTPUTS) -> dict:
    results, params, model = bench_ours(options)
    ours = median_of([our_stages(r.times, options.steps) for r in results])
    # The same prompt again finds its chunks in the cache: what a rerun with another seed pays for its text.
    ours["text_encoder_cached_ms"] = statistics.median(
        generate(model, params).times.text_encoder_ms for _ in range(options.runs)
    )
    reference, reference_image = bench_diffusers(options, params) if options.reference else (None, None)
    settings = bench_settings(
        options.steps, options.scheduler, params.size, options.runs, noise_mode=params.noise_mode
    )
    server = served_environment(model)
    # The options of the backend that runs (the others' were given but play no part).
    used = {"cuda": options.cuda_options, "tensorrt": options.trt_options}.get(model.backend)
    if used is not None:
        server["engine_options"] = asdict(used)
    report = new_report(
        "latency", "in-process", server, settings, [in_process_row(results, model, {"kind": "single", "value": 1})]
    )
    report.update(diffuserve=ours, diffusers=reference)
    print(format_report(report))
    print(
        f"\ntext encoder, prompt found in the cache: {ours['text_encoder_cached_ms']:.3f} ms against "
        f"{ours['text_encoder_ms']:.3f} ms encoded"
    )
    if reference is not None:
        print(f"\nagainst diffusers on the same weights, median of {options.runs} runs each (ms)")
        print(format_table(ours, reference))
        difference = float(np.abs(results[0].pixels - reference_image).max())
        print(f"max |ours - diffusers| on the 0..1 image, seed {params.seeds[0]}: {difference:.2e}")
        report["max_abs_difference"] = difference
    samplers = sampler_costs(model, params, options.steps)
    print()
    print(format_sampler_table(samplers, options.steps))
    noise = noise_costs(model)
    print(
        "initial noise per image: "
        + ", ".join(f"{mode} {ms:.3f} ms ({ms / ours['total_ms']:.2%} of a request)" for mode, ms in noise.items())
    )
    report.update(samplers=samplers, noise_ms=noise)
    if options.low_memory:
        report["low_memory"] = bench_low_memory(options, params, model)
    for line in outputs.write(report):
        print(line)
    return report


def bench_low_memory(options: BenchOptions, params: GenerateParams, resident: ServedModel) -> dict:
    """The same request on the model with every engine resident and with one stage's at a time, runs interleaved
    (and alternating which goes first) so drift hits both alike; what low memory costs, and that its images are the
    same."""
    low = load_bench_model(options, low_memory=True)
    generate(low, params)  # warm-up, as for the resident model
    resident_set = low.loaded.engines
    loads_before, load_s_before = resident_set.loads, resident_set.load_s
    models = {"resident": resident, "low_memory": low}
    runs: dict[str, list] = {name: [] for name in models}
    for index in range(options.runs):
        for name in models if index % 2 == 0 else reversed(models):
            runs[name].append(generate(models[name], params))
    stages = {name: median_of([our_stages(r.times, options.steps) for r in results]) for name, results in runs.items()}
    loads = (resident_set.loads - loads_before) / options.runs
    load_ms = (resident_set.load_s - load_s_before) / options.runs * 1e3
    difference = float(np.abs(runs["resident"][0].pixels - runs["low_memory"][0].pixels).max())
    print()
    print(
        "low memory: the same request with one stage's engines resident at a time against all resident, "
        f"median of {options.runs} interleaved runs (ms)"
    )
    print(format_table(stages["low_memory"], stages["resident"], names=("low memory", "resident")))
    print(
        f"engine loads per low-memory request: {loads:.1f}, {load_ms:.0f} ms in all (each counts in the stage that "
        "needs it: the U-Net's in scheduler_ms_per_step, outside the calls); "
        f"max |low memory - resident| on the image: {difference:g}"
    )
    return {**stages, "loads_per_request": loads, "load_ms_per_request": load_ms, "max_abs_difference": difference}


def grpc_overhead(model: ServedModel, steps: int, runs: int = 15) -> dict[str, float]:
    """The same single request in-process and over a loopback channel, interleaved so drift hits both alike."""
    request = pb.GenerateRequest(prompt=BENCH_PROMPT, steps=steps, seeds=[BENCH_SEED])
    params = validate(request, {model.name: model}, model.name)
    local, remote = [], []
    with served_here(model) as link:
        with link.channel() as channel:
            stub = pb_grpc.DiffusionServiceStub(channel)
            stub.Generate(request)  # warm-up of both paths
            for _ in range(runs):
                start = time.perf_counter()
                generate(model, params)
                local.append((time.perf_counter() - start) * 1e3)
                start = time.perf_counter()
                stub.Generate(request)
                remote.append((time.perf_counter() - start) * 1e3)
    in_process, over_grpc = statistics.median(local), statistics.median(remote)
    return {"in_process_p50_ms": in_process, "grpc_p50_ms": over_grpc, "overhead_ms": over_grpc - in_process}


# What `bench --tasks` times: each task at the same steps (strength 1 runs every step), so the rows differ only in
# the start (the VAE encoder's pass, noising) and, for inpainting, the per-step blend.
TASK_FIELDS = {
    "txt2img": {},
    "img2img": {"strength": 1.0},
    "inpaint": {"strength": 1.0},
    "img2img, strength 0.5": {"strength": 0.5},
}
TASK_STAGES = ("text_encoder_ms", "vae_encode_ms", "denoise_ms", "unet_ms", "vae_decode_ms", "total_ms")


def task_stages(times: StageTimes) -> dict[str, float]:
    return {stage: getattr(times, stage) for stage in TASK_STAGES}


def edit_inputs(size: tuple[int, int]) -> dict[str, bytes]:
    """An init image (a colour gradient) and a mask (a centred rectangle) of that size, as a client sends them."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return {"init_image": encode_image(pixels, "png", 90)[0], "mask_image": encode_image(mask, "png", 90)[0]}


def task_request(name: str, options: BenchOptions, images: dict[str, bytes]) -> pb.GenerateRequest:
    request = bench_request(options, **TASK_FIELDS[name])
    if name != "txt2img":
        request.init_image = images["init_image"]
    if name == "inpaint":
        request.mask_image = images["mask_image"]
    return request


def run_task_bench(options: BenchOptions, outputs: Outputs = NO_OUTPUTS) -> dict:
    """Each task the model serves, in-process at the same steps, runs interleaved; medians per stage (ms)."""
    model = load_bench_model(options)
    images = edit_inputs(model.manifest.default_size)
    names = [n for n in TASK_FIELDS if n.split(",")[0] in model.tasks]
    requests = {n: validate(task_request(n, options, images), {model.name: model}, model.name) for n in names}
    for params in requests.values():
        generate(model, params)  # warm-up, and the prompt's chunks cached for every task alike
    runs: dict[str, list] = {n: [] for n in names}
    with ProgressBar("bench tasks", options.runs * len(names)) as progress:
        for _ in range(options.runs):
            for name, params in requests.items():
                runs[name].append(generate(model, params))
                progress.advance()
    table = {
        name: median_of([{s: getattr(r.times, s) for s in TASK_STAGES} for r in results])
        for name, results in runs.items()
    }
    rows = [in_process_row(results, model, {"kind": "task", "value": name}) for name, results in runs.items()]
    first = next(iter(requests.values()))
    settings = bench_settings(options.steps, options.scheduler, first.size, options.runs, noise_mode=first.noise_mode)
    report = new_report("tasks", "in-process", served_environment(model), settings, rows, tasks=table)
    print(format_header(report))
    print(f"each task, median of {options.runs} interleaved runs (ms)")
    header = f"{'task':<24}" + "".join(f"{stage.removesuffix('_ms'):>14}" for stage in TASK_STAGES)
    print(header)
    print("-" * len(header))
    for name, row in table.items():
        print(f"{name:<24}" + "".join(f"{row[stage]:>14.2f}" for stage in TASK_STAGES))
    for line in outputs.write(report):
        print(line)
    return report
