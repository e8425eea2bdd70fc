"""`diffuserve bench`: every mode against a real server on a loopback port (or in-process), the report's shape, its
CSV, the comparison of two reports, and the figures the server reports for it (U-Net calls, process memory)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from diffuserve.server.cli import main
from diffuserve.server.client import Connection
from diffuserve.server.models import ServedModel
from diffuserve.server.tools.bench import BenchOptions, run_bench
from diffuserve.server.tools.load import LoadPlan, RequestSettings, arrival_times, run_load_bench
from diffuserve.server.tools.report import (
    REPORT_SCHEMA,
    ProgressBar,
    Sample,
    compare_reports,
    csv_text,
    format_comparison,
    load_report,
    new_report,
    summarise,
)
from diffuserve.v1 import diffusion_pb2 as pb

from .serving_helpers import euler_request, serving

STEPS = 3
SETTINGS = RequestSettings(steps=STEPS, scheduler="euler")


def link_to(server) -> Connection:
    return Connection((server.address,))


def test_responses_count_their_unet_calls_and_the_server_reports_its_memory(stub) -> None:
    euler = stub.Generate(euler_request(prompt="a red circle", steps=STEPS))
    assert euler.timings.unet_calls == STEPS
    # Heun calls the U-Net twice per step but the last.
    heun = stub.Generate(pb.GenerateRequest(prompt="a red circle", steps=STEPS, scheduler=pb.SCHEDULER_HEUN))
    assert heun.timings.unet_calls == 2 * STEPS - 1
    info = stub.GetServerInfo(pb.GetServerInfoRequest())
    assert info.resident_memory_bytes > 50 * 2**20
    assert not info.HasField("gpu_memory_bytes")  # the CPU backend runs on no GPU


def test_latency_against_a_server_reports_every_stage_with_percentiles(server, tmp_path: Path) -> None:
    report = run_load_bench(link_to(server), LoadPlan("latency", runs=4), SETTINGS, "server")
    assert report["schema"] == REPORT_SCHEMA and report["mode"] == "latency"
    (row,) = report["rows"]
    assert row["load"] == {"kind": "single", "value": 1}
    assert (row["requests"], row["ok"], row["errors"], row["mean_batch"]) == (4, 4, {}, 1.0)
    stages = row["stages_ms"]
    for stage in ("queue_ms", "text_encoder_ms", "unet_ms", "unet_call_ms", "sampler_ms", "vae_decode_ms"):
        assert set(stages[stage]) == {"p50", "p90", "p99", "max", "mean"}
        assert stages[stage]["p50"] <= stages[stage]["p90"] <= stages[stage]["p99"] <= stages[stage]["max"]
    assert stages["unet_call_ms"]["mean"] == pytest.approx(stages["unet_ms"]["mean"] / STEPS)
    # The client's end to end holds the server's total and the trip to it.
    assert row["latency_ms"]["p50"] >= stages["server_ms"]["p50"]
    assert row["memory"]["rss_mb"] > 50
    server_env, settings = report["environment"]["server"], report["settings"]
    assert server_env["backend"] == "cpu" and server_env["model"] and server_env["device"]
    assert (settings["width"], settings["height"]) == tuple(server_env["sizes"][0])
    assert report["environment"]["machine"]["versions"]["grpcio"]


def test_closed_loop_sweep_has_a_row_per_client_count(tiny_model: ServedModel) -> None:
    with serving(tiny_model, queue_capacity=16) as (server, _, _):
        plan = LoadPlan("closed", concurrency=(1, 3), requests=6)
        report = run_load_bench(link_to(server), plan, SETTINGS, "server")
    assert [row["load"] for row in report["rows"]] == [
        {"kind": "clients", "value": 1},
        {"kind": "clients", "value": 3},
    ]
    for row in report["rows"]:
        assert row["ok"] == 6 and row["images_per_s"] > 0
        assert 1 <= row["mean_batch"] <= max(tiny_model.batch_sizes)
    assert report["settings"]["concurrency"] == [1, 3]


def test_poisson_arrivals_come_at_the_rate_and_repeat_with_the_seed() -> None:
    due = arrival_times(rate=20.0, count=4000, seed=3)
    assert np.all(np.diff(due) >= 0)
    assert np.mean(np.diff(due)) == pytest.approx(1 / 20.0, rel=0.08)
    np.testing.assert_array_equal(due, arrival_times(20.0, 4000, 3))
    assert not np.array_equal(due, arrival_times(20.0, 4000, 4))


def test_open_loop_above_capacity_shows_queueing_in_the_latency(tiny_model: ServedModel) -> None:
    """Arrivals faster than the server answers: requests wait, and each is timed from when it was due."""
    with serving(tiny_model, queue_capacity=64, batching=False) as (server, _, _):
        plan = LoadPlan("open", rates=(200.0,), requests=12)
        report = run_load_bench(link_to(server), plan, SETTINGS, "server")
    (row,) = report["rows"]
    assert row["load"] == {"kind": "rate", "value": 200.0} and row["ok"] == 12
    assert (
        row["stages_ms"]["queue_ms"]["max"]
        > row["stages_ms"]["server_ms"]["p50"] - row["stages_ms"]["queue_ms"]["p50"]
    )
    assert row["latency_ms"]["max"] >= row["stages_ms"]["server_ms"]["max"]
    # Twelve requests due within ~60 ms, answered one by one: the last waits for most of the others.
    assert row["latency_ms"]["max"] > 5 * row["stages_ms"]["unet_ms"]["p50"]


def test_soak_has_a_row_per_window_with_the_server_memory(tiny_model: ServedModel) -> None:
    with serving(tiny_model) as (server, _, _):
        plan = LoadPlan("soak", concurrency=(2,), soak_s=3.0, window_s=1.0)
        report = run_load_bench(link_to(server), plan, SETTINGS, "server")
    rows = report["rows"]
    assert [row["load"]["kind"] for row in rows] == ["minute"] * 3
    assert [row["load"]["value"] for row in rows] == pytest.approx([1 / 60, 2 / 60, 3 / 60], abs=1e-3)
    for row in rows:
        assert row["ok"] > 0 and row["memory"]["rss_mb"] > 50 and row["wall_s"] == 1.0


def test_refused_requests_are_counted_by_code_not_timed(server) -> None:
    """Steps over the server's limit: every request is refused; the bench reports it and goes on."""
    settings = RequestSettings(steps=10_000)
    report = run_load_bench(link_to(server), LoadPlan("latency", runs=3), settings, "server")
    (row,) = report["rows"]
    assert row["errors"] == {"INVALID_ARGUMENT": 3} and row["ok"] == 0
    assert row["latency_ms"]["p50"] is None and row["images_per_s"] == 0


def test_in_process_latency_writes_json_and_csv(tiny_export: Path, tmp_path: Path, capsys) -> None:
    json_path, csv_path = tmp_path / "r.json", tmp_path / "r.csv"
    assert (
        main(
            [
                "bench",
                str(tiny_export),
                "--steps",
                "2",
                "--runs",
                "3",
                "--json",
                str(json_path),
                "--csv",
                str(csv_path),
            ]
        )
        == 0
    )
    report = load_report(json_path)
    assert report["target"] == "in-process" and report["mode"] == "latency"
    (row,) = report["rows"]
    assert row["requests"] == 3 and row["stages_ms"]["unet_call_ms"]["p50"] > 0
    assert report["environment"]["server"]["precision"] == "fp32"
    lines = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert len(lines) == 1 and float(lines[0]["latency_p50_ms"]) == pytest.approx(row["latency_ms"]["p50"], rel=1e-3)
    assert lines[0]["backend"] == "cpu" and lines[0]["steps"] == "2"
    out = capsys.readouterr().out
    assert "one request at a time, in-process" in out and "U-Net, one call" in out


def test_the_load_modes_serve_a_model_folder_on_loopback(tiny_export: Path, tmp_path: Path, capsys) -> None:
    json_path = tmp_path / "load.json"
    args = ["bench", str(tiny_export), "--load", "--concurrency", "1", "2", "--requests", "4", "--steps", "2"]
    assert main([*args, "--json", str(json_path)]) == 0
    report = load_report(json_path)
    assert report["mode"] == "closed" and len(report["rows"]) == 2
    assert report["grpc_overhead"]["grpc_p50_ms"] > 0
    assert "gRPC overhead" in capsys.readouterr().out


def test_the_server_target_refuses_what_needs_the_model_folder(server, capsys) -> None:
    assert main(["bench", "--server", server.address, "--tasks"]) == 2
    assert "give MODEL instead of --server" in capsys.readouterr().err


def test_an_unreachable_server_is_an_error_naming_it(capsys) -> None:
    assert main(["bench", "--server", "127.0.0.1:1", "--runs", "1", "--timeout", "2"]) == 1
    assert "bench --server: UNAVAILABLE" in capsys.readouterr().err


def fake_row(p50: float, images_per_s: float, load: dict) -> dict:
    samples = [Sample(p50, 0.1, {"unet_ms": p50 * 0.8, "server_ms": p50 * 0.95}) for _ in range(5)]
    return summarise(samples, 5 / images_per_s, load, {"rss_mb": 100.0, "gpu_mb": None})


def fake_report(p50: float, images_per_s: float, backend: str) -> dict:
    rows = [fake_row(p50 * c, images_per_s * c, {"kind": "clients", "value": c}) for c in (1, 4)]
    server = {"backend": backend, "model": "m", "device": "cpu", "precision": "fp32"}
    return new_report("closed", "server", server, {"steps": 20, "width": 64, "height": 64}, rows)


def test_compare_gives_ratios_per_matched_load_point_and_the_differences() -> None:
    a, b = fake_report(100.0, 10.0, "cpu"), fake_report(50.0, 20.0, "cuda")
    comparison = compare_reports(a, b)
    assert [row["load"]["value"] for row in comparison["rows"]] == [1, 4]
    figures = {f["figure"]: f for f in comparison["rows"][0]["figures"]}
    assert figures["end to end p50"]["ratio"] == pytest.approx(0.5)
    assert figures["images/s"]["ratio"] == pytest.approx(2.0)
    assert ("server.backend", "cpu", "cuda") in comparison["differences"]
    text = format_comparison(comparison, ("a.json", "b.json"))
    assert "server.backend: 'cpu' -> 'cuda'" in text and "B better" in text and "B worse" not in text


def test_compare_from_the_command_line(tmp_path: Path, capsys) -> None:
    a, b, other = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "other.json"
    a.write_text(json.dumps(fake_report(100.0, 10.0, "cpu")))
    b.write_text(json.dumps(fake_report(80.0, 12.0, "cpu")))
    other.write_text(json.dumps({"results": []}))
    assert main(["bench", "--compare", str(a), str(b)]) == 0
    assert "clients 4" in capsys.readouterr().out
    assert main(["bench", "--compare", str(a), str(other)]) == 2
    assert "not a diffuserve bench report" in capsys.readouterr().err


def test_csv_has_a_line_per_row_with_the_environment() -> None:
    report = fake_report(100.0, 10.0, "cpu")
    lines = list(csv.DictReader(io.StringIO(csv_text(report))))
    assert [line["load_value"] for line in lines] == ["1", "4"]
    assert lines[1]["latency_p99_ms"] == "400" and lines[0]["backend"] == "cpu" and lines[0]["rss_mb"] == "100"


def test_progress_bar_draws_on_a_terminal_only() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        with ProgressBar("bench", 4, stream=stream) as bar:
            bar.advance()
            bar.advance()
    assert "[##############..............] 2/4 requests" in terminal.getvalue()
    assert pipe.getvalue() == ""


def test_bad_load_options_are_refused_naming_the_flag(capsys) -> None:
    with pytest.raises(SystemExit, match="--rate"):
        main(["bench", "--server", "127.0.0.1:1", "--rate", "0"])
    with pytest.raises(SystemExit):
        main(["bench", "--server", "127.0.0.1:1", "--soak", "soon"])
    assert "a duration is seconds" in capsys.readouterr().err


def test_in_process_latency_keeps_the_diffusers_reference_figures(tiny_export: Path) -> None:
    report = run_bench(BenchOptions(str(tiny_export), steps=2, runs=2))
    assert report["diffuserve"]["total_ms"] > 0 and report["diffusers"] is None
    assert report["rows"][0]["requests"] == 2


def test_fuzz_reaches_a_server_that_wants_a_token(tiny_model: ServedModel) -> None:
    from diffuserve.server.app import BackgroundServer, ServerConfig
    from diffuserve.server.tools.fuzz import run_fuzz

    token = "bench-token-0123456789abcdef"
    config = ServerConfig(model_dirs=(), host="127.0.0.1", port=0, auth_tokens=(token,))
    with BackgroundServer(config, {tiny_model.name: tiny_model}) as server:
        with pytest.raises(grpc.RpcError):
            run_fuzz(server.address, 3)
        report = run_fuzz(Connection((server.address,), token=token), 12, seed=1)
    assert report.cases == 12 and report.ok


def test_synthetic_models_take_the_load_modes_on_their_export(tiny_export: Path, tmp_path: Path, monkeypatch) -> None:
    """The build and export of a full-size model (4 GB, minutes) are stood in for by the tiny export, placed where
    --work keeps the synthetic export; the rest is the real path: served on loopback, measured over gRPC."""
    from diffuserve.server.tools import synthetic

    (tmp_path / "export-cpu").symlink_to(tiny_export, target_is_directory=True)
    monkeypatch.setattr(synthetic, "prepare_source", lambda options: {})
    monkeypatch.setattr(synthetic, "prepare_export", lambda options, source: {})
    json_path = tmp_path / "synthetic-load.json"
    args = ["bench", "--synthetic", "sd15", "--work", str(tmp_path), "--load", "--concurrency", "2", "--requests", "4"]
    assert main([*args, "--json", str(json_path)]) == 0
    report = load_report(json_path)
    assert report["mode"] == "closed" and report["rows"][0]["ok"] == 4
    assert report["settings"]["steps"] == 2  # the CPU target's own, --steps not given


def test_the_synthetic_runs_encode_their_prompt_each_time(tiny_export: Path) -> None:
    """As diffusers' runs do: a prompt found in the cache would time a lookup against diffusers' encoder."""
    from diffuserve.server.models import load_model
    from diffuserve.server.tools.synthetic import SyntheticOptions, bench_ours

    model = load_model(str(tiny_export), backend="cpu")
    run = bench_ours(model, SyntheticOptions(kind="sd15", steps=2, runs=3), batch=1)
    stats = model.text_cache.stats()
    # Prompt and negative prompt, looked up by the warm-up and each run, found by none.
    assert stats.hits == 0 and stats.misses == 2 * (1 + 3)
    assert run.row["requests"] == 3
