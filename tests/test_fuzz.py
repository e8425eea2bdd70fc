"""The fuzzer: its contract checks on fabricated outcomes, its cases against the server's own validation, and a
thousand of them against a real server."""

from __future__ import annotations

import hashlib
import io
import math
import random
import sys
from dataclasses import replace

import grpc
import pytest
from PIL import Image

from diffuserve.server.app import BackgroundServer, ServerConfig
from diffuserve.server.models import ServedModel
from diffuserve.server.params import MAX_IMAGE_BYTES, InvalidArgument, ModelNotFound, validate
from diffuserve.server.tools.fuzz import (
    ABSENT,
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
    image_pairs,
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
    valid_requests,
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


def test_an_edge_case_is_refused_only_for_what_it_changed() -> None:
    invalid = "INVALID_ARGUMENT names a field the case did not make invalid"
    # width and height are one check: a bad width may be reported as the height (params names the unserved side).
    width = changed_case(("width",), width=128, height=-1)
    assert rules(width, Outcome("INVALID_ARGUMENT", "height: model serves 128x128, got 128x-1")) == []
    # Fewer steps can leave the (default) strength none to run.
    steps = changed_case(("steps",), steps=1, init_image=png((128, 128)))
    assert rules(steps, Outcome("INVALID_ARGUMENT", "strength: strength=0.8 runs none of 1 steps")) == []
    blur = changed_case(("mask_blur",), mask_blur=-1)
    assert rules(blur, Outcome("INVALID_ARGUMENT", "mask_blur: must be in 0..256; steps: must be in 1..2")) == [
        invalid
    ]
    # A problem's own text may hold "; " and field names; only the fields problems start with count.
    message = "mask_blur: must be in 0..256; a mask covers init_image: pixel for pixel"
    assert rules(blur, Outcome("INVALID_ARGUMENT", message)) == []
    # Another served model has other limits: any field may be wrong there.
    other = changed_case(("model",), model="other-model", mask_blur=-1)
    assert rules(other, Outcome("INVALID_ARGUMENT", "steps: must be in 1..4")) == []


BOMB = png_bomb((20_000, 20_000))
TURNED = image_file((96, 64), "JPEG", "RGB", 0, 6)  # stored 96x64, upright 64x96
# Requests invalid whatever their other fields, and a field the refusal may name.
INVALID_REQUESTS = {
    "gif": ({"init_image": image_file((32, 32), "GIF", "P")}, "init_image"),
    "bmp": ({"init_image": image_file((32, 32), "BMP", "RGB")}, "init_image"),
    "garbage": ({"init_image": b"\x89PNG\r\n\x1a\ngarbage"}, "init_image"),
    "cut": ({"init_image": png((64, 64))[:200]}, "init_image"),
    "bomb": ({"init_image": BOMB}, "init_image"),
    "too many bytes": ({"init_image": padded_image(MAX_IMAGE_BYTES + 1)}, "init_image"),
    "mask alone": ({"mask_image": png((64, 64), "L")}, "mask_image"),
    "mask of another size": ({"init_image": png((64, 64)), "mask_image": png((64, 32), "L")}, "mask_image"),
    "RGB mask": ({"init_image": png((64, 64)), "mask_image": png((64, 64))}, "mask_image"),
    "mask of the stored size": ({"init_image": TURNED, "mask_image": png((96, 64), "L")}, "mask_image"),
    "refused resize": ({"init_image": png((64, 64)), "resize_mode": pb.RESIZE_MODE_REFUSE}, "init_image"),
    "strength NaN": ({"init_image": png((64, 64)), "strength": math.nan}, "strength"),
    "strength inf": ({"init_image": png((64, 64)), "strength": math.inf}, "strength"),
    "strength 0": ({"init_image": png((64, 64)), "strength": 0.0}, "strength"),
    "strength past 1": ({"init_image": png((64, 64)), "strength": 1.0000001}, "strength"),
    "strength alone": ({"strength": 0.5}, "strength"),
    "resize mode unknown": ({"init_image": png((64, 64)), "resize_mode": 7}, "resize_mode"),
    "resize mode alone": ({"resize_mode": pb.RESIZE_MODE_RESIZE}, "resize_mode"),
    "blur negative": ({"mask_blur": -1}, "mask_blur"),
    "blur past the limit": (
        {"init_image": png((8, 8)), "mask_image": png((8, 8), "L"), "mask_blur": 257},
        "mask_blur",
    ),
    "blur without mask": ({"init_image": png((64, 64)), "mask_blur": 4}, "mask_blur"),
    "crop on sd1": ({"crop_top": 8}, "original_size"),
    "target size on sd1": ({"target_size": pb.ImageSize(width=1024, height=1024)}, "original_size"),
    "151 tokens": ({"prompt": letter_words(151, 0)}, "prompt"),
    "three chunks by BREAK": ({"prompt": letter_groups((1, 1, 1), 0)}, "prompt"),
    "guided negative of 151 tokens": ({"negative_prompt": letter_words(151, 0)}, "negative_prompt"),
    "weight past 100": ({"prompt": "(a:100.5)"}, "prompt"),
    "weight past float32": ({"prompt": f"(a:{'9' * 40})"}, "prompt"),
    "nesting past 100": ({"prompt": "(" * 49 + "a" + ")" * 49}, "prompt"),
    "negative weight past 100": ({"negative_prompt": "(a:-1000)"}, "negative_prompt"),
    "prompt of 10001 characters": ({"prompt": "a" * 10_001}, "prompt"),
    "width not served": ({"width": 64}, "width"),
    "height not served with an init image": ({"init_image": png((192, 128)), "height": 4_000_000}, "height"),
    "size of an init image not served": ({"init_image": png((200, 200)), "width": 200, "height": 200}, "width"),
}


def test_a_mask_that_does_not_fit_its_image_at_a_size_not_served_may_be_refused_for_the_size() -> None:
    """The server compares a mask with its image only at a size it serves: naming the size is enough."""
    case = edge_case(init_image=png((31, 129)), mask_image=png((200, 121), "L"), width=64)
    assert rules(case, Outcome("INVALID_ARGUMENT", "width: model serves 64x64 only")) == []
    assert rules(case, Outcome("INVALID_ARGUMENT", "quality: not like this")) == [
        "INVALID_ARGUMENT does not name a field that is invalid"
    ]


@pytest.mark.parametrize("fields, named", INVALID_REQUESTS.values(), ids=INVALID_REQUESTS)
def test_requests_invalid_whatever_else_must_be_refused_naming_why(fields: dict, named: str) -> None:
    case = edge_case(**fields)
    assert any(named in refusal.fields for refusal in expected_refusals(case.request, TARGET))
    assert "OK for a request that must be refused" in rules(case, Outcome("OK"))
    assert rules(case, Outcome("INVALID_ARGUMENT", f"{named}: not like this")) == []
    assert rules(case, Outcome("INVALID_ARGUMENT", "quality: not like this")) == [
        "INVALID_ARGUMENT does not name a field that is invalid"
    ]
    # It is refused before any work: waiting out the deadline is a hang. Other ends are not the fuzzer's to judge.
    assert rules(case, Outcome("DEADLINE_EXCEEDED", "Deadline Exceeded")) == [
        "DEADLINE_EXCEEDED for a request that must be refused"
    ]
    assert rules(case, Outcome("UNAVAILABLE", "draining")) == []


# Edge values that are valid, or whose validity depends on fields the fuzzer does not model: no refusal claimed.
UNCLAIMED_REQUESTS = {
    "exponent is text": {"prompt": "(a:1e30)"},
    "weight at the limit": {"prompt": "(a:-100)"},
    "nesting under 100": {"prompt": "(" * 48 + "a" + ")" * 48},
    "square brackets": {"prompt": "[" * 1000 + "a" + "]" * 1000},
    "150 tokens": {"prompt": letter_words(150, 0)},
    "two chunks by BREAK": {"prompt": letter_groups((75, 75), 0)},
    "unguided negative of 151 tokens": {"negative_prompt": letter_words(151, 0), "guidance_scale": 1.0},
    "turned init and upright mask": {"init_image": TURNED, "mask_image": png((64, 96), "L"), "mask_blur": 256},
    "served init with refusal of resizing": {"init_image": png((192, 128)), "resize_mode": pb.RESIZE_MODE_REFUSE},
    "tiny strength": {"init_image": png((1, 1)), "strength": 1e-45},
}


@pytest.mark.parametrize("fields", UNCLAIMED_REQUESTS.values(), ids=UNCLAIMED_REQUESTS)
def test_edge_values_that_may_be_valid_are_not_claimed_invalid(fields: dict) -> None:
    assert expected_refusals(edge_case(**fields).request, TARGET) == []


def inpainting(**fields) -> pb.GenerateRequest:
    """100 one-letter words, an init image of a served size (192x128, taken when width and height are 0), a mask."""
    init = {"init_image": png((192, 128)), "mask_image": png((192, 128), "L")}
    return pb.GenerateRequest(prompt=letter_words(100, 0), seeds=[5], request_id="r", **{**init, **fields})


def test_answers_to_edits_are_checked() -> None:
    valid = structured_case("valid", GENERATE, inpainting())
    echo = Echo(task=pb.TASK_INPAINT, strength=1.0, prompt_tokens=100, negative_prompt_tokens=0, text_chunks=2)
    good = Outcome("OK", request_ids=("r",), images=((5, "image/png", 192, 128),), echo=echo)
    assert rules(valid, good) == []
    wrong = Echo(task=pb.TASK_IMG2IMG, strength=0.8, prompt_tokens=99, negative_prompt_tokens=3, text_chunks=1)
    assert rules(valid, replace(good, images=((5, "image/png", 128, 128),), echo=wrong)) == [
        "image size is not the request's",
        "task is not the request's",
        "strength is not the request's",
        "token count is not the prompt's",
        "token count is not the prompt's",
        "text_chunks outside the prompt's needs and the model's",
    ]
    # The strength asked for is echoed as the float32 it was; an init image of a size not served gets the model's.
    edit = pb.GenerateRequest(prompt="x", seeds=[5], request_id="r", init_image=png((64, 64)), strength=0.7)
    echo = Echo(task=pb.TASK_IMG2IMG, strength=0.7, prompt_tokens=1, negative_prompt_tokens=0, text_chunks=1)
    outcome = Outcome("OK", request_ids=("r",), images=((5, "image/png", 128, 128),), echo=echo)
    assert rules(structured_case("valid", GENERATE, edit), outcome) == []
    # The image's size is its upright size: a photo turned by its EXIF Orientation is served at that.
    turned = pb.GenerateRequest(
        prompt="x", seeds=[5], request_id="r", init_image=image_file((128, 192), "JPEG", "L", 0, 6)
    )
    echo = replace(echo, strength=0.8)  # unset: the proto's default
    outcome = replace(outcome, images=((5, "image/png", 192, 128),), echo=echo)
    assert rules(structured_case("valid", GENERATE, turned), outcome) == []
    no_tokens = replace(outcome, echo=replace(echo, prompt_tokens=0))
    assert rules(structured_case("valid", GENERATE, turned), no_tokens) == [
        "prompt_tokens do not count the prompt",
        "token count is not the prompt's",
    ]


def test_prompts_of_one_letter_words_have_known_tokens_and_chunks() -> None:
    assert letter_tokens(letter_words(150, 3)) == (150, 2)
    assert letter_tokens(letter_groups((75, 1, 76), 3)) == (152, 4)
    assert letter_tokens("a b BREAK") is None and letter_tokens("ab") is None and letter_tokens("") is None
    assert expected_task(inpainting()) == pb.TASK_INPAINT


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


def present(request: pb.GenerateRequest, name: str) -> bool:
    """Set: HasField for fields with presence (optional scalars, messages), else a non-default value."""
    if pb.GenerateRequest.DESCRIPTOR.fields_by_name[name].has_presence:
        return request.HasField(name)
    return bool(getattr(request, name))


def decoded(data: bytes) -> Image.Image | None:
    try:
        return Image.open(io.BytesIO(data))
    except Exception:  # not an image Pillow reads
        return None


@pytest.fixture(scope="module")
def six_hundred() -> list[Case]:
    return drawn(600, 0)


def test_cases_reach_every_field_and_its_extremes(six_hundred: list[Case]) -> None:
    assert set(extreme_fields(TARGET)) == set(REQUEST_FIELDS)
    cases = six_hundred
    assert {case.kind for case in cases} == set(KINDS)
    assert {case.method for case in cases} == {GENERATE, GENERATE_STREAM}
    requests = [case.request for case in cases if case.request is not None]
    for name in REQUEST_FIELDS:
        assert any(present(request, name) for request in requests), name
    assert any(len(text) > 100_000 for request in requests for text in (request.prompt, request.negative_prompt))
    assert any(len(request.seeds) > 1000 for request in requests)
    assert any(math.isnan(request.guidance_scale) for request in requests)
    assert any(request.scheduler not in pb.Scheduler.values() for request in requests)
    int32s = {getattr(request, name) for request in requests for name in ("width", "num_images", "steps", "quality")}
    assert {-(2**31), -1, 2**31 - 1} <= int32s
    strings = [getattr(request, name) for request in requests for name in ("model", "request_id", "prompt")]
    assert any("\0" in text for text in strings) and any(not text.isprintable() for text in strings)
    assert any(parse(case.body) is None for case in cases if case.kind == "truncated")


# find() reports what it found; an image or a long prompt makes a large repr, which hypothesis warns of.
FOUND_REPR_IS_LARGE = pytest.mark.filterwarnings("ignore:Generating overly large repr")


def reaches(strategy, condition) -> bool:
    """Whether the strategy draws a value meeting the condition within a few thousand tries. Searched, not counted
    in a fixed draw: hypothesis mixes constants from the project's own modules into its draws, so which values a
    given seed draws changes with any edit to the code."""
    hypothesis = require_hypothesis()
    settings = hypothesis.settings(
        max_examples=5000,
        database=None,
        deadline=None,
        phases=[hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    try:
        hypothesis.find(strategy, condition, settings=settings, random=random.Random(0))
    except hypothesis.errors.NoSuchExample:
        return False
    return True


def is_image(data: bytes, test) -> bool:
    image = decoded(data) if data else None
    return image is not None and test(image)


EDITING_EXTREMES = {
    "strength NaN": ("strength", lambda value: value is not ABSENT and math.isnan(value)),
    "strength tiny": ("strength", lambda value: value is not ABSENT and 0 < value < 0.01),
    "strength negative": ("strength", lambda value: value is not ABSENT and value < 0),
    "resize mode unknown": ("resize_mode", lambda value: value not in pb.ResizeMode.values()),
    "blur negative": ("mask_blur", lambda value: value < 0),
    "blur past the limit": ("mask_blur", lambda value: value > 256),
    "crop": ("crop_left", lambda value: value > 0),
    "target size": ("target_size", lambda value: value is not ABSENT),
    "GIF": ("init_image", lambda data: is_image(data, lambda image: image.format == "GIF")),
    "BMP": ("init_image", lambda data: is_image(data, lambda image: image.format == "BMP")),
    "RGB mask": ("mask_image", lambda data: is_image(data, lambda image: image.mode == "RGB")),
    "bomb": ("init_image", lambda data: is_image(data, lambda image: image.width * image.height > 4096**2)),
    "broken image": ("init_image", lambda data: bool(data) and decoded(data) is None),
    "image past the byte limit": ("mask_image", lambda data: len(data) > MAX_IMAGE_BYTES),
    "prompt past 150 tokens": ("prompt", lambda text: (letter_tokens(text) or (0,))[0] > 150),
    "prompt of more chunks by BREAK": ("negative_prompt", lambda text: (letter_tokens(text) or (0, 0))[1] > 2),
    "weight past the limit": ("prompt", lambda text: text == "(a:1000)"),
    "exponent read as text": ("negative_prompt", lambda text: text == "(a:1e30)"),
}


@pytest.mark.parametrize("name, condition", EDITING_EXTREMES.values(), ids=EDITING_EXTREMES)
@FOUND_REPR_IS_LARGE
def test_the_editing_fields_extremes_are_drawn(name: str, condition) -> None:
    assert reaches(extreme_fields(TARGET)[name], condition)


@FOUND_REPR_IS_LARGE
def test_edge_cases_pair_an_init_image_with_a_mask_that_does_not_fit_it() -> None:
    def mismatched(pair: dict) -> bool:
        init, mask = decoded(pair["init_image"]), decoded(pair["mask_image"])
        return init.size != mask.size

    assert reaches(image_pairs(), mismatched)
    assert reaches(image_pairs(), lambda pair: decoded(pair["mask_image"]).mode not in ("L", "1"))


VALID_EDITS = {
    "image-to-image": lambda request: expected_task(request) == pb.TASK_IMG2IMG,
    "inpainting": lambda request: expected_task(request) == pb.TASK_INPAINT,
    "an init image to resize": lambda request: is_image(request.init_image, lambda i: i.size not in TARGET.sizes),
    "a photo turned by EXIF": lambda request: is_image(request.init_image, lambda i: i.getexif().get(0x0112, 1) != 1),
    "a blurred mask": lambda request: request.mask_blur > 0,
    "a strength": lambda request: request.HasField("strength"),
    "a refusal of resizing": lambda request: request.resize_mode == pb.RESIZE_MODE_REFUSE,
    "a prompt of two chunks": lambda request: (letter_tokens(request.prompt) or (0,))[0] > 75,
    "a weighted prompt": lambda request: ":" in request.prompt and "(" in request.prompt,
    "a prompt cut by BREAK": lambda request: " BREAK " in request.prompt,
}


@pytest.mark.parametrize("condition", VALID_EDITS.values(), ids=VALID_EDITS)
@FOUND_REPR_IS_LARGE
def test_valid_cases_edit_images_and_send_long_and_weighted_prompts(condition) -> None:
    assert reaches(valid_requests(TARGET), condition)


def test_a_run_of_cases_asks_for_every_task(six_hundred: list[Case]) -> None:
    assert {expected_task(case.request) for case in six_hundred if case.kind == "valid"} == set(TARGET.tasks)


def validated(request: pb.GenerateRequest, model: ServedModel) -> Outcome:
    """What the server's own validation makes of a request, as the outcome a server would send."""
    try:
        validate(request, {model.name: model}, model.name)
    except InvalidArgument as error:
        return Outcome("INVALID_ARGUMENT", str(error))
    except ModelNotFound as error:
        return Outcome("NOT_FOUND", str(error))
    return Outcome("OK")


def test_drawn_cases_agree_with_the_servers_validation(tiny_model: ServedModel) -> None:
    """Valid cases pass params.validate; what it refuses is named as the fuzzer expects; and what the fuzzer claims
    invalid it refuses. Offline: no model runs, so a few hundred cases take seconds."""
    model = replace(tiny_model, defaults=replace(tiny_model.defaults, max_steps=SMALL_STEPS, max_images=SMALL_IMAGES))
    target = replace(TARGET, default_model=model.name, models=(model.name,), default_steps=model.defaults.steps)
    cases = []
    draw_cases(target, 400, 1, cases.append)
    for case in cases:
        if case.request is None:
            continue
        outcome = validated(case.request, model)
        problems = status_problems(case, outcome, target) + refusal_problems(case, outcome, target)
        assert not problems, (problems, outcome.message, case.request)


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
    assert set(report.served) == {"txt2img", "img2img", "inpaint"}, "some task was never served"
    with grpc.insecure_channel(small_server.address) as channel:
        response = pb_grpc.DiffusionServiceStub(channel).Generate(GOOD, timeout=30)
    assert [image.seed for image in response.images] == [3]
