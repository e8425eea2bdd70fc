"""The synthetic full-size models: published architectures, the folder they are written as, and the benchmark's
report. Nothing full-size is built, exported or run here (the meta device counts parameters without memory)."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from diffuserve.engine.manifest import (
    ENCODER_HIDDEN_STATES,
    MODEL_OUTPUT,
    SAMPLE,
    TIMESTEP,
    UNET,
    ComponentSpec,
    TensorSpec,
)
from diffuserve.export.synthetic import (
    ARCHITECTURES,
    MARKER_NAME,
    architecture,
    build_architecture_folder,
    is_built,
    parameter_counts,
    scaled_down,
    time_diffusers,
    write_tokenizer,
)
from diffuserve.server.cli import add_backend_arguments
from diffuserve.server.tokenizer import ClipTokenizer
from diffuserve.server.tools import synthetic as tool
from diffuserve.server.tools.report import write_json

COMMITTED_TOKENIZER = Path(__file__).resolve().parent.parent / "models" / "shapes-sd" / "tokenizer"

# Widths small enough to build and run in a second, the release's layout otherwise (four levels, 8x VAE).
NARROW = {
    "unet": {"block_out_channels": (32, 32, 64, 64), "norm_num_groups": 8, "cross_attention_dim": 32},
    "vae": {"block_out_channels": (8, 8, 16, 16), "norm_num_groups": 4, "layers_per_block": 1},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4},
}


def narrow(kind: str):
    changes = {**NARROW, "unet": {**NARROW["unet"], "attention_head_dim": (2, 2, 4, 4) if kind == "sd21" else 8}}
    return scaled_down(architecture(kind), **changes)


@pytest.fixture(scope="module")
def narrow_sd15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_architecture_folder(narrow("sd15"), tmp_path_factory.mktemp("synthetic") / "sd15", seed=3)


def test_sd15_has_the_published_parameter_counts() -> None:
    assert parameter_counts(architecture("sd15")) == {
        "text_encoder": 123_060_480,  # CLIP ViT-L/14's text tower
        "unet": 859_520_964,
        "vae": 83_653_863,
    }


def test_sd21_has_the_published_parameter_counts() -> None:
    # OpenCLIP ViT-H/14's text tower without its last layer (SD 2 reads the penultimate), and the same VAE.
    assert parameter_counts(architecture("sd21")) == {
        "text_encoder": 340_387_840,
        "unet": 865_910_724,
        "vae": 83_653_863,
    }


def test_the_configs_are_the_releases_own() -> None:
    sd15, sd21 = architecture("sd15"), architecture("sd21")
    assert sd15.unet["block_out_channels"] == (320, 640, 1280, 1280)
    assert (sd15.unet["cross_attention_dim"], sd15.unet["attention_head_dim"], sd15.unet["sample_size"]) == (
        768,
        8,
        64,
    )
    assert sd15.unet["down_block_types"] == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert sd15.unet["up_block_types"] == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert (sd15.text_encoder["hidden_act"], sd15.text_encoder["max_position_embeddings"]) == ("quick_gelu", 77)
    assert (sd15.vae["scaling_factor"], sd15.vae["latent_channels"], sd15.vae["sample_size"]) == (0.18215, 4, 512)
    assert (sd15.scheduler_class, sd15.scheduler["prediction_type"], sd15.size) == (
        "PNDMScheduler",
        "epsilon",
        (512, 512),
    )
    assert sd21.unet["attention_head_dim"] == (5, 10, 20, 20)
    assert (sd21.unet["cross_attention_dim"], sd21.unet["use_linear_projection"]) == (1024, True)
    assert (sd21.text_encoder["hidden_act"], sd21.text_encoder["num_hidden_layers"]) == ("gelu", 23)
    assert (sd21.scheduler["prediction_type"], sd21.size) == ("v_prediction", (768, 768))


def test_an_unknown_kind_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="sd15"):
        architecture("sdxl")


def test_the_folder_is_a_diffusers_sd_folder_with_the_real_tokenizer(narrow_sd15: Path) -> None:
    index = json.loads((narrow_sd15 / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    for part in ("text_encoder", "unet", "vae"):
        assert list((narrow_sd15 / part).glob("*.safetensors")), part
        assert not [p for p in (narrow_sd15 / part).iterdir() if p.suffix in (".bin", ".ckpt", ".pt")]
    for name in ("vocab.json", "merges.txt"):
        assert (narrow_sd15 / "tokenizer" / name).read_bytes() == (COMMITTED_TOKENIZER / name).read_bytes()
    scheduler = json.loads((narrow_sd15 / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler == dict(ARCHITECTURES["sd15"].scheduler)
    assert is_built(narrow_sd15, "sd15", seed=3)
    assert not is_built(narrow_sd15, "sd15", seed=0)


def test_the_same_seed_writes_the_same_weights(narrow_sd15: Path, tmp_path: Path) -> None:
    again = build_architecture_folder(narrow("sd15"), tmp_path / "again", seed=3)
    for part, name in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        assert (again / part / name).read_bytes() == (narrow_sd15 / part / name).read_bytes(), part
    marker = json.loads((again / MARKER_NAME).read_text())
    assert marker["kind"] == "sd15" and marker["parameters"]["unet"] > 0


def test_sd21_pads_prompts_with_its_own_token(tmp_path: Path) -> None:
    ids = {}
    for kind in ("sd15", "sd21"):
        folder = write_tokenizer(architecture(kind), tmp_path / kind)
        ids[kind] = ClipTokenizer.from_folder(folder).encode(["a red circle"])[0]
    assert ids["sd15"][-1] == 49407  # <|endoftext|>
    assert ids["sd21"][-1] == 0  # "!"
    assert list(ids["sd15"][:5]) == list(ids["sd21"][:5])


def test_diffusers_timing_counts_unet_calls_and_returns_images(narrow_sd15: Path) -> None:
    noise = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    run = time_diffusers(
        narrow_sd15, scheduler="euler", prompt="a red circle", noise=noise, steps=2, guidance_scale=7.5, runs=1
    )
    assert run.unet_calls == 2
    assert run.images.shape == (1, 64, 64, 3)
    assert set(run.runs[0]) == {"text_encoder", "unet", "vae_decode", "render_ms"}
    assert run.setup["dtype"] == "float32" and run.peak_gpu_bytes is None


def test_the_server_side_lists_the_kinds_export_builds() -> None:
    assert tool.SYNTHETIC_KINDS == tuple(ARCHITECTURES)


def test_the_benchmark_tool_imports_without_torch() -> None:
    code = (
        "import sys, diffuserve.server.tools.synthetic; sys.exit('torch' in sys.modules or 'diffusers' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def bench_parser() -> argparse.ArgumentParser:
    """The bench subcommand's flags that --synthetic reuses, as server/cli.py defines them."""
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?")
    parser.add_argument("--reference")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--scheduler", default="euler")
    parser.add_argument("--json")
    add_backend_arguments(parser, default="cpu")
    tool.add_synthetic_arguments(parser)
    return parser


@pytest.mark.parametrize(
    ("argv", "steps", "runs"),
    [
        (["--synthetic", "sd15"], 2, 1),
        (["--synthetic", "sd15", "--target", "cuda"], 30, 5),
        (["--synthetic", "sd15", "--steps", "20", "--runs", "5"], 20, 5),
    ],
)
def test_synthetic_takes_per_target_defaults_unless_steps_are_given(argv: list[str], steps: int, runs: int) -> None:
    options = tool.options_from_args(bench_parser().parse_args(argv))
    assert (options.steps, options.runs) == (steps, runs)
    assert options.backend == options.target  # the bench's --backend default (cpu) gives way to the target's


def test_the_cuda_flags_of_bench_reach_the_synthetic_run() -> None:
    argv = ["--synthetic", "sd15", "--target", "cuda", "--no-cuda-graph", "--device-id", "1"]
    options = tool.options_from_args(bench_parser().parse_args(argv))
    assert options.backend == "cuda" and options.device_id == 1
    assert options.cuda_options.cuda_graph is False
    assert tool.options_from_args(bench_parser().parse_args(["--synthetic", "sd15"])).cuda_options is None


def test_the_plain_bench_keeps_its_defaults() -> None:
    args = bench_parser().parse_args(["some/model"])
    assert args.steps == 20 and args.runs == 5 and args.backend == "cpu" and args.synthetic is None
    assert json.dumps({"steps": args.steps, "backend": args.backend}) == '{"steps": 20, "backend": "cpu"}'


def test_synthetic_refuses_a_model_folder_or_another_reference(capsys) -> None:
    args = bench_parser().parse_args(["some/model", "--synthetic", "sd15"])
    assert tool.cmd_synthetic(args) == 2
    assert "MODEL" in capsys.readouterr().err


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="--batch"):
        tool.SyntheticOptions(batches=(0,))
    with pytest.raises(ValueError, match="--target"):
        tool.SyntheticOptions(target="tpu")
    options = tool.SyntheticOptions(kind="sd21", batches=(4, 1, 4), work="/tmp/w")
    assert options.batches == (1, 4) and options.export_dir == Path("/tmp/w/export-cpu")


def stages(scale: float) -> dict[str, float]:
    return {key: scale * (index + 1) for index, (key, _) in enumerate(tool.TABLE_ROWS)}


def sample_report(backend: str = "cpu", steps: int = 2) -> dict:
    memory = {"rss_start_mb": 900.0, "rss_peak_mb": 1400.0, "rss_added_mb": 500.0, "gpu_added_mb": None}
    return {
        "options": {"kind": "sd15", "steps": steps},
        "settings": {"steps": steps, "scheduler": "euler", "guidance_scale": 7.5, "runs": 1},
        "environment": {
            "machine": {
                "cpu": "AMD EPYC",
                "cores": 2,
                "load_average_1m": 2.1,
                "versions": {"torch": "2.13.0", "diffusers": "0.42.1"},
                "onnxruntime": {"version": "1.32.0", "path": "/x/onnxruntime", "available_providers": []},
            },
            "server": {
                "backend": backend,
                "target": backend,
                "precision": "fp32" if backend == "cpu" else "fp16",
                "providers": ["CPUExecutionProvider"] if backend == "cpu" else ["CUDAExecutionProvider"],
                "device": "AMD EPYC" if backend == "cpu" else "NVIDIA H200",
                "sizes": [[512, 512]],
                "diffusers_pipeline": {
                    "dtype": "float32",
                    "device": "cpu",
                    "attention": "AttnProcessor2_0",
                    "scheduler": "E",
                },
            },
        },
        "build": {"parameters": {"unet": 859_520_964}, "bytes": 4.27e9, "reused": True, "description": "SD 1.5"},
        "export": {"targets": ["cpu"], "size": [512, 512], "batches": [1], "bytes": 4.3e9, "export_s": 190.0},
        "results": [
            {
                "batch": 1,
                "unet_calls": steps,
                "diffuserve": stages(1.0),
                "diffusers": stages(2.0),
            }
        ],
        "memory": {"diffuserve": {**memory, "load_s": 14.0}, "diffusers": {**memory, "rss_added_mb": 1000.0}},
        "anchors": [
            {"label": a.label, "total_ms": a.total_ms, "steps": a.steps, "hardware": a.hardware, "source": a.source}
            for a in tool.ANCHORS
        ],
        "checks": [
            {"name": "image", "max_abs_diff": 1e-6, "mean_abs_diff": 1e-7, "psnr_db": 120.0, "min_psnr_db": 40.0}
            | {"passed": True}
        ],
    }


def test_the_table_says_where_and_how_it_ran() -> None:
    text = tool.format_report(sample_report())
    assert "backend cpu (CPUExecutionProvider), fp32, on AMD EPYC" in text
    assert "CPU RUN WITH 2 STEPS, NOT 30" in text
    assert "load average 2.1" in text
    assert "859.5M" in text and "exported in 190 s" in text
    ratio_line = next(line for line in text.splitlines() if line.startswith("text encoder"))
    assert ratio_line.split()[-1] == "0.50"  # ours / diffusers
    assert "TensorRT 8.6 (A100-PCIE-80GB)" in text and "20.00 ms/step" in text
    assert "for scale only" in text and "PSNR 120.0 dB" in text
    memory_line = next(line for line in text.splitlines() if line.startswith("peak RSS added"))
    assert memory_line.split()[-3:] == ["500.00", "1000.00", "0.50"]
    assert "loaded in 14.0 s" in text


def test_a_gpu_run_at_full_steps_has_no_cpu_warning() -> None:
    text = tool.format_report(sample_report(backend="cuda", steps=30))
    assert "CPU RUN" not in text and "for scale only" not in text
    assert "fp16, on NVIDIA H200" in text


def test_the_json_report_carries_the_environment(tmp_path: Path) -> None:
    report = sample_report()
    report["results"][0]["diffuserve"]["total_ms"] = np.float32(1.5)
    write_json(report, tmp_path / "r.json")
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["environment"]["server"]["backend"] == "cpu"
    assert written["environment"]["machine"]["cpu"] == "AMD EPYC"
    assert written["environment"]["machine"]["onnxruntime"]["version"] == "1.32.0"
    assert written["results"][0]["diffuserve"]["total_ms"] == 1.5


def test_failed_checks_fail_the_command() -> None:
    report = sample_report()
    assert tool.checks_passed(report)
    report["checks"].append({"name": "graph", "passed": False})
    assert not tool.checks_passed(report)
    assert tool.checks_passed({**report, "checks": [{"name": "graph", "passed": None, "skipped": "no switch"}]})


def test_image_agreement_of_equal_images_is_infinite_psnr() -> None:
    image = np.random.default_rng(0).random((1, 8, 8, 3), dtype=np.float32)
    assert tool.image_agreement(image, image)["psnr_db"] == math.inf
    assert tool.image_agreement(image, np.clip(image + 0.01, 0, 1))["max_abs_diff"] <= 0.01 + 1e-6


# In a fresh process: in the suite's, other tests' threads (servers, thread pools) free memory while the phase runs,
# and a drop as large as the block hides it from the peak.
MEMORY_PHASE = """
import json, numpy as np
from diffuserve.server.tools.synthetic import MemoryProbe
probe = MemoryProbe.start()
block = np.ones(64 * 2**20 // 8)  # 64 MB touched
print(json.dumps(probe.stop().to_dict()))
"""


def test_the_memory_probe_measures_a_phase() -> None:
    result = subprocess.run([sys.executable, "-c", MEMORY_PHASE], capture_output=True, text=True, check=True)
    measured = json.loads(result.stdout.splitlines()[-1])
    if measured["rss_added_mb"] is None:
        pytest.skip("no /proc/self/status on this OS")
    assert measured["rss_added_mb"] >= 60


def test_the_environment_names_libraries_and_the_runtime_in_use() -> None:
    model = type(
        "FakeModel",
        (),
        {
            "name": "m",
            "backend": "cpu",
            "target": "cpu",
            "precision": "fp32",
            "providers": ["CPUExecutionProvider"],
            "device": "cpu",
            "sizes": ((512, 512),),
            "batch_sizes": (1,),
        },
    )()
    env = tool.environment(model, replace(tool.SyntheticOptions(), steps=3), None)
    host = env["machine"]
    assert host["versions"]["numpy"] == np.__version__ and host["versions"]["diffusers"]
    assert "CPUExecutionProvider" in host["onnxruntime"]["available_providers"]
    assert host["cores"] >= 1 and host["gpu"] is None and env["server"]["backend"] == "cpu"


# The CUDA-graph check runs only on a GPU; here the engine is a stand-in (a GPU cannot exist here) around the real
# comparison (engine.ort_cuda.graph_replay_difference), so the check is pinned down before it meets the lent machine.


class StandInUNet:
    """An engine whose answer is a fixed function of its inputs; with `stale`, its graph replays repeat the first
    answer, as a replay that never copied the new inputs in would."""

    uses_cuda_graph = True

    def __init__(self, spec, stale: bool = False):
        self.spec, self.stale, self.first = spec, stale, None

    def run_eager(self, feeds):
        return {MODEL_OUTPUT: (feeds[SAMPLE] * 0.5 + feeds[TIMESTEP][:, None, None, None] / 1000).astype(np.float32)}

    def run(self, feeds):
        out = self.run_eager(feeds)
        if self.stale:
            self.first = self.first or out
            return self.first
        return out


def unet_spec():
    return ComponentSpec(
        UNET,
        inputs=(
            TensorSpec(SAMPLE, (2, 4, 8, 8), "float32"),
            TensorSpec(TIMESTEP, (2,), "float32"),
            TensorSpec(ENCODER_HIDDEN_STATES, (2, 77, 32), "float32"),
        ),
        outputs=(TensorSpec(MODEL_OUTPUT, (2, 4, 8, 8), "float32"),),
    )


@pytest.mark.parametrize(("stale", "passed"), [(False, True), (True, False)])
def test_the_cuda_graph_check_catches_a_replay_that_ignores_new_inputs(stale: bool, passed: bool) -> None:
    engine = StandInUNet(unet_spec(), stale=stale)
    model = SimpleNamespace(sizes=((64, 64),), engines=lambda name, size: (engine,))
    assert tool.cuda_graph_check(model, batch=1)["passed"] is passed


def test_the_cuda_graph_check_is_skipped_when_the_unet_runs_eagerly() -> None:
    engine = StandInUNet(unet_spec())
    engine.uses_cuda_graph = False
    model = SimpleNamespace(sizes=((64, 64),), engines=lambda name, size: (engine,))
    assert tool.cuda_graph_check(model, batch=1)["passed"] is None
