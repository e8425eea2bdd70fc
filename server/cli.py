"""The `diffuserve` command: export, build-engines, serve, generate, gateway, grid, bench, demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from diffuserve.engine.loader import BACKENDS
from diffuserve.engine.manifest import TARGETS

from .app import ServerConfig
from .gateway import GATEWAY_GRACE_S
from .logs import LOG_FORMATS, configure_logging
from .metrics import MissingExtra
from .models import BUNDLED_MODEL, ModelDefaults
from .noise import NOISE_MODES
from .params import IMAGE_FORMATS
from .schedulers import SAMPLERS
from .settings import SettingsError, check_ranges, with_settings
from .tools.demo import DEMO_PROMPT
from .tools.grid import AXES, DEFAULT_CONCURRENCY
from .tools.load import BENCH_GUIDANCE, BENCH_PROMPT
from .tools.synthetic import add_synthetic_arguments, cmd_synthetic, cmd_synthetic_load
from .worker import WorkerConfig

log = logging.getLogger("diffuserve")


def cmd_export(args: argparse.Namespace) -> int:
    from diffuserve.export.exporter import ExportError, ExportOptions, export_model
    from diffuserve.export.parity import ParityError

    tolerances = {
        "parity_tolerance": args.parity_tolerance,
        "fp16_tolerance": args.fp16_tolerance,
        "min_image_psnr": args.min_image_psnr,
    }
    try:
        options = ExportOptions(
            sizes=export_sizes(args),
            batches=tuple(args.batch or [1]),
            targets=tuple(args.target or ["cpu"]),
            fp32_ops=fp32_ops(args.fp32_ops),
            **{key: value for key, value in tolerances.items() if value is not None},
            name=args.name,
            default_steps=args.default_steps,
            default_guidance_scale=args.default_guidance,
            text_lengths=tuple(args.text_length) if args.text_length else None,
            fp16_vae=args.fp16_vae,
        )
        export_model(args.source, args.output, options, report=lambda line: print(line, file=sys.stderr, flush=True))
    except (ExportError, ParityError, ValueError) as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    return 0


def parse_size(text: str) -> tuple[int, int]:
    """WIDTHxHEIGHT, as AUTOMATIC1111's `Size:` writes it."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise argparse.ArgumentTypeError(f"a size is WIDTHxHEIGHT, e.g. 768x512; got {text!r}")
    return int(width), int(height)


def export_sizes(args: argparse.Namespace) -> tuple[tuple[int, int], ...]:
    """--size values, then --width/--height pairs (repeated together), else 512x512."""
    widths, heights = args.width or [], args.height or []
    if len(widths) != len(heights):
        raise ValueError(f"--width and --height come in pairs; got {len(widths)} widths and {len(heights)} heights")
    sizes = [*(args.size or []), *zip(widths, heights, strict=True)]
    return tuple(sizes) or ((512, 512),)


def fp32_ops(values: list[str] | None) -> dict[str, tuple[str, ...]]:
    """COMPONENT=Op[,Op...] values of --fp32-ops."""
    ops: dict[str, tuple[str, ...]] = {}
    for value in values or []:
        component, sep, names = value.partition("=")
        if not sep or not names:
            raise ValueError(f"--fp32-ops is COMPONENT=Op[,Op...], e.g. unet=Softmax; got {value!r}")
        ops[component] = (*ops.get(component, ()), *(n.strip() for n in names.split(",") if n.strip()))
    return ops


def cuda_options(args: argparse.Namespace):
    """The cuda backend's options from --device-id, --no-cuda-graph and KEY=VALUE --cuda-option values."""
    from diffuserve.engine.ort_cuda import CudaOptions

    extra = {}
    for value in args.cuda_option or []:
        key, sep, setting = value.partition("=")
        if not sep or not key:
            raise SystemExit(f"--cuda-option is KEY=VALUE (an ONNX Runtime CUDA provider option), got {value!r}")
        extra[key] = setting
    return CudaOptions(device_id=args.device_id, cuda_graph=not args.no_cuda_graph, extra=extra)


def trt_options(args: argparse.Namespace):
    """The tensorrt backend's options from --device-id, --no-cuda-graph and --build-missing."""
    from diffuserve.engine.trt import TrtOptions

    return TrtOptions(
        device_id=args.device_id,
        cuda_graph=not args.no_cuda_graph,
        build_missing=getattr(args, "build_missing", False),
    )


def cmd_build_engines(args: argparse.Namespace) -> int:
    from diffuserve.engine.ort import BackendUnavailableError
    from diffuserve.engine.trt import TrtError
    from diffuserve.engine.trt_build import BuildOptions, PlanBuildError, build_plans

    try:
        options = BuildOptions(args.device_id, args.workspace_gb, args.timing_cache, args.optimization_level)
        build_plans(args.model, options, report=lambda line: print(line, file=sys.stderr, flush=True))
    except (BackendUnavailableError, PlanBuildError, TrtError, ValueError, FileNotFoundError) as e:
        print(f"build-engines failed: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from diffuserve.engine.ort import BackendUnavailableError

    from .app import serve

    if args.text_cache_mb < 0:
        raise SystemExit(f"--text-cache-mb: must be >= 0 (0 turns the cache off), got {args.text_cache_mb}")
    defaults = ModelDefaults(
        max_steps=args.max_steps, max_images=args.max_images, text_cache_bytes=int(args.text_cache_mb * 2**20)
    )
    given = {"steps": args.default_steps, "guidance_scale": args.default_guidance}
    config = ServerConfig(
        model_dirs=tuple(args.models) or (str(BUNDLED_MODEL),),
        overrides={key: value for key, value in given.items() if value is not None},
        host=args.host,
        port=args.port,
        backend=args.backend,
        threads=args.threads,
        defaults=defaults,
        grace_s=args.grace,
        cuda_options=cuda_options(args),
        trt_options=trt_options(args),
        low_memory=args.low_memory,
        worker=WorkerConfig(
            queue_capacity=args.queue_capacity, batching=not args.no_batching, max_batch_wait_ms=args.max_batch_wait_ms
        ),
        **security_settings(args),
    )
    if config.http_port is not None:
        try:  # before any model loads: the gateway's packages are an extra
            from .gateway import app  # noqa: F401
        except MissingExtra as error:
            print(f"serve: --http-port: {error}", file=sys.stderr)
            return 1
    try:
        serve(config)
    except (BackendUnavailableError, FileNotFoundError, ValueError, OSError) as e:
        # What start-up refuses (a backend that does not run here, missing plans, a folder that is not a model).
        print(f"serve: cannot start: {e}", file=sys.stderr)
        return 1
    return 0


def security_settings(args: argparse.Namespace) -> dict:
    """serve's TLS and token settings; SystemExit naming the setting when they cannot be used."""
    from .security import SecurityError, TlsFiles, load_tokens

    if (args.tls_cert is None) != (args.tls_key is None) or (args.tls_client_ca and not args.tls_cert):
        raise SystemExit("--tls-cert and --tls-key: give both for TLS (and --tls-client-ca only with them)")
    if args.http_port is not None and args.tls_cert:
        # The in-process gateway reaches the port over loopback, where the certificate's names do not match.
        raise SystemExit(
            "--http-port: the in-process gateway speaks plaintext to its own port; with --tls-cert run "
            "'diffuserve gateway --server HOST:PORT --tls-ca CA' beside the server instead"
        )
    try:
        tokens = load_tokens(args.auth_token_file)
    except SecurityError as error:
        raise SystemExit(str(error)) from None
    tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    return {
        "tls": tls,
        "auth_tokens": tokens,
        "open_health": not args.auth_health,
        "open_reflection": not args.auth_reflection,
        "longest_request_s": args.longest_request_s,
        "metrics_port": args.metrics_port,
        "http_port": args.http_port,
    }


def client_connection(args: argparse.Namespace):
    """The client's Connection from --server (one or several addresses), the TLS options and the token."""
    from .client import connection
    from .security import SecurityError, client_token

    try:
        tls = bool(args.tls or args.tls_ca or args.tls_cert)
        settings = {"tls": tls, "tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}
        return connection(args.server, token=client_token(args.auth_token_file), **settings)
    except (SecurityError, ValueError) as error:
        raise SystemExit(str(error)) from None


def add_client_arguments(p: argparse.ArgumentParser, with_server: bool = True) -> None:
    if with_server:
        p.add_argument(
            "--server", default="127.0.0.1:50051", help="HOST:PORT; several, comma-separated, are balanced round-robin"
        )
    p.add_argument("--tls", action="store_true", help="TLS, trusting the system's CAs (or --tls-ca)")
    p.add_argument("--tls-ca", help="TLS: the CA certificate (PEM) the server's certificate chains to")
    p.add_argument("--tls-cert", help="mutual TLS: this client's certificate (PEM)")
    p.add_argument("--tls-key", help="mutual TLS: this client's private key (PEM)")
    p.add_argument(
        "--auth-token-file", help="a file whose first line is the bearer token (else $DIFFUSERVE_AUTH_TOKEN)"
    )


def read_input_file(path: str | None, flag: str) -> bytes:
    """A file the client sends as it is; empty when the flag is not given."""
    if not path:
        return b""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise SystemExit(f"{flag}: cannot read {path}: {error.strerror}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    from .client import ClientRequest, ProgressBar, request_generate, stream_generate, write_images

    link = client_connection(args)
    request = ClientRequest(
        prompt=args.prompt,
        negative_prompt=args.negative,
        model=args.model,
        seeds=tuple(args.seed),
        num_images=args.num_images,
        steps=args.steps,
        guidance_scale=args.guidance,
        scheduler=args.scheduler,
        noise_mode=args.noise_mode,
        width=args.width,
        height=args.height,
        output_format=args.format,
        quality=args.quality,
        embed_metadata=not args.no_metadata,
        init_image=read_input_file(args.init_image, "--init-image"),
        mask_image=read_input_file(args.mask, "--mask"),
        strength=args.strength,
        mask_blur=args.mask_blur,
        refuse_resize=args.refuse_resize,
    )
    try:
        if args.stream:
            response = stream_generate(link, request.to_proto(), ProgressBar(), timeout_s=args.timeout)
        else:
            response = request_generate(link, request.to_proto(), timeout_s=args.timeout)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    for path, image in zip(write_images(response, Path(args.output)), response.images, strict=True):
        print(f"{path}  seed={image.seed}")
    t = response.timings
    print(
        f"request {response.request_id}: total {t.total_ms:.0f} ms (queue {t.queue_ms:.0f},"
        f" text {t.text_encoder_ms:.0f},{f' vae encode {t.vae_encode_ms:.0f},' if t.vae_encode_ms else ''}"
        f" denoise {t.denoise_ms:.0f}, vae {t.vae_decode_ms:.0f}, encode {t.image_encode_ms:.0f})"
    )
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    try:
        from .gateway.app import GatewayConfig, run_gateway
    except MissingExtra as error:
        print(f"gateway: {error}", file=sys.stderr)
        return 1
    if not 0 <= args.http_port <= 65535:
        print(f"gateway: --http-port: must be 0..65535, got {args.http_port}", file=sys.stderr)
        return 2
    link = client_connection(args)
    config = GatewayConfig(link, args.http_host, args.http_port, grace_s=args.grace, timeout_s=args.timeout)
    try:
        run_gateway(config)
    except OSError as error:
        print(f"gateway: cannot start: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .tools.report import Outputs, ReportError

    if args.compare:
        from .tools.report import compare_reports, format_comparison, load_report

        try:
            first, second = (load_report(path) for path in args.compare)
        except ReportError as error:
            print(f"bench --compare: {error}", file=sys.stderr)
            return 2
        print(format_comparison(compare_reports(first, second), tuple(args.compare)))
        return 0
    outputs = Outputs(args.json, args.csv, args.plot)
    if args.synthetic and bench_mode(args) != "latency":
        return cmd_synthetic_load(args, lambda folder_args: bench_served_here(folder_args, outputs))
    if args.synthetic:
        return cmd_synthetic(args, outputs)
    if args.remote:
        return bench_servers(args, outputs)
    if not args.model:
        print("bench: give MODEL (an exported model folder), --server HOST:PORT or --synthetic KIND", file=sys.stderr)
        return 2
    if args.memory:
        from .tools.memory import memory_report

        memory_report(args.model, args.backend, json_path=args.json, low_memory=args.low_memory)
        return 0
    if args.faults:
        from .tools.robustness import FaultOptions, run_faults

        run_faults(FaultOptions(args.model), json_path=args.json)
        return 0
    if args.fuzz:
        from .tools.robustness import run_fuzz_on_model

        return 0 if run_fuzz_on_model(args.model, args.fuzz, args.seed, json_path=args.json) else 1
    if bench_mode(args) != "latency":
        return bench_served_here(args, outputs)
    from .tools.bench import BenchOptions, run_bench, run_task_bench

    options = BenchOptions(
        model_dir=args.model,
        reference=args.reference,
        steps=args.steps,
        runs=args.runs,
        scheduler=args.scheduler,
        backend=args.backend,
        cuda_options=cuda_options(args),
        trt_options=trt_options(args),
        low_memory=args.low_memory,
    )
    (run_task_bench if args.tasks else run_bench)(options, outputs)
    return 0


def bench_mode(args: argparse.Namespace) -> str:
    """latency (one request at a time) unless --soak, --rate (open loop) or --load (closed loop) asks otherwise."""
    if args.soak:
        return "soak"
    if args.rate:
        return "open"
    return "closed" if args.load else "latency"


def load_plan(args: argparse.Namespace):
    from .tools.load import LoadPlan

    try:
        return LoadPlan(
            mode=bench_mode(args),
            runs=args.runs,
            concurrency=tuple(args.concurrency),
            rates=tuple(args.rate or ()),
            requests=args.requests,
            soak_s=args.soak or 0.0,
            window_s=args.window,
            arrival_seed=args.seed,
        )
    except ValueError as error:
        raise SystemExit(f"bench: {error}") from None


def request_settings(args: argparse.Namespace):
    from .tools.load import RequestSettings

    width, height = args.size or (0, 0)
    return RequestSettings(
        prompt=args.prompt,
        model=args.model_name,
        steps=args.steps,
        scheduler=args.scheduler,
        guidance_scale=args.guidance,
        width=width,
        height=height,
        images_per_request=args.images,
        timeout_s=args.timeout,
    )


def bench_servers(args: argparse.Namespace, outputs) -> int:
    """bench --server: running servers, over gRPC as a client reaches them."""
    import grpc

    args.server = args.remote
    link = client_connection(args)
    if args.fuzz:
        from .tools.robustness import run_fuzz_on_server

        return 0 if run_fuzz_on_server(link, args.fuzz, args.seed, json_path=args.json) else 1
    if args.reference or args.tasks or args.memory or args.faults or args.low_memory:
        print(
            "bench --server: --reference, --tasks, --memory, --faults and --low-memory time a model folder "
            "in-process; give MODEL instead of --server for them",
            file=sys.stderr,
        )
        return 2
    from .tools.load import run_load_bench
    from .tools.report import format_report

    try:
        report = run_load_bench(link, load_plan(args), request_settings(args), "server")
    except (grpc.RpcError, ValueError) as error:
        detail = f"{error.code().name}: {error.details()}" if isinstance(error, grpc.RpcError) else str(error)
        print(f"bench --server: {detail}", file=sys.stderr)
        return 1
    print(format_report(report))
    for line in outputs.write(report):
        print(line)
    return 0


def bench_served_here(args: argparse.Namespace, outputs) -> int:
    """bench MODEL --load/--rate/--soak: the model served on a loopback port, measured over gRPC."""
    from .models import load_model
    from .tools.bench import grpc_overhead
    from .tools.load import run_load_bench, served_here, worker_for
    from .tools.report import format_report

    plan = load_plan(args)
    if not args.verbose:  # a log line per request would bury the table
        logging.getLogger("diffuserve.server.service").setLevel(logging.WARNING)
    model = load_model(
        args.model, backend=args.backend, cuda_options=cuda_options(args), trt_options=trt_options(args)
    )
    worker = worker_for(plan, batching=not args.no_batching, max_batch_wait_ms=args.max_batch_wait_ms)
    with served_here(model, worker) as link:
        report = run_load_bench(link, plan, request_settings(args), "in-process")
    report["environment"]["server"].pop("addresses", None)
    print(format_report(report))
    if plan.mode == "closed":
        overhead = report["grpc_overhead"] = grpc_overhead(model, args.steps)
        print(
            f"gRPC overhead, one request: in-process p50 {overhead['in_process_p50_ms']:.1f} ms, over loopback gRPC "
            f"p50 {overhead['grpc_p50_ms']:.1f} ms, difference {overhead['overhead_ms']:.1f} ms"
        )
    for line in outputs.write(report):
        print(line)
    return 0


def parse_duration(text: str) -> float:
    """Seconds from 90, 90s, 10m or 2h."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a duration is seconds or a number with s, m or h (90, 10m); got {text!r}"
        ) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"a duration above 0 is needed; got {text!r}")
    return seconds


def cmd_demo(args: argparse.Namespace) -> int:
    from .tools.demo import run_demo

    for path in run_demo(Path(args.output), args.prompt, args.seed):
        print(f"wrote {path.resolve()}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .tools.evaluate import evaluate, format_table, meets_targets

    results = evaluate(args.model, args.count, args.seed, args.sampler)
    print(f"{args.count} prompts from the shapes grammar, one image each per sampler, through the gRPC server")
    print(format_table(results))
    if args.json:
        report = {"count": args.count, "seed": args.seed, "accuracy": results}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if meets_targets(results) else 1


def cmd_gallery(args: argparse.Namespace) -> int:
    from .tools.evaluate import GALLERY_PROMPTS, make_gallery

    print(f"wrote {make_gallery(args.model, Path(args.output), args.prompts or GALLERY_PROMPTS, args.seed)}")
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from .tools.grid import GridError, GridSpec, make_grid, parse_guidance, parse_schedulers, parse_seeds, parse_steps

    try:
        spec = GridSpec(
            prompt=args.prompt,
            negative_prompt=args.negative,
            model=args.model,
            width=args.width,
            height=args.height,
            noise_mode=args.noise_mode,
            steps=parse_steps(args.steps),
            guidance=parse_guidance(args.guidance),
            scheduler=parse_schedulers(args.scheduler),
            seed=parse_seeds(args.seeds),
            columns=args.columns or "",
        )
        cells_dir = Path(args.cells) if args.cells else None
        run, _ = make_grid(client_connection(args), spec, Path(args.output), cells_dir, args.concurrency, args.timeout)
    except ValueError as error:
        print(f"grid: {error}", file=sys.stderr)
        return 2
    except GridError as error:
        print(f"grid: {error}; nothing written", file=sys.stderr)
        return 1
    print(
        f"{len(run.results)} cells in {run.wall_s:.2f} s ({run.concurrency} in flight at most): mean batch "
        f"{run.mean_batch_size:.2f} on the server, per-cell latency p50 {run.p50_latency_s * 1e3:.0f} ms"
    )
    print(f"wrote {args.output}" + (f", and the cells with grid.json to {args.cells}" if args.cells else ""))
    return 0


def add_backend_arguments(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--backend",
        choices=("auto", *BACKENDS),
        default=default,
        help="auto: the first that really runs here of tensorrt (TensorRT installed, plans built for this GPU), cuda "
        "(onnxruntime-gpu) and cpu, among the targets the model has",
    )
    p.add_argument("--device-id", type=int, default=0, help="cuda, tensorrt: the GPU to run on")
    p.add_argument(
        "--no-cuda-graph", action="store_true", help="cuda, tensorrt: run the U-Net eagerly, without CUDA graphs"
    )
    p.add_argument(
        "--build-missing",
        action="store_true",
        help="tensorrt: build the plans a model lacks for this GPU at start (minutes) instead of refusing it",
    )
    p.add_argument(
        "--cuda-option",
        action="append",
        metavar="KEY=VALUE",
        help="cuda: an ONNX Runtime CUDA provider option over diffuserve's choice, e.g. prefer_nhwc=1; repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffuserve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=os.environ.get("DIFFUSERVE_LOG_FORMAT", "text"),
        help="json: one object per line, for log collectors (also $DIFFUSERVE_LOG_FORMAT)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="diffusers folder -> ONNX + manifest")
    p.add_argument("source", help="a local diffusers model folder (model_index.json, unet/, vae/, ...)")
    p.add_argument("-o", "--output", required=True, help="the folder to write")
    p.add_argument(
        "--size",
        type=parse_size,
        action="append",
        metavar="WxH",
        help="an image size to serve, width x height; repeat for several, the first is the default (512x512)",
    )
    p.add_argument("--width", type=int, action="append", help="with --height: a size as a pair; repeatable")
    p.add_argument("--height", type=int, action="append", help="with --width: a size as a pair; repeatable")
    p.add_argument(
        "--batch",
        type=int,
        action="append",
        help="images per engine call (the U-Net runs at twice this); repeat for several batch sizes (default: 1)",
    )
    p.add_argument(
        "--target",
        choices=TARGETS,
        action="append",
        help="graphs to build: cpu (fp32), cuda (fp16, fused for ONNX Runtime's CUDA provider), tensorrt (fp16 with "
        "explicit casts, for plans built on the serving GPU by build-engines); repeatable, default cpu",
    )
    p.add_argument(
        "--fp32-ops",
        action="append",
        metavar="COMPONENT=OP[,OP]",
        help="op types to keep in float32 in fp16 graphs, e.g. unet=Softmax; repeatable",
    )
    p.add_argument(
        "--text-length",
        type=int,
        action="append",
        metavar="TOKENS",
        help="a text length the U-Net takes, a multiple of the text encoder's 77 tokens (a prompt of k 75-token "
        "chunks needs 77k); repeat for several (default: 77 and 154)",
    )
    p.add_argument(
        "--fp16-vae",
        action="store_true",
        help="convert an SDXL VAE to fp16 in the fp16 targets (only for an fp16-safe VAE; SDXL's own overflows, so "
        "it is kept in fp32 by default)",
    )
    p.add_argument("--name", help="model name to serve it under (default: the source folder's name)")
    p.add_argument("--parity-tolerance", type=float, help="allowed |torch - onnx| / output magnitude (default 1e-3)")
    p.add_argument("--fp16-tolerance", type=float, help="the same for fp16 targets (default 2e-2)")
    p.add_argument(
        "--min-image-psnr", type=float, help="least PSNR of an fp16 target's image against fp32's (default 30 dB)"
    )
    p.add_argument("--default-steps", type=int, help="steps the model is meant to run with (recorded in the manifest)")
    p.add_argument("--default-guidance", type=float, help="its guidance scale (recorded in the manifest)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "build-engines", help="build TensorRT plans of an exported model's tensorrt target for this machine's GPU"
    )
    p.add_argument("model", help="a folder made by 'diffuserve export ... --target tensorrt'")
    p.add_argument("--device-id", type=int, default=0, help="the GPU to build for (and on)")
    p.add_argument("--workspace-gb", type=float, help="the builder's workspace limit (default: TensorRT's)")
    p.add_argument(
        "--timing-cache",
        help="the timing cache to read and update (default: beside the plans, one per GPU architecture and TensorRT)",
    )
    p.add_argument(
        "--optimization-level",
        type=int,
        default=3,
        help="TensorRT's builder optimisation level, 0-5 (default 3, TensorRT's): higher searches longer",
    )
    p.set_defaults(func=cmd_build_engines)

    p = sub.add_parser(
        "serve",
        help="serve exported models over gRPC",
        epilog="Every setting also comes from the environment, DIFFUSERVE_ and its name in capitals "
        "(DIFFUSERVE_QUEUE_CAPACITY=8, DIFFUSERVE_MODELS='a b'), and from a TOML file (--config; keys as the "
        "flags without dashes: queue_capacity = 8, models = ['a', 'b'], optionally under [serve]). Flags win over "
        "the environment, the environment over the file. Tokens only from --auth-token-file or "
        "DIFFUSERVE_AUTH_TOKEN(S).",
    )
    p.add_argument("models", nargs="*", help="folders made by 'diffuserve export' (default: the bundled model)")
    p.add_argument("--config", help="a TOML file of settings (also $DIFFUSERVE_CONFIG)")
    p.add_argument("--host", default="[::]", help="the address to listen on (default: every interface)")
    p.add_argument("--port", type=int, default=50051, help="the gRPC port (0: any free one)")
    add_backend_arguments(p, default="auto")
    p.add_argument("--threads", type=int, help="intra-op threads per engine (default: the cores available)")
    p.add_argument("--default-steps", type=int, help="steps for requests that leave them unset (default: the model's)")
    p.add_argument("--default-guidance", type=float, help="guidance for requests that leave it unset (the model's)")
    p.add_argument(
        "--max-steps", type=int, default=ModelDefaults.max_steps, help="the most steps a request may ask for"
    )
    p.add_argument(
        "--max-images", type=int, default=ModelDefaults.max_images, help="the most images a request may ask for"
    )
    p.add_argument(
        "--metrics-port", type=int, help="Prometheus metrics on this port (needs diffuserve[metrics]); 0: any free"
    )
    p.add_argument(
        "--http-port",
        type=int,
        help="the browser playground and its HTTP gateway on this port, on --host (needs diffuserve[gateway]); 0: any "
        "free",
    )
    p.add_argument("--tls-cert", help="TLS: the server's certificate chain (PEM file)")
    p.add_argument("--tls-key", help="TLS: the server's private key (PEM file)")
    p.add_argument("--tls-client-ca", help="mutual TLS: clients must present a certificate this CA (PEM) signed")
    p.add_argument(
        "--auth-token-file",
        help="bearer tokens, one per line, that calls must carry (also $DIFFUSERVE_AUTH_TOKEN(S)); never on argv",
    )
    p.add_argument("--auth-health", action="store_true", help="with tokens: health checks need a token too")
    p.add_argument("--auth-reflection", action="store_true", help="with tokens: reflection needs a token too")
    p.add_argument(
        "--longest-request-s",
        type=float,
        default=ServerConfig.longest_request_s,
        help="the longest a request runs: a connection asked to reconnect (every 5 min) gets this long to finish",
    )
    p.add_argument(
        "--text-cache-mb",
        type=float,
        default=ModelDefaults.text_cache_bytes / 2**20,
        help="memory per model for encoded prompt chunks, so a repeated prompt skips the text encoder (0: off)",
    )
    p.add_argument(
        "--grace", type=float, default=ServerConfig.grace_s, help="seconds to finish accepted requests on shutdown"
    )
    p.add_argument(
        "--queue-capacity",
        type=int,
        default=WorkerConfig.queue_capacity,
        help="waiting requests before RESOURCE_EXHAUSTED",
    )
    p.add_argument("--no-batching", action="store_true", help="run each request on its own")
    p.add_argument(
        "--max-batch-wait-ms",
        type=float,
        default=WorkerConfig.max_batch_wait_ms,
        help="how long a request waits for batch company",
    )
    p.add_argument(
        "--low-memory",
        action="store_true",
        help="keep only the running stage's engines resident (text encoder, U-Net, VAE decoder in turn), each stage "
        "loading its own as it begins: for boards with little shared memory (Jetson), at a load per stage per batch",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="ask a server for an image")
    p.add_argument("prompt")
    add_client_arguments(p)
    p.add_argument("-o", "--output", default="out.png")
    p.add_argument("--model", default="")
    p.add_argument("--negative", default="")
    p.add_argument("--seed", type=int, action="append", default=[], help="repeat for several images")
    p.add_argument("--num-images", type=int, default=0)
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--guidance", type=float)
    p.add_argument("--scheduler", choices=list(SAMPLERS), default="", help="default: the model's own")
    p.add_argument(
        "--noise-mode", choices=NOISE_MODES, default="", help="how seeds become noise; default: the server's"
    )
    p.add_argument("--width", type=int, default=0)
    p.add_argument("--height", type=int, default=0)
    p.add_argument("--format", choices=IMAGE_FORMATS, default="")
    p.add_argument("--quality", type=int, default=0)
    p.add_argument("--no-metadata", action="store_true", help="do not embed prompt and settings in the file")
    p.add_argument("--init-image", help="image-to-image: start from this PNG, JPEG or WebP file")
    p.add_argument("--mask", help="inpainting: a grayscale image of the init image's size; white is repainted")
    p.add_argument("--strength", type=float, help="0..1, how much of the schedule runs (default 0.8; inpainting 1)")
    p.add_argument("--mask-blur", type=int, default=0, help="inpainting: blur the mask by this many pixels")
    p.add_argument(
        "--refuse-resize", action="store_true", help="fail on an init image of another size instead of resizing it"
    )
    p.add_argument("--timeout", type=float, help="deadline in seconds")
    p.add_argument("--stream", action="store_true", help="show a progress bar while the server works")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "gateway",
        help="the browser playground: an HTTP gateway (JSON, server-sent events) to running servers",
        epilog="Endpoints: GET / (the page), GET /api/models, POST /api/generate (a JSON body of GenerateRequest "
        "fields and `seed`; answers server-sent events). A caller's Authorization header is passed on to the server.",
    )
    add_client_arguments(p)
    p.add_argument("--http-host", default="127.0.0.1", help="the address to listen on (default: loopback only)")
    p.add_argument("--http-port", type=int, default=8080, help="the HTTP port (0: any free one)")
    p.add_argument("--timeout", type=float, help="a deadline in seconds for each call to the server")
    p.add_argument(
        "--grace", type=float, default=GATEWAY_GRACE_S, help="seconds open streams get to finish on shutdown"
    )
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser(
        "bench",
        help="latency and throughput: one request at a time, closed and open loop, sweeps, soak; in-process, against "
        "running servers or synthetic full-size models",
        epilog="Modes: one request at a time (default); --load: closed loop, a row per --concurrency; --rate: open "
        "loop, Poisson arrivals, a row per rate; --soak DURATION: a closed loop for that long, a row per --window. "
        "Targets: MODEL (in-process; the load modes serve it on a loopback port), --server HOST:PORT (running "
        "servers), --synthetic KIND. Every report carries its environment; --json, --csv, --plot write it, and "
        "--compare A.json B.json prints B against A.",
    )
    p.add_argument("model", nargs="?", help="an exported model folder (or --server, or --synthetic KIND instead)")
    p.add_argument(
        "--server",
        dest="remote",
        help="running servers instead of MODEL (HOST:PORT; several, comma-separated, round-robin)",
    )
    add_client_arguments(p, with_server=False)
    p.add_argument("--reference", help="the diffusers folder it was exported from, to time diffusers' pipeline")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--runs", type=int, default=5, help="requests timed one at a time (after a warm-up)")
    p.add_argument("--scheduler", choices=sorted(SAMPLERS), default="euler")
    p.add_argument("--prompt", default=BENCH_PROMPT, help="with --server or a load mode: the requests' prompt")
    p.add_argument("--guidance", type=float, default=BENCH_GUIDANCE, help="with --server or a load mode")
    p.add_argument(
        "--size", type=parse_size, metavar="WxH", help="with --server or a load mode (default: the model's)"
    )
    p.add_argument("--images", type=int, default=1, help="with --server or a load mode: images per request")
    p.add_argument(
        "--model-name", default="", help="with --server: the served model to ask for (default: the server's)"
    )
    p.add_argument("--timeout", type=float, help="with --server or a load mode: each request's deadline in seconds")
    p.add_argument("--load", action="store_true", help="closed loop: --concurrency clients, each waits for its answer")
    p.add_argument(
        "--rate",
        type=float,
        nargs="+",
        metavar="PER_S",
        help="open loop: requests arrive at random (Poisson) at this many per second, answered or not; a row per rate",
    )
    p.add_argument(
        "--soak", type=parse_duration, metavar="DURATION", help="a closed loop for this long (30s, 10m, 2h)"
    )
    p.add_argument(
        "--window",
        type=parse_duration,
        default=60.0,
        metavar="DURATION",
        help="with --soak: the span of each row (default 1m): latency and resident memory per window",
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8], help="--load: clients per row")
    p.add_argument("--requests", type=int, default=32, help="--load, --rate: requests per row")
    p.add_argument("--no-batching", action="store_true", help="a load mode on MODEL: serve it without batching")
    p.add_argument("--max-batch-wait-ms", type=float, help="a load mode on MODEL: the server's wait for batch company")
    p.add_argument("--json", help="also write the report here")
    p.add_argument("--csv", help="also write the report's rows here, one line per load point")
    p.add_argument(
        "--plot", help="also draw latency against load and the per-stage breakdown here (PNG; diffuserve[plots])"
    )
    p.add_argument(
        "--compare", nargs=2, metavar=("A.json", "B.json"), help="instead: print B's figures against A's, as ratios"
    )
    p.add_argument(
        "--tasks", action="store_true", help="each task the model serves (txt2img, img2img, inpaint) at the same steps"
    )
    p.add_argument(
        "--faults",
        action="store_true",
        help="instead: the next request's wait after a cancelled one, and an overload burst with mixed deadlines",
    )
    p.add_argument(
        "--fuzz",
        type=int,
        metavar="N",
        help="instead: N hostile and malformed requests, each answer checked against the API's contract",
    )
    p.add_argument("--seed", type=int, default=0, help="the seed of --fuzz's cases and of --rate's arrival times")
    p.add_argument(
        "--memory",
        action="store_true",
        help="instead: resident memory serving every exported batch size against the smallest alone",
    )
    p.add_argument(
        "--low-memory",
        action="store_true",
        help="also time the same request as serve --low-memory runs it, interleaved with the usual (with --memory: "
        "also its resident memory)",
    )
    add_backend_arguments(p, default="cpu")
    add_synthetic_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "grid",
        help="every combination of a few settings, drawn concurrently over gRPC onto one titled contact sheet",
        epilog="Each of --steps, --seeds, --guidance and --scheduler takes a comma-separated list; a setting with "
        "one value (or none: the server's default) is the same in every cell and shown in the caption. A cell the "
        "server refuses fails the whole grid before anything is written.",
    )
    p.add_argument("prompt")
    add_client_arguments(p)
    p.add_argument("-o", "--output", default="grid.png", help="the contact sheet (PNG)")
    p.add_argument(
        "--cells", metavar="DIR", help="also write each cell as the server sent it (settings inside) and grid.json"
    )
    p.add_argument("--steps", default="", metavar="N[,N...]", help="default: the model's")
    p.add_argument(
        "--seeds", "--seed", default="", metavar="N[,N...]", help="default: one random seed shared by every cell"
    )
    p.add_argument("--guidance", default="", metavar="G[,G...]", help="default: the model's")
    p.add_argument(
        "--scheduler", default="", metavar="NAME[,NAME...]", help=f"default: the model's own; of {', '.join(SAMPLERS)}"
    )
    p.add_argument("--columns", choices=AXES, help="the varied setting along the columns (default: seed, if varied)")
    p.add_argument("--model", default="")
    p.add_argument("--negative", default="")
    p.add_argument(
        "--noise-mode", choices=NOISE_MODES, default="", help="how seeds become noise; default: the server's"
    )
    p.add_argument("--width", type=int, default=0)
    p.add_argument("--height", type=int, default=0)
    p.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help="requests in flight at once, over one connection (so the server can batch them)",
    )
    p.add_argument("--timeout", type=float, help="each cell's deadline in seconds")
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser("demo", help="serve the bundled model on a loopback port and draw one prompt over gRPC")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("-o", "--output", default="demo.png")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("evaluate", help="grade the bundled model's drawings of random prompts, per sampler")
    p.add_argument("model", nargs="?", default=str(BUNDLED_MODEL))
    p.add_argument("--count", type=int, default=100, help="prompts (one image each) per sampler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sampler", action="append", default=[], choices=list(SAMPLERS), help="repeat for several; default: all"
    )
    p.add_argument("--json", help="also write the results here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("gallery", help="a grid of the bundled model's drawings of a few prompts")
    p.add_argument("prompts", nargs="*")
    p.add_argument("--model", default=str(BUNDLED_MODEL))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("-o", "--output", default="gallery.png")
    p.set_defaults(func=cmd_gallery)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command == "serve":  # its settings may also come from the environment and a TOML file
        try:
            serve_args = with_settings(subcommand(parser, "serve"), argv[argv.index("serve") + 1 :])
            check_ranges(serve_args)
        except SettingsError as error:
            print(f"serve: {error}", file=sys.stderr)
            return 2
        args = argparse.Namespace(**{**vars(args), **vars(serve_args)})
    try:
        configure_logging(args.verbose, args.log_format)
    except ValueError as error:  # DIFFUSERVE_LOG_FORMAT, which argparse does not check
        print(f"diffuserve: {error}", file=sys.stderr)
        return 2
    return args.func(args)


def subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


if __name__ == "__main__":
    sys.exit(main())
