"""Low memory (serve --low-memory): one stage's engines resident at a time, on real ONNX Runtime sessions of the tiny
model, in-process and through a real server on loopback."""

from __future__ import annotations

import logging
import shutil
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import diffuserve.engine.loader as loader
import diffuserve.engine.ort as ort
from diffuserve.engine.manifest import TEXT_ENCODER, UNET, VAE_DECODER, Manifest
from diffuserve.engine.ort import BackendUnavailableError
from diffuserve.engine.resident import ResidentEngines
from diffuserve.server.app import ServerConfig, load_models
from diffuserve.server.cli import build_parser
from diffuserve.server.models import TEXT_TO_IMAGE, ServedModel, load_model, served_components
from diffuserve.server.params import GenerateParams, validate
from diffuserve.server.pipeline import Solo, render_members
from diffuserve.v1 import diffusion_pb2 as pb

from .serving_helpers import busy, serving


@pytest.fixture(scope="module")
def low_model(tiny_export: Path) -> ServedModel:
    return load_model(tiny_export, backend="cpu", low_memory=True)


def params_for(model: ServedModel, **fields) -> GenerateParams:
    return validate(pb.GenerateRequest(**fields), {model.name: model}, model.name)


class Leaving(Solo):
    """A member that stops after some steps: the U-Net's rows are rebuilt for those still running."""

    def __init__(self, params: GenerateParams, steps: int):
        super().__init__(params)
        self.steps, self.done = steps, 0

    def proceed(self) -> bool:
        return self.done < self.steps

    def on_step(self, step, total, latents, step_ms) -> None:
        self.done = step


class LiveSessions:
    """Every CPU session created from here on, held weakly: the ones alive are the ones something still holds; and
    how many were alive as each was created."""

    def __init__(self) -> None:
        self.sessions: weakref.WeakSet = weakref.WeakSet()
        self.alive_at_creation: list[int] = []

    def __len__(self) -> int:
        return len(self.sessions)


@pytest.fixture
def live_sessions(monkeypatch: pytest.MonkeyPatch) -> LiveSessions:
    live = LiveSessions()
    create = ort.cpu_session

    def recording(*args, **kwargs):
        live.alive_at_creation.append(len(live))
        session = create(*args, **kwargs)
        live.sessions.add(session)
        return session

    monkeypatch.setattr(ort, "cpu_session", recording)
    return live


# Samplers of one, two and several U-Net calls per step, and two that draw noise every step, in both noise modes.
@pytest.mark.parametrize(
    ("scheduler", "noise_mode"),
    [
        (pb.SCHEDULER_EULER, pb.NOISE_MODE_TORCH_CPU),
        (pb.SCHEDULER_HEUN, pb.NOISE_MODE_NUMPY),
        (pb.SCHEDULER_DPMPP_2M, pb.NOISE_MODE_TORCH_CPU),
        (pb.SCHEDULER_EULER_ANCESTRAL, pb.NOISE_MODE_NUMPY),
        (pb.SCHEDULER_DPMPP_2M_SDE_KARRAS, pb.NOISE_MODE_TORCH_CPU),
    ],
)
def test_batched_images_are_bit_identical_with_and_without_low_memory(
    tiny_model: ServedModel, low_model: ServedModel, scheduler: int, noise_mode: int
) -> None:
    common = {"steps": 5, "scheduler": scheduler, "noise_mode": noise_mode}
    requests = [
        {"prompt": "a red circle", "seeds": [11], "guidance_scale": 7.5},
        # Two images: with the first request's, three rows padded into the batch-2 engines.
        {"prompt": "a blue triangle", "negative_prompt": "green", "seeds": [12, 13], "guidance_scale": 4.0},
    ]
    images = {}
    for model in (tiny_model, low_model):
        members = [Solo(params_for(model, **r, **common)) for r in requests]
        images[model.low_memory] = render_members(model, members)
    for resident, low in zip(images[False], images[True], strict=True):
        assert resident.shape == low.shape and (resident == low).all()


def test_one_component_is_alive_at_every_engine_call_and_a_stage_loads_once(
    tiny_export: Path, tiny_model: ServedModel, live_sessions: LiveSessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, int]] = []
    run = ort.OrtEngine.run

    def counting(engine, feeds):
        calls.append((engine.spec.name, len(live_sessions)))
        return run(engine, feeds)

    monkeypatch.setattr(ort.OrtEngine, "run", counting)
    model = load_model(tiny_export, backend="cpu", low_memory=True)
    resident = model.loaded.engines
    # Every component served, the VAE encoder included (editing), loaded once at start.
    assert isinstance(resident, ResidentEngines) and resident.loads == len(served_components(model.manifest))
    # Loaded once each at start, released in turn: the first stage's stays, for the first request.
    assert resident.resident == TEXT_ENCODER and len(live_sessions) == 1

    steps, common = 6, {"steps": 6, "scheduler": pb.SCHEDULER_EULER}
    staying = Solo(params_for(model, prompt="a red circle", seeds=[1], **common))
    leaving = Leaving(params_for(model, prompt="a blue square", seeds=[2], **common), steps=2)
    pixels = render_members(model, [staying, leaving])

    assert leaving.done == 2 and pixels[1] is None
    components = [name for name, _ in calls]
    # Four prompt rows are two calls of the batch-2 text encoder; Euler calls the U-Net once a step.
    assert components == [TEXT_ENCODER] * 2 + [UNET] * steps + [VAE_DECODER]
    assert {alive for _, alive in calls} == {1}
    # Each stage's session was created after the previous stage's was gone: the peak is one component, not two.
    assert live_sessions.alive_at_creation == [0] * resident.loads
    # The text encoder was resident already; the U-Net's rows rebuilt when a member left asked for its engines
    # again: no second load.
    assert resident.loads == len(served_components(model.manifest)) + 2
    (alone,) = render_members(tiny_model, [Solo(staying.params)])
    assert (pixels[0] == alone).all()


def test_entering_a_stage_releases_the_previous_stage_s_session(low_model: ServedModel) -> None:
    text_encoder = weakref.ref(low_model.engines(TEXT_ENCODER)[0].session)
    assert text_encoder() is not None
    unet = low_model.engines(UNET, low_model.sizes[0])
    assert text_encoder() is None  # no collection needed: nothing else held it
    assert low_model.loaded.engines.resident == UNET and unet[0].spec.name == UNET
    assert TEXT_ENCODER in low_model.loaded.engines and low_model.loaded.engines.resident == UNET


def test_concurrent_callers_each_get_the_component_they_ask_for_loaded_once_at_a_time(
    low_model: ServedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    inside, most = [0], [0]
    lock = threading.Lock()
    load_target = loader.load_target

    def watched(*args, **kwargs):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            return load_target(*args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(loader, "load_target", watched)
    names = [TEXT_TO_IMAGE[i % len(TEXT_TO_IMAGE)] for i in range(24)]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda name: (name, low_model.engines(name)[0].spec.name), names))
    assert all(asked == spec for asked, spec in got)
    assert most[0] == 1


def test_concurrent_requests_through_the_worker_match_a_fully_resident_server(
    tiny_model: ServedModel, low_model: ServedModel
) -> None:
    common = {"steps": 4, "scheduler": pb.SCHEDULER_EULER_ANCESTRAL}
    requests = [
        pb.GenerateRequest(prompt="a red circle", seeds=[21], **common),
        pb.GenerateRequest(prompt="a green square", seeds=[22], **common),
        # Another step count: a batch of its own, queued behind the others.
        pb.GenerateRequest(prompt="a blue triangle", seeds=[23], steps=3),
    ]
    responses = {}
    for model in (tiny_model, low_model):
        with serving(model) as (_, stub, _), busy(stub, steps=20), ThreadPoolExecutor(len(requests)) as pool:
            responses[model.low_memory] = list(pool.map(stub.Generate, requests))
    assert [r.timings.batch_size for r in responses[True]] == [2, 2, 1]
    for resident, low in zip(responses[False], responses[True], strict=True):
        assert [i.data for i in resident.images] == [i.data for i in low.images]
    assert low_model.loaded.engines.resident == VAE_DECODER


@pytest.mark.parametrize("broken", [TEXT_ENCODER, VAE_DECODER])
def test_a_graph_that_does_not_load_fails_at_start_not_at_its_stage(
    tiny_export: Path, tmp_path: Path, broken: str
) -> None:
    copy = Path(shutil.copytree(tiny_export, tmp_path / "model"))
    graph = Manifest.load(copy).targets["cpu"].components[broken].graph_file
    (copy / graph).write_bytes(b"not an onnx graph")
    with pytest.raises(Exception, match=Path(graph).name):
        load_model(copy, backend="cpu", low_memory=True)


def test_a_backend_that_does_not_run_fails_at_start(tiny_export: Path, tiny_cuda_export: Path) -> None:
    from diffuserve.engine.ort_cuda import cuda_unavailable_reason

    if cuda_unavailable_reason() is None:
        pytest.skip("this machine has a working CUDA")
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
        load_model(tiny_cuda_export, backend="cuda", low_memory=True)
    with pytest.raises(ValueError, match="no 'cuda' target"):
        load_model(tiny_export, backend="cuda", low_memory=True)
    model = load_model(tiny_cuda_export, backend="auto", low_memory=True)  # auto chooses as it always does
    assert (model.backend, model.low_memory) == ("cpu", True) and model.loaded.reason.startswith("auto")


def test_the_flag_reaches_the_server_config_and_its_load_log(
    tiny_export: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for command in (["serve"], ["bench", "MODEL"]):
        assert build_parser().parse_args([*command, "--low-memory"]).low_memory
        assert not build_parser().parse_args(command).low_memory
    config = ServerConfig(model_dirs=(str(tiny_export),), backend="cpu", low_memory=True)
    with caplog.at_level(logging.INFO):
        (model,) = load_models(config).values()
    assert model.low_memory
    assert "low memory: one stage's engines resident at a time" in caplog.text
    assert "loaded once at start: text_encoder in" in caplog.text


def test_bench_times_the_same_request_both_ways_and_finds_the_same_image(tiny_export: Path, capsys) -> None:
    from diffuserve.server.tools.bench import BenchOptions, run_bench

    report = run_bench(BenchOptions(str(tiny_export), steps=2, runs=2, low_memory=True))
    low = report["low_memory"]
    # After the warm-up the VAE decoder is resident: every request loads all three stages.
    assert low["loads_per_request"] == len(TEXT_TO_IMAGE) and low["max_abs_difference"] == 0
    assert low["low_memory"]["total_ms"] > 0 and low["resident"]["total_ms"] > 0
    assert "low memory    resident   ratio" in capsys.readouterr().out
