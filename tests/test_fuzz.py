"""The fuzzer: its contract checks on fabricated outcomes, its cases against the server's own validation, and a
thousand of them against a real server."""

from __future__ import annotations

import hashlib
import io
import math
import sys
from dataclasses import replace

import grpc
import pytest

from PIL import Image

from diffuserve.server.app import BackgroundServer, ServerConfig
from diffuserve.server.models import ServedModel
from diffuserve.server.params import MAX_IMAGE_BYTES, InvalidArgument, ModelNotFound, validate
from diffuserve.server.tools.fuzz import (
    GENERATE,
    GENERATE_STREAM,
    KINDS,
    MISSING_HYPOTHESIS,
    REQUEST_FIELDS,
    RETRY_PUSHBACK_KEY,
    Case,
    Echo,
    Outcome,
    Record,
    Target,
    check_outcome,
    draw_cases,
    expected_refusals,
    expected_task,
    extreme_fields,
    format_report,
    image_file,
    letter_groups,
    letter_tokens,
    letter_words,
    padded_image,
    parse,
    png_bomb,
    raw_case,
    refusal_problems,
    require_hypothesis,
    run_fuzz,
    status_problems,
    structured_case,
    tally,
)
from diffuserve.v1 import diffusion_pb2 as pb
from diffuserve.v1 import diffusion_pb2_grpc as pb_grpc

FUZZ_CASES = 1000
# Small limits keep the valid cases cheap: each runs the tiny model for at most this many steps and images.
SMALL_STEPS = 2
SMALL_IMAGES = 2
TARGET = Target(
    default_model="tiny-sd",
    models=("tiny-sd",),
    width=128,
    height=128,
    default_steps=20,
    max_steps=SMALL_STEPS,
    max_images=SMALL_IMAGES,
    schedulers=(pb.SCHEDULER_EULER, pb.SCHEDULER_DDIM),
    previews=True,
    sizes=((128, 128), (192, 128)),
    tasks=(pb.TASK_TXT2IMG, pb.TASK_IMG2IMG, pb.TASK_INPAINT),
    family="sd1",
    max_prompt_tokens=150,
    default_guidance_scale=7.5,
    guidance_embedded=False,
)
GOOD = pb.GenerateRequest(prompt="a red circle", steps=1, seeds=[3])
EVENTS = ("queued", "image", "image", "completed")


def rules(case: Case, outcome: Outcome) -> list[str]:
    return [problem.rule for problem in check_outcome(case, outcome, TARGET)]


def edge_case(**fields) -> Case:
    """An edge case with a prompt (unless given), its changed fields unknown: any field may be named."""
    return structured_case("edge", GENERATE, pb.GenerateRequest(**{"prompt": "x", **fields}))


def changed_case(changed: tuple[str, ...], **fields) -> Case:
    """An edge case that changed these fields of a valid request."""
    return structured_case("edge", GENERATE, pb.GenerateRequest(prompt="x", **fields), frozenset(changed))


def png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    return image_file(size, "PNG", mode)


def test_unknown_and_internal_break_the_contract() -> None:
    case = edge_case(prompt="x")
    assert rules(case, Outcome("UNKNOWN", "Unexpected error")) == [
        "status UNKNOWN is outside the contract",
        "error message shows Python internals",
    ]
    assert rules(case, Outcome("INTERNAL", "request abc failed")) == ["status INTERNAL is outside the contract"]
    assert rules(case, Outcome("DEADLINE_EXCEEDED", "Deadline Exceeded")) == []


def test_invalid_argument_must_name_a_field_of_the_request() -> None:
    case = edge_case(steps=0)
    assert rules(case, Outcome("INVALID_ARGUMENT", "steps: must be in 1..2, got 0")) == []
    assert rules(case, Outcome("INVALID_ARGUMENT", "prompt: must not be empty; steps: must be in 1..2")) == []
    assert rules(case, Outcome("INVALID_ARGUMENT", "bad request")) == [
        "INVALID_ARGUMENT names no field of GenerateRequest"
    ]
    # A body that is no GenerateRequest has no field to name; saying what is wrong is enough.
    garbage = raw_case(GENERATE, b"\xff\xff\xff")
    assert garbage.request is None
    assert rules(garbage, Outcome("INVALID_ARGUMENT", "request: not a valid GenerateRequest")) == []
    assert rules(garbage, Outcome("INVALID_ARGUMENT", "")) == ["INVALID_ARGUMENT for an unparsable body says nothing"]


def test_error_messages_are_short_and_free_of_python_internals() -> None:
    case = edge_case(model="m" * 5000)
    echo = f"model: no model named {'m' * 5000!r}"
    assert rules(case, Outcome("NOT_FOUND", echo)) == ["error message longer than 2048 bytes"]
    leak = "request 1 failed: <Future at 0x7f3a2c0 state=pending>"
    assert rules(case, Outcome("NOT_FOUND", f"model: {leak}")) == ["error message shows Python internals"]
    assert rules(edge_case(model="tiny-sd"), Outcome("NOT_FOUND", "model: no model named 'tiny-sd'")) == [
        "NOT_FOUND for a model the server serves"
    ]


def test_resource_exhausted_is_a_full_queue_or_an_oversized_body() -> None:
    case = edge_case(prompt="x" * 100_000)
    pushback = ((RETRY_PUSHBACK_KEY, "250"),)
    assert rules(case, Outcome("RESOURCE_EXHAUSTED", "queue full", pushback)) == []
    too_large = f"SERVER: Received message larger than max ({len(case.body)} vs. 82610)"
    assert rules(case, Outcome("RESOURCE_EXHAUSTED", too_large)) == []
    # What a client says of an error message too long for its 8 KiB metadata limit: the server's fault.
    metadata = "received trailing metadata size exceeds limit"
    assert rules(case, Outcome("RESOURCE_EXHAUSTED", metadata)) == [
        f"RESOURCE_EXHAUSTED neither for a full queue ({RETRY_PUSHBACK_KEY}) nor a large body"
    ]
    valid = structured_case("valid", GENERATE, GOOD)
    refused = f"Received message larger than max ({len(valid.body)} vs. 10)"
    assert rules(valid, Outcome("RESOURCE_EXHAUSTED", refused)) == ["valid request refused with RESOURCE_EXHAUSTED"]


def test_answers_to_valid_requests_are_checked() -> None:
    valid = structured_case("valid", GENERATE_STREAM, pb.GenerateRequest(prompt="x", seeds=[5, 6], request_id="r"))
    image = (5, "image/png", 128, 128)
    good = Outcome("OK", request_ids=("r",) * 4, images=(image, (6, *image[1:])), events=EVENTS)
    assert rules(valid, good) == []
    assert rules(valid, Outcome("INVALID_ARGUMENT", "steps: no")) == ["valid request refused with INVALID_ARGUMENT"]
    # A sampler's own step limit is not in ListModels: a case within the model's limits may meet it.
    warm_up = "steps: steps=2 is too few for the Runge-Kutta warm-up; allowed: steps >= 4 (scheduler 'pndm')"
    assert rules(valid, Outcome("INVALID_ARGUMENT", warm_up)) == []
    wrong = replace(good, images=((7, "image/jpeg", 128, 64),), request_ids=("r", "s"), events=("completed",))
    assert rules(valid, wrong) == [
        "wrong number of images",
        "seeds not returned as sent",
        "image mime_type does not match output_format",
        "image size is not the request's",
        "request_id not echoed (or none generated)",
        "stream does not run from queued to completed",
    ]


def test_tally_counts_by_code_and_kind_and_reports_each_broken_rule() -> None:
    problems = check_outcome(raw_case(GENERATE_STREAM, b"\xff\xff\xff"), Outcome("UNKNOWN", "boom"), TARGET)
    records = [
        Record(0, "valid", GENERATE, "OK", 100.0, "", "prompt='x'"),
        Record(1, "edge", GENERATE, "INVALID_ARGUMENT", 2.0, "steps: no", "steps=0"),
        Record(2, "raw", GENERATE_STREAM, "UNKNOWN", 4.0, "boom", "3 bytes ffffff", problems),
    ]
    report = tally(records, seed=5, duration_s=1.0, still_serving=False)
    assert report.by_code == {"OK": 1, "INVALID_ARGUMENT": 1, "UNKNOWN": 1}
    assert report.by_kind["raw"].codes == {"UNKNOWN": 1} and report.by_kind["raw"].violations == 1
    assert report.latency_p50_ms == 4.0 and report.latency_max_ms == 100.0
    assert [v.rule for v in report.violations] == [
        "status UNKNOWN is outside the contract",
        "server no longer serves a good request",
    ]
    assert not report.ok
    text = format_report(report)
    assert "status UNKNOWN is outside the contract: 1 case(s) (raw 1)" in text
    assert "a good request afterwards: FAILED" in text and "3 bytes ffffff" in text


def test_hypothesis_missing_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # makes `import hypothesis` fail
    with pytest.raises(RuntimeError, match=r"install diffuserve\[fuzz\]") as raised:
        require_hypothesis()
    assert str(raised.value) == MISSING_HYPOTHESIS


def drawn(count: int, seed: int) -> list[Case]:
    cases: list[Case] = []
    draw_cases(TARGET, count, seed, cases.append)
    return cases


def test_cases_are_the_same_for_the_same_seed() -> None:
    first, again, other = drawn(100, 3), drawn(100, 3), drawn(100, 4)
    digest = [hashlib.sha256(case.body).hexdigest() for case in first]
    assert len(first) == 100 and digest == [hashlib.sha256(case.body).hexdigest() for case in again]
    assert digest != [hashlib.sha256(case.body).hexdigest() for case in other]


def test_cases_reach_every_field_and_its_extremes() -> None:
    assert set(extreme_fields(TARGET)) == set(REQUEST_FIELDS)
    cases = drawn(600, 0)
    assert {case.kind for case in cases} == set(KINDS)
    assert {case.method for case in cases} == {GENERATE, GENERATE_STREAM}
    requests = [case.request for case in cases if case.request is not None]
    for name in REQUEST_FIELDS:
        assert any(
            request.HasField(name) if name == "guidance_scale" else getattr(request, name) for request in requests
        )
    assert any(len(request.prompt) > 100_000 for request in requests)
    assert any(len(request.seeds) > 1000 for request in requests)
    assert any(math.isnan(request.guidance_scale) for request in requests)
    assert any(request.scheduler not in pb.Scheduler.values() for request in requests)
    int32s = {getattr(request, name) for request in requests for name in ("width", "num_images", "steps", "quality")}
    assert {-(2**31), -1, 2**31 - 1} <= int32s
    strings = [getattr(request, name) for request in requests for name in ("model", "request_id", "prompt")]
    assert any("\0" in text for text in strings) and any(not text.isprintable() for text in strings)
    assert any(parse(case.body) is None for case in cases if case.kind == "truncated")


@pytest.fixture(scope="module")
def small_server(tiny_model: ServedModel):
    model = replace(tiny_model, defaults=replace(tiny_model.defaults, max_steps=SMALL_STEPS, max_images=SMALL_IMAGES))
    config = ServerConfig(model_dirs=(), host="127.0.0.1", port=0)
    with BackgroundServer(config, {model.name: model}) as server:
        yield server


@pytest.mark.slow
def test_a_thousand_fuzz_cases_keep_the_contract(small_server: BackgroundServer) -> None:
    report = run_fuzz(small_server.address, FUZZ_CASES, seed=0)
    print(format_report(report))
    assert report.cases == FUZZ_CASES and set(report.by_kind) == set(KINDS)
    assert report.by_code.get("OK", 0) > FUZZ_CASES // 10, "too few cases got far enough to run the model"
    assert not report.violations, format_report(report)
    with grpc.insecure_channel(small_server.address) as channel:
        response = pb_grpc.DiffusionServiceStub(channel).Generate(GOOD, timeout=30)
    assert [image.seed for image in response.images] == [3]
