"""`diffuserve bench --fuzz N`: valid, hostile and malformed requests against a running server, each answer checked
against the API's contract (documented status codes, errors that name a field, bounded messages, no internals)."""

from __future__ import annotations

import functools
import logging
import math
import random
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import grpc

from diffuserve.v1 import diffusion_pb2 as pb
from diffuserve.v1 import diffusion_pb2_grpc as pb_grpc

from ..images import MIME_TYPES
from ..params import MAX_PROMPT_CHARS, MAX_REQUEST_ID_CHARS, format_name
from ..service import RETRY_PUSHBACK_KEY

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

log = logging.getLogger(__name__)

MISSING_HYPOTHESIS = "diffuserve bench --fuzz needs hypothesis: install diffuserve[fuzz]"

SERVICE = pb.DESCRIPTOR.services_by_name["DiffusionService"].full_name
GENERATE = "Generate"
GENERATE_STREAM = "GenerateStream"
METHODS = (GENERATE, GENERATE_STREAM)
REQUEST_FIELDS = tuple(pb.GenerateRequest.DESCRIPTOR.fields_by_name)

# The codes the design documents for Generate that a caller without auth, who never cancels, can see. INTERNAL is
# documented for a failing engine, but a fuzz case never breaks an engine: there it is always a server bug.
CONTRACT_CODES = frozenset(
    {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNAVAILABLE"}
)
# An error message is for a person reading a log line; more than this is an echo of the request, not an explanation.
MAX_MESSAGE_BYTES = 2048
# Fragments of Python's own reprs and of grpcio's answers to an exception escaping a handler.
INTERNALS = (
    "Traceback",
    'File "',
    "object at 0x",
    "<Future",
    "<class '",
    "Exception calling application",
    "Exception iterating responses",
    "Unexpected error",
)
# gRPC core's own answer to a body over the server's receive limit (RESOURCE_EXHAUSTED, without pushback: retrying
# cannot help), with the body's size and the limit.
TOO_LARGE = re.compile(r"Received message larger than max \((\d+) vs\. (\d+)\)")
# A sampler's own step limit (PNDM's Runge-Kutta warm-up needs 4, LCM at most original_inference_steps), which
# ListModels does not list: a "valid" case inside the model's limits may still meet it, and is rightly refused.
SAMPLER_STEP_LIMIT = re.compile(r"steps: .*\(scheduler '\w+'\)$")
FIELD_LABEL = re.compile(r"\b(?:" + "|".join(REQUEST_FIELDS) + r"):")

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
UINT64_MAX = 2**64 - 1
# Hostile strings reach ~200k characters (up to 800 KB of UTF-8): beyond any field limit, and beyond the receive limit
# of a server that sizes it to the largest valid request.
HUGE_CHARS = 200_000
# Thousands of seeds: far more than any max_images, a few tens of KB on the wire.
MANY_SEEDS = 5_000
# Requests meant to be valid run the model: at most this many steps and images keeps each to ~0.1 s on a tiny model.
CHEAP_STEPS = 2
CHEAP_IMAGES = 2
DEFAULT_TIMEOUT_S = 10.0
# Case kinds and their share of a run, out of the number of slots: valid requests cost a model run, the rest ~1 ms.
KIND_SLOTS = {"valid": 2, "edge": 5, "wild": 2, "raw": 3, "truncated": 3, "mutated": 2}
KINDS = tuple(KIND_SLOTS)
# Hypothesis may end a run early (too many rejected draws); each further round continues with the next seed.
MAX_ROUNDS = 10
PROGRESS_EVERY = 1000
# A description of a request in a report line is cut here: enough to reproduce the shape of the case.
DESCRIPTION_CHARS = 600
TEXT_EXCERPT_CHARS = 12
MESSAGE_EXCERPT_CHARS = 300
GOOD_PROMPT = "a red circle on a blue background"
GOOD_SEED = 7


def require_hypothesis():
    """The hypothesis module, imported only when fuzzing: it is the `fuzz` extra, not a serving dependency."""
    try:
        import hypothesis
    except ImportError as error:
        raise RuntimeError(MISSING_HYPOTHESIS) from error
    return hypothesis


def strategies():
    return require_hypothesis().strategies


@dataclass(frozen=True)
class Target:
    """What the fuzzed server serves (its default model's limits), so valid requests can be built for it."""

    default_model: str
    models: tuple[str, ...]
    width: int
    height: int
    default_steps: int
    max_steps: int
    max_images: int
    schedulers: tuple[int, ...]
    previews: bool


@dataclass(frozen=True)
class Case:
    """One call: a request body (bytes, sent as they are) for one method, and where the body came from."""

    kind: str
    method: str
    body: bytes
    # The body parsed as a GenerateRequest the way the server parses it; None when it does not parse.
    request: pb.GenerateRequest | None
    # The structured request a malformed body was made from, and how it was changed.
    origin: pb.GenerateRequest | None = None
    note: str = ""


@dataclass(frozen=True)
class Outcome:
    """What came back for one case: the status and what of the response the contract speaks about."""

    code: str
    message: str = ""
    trailers: tuple[tuple[str, str], ...] = ()
    latency_ms: float = 0.0
    # The request id of the response, or of every event of a stream.
    request_ids: tuple[str, ...] = ()
    # (seed, mime_type, width, height) of each image, in order.
    images: tuple[tuple[int, str, int, int], ...] = ()
    # GenerateStream: the kind of each event, in order.
    events: tuple[str, ...] = ()


@dataclass(frozen=True)
class Problem:
    rule: str
    detail: str = ""


@dataclass(frozen=True)
class Record:
    """A sent case, kept small (the body is dropped): enough to count it and to report it."""

    index: int
    kind: str
    method: str
    code: str
    latency_ms: float
    message: str
    request: str
    problems: tuple[Problem, ...] = ()


@dataclass(frozen=True)
class Violation:
    index: int
    kind: str
    method: str
    code: str
    rule: str
    detail: str
    message: str
    request: str


@dataclass(frozen=True)
class KindStats:
    cases: int
    codes: Mapping[str, int]
    latency_p50_ms: float
    latency_max_ms: float
    violations: int


@dataclass(frozen=True)
class FuzzReport:
    seed: int
    cases: int
    duration_s: float
    by_code: Mapping[str, int]
    by_kind: Mapping[str, KindStats]
    latency_p50_ms: float
    latency_max_ms: float
    still_serving: bool
    violations: tuple[Violation, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.still_serving and not self.violations


# Strategies: per field, values a valid request may carry, and extreme ones.


def repeated_text(min_chars: int, max_chars: int, unit: SearchStrategy[str] | None = None) -> SearchStrategy[str]:
    """Long strings built from a short drawn unit: drawing 200k characters one by one would be slow."""
    st = strategies()

    def repeat(text: str, length: int) -> str:
        return (text * (length // len(text) + 1))[:length]

    units = st.text(min_size=1, max_size=8) if unit is None else unit
    return st.builds(repeat, units, st.integers(min_chars, max_chars))


def printable_text(max_chars: int) -> SearchStrategy[str]:
    """Strings for which str.isprintable() holds: no controls, formats, separators other than the plain space."""
    st = strategies()
    printable = st.characters(exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs")) | st.just(" ")
    return st.text(printable, max_size=max_chars)


def hostile_text(target: Target) -> SearchStrategy[str]:
    """Empty, whitespace, controls and NUL, bidi and byte-order marks, the largest code point, and ~200k chars."""
    st = strategies()
    special = ("", " ", "\x00", "\t\r\n", "\u202e", "\ufeff", "\U0010ffff", "%s%n{0}", "\\x00", target.default_model)
    controls = st.characters(categories=("Cc", "Cf", "Zl", "Zp"))
    return st.one_of(
        st.sampled_from(special),
        st.text(max_size=40),  # any code point but surrogates (protobuf cannot encode them)
        st.text(controls, min_size=1, max_size=40),
        # Long strings, one branch in all: a body over the server's receive limit takes ~0.1 s to be refused.
        st.one_of(
            repeated_text(MAX_PROMPT_CHARS - 2, MAX_PROMPT_CHARS + 2),
            repeated_text(1, HUGE_CHARS),
            # Hypothesis favours small integers even in a wide range: this makes sure of really long strings.
            repeated_text(HUGE_CHARS // 2, HUGE_CHARS),
            repeated_text(1, HUGE_CHARS, unit=st.text(controls, min_size=1, max_size=4)),
        ),
    )


def int32_values(*edges: int) -> SearchStrategy[int]:
    """The int32 limits, values next to the given edges (a field's own bounds), or any int32."""
    st = strategies()
    near = sorted({v for edge in edges for v in (edge - 1, edge, edge + 1) if INT32_MIN <= v <= INT32_MAX})
    limits = (0, -1, INT32_MIN, INT32_MAX)
    return st.one_of(st.sampled_from(limits), st.sampled_from((1, *near)), st.integers(INT32_MIN, INT32_MAX))


def enum_values(enum) -> SearchStrategy[int]:
    """Proto3 enums are open: any int32 arrives, not only the declared numbers."""
    st = strategies()
    declared = tuple(enum.values())
    return st.one_of(st.sampled_from(declared), int32_values(max(declared) + 1))


def uint64_values() -> SearchStrategy[int]:
    st = strategies()
    special = (0, 1, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, UINT64_MAX)
    return st.one_of(st.sampled_from(special), st.integers(0, UINT64_MAX))


def many_seeds() -> SearchStrategy[list[int]]:
    """Up to thousands of seeds, as an arithmetic run: a drawn list that long would exceed hypothesis's budget."""
    st = strategies()

    def run(count: int, start: int, step: int) -> list[int]:
        return [(start + i * step) % (UINT64_MAX + 1) for i in range(count)]

    counts = st.one_of(st.integers(0, MANY_SEEDS), st.integers(MANY_SEEDS // 2, MANY_SEEDS))  # as for strings
    return st.builds(run, counts, uint64_values(), uint64_values())


def float32_values() -> SearchStrategy[float]:
    """NaN, the infinities, -0, the float32 extremes, values next to the guidance limits, or any float32."""
    st = strategies()
    special = (-0.0, 0.0, 1.0, -1.0, 50.0, 50.000004, 1e-45, 3.4028235e38, -3.4e38)
    return st.one_of(st.sampled_from((math.nan, math.inf, -math.inf)), st.sampled_from(special), st.floats(width=32))


# Stands for "leave the optional field unset" in a field dictionary.
ABSENT = object()


def extreme_fields(target: Target) -> dict[str, SearchStrategy]:
    """For every field of GenerateRequest, a strategy of extreme values (test_fuzz checks none is missing)."""
    st = strategies()
    return {
        # Half the time a served model, so the fields after it are checked too (an unknown model ends validation).
        "model": st.one_of(st.sampled_from(("", target.default_model)), hostile_text(target)),
        "request_id": st.one_of(hostile_text(target), printable_text(MAX_REQUEST_ID_CHARS + 2)),
        "prompt": hostile_text(target),
        "negative_prompt": hostile_text(target),
        "width": int32_values(target.width, 2 * target.width, target.width + 8),
        "height": int32_values(target.height, 2 * target.height, target.height + 8),
        "num_images": int32_values(target.max_images),
        "steps": int32_values(target.max_steps, target.default_steps),
        "guidance_scale": st.one_of(st.just(ABSENT), float32_values()),
        "scheduler": enum_values(pb.Scheduler),
        "seeds": st.one_of(st.lists(uint64_values(), max_size=target.max_images + 2), many_seeds()),
        "output_format": enum_values(pb.ImageFormat),
        "quality": int32_values(100),
        "embed_metadata": st.booleans(),
        "preview_interval": int32_values(target.max_steps),
        "noise_mode": enum_values(pb.NoiseMode),
    }


def cheap_counts(limit: int, cheap: int) -> tuple[int, ...]:
    """1 to min(limit, cheap), with 1 as likely as all the others together: each step and image costs a model run."""
    larger = tuple(range(2, min(limit, cheap) + 1))
    return (1,) * max(1, len(larger)) + larger


def valid_fields(target: Target) -> SearchStrategy[dict]:
    """Field values inside every documented limit, biased cheap: few steps and images, since each runs the model."""
    st = strategies()
    steps = st.sampled_from(cheap_counts(target.max_steps, CHEAP_STEPS))
    images = st.sampled_from(cheap_counts(target.max_images, CHEAP_IMAGES))
    return st.tuples(steps, images).flatmap(lambda drawn: valid_fields_for(target, *drawn))


@functools.cache  # flatmap asks for it on every draw; building strategies is the slow part
def valid_fields_for(target: Target, steps: int, images: int) -> SearchStrategy[dict]:
    st = strategies()
    # 0 means the model's default, which is only valid (and cheap) when that default is.
    steps_field = st.sampled_from((steps, 0) if steps == target.default_steps else (steps,))
    prompt = st.one_of(st.text(min_size=1, max_size=60), repeated_text(1, MAX_PROMPT_CHARS)).filter(str.strip)
    negative = st.one_of(st.just(""), st.text(max_size=60), repeated_text(1, MAX_PROMPT_CHARS))
    fields = st.fixed_dictionaries(
        {
            "model": st.sampled_from(("", target.default_model)),
            "request_id": printable_text(MAX_REQUEST_ID_CHARS),
            "prompt": prompt,
            "negative_prompt": negative,
            "width": st.sampled_from((0, target.width)),
            "height": st.sampled_from((0, target.height)),
            "steps": steps_field,
            "guidance_scale": st.one_of(st.just(ABSENT), st.floats(0.0, 50.0, width=32)),
            "scheduler": st.sampled_from((pb.SCHEDULER_UNSPECIFIED, *target.schedulers)),
            "output_format": st.sampled_from(tuple(pb.ImageFormat.values())),
            "quality": st.integers(0, 100),
            "embed_metadata": st.booleans(),
            "preview_interval": st.integers(0, steps if target.previews else 0),
            "noise_mode": st.sampled_from(tuple(pb.NoiseMode.values())),
        }
    )
    seeds = st.lists(uint64_values(), max_size=images)
    return st.tuples(fields, seeds, st.booleans()).map(lambda drawn: with_images(*drawn, images))


def with_images(fields: dict, seeds: list[int], zero: bool, images: int) -> dict:
    """num_images 0 means max(1, len(seeds)): use it only where that is the drawn count."""
    implied = max(1, len(seeds))
    return {**fields, "seeds": seeds, "num_images": 0 if zero and implied == images else images}


def to_request(fields: Mapping[str, object]) -> pb.GenerateRequest:
    return pb.GenerateRequest(**{name: value for name, value in fields.items() if value is not ABSENT})


def valid_requests(target: Target) -> SearchStrategy[pb.GenerateRequest]:
    return valid_fields(target).map(to_request)


def edge_requests(target: Target) -> SearchStrategy[pb.GenerateRequest]:
    """A valid request with one to three fields replaced by extreme values: each reaches the checks of the others."""
    st = strategies()
    one_field = {name: values.map(functools.partial(single, name)) for name, values in extreme_fields(target).items()}
    overrides = st.lists(st.sampled_from(REQUEST_FIELDS).flatmap(one_field.__getitem__), min_size=1, max_size=3)
    return st.tuples(valid_fields(target), overrides).map(lambda drawn: to_request(merged(drawn[0], *drawn[1])))


def single(name: str, value: object) -> dict[str, object]:
    return {name: value}


def merged(*fields: Mapping[str, object]) -> dict[str, object]:
    return {name: value for one in fields for name, value in one.items()}


def wild_requests(target: Target) -> SearchStrategy[pb.GenerateRequest]:
    """Every field extreme at once: many errors in one message."""
    return strategies().fixed_dictionaries(extreme_fields(target)).map(to_request)


# Strategies: bodies that are not (whole) serialized requests.


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# Payload sizes of the fixed-width wire types: 1 is 64-bit (double, fixed64), 5 is 32-bit (float, fixed32).
FIXED_BYTES = {1: 8, 5: 4}


def wire_field(number: int, wire_type: int, payload: int | bytes) -> bytes:
    """One field in protobuf's wire format, for any number and wire type, so malformed ones can be written too."""
    tag = varint((number << 3) | wire_type)
    if isinstance(payload, int):
        value, data = payload & UINT64_MAX, (payload & UINT64_MAX).to_bytes(8, "little")
    else:
        value, data = int.from_bytes(payload[:8], "little"), payload
    if wire_type == 0:
        return tag + varint(value)
    if wire_type == 2:
        return tag + varint(len(data)) + data
    if wire_type in FIXED_BYTES:
        return tag + data[: FIXED_BYTES[wire_type]].ljust(FIXED_BYTES[wire_type], b"\0")
    return tag  # group start/end and the undefined wire types 6 and 7 carry no payload of their own


# Hand-written bodies parsers get wrong: an empty body, a length past the end, a length of 2**64-1 (-1 as int64), bad
# UTF-8 and a UTF-8-encoded surrogate in strings, 10-byte varints into int32 fields, groups nested 99, 200 and 10,000
# deep (upb allows 100) or never closed, an 11-byte varint, a stray group end, field number 0, a packed seeds field
# of over-long varints, a signalling-NaN guidance_scale.
UNKNOWN_GROUP = 1000
SPECIAL_BODIES = (
    b"",
    wire_field(3, 2, b"")[:-1] + varint(2**32),
    wire_field(3, 2, b"")[:-1] + varint(UINT64_MAX),
    wire_field(3, 2, b"\xc3\x28"),
    wire_field(1, 2, b"\xed\xa0\x80"),
    wire_field(8, 0, UINT64_MAX),
    wire_field(7, 0, 2**40 + 1),
    wire_field(UNKNOWN_GROUP, 3, 0) * 99 + wire_field(UNKNOWN_GROUP, 4, 0) * 99,
    wire_field(UNKNOWN_GROUP, 3, 0) * 200 + wire_field(UNKNOWN_GROUP, 4, 0) * 200,
    wire_field(UNKNOWN_GROUP, 3, 0) * 10_000,
    wire_field(3, 2, b"")[:-1] + b"\xff" * 10 + b"\x01",
    wire_field(UNKNOWN_GROUP, 4, 0),
    wire_field(0, 0, 1),
    wire_field(11, 2, varint(UINT64_MAX) * 1000),
    wire_field(9, 5, b"\x01\x00\xc0\x7f"),
)


def random_bytes(generator: random.Random, size: int) -> bytes:
    return generator.randbytes(size)


def raw_bodies() -> SearchStrategy[bytes]:
    st = strategies()
    numbers = st.one_of(st.integers(1, len(REQUEST_FIELDS) + 1), st.integers(1, 2**29 - 1))
    payloads = st.one_of(st.integers(0, UINT64_MAX), st.binary(max_size=64))
    fields = st.builds(wire_field, numbers, st.integers(0, 7), payloads)
    return st.one_of(
        st.sampled_from(SPECIAL_BODIES),
        st.binary(max_size=256),
        # Seeded from one draw: drawing kilobytes byte by byte overruns hypothesis's budget for one example.
        st.builds(random_bytes, st.randoms(use_true_random=True), st.integers(1024, 65_536)),
        st.lists(fields, max_size=12).map(b"".join),
    )


def structured_requests(target: Target) -> SearchStrategy[pb.GenerateRequest]:
    """What truncated and mutated bodies start from; not wild requests, mostly too large to reach the parser."""
    return strategies().one_of(valid_requests(target), edge_requests(target))


def parse(body: bytes) -> pb.GenerateRequest | None:
    try:
        return pb.GenerateRequest.FromString(body)
    except Exception:  # DecodeError, or RecursionError/ValueError from some parser backends: "does not parse"
        return None


def structured_case(kind: str, method: str, request: pb.GenerateRequest) -> Case:
    return Case(kind, method, request.SerializeToString(), request)


def raw_case(method: str, body: bytes) -> Case:
    return Case("raw", method, body, parse(body))


def truncated_case(method: str, request: pb.GenerateRequest, fraction: float) -> Case:
    whole = request.SerializeToString()
    cut = min(int(len(whole) * fraction), max(0, len(whole) - 1))
    body = whole[:cut]
    return Case("truncated", method, body, parse(body), request, f"first {cut} of {len(whole)} bytes")


def mutated_case(method: str, request: pb.GenerateRequest, edits: list[tuple[float, int]]) -> Case:
    body = bytearray(request.SerializeToString() or b"\0")
    for fraction, value in edits:
        body[min(int(len(body) * fraction), len(body) - 1)] = value
    note = f"{len(edits)} byte(s) overwritten in {len(body)}"
    return Case("mutated", method, bytes(body), parse(bytes(body)), request, note)


def cases(target: Target) -> SearchStrategy[Case]:
    """Every kind of case, in the proportions of KIND_SLOTS, for either method."""
    st = strategies()
    methods = st.sampled_from(METHODS)
    fraction = st.floats(0.0, 1.0, exclude_max=True)
    by_kind = {
        "valid": st.builds(structured_case, st.just("valid"), methods, valid_requests(target)),
        "edge": st.builds(structured_case, st.just("edge"), methods, edge_requests(target)),
        "wild": st.builds(structured_case, st.just("wild"), methods, wild_requests(target)),
        "raw": st.builds(raw_case, methods, raw_bodies()),
        "truncated": st.builds(truncated_case, methods, structured_requests(target), fraction),
        "mutated": st.builds(
            mutated_case,
            methods,
            structured_requests(target),
            st.lists(st.tuples(fraction, st.integers(0, 255)), min_size=1, max_size=4),
        ),
    }
    slots = tuple(kind for kind, share in KIND_SLOTS.items() for _ in range(share))
    return st.sampled_from(slots).flatmap(by_kind.__getitem__)


def expected_mime_type(output_format: int) -> str | None:
    """The MIME type a served image of this format has (PNG when unset); None for a format the server refuses."""
    if output_format == pb.IMAGE_FORMAT_UNSPECIFIED:
        return MIME_TYPES["png"]
    if output_format not in pb.ImageFormat.values():
        return None
    return MIME_TYPES.get(format_name(output_format))


def draw_cases(target: Target, count: int, seed: int, handle: Callable[[Case], None]) -> int:
    """Hands `count` cases to `handle` one at a time (bodies reach megabytes, so they are never all held), the same
    cases for the same target and seed: hypothesis with a fixed seed, no example database, no shrinking, quiet.
    Returns how many were handled."""
    hypothesis = require_hypothesis()
    handled = 0

    def one(case: Case) -> None:
        nonlocal handled
        if handled < count:
            handled += 1
            handle(case)

    strategy = cases(target)
    for round_seed in range(seed, seed + MAX_ROUNDS):
        if handled >= count:
            break
        run_round(hypothesis, strategy, count - handled, round_seed, one)
    return handled


def run_round(
    hypothesis, strategy: SearchStrategy[Case], examples: int, seed: int, test: Callable[[Case], None]
) -> None:
    settings = hypothesis.settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
        verbosity=hypothesis.Verbosity.quiet,
        derandomize=False,
        print_blob=False,
    )
    hypothesis.seed(seed)(settings(hypothesis.given(strategy)(test)))()


# Sending.


def method_path(method: str) -> str:
    return f"/{SERVICE}/{method}"


def image_summary(image: pb.Image) -> tuple[int, str, int, int]:
    return image.seed, image.mime_type, image.width, image.height


def failure(error: grpc.RpcError, start: float, **seen) -> Outcome:
    trailers = tuple((key, str(value)) for key, value in (error.trailing_metadata() or ()))
    return Outcome(error.code().name, error.details() or "", trailers, elapsed_ms(start), **seen)


def elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def call_generate(channel: grpc.Channel, body: bytes, timeout_s: float) -> Outcome:
    # No request serializer: the body goes on the wire exactly as drawn, malformed or not.
    rpc = channel.unary_unary(
        method_path(GENERATE), request_serializer=None, response_deserializer=pb.GenerateResponse.FromString
    )
    start = time.perf_counter()
    try:
        response, call = rpc.with_call(body, timeout=timeout_s)
    except grpc.RpcError as error:
        return failure(error, start)
    return Outcome(
        "OK",
        latency_ms=elapsed_ms(start),
        trailers=tuple((key, str(value)) for key, value in (call.trailing_metadata() or ())),
        request_ids=(response.request_id,),
        images=tuple(image_summary(image) for image in response.images),
    )


def call_stream(channel: grpc.Channel, body: bytes, timeout_s: float) -> Outcome:
    rpc = channel.unary_stream(
        method_path(GENERATE_STREAM), request_serializer=None, response_deserializer=pb.GenerateEvent.FromString
    )
    start = time.perf_counter()
    call = rpc(body, timeout=timeout_s)
    events: list[pb.GenerateEvent] = []
    try:
        events.extend(call)
    except grpc.RpcError as error:
        return failure(error, start, **stream_seen(events))
    return Outcome("OK", latency_ms=elapsed_ms(start), **stream_seen(events))


def stream_seen(events: Sequence[pb.GenerateEvent]) -> dict:
    return {
        "request_ids": tuple(event.request_id for event in events),
        "images": tuple(image_summary(event.image) for event in events if event.HasField("image")),
        "events": tuple(event.WhichOneof("event") or "" for event in events),
    }


def send(channel: grpc.Channel, case: Case, timeout_s: float) -> Outcome:
    call = call_generate if case.method == GENERATE else call_stream
    return call(channel, case.body, timeout_s)


# The contract.


def names_field(message: str) -> bool:
    """params.py's style: each problem starts with the field's name and a colon ("steps: must be in 1..150")."""
    return bool(FIELD_LABEL.search(message))


def expected_images(request: pb.GenerateRequest) -> int:
    """The proto's rule: num_images 0 means one image, or one per seed when seeds are given."""
    return request.num_images or max(1, len(request.seeds))


def check_outcome(case: Case, outcome: Outcome, target: Target) -> tuple[Problem, ...]:
    """Every way the outcome breaks the API's contract; empty when it keeps it."""
    problems = list(status_problems(case, outcome, target))
    if outcome.code == "OK":
        problems += response_problems(case, outcome, target)
    return tuple(problems)


def status_problems(case: Case, outcome: Outcome, target: Target) -> list[Problem]:
    code, message, request = outcome.code, outcome.message, case.request
    problems = []
    if code not in CONTRACT_CODES:
        problems.append(Problem(f"status {code} is outside the contract"))
    if code == "OK":
        return problems
    problems += message_problems(message)
    if code == "INVALID_ARGUMENT" and request is not None and not names_field(message):
        problems.append(Problem("INVALID_ARGUMENT names no field of GenerateRequest"))
    if code == "INVALID_ARGUMENT" and request is None and not message.strip():
        problems.append(Problem("INVALID_ARGUMENT for an unparsable body says nothing"))
    if code == "NOT_FOUND" and request is not None and (request.model in ("", *target.models)):
        problems.append(Problem("NOT_FOUND for a model the server serves", repr(request.model[:40])))
    if code == "RESOURCE_EXHAUSTED" and not (queue_full(outcome) or too_large(case, outcome)):
        problems.append(
            Problem(f"RESOURCE_EXHAUSTED neither for a full queue ({RETRY_PUSHBACK_KEY}) nor a large body")
        )
    refused = code == "NOT_FOUND" or too_large(case, outcome)
    refused = refused or (code == "INVALID_ARGUMENT" and not SAMPLER_STEP_LIMIT.match(message))
    if case.kind == "valid" and refused:
        problems.append(Problem(f"valid request refused with {code}"))
    return problems


def message_problems(message: str) -> list[Problem]:
    problems = []
    if len(message.encode("utf-8", "replace")) > MAX_MESSAGE_BYTES:
        problems.append(Problem(f"error message longer than {MAX_MESSAGE_BYTES} bytes", f"{len(message)} chars"))
    leaked = [marker for marker in INTERNALS if marker in message]
    if leaked:
        problems.append(Problem("error message shows Python internals", ", ".join(leaked)))
    return problems


def queue_full(outcome: Outcome) -> bool:
    return outcome.code == "RESOURCE_EXHAUSTED" and RETRY_PUSHBACK_KEY in dict(outcome.trailers)


def too_large(case: Case, outcome: Outcome) -> bool:
    """The server's receive limit refused this very body (not, say, a client refusing a long error message)."""
    match = TOO_LARGE.search(outcome.message)
    return outcome.code == "RESOURCE_EXHAUSTED" and match is not None and int(match[1]) == len(case.body)


def response_problems(case: Case, outcome: Outcome, target: Target) -> list[Problem]:
    request = case.request
    if request is None:
        return [Problem("OK for a body that does not parse as a GenerateRequest")]
    problems = []
    images = outcome.images
    if len(images) != expected_images(request):
        problems.append(Problem("wrong number of images", f"{len(images)} for {expected_images(request)}"))
    sent = tuple(request.seeds)
    if tuple(seed for seed, *_ in images[: len(sent)]) != sent[: len(images)]:
        problems.append(Problem("seeds not returned as sent"))
    mime = expected_mime_type(request.output_format)
    if any(image_mime != mime for _, image_mime, _, _ in images):
        problems.append(Problem("image mime_type does not match output_format", f"expected {mime}"))
    if request.model in ("", target.default_model) and any(
        (w, h) != (target.width, target.height) for *_, w, h in images
    ):
        problems.append(Problem("image size is not the model's"))
    wanted = request.request_id
    if not outcome.request_ids or any((rid != wanted) if wanted else not rid for rid in outcome.request_ids):
        problems.append(Problem("request_id not echoed (or none generated)"))
    if case.method == GENERATE_STREAM and (outcome.events[:1], outcome.events[-1:]) != (("queued",), ("completed",)):
        problems.append(Problem("stream does not run from queued to completed", " ".join(outcome.events[:3])))
    return problems


# Describing cases for a report.


def describe_text(text: str) -> str:
    """Short strings as they are; long or unprintable ones by length, traits and a start cut to TEXT_EXCERPT_CHARS."""
    if len(text) <= 32 and text.isprintable():
        return repr(text)
    traits = [
        trait
        for trait, present in (
            ("non-ASCII", not text.isascii()),
            ("unprintable", not text.isprintable()),
            ("NUL", "\0" in text),
        )
        if present
    ]
    start = repr(text[:TEXT_EXCERPT_CHARS])[:TEXT_EXCERPT_CHARS]
    return f"<{len(text)} chars{''.join(', ' + trait for trait in traits)}: {start}...>"


def describe_request(request: pb.GenerateRequest) -> str:
    parts = []
    for descriptor, value in request.ListFields():
        if isinstance(value, str):
            shown = describe_text(value)
        elif descriptor.name == "seeds":
            shown = list(value) if len(value) <= 4 else f"<{len(value)} seeds: {list(value[:3])}...>"
        else:
            shown = repr(value)
        parts.append(f"{descriptor.name}={shown}")
    return " ".join(parts) or "<empty request>"


def describe_case(case: Case) -> str:
    if case.origin is not None:
        parsed = "" if case.request is None else "; parses"
        text = f"{case.note} of [{describe_request(case.origin)}]{parsed}"
    elif case.kind == "raw":
        parsed = "does not parse" if case.request is None else f"parses as [{describe_request(case.request)}]"
        text = f"{len(case.body)} bytes {case.body[:24].hex()}{'...' if len(case.body) > 24 else ''}; {parsed}"
    else:
        text = describe_request(case.request)
    return text if len(text) <= DESCRIPTION_CHARS else text[:DESCRIPTION_CHARS] + "..."


# Running and reporting.


def probe_target(channel: grpc.Channel, timeout_s: float) -> Target:
    """The default model's limits from ListModels; whether it makes previews, from one cheap request that asks."""
    stub = pb_grpc.DiffusionServiceStub(channel)
    default = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=timeout_s).default_model
    models = stub.ListModels(pb.ListModelsRequest(), timeout=timeout_s).models
    info = next(m for m in models if m.name == default)
    target = Target(
        default_model=default,
        models=tuple(m.name for m in models),
        width=info.width,
        height=info.height,
        default_steps=info.default_steps,
        max_steps=info.max_steps,
        max_images=info.max_images,
        schedulers=tuple(info.schedulers),
        previews=False,
    )
    if not serves_good_request(channel, target, timeout_s):
        raise RuntimeError(f"the server does not answer a good request before fuzzing: {good_request()}")
    try:
        stub.Generate(good_request(preview_interval=1), timeout=timeout_s)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
            raise
        return target
    return replace(target, previews=True)


def good_request(**fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=GOOD_PROMPT, steps=1, num_images=1, seeds=[GOOD_SEED], **fields)


def serves_good_request(channel: grpc.Channel, target: Target, timeout_s: float) -> bool:
    request = good_request()
    case = structured_case("valid", GENERATE, request)
    outcome = send(channel, case, timeout_s)
    if outcome.code != "OK" or check_outcome(case, outcome, target):
        log.warning("a good request got %s: %s", outcome.code, outcome.message)
        return False
    return True


def record(index: int, case: Case, outcome: Outcome, target: Target) -> Record:
    return Record(
        index=index,
        kind=case.kind,
        method=case.method,
        code=outcome.code,
        latency_ms=outcome.latency_ms,
        message=outcome.message[:MESSAGE_EXCERPT_CHARS],
        request=describe_case(case),
        problems=check_outcome(case, outcome, target),
    )


def run_fuzz(address: str, count: int, seed: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S) -> FuzzReport:
    """Sends `count` cases to the server at `address`, one at a time, each with a deadline of timeout_s, checks
    every answer against the contract and, at the end, that the server still serves a good request."""
    require_hypothesis()
    # Client limits stay at grpcio's defaults (4 MiB received; metadata 8 KiB soft, 16 KiB hard): what a real client
    # has, so an error message too long for its metadata limit shows up here as it would there.
    with grpc.insecure_channel(address) as channel:
        target = probe_target(channel, timeout_s)
        records: list[Record] = []
        start = time.perf_counter()

        def handle(case: Case) -> None:
            records.append(record(len(records), case, send(channel, case, timeout_s), target))
            if len(records) % PROGRESS_EVERY == 0:
                log.info("fuzz: %d of %d cases sent", len(records), count)

        draw_cases(target, count, seed, handle)
        still_serving = serves_good_request(channel, target, timeout_s)
    return tally(records, seed, time.perf_counter() - start, still_serving)


def median_and_max_ms(latencies: Sequence[float]) -> tuple[float, float]:
    return (statistics.median(latencies), max(latencies)) if latencies else (0.0, 0.0)


def tally(records: Sequence[Record], seed: int, duration_s: float, still_serving: bool) -> FuzzReport:
    """The report of a run: counts by status and by kind, latencies, every violation."""
    violations = tuple(
        Violation(r.index, r.kind, r.method, r.code, p.rule, p.detail, r.message, r.request)
        for r in records
        for p in r.problems
    )
    if not still_serving:
        after = Violation(
            index=len(records),
            kind="after",
            method=GENERATE,
            code="",
            rule="server no longer serves a good request",
            detail="",
            message="",
            request=describe_request(good_request()),
        )
        violations += (after,)
    by_kind = {}
    for kind in sorted({r.kind for r in records}, key=kind_order):
        rows = [r for r in records if r.kind == kind]
        p50, worst = median_and_max_ms([r.latency_ms for r in rows])
        by_kind[kind] = KindStats(
            cases=len(rows),
            codes=dict(Counter(r.code for r in rows)),
            latency_p50_ms=p50,
            latency_max_ms=worst,
            violations=sum(1 for r in rows if r.problems),
        )
    p50, worst = median_and_max_ms([r.latency_ms for r in records])
    return FuzzReport(
        seed=seed,
        cases=len(records),
        duration_s=duration_s,
        by_code=dict(Counter(r.code for r in records)),
        by_kind=by_kind,
        latency_p50_ms=p50,
        latency_max_ms=worst,
        still_serving=still_serving,
        violations=violations,
    )


def kind_order(kind: str) -> int:
    return KINDS.index(kind) if kind in KINDS else len(KINDS)


def code_order(code: str) -> tuple[bool, str]:
    return code != "OK", code


def format_report(report: FuzzReport) -> str:
    """A table of status codes by case kind, the latencies, then each broken rule with its first example."""
    codes = sorted(report.by_code, key=code_order)
    header = ["kind", "cases", *codes, "p50 ms", "max ms", "violating"]
    overall = KindStats(
        cases=report.cases,
        codes=report.by_code,
        latency_p50_ms=report.latency_p50_ms,
        latency_max_ms=report.latency_max_ms,
        violations=len({v.index for v in report.violations}),
    )
    rows = [stats_row(kind, stats, codes) for kind, stats in (*report.by_kind.items(), ("all", overall))]
    lines = [
        f"fuzz: {report.cases} cases, seed {report.seed}, {report.duration_s:.1f} s; "
        f"a good request afterwards: {'served' if report.still_serving else 'FAILED'}",
        *table([header, *rows]),
    ]
    lines += format_violations(report.violations)
    return "\n".join(lines)


def stats_row(name: str, stats: KindStats, codes: Sequence[str]) -> list[object]:
    counts = (stats.codes.get(code, 0) for code in codes)
    return [name, stats.cases, *counts, f"{stats.latency_p50_ms:.1f}", f"{stats.latency_max_ms:.1f}", stats.violations]


def table(rows: Sequence[Sequence[object]]) -> list[str]:
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in cells
    ]


def format_violations(violations: Sequence[Violation]) -> list[str]:
    if not violations:
        return ["no violations"]
    by_rule: dict[str, list[Violation]] = {}
    for violation in violations:
        by_rule.setdefault(violation.rule, []).append(violation)
    lines = [f"violations: {len(by_rule)} rule(s) broken"]
    for rule, found in by_rule.items():
        first = found[0]
        kinds = ", ".join(f"{k} {n}" for k, n in Counter(v.kind for v in found).most_common())
        lines.append(f"- {rule}: {len(found)} case(s) ({kinds})")
        lines.append(f"    e.g. #{first.index} {first.kind} {first.method} -> {first.code} {first.detail}".rstrip())
        lines.append(f"    request: {first.request}")
        if first.message:
            lines.append(f"    message: {first.message!r}")
    return lines
