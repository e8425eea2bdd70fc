"""`diffuserve bench --fuzz N`: valid, hostile and malformed requests against a running server, each answer checked
against the API's contract (documented status codes, errors that name the right field, bounded messages, no
internals, valid requests served as asked: images, sizes, seeds, task, strength, prompt tokens)."""

from __future__ import annotations

import functools
import io
import logging
import math
import random
import re
import statistics
import string
import struct
import time
import unicodedata
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import grpc
import numpy as np
from PIL import Image

from diffuserve.v1 import diffusion_pb2 as pb
from diffuserve.v1 import diffusion_pb2_grpc as pb_grpc

from ..client import Connection
from ..images import MASK_MODES, MAX_INPUT_PIXELS, MIME_TYPES
from ..params import (
    MAX_CONDITIONING_SIZE,
    MAX_IMAGE_BYTES,
    MAX_MASK_BLUR,
    MAX_PROMPT_CHARS,
    MAX_PROMPT_WEIGHT,
    MAX_REQUEST_ID_CHARS,
    format_name,
)
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
# The field each problem of an INVALID_ARGUMENT starts with: params.py joins problems with "; " and starts each with
# its field's name and a colon. A problem's own text may hold "; " too, but never a field name and a colon after it.
ERROR_LABEL = re.compile(r"(?:^|; )(" + "|".join(REQUEST_FIELDS) + r"):")

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

# Long prompts: CLIP's 77 ids a chunk, less its BOS and EOS, are the 75 tokens AUTOMATIC1111 fills each chunk with.
CHUNK_TOKENS = 75
# A one-letter word is one CLIP token whatever the vocabulary (its own id, or the unknown token's), so prompts of
# them have a token count the fuzzer knows without a tokenizer.
LETTERS = string.ascii_lowercase
# Where a prompt of one-letter words is cut into the chunks it asks for.
BREAK_WORD = " BREAK "
# Characters AUTOMATIC1111's prompt syntax gives a meaning: free text without them carries no weights.
PROMPT_SYNTAX = "()[]:\\"
# Free text a valid case sends as a prompt: its UTF-8 bytes after the tokenizer's NFC and lowercasing bound its
# tokens (byte-level BPE: at most one a byte), so this many bytes always fit one chunk.
ONE_CHUNK_BYTES = 60
# The prompt syntax's multipliers: `(word)` is 1.1 times, `[word]` 1/1.1 times the weight around it.
ROUND_MULTIPLIER = 1.1
# Explicit weights of valid weighted prompts: well inside the server's limit, with two decimals as people write them.
VALID_WEIGHT_CENTS = 1000
# Prompts whose weight the fuzzer knows: one word in nested round brackets (closed or not), or one `(word:w)`.
NESTED_WORD = re.compile(r"(\(*)([a-z]+)(\)*)")
WEIGHTED_WORD = re.compile(r"\(([a-z]+):([+-]?(?:\d+\.?\d*|\.\d+))\)")
# Prompts of one-letter words in groups cut by BREAK: their tokens and chunks are known.
LETTER_GROUPS = re.compile(r"[a-z](?: [a-z])*(?: BREAK [a-z](?: [a-z])*)*")
# AUTOMATIC1111's BREAK, which leaves no text; any other ASCII letter of a prompt is text, and so at least one token.
BREAK_TOKEN = re.compile(r"\bBREAK\b")

# Init images and masks stay small (each valid edit runs the VAE encoder on its image; every body is serialized), but
# span sizes the model does not serve, so resizing runs.
IMAGE_SIDES = (1, 8, 64, 128, 192, 200)
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 8, 200
# Image files are made in-process and reused: a few pixel seeds per size, format and mode.
IMAGE_SEEDS = 3
IMAGE_CACHE_SIZE = 512
# Files a valid case sends, as (Pillow format, Pillow mode): every mode an init image may have, masks single-channel.
INIT_FILES = (
    ("PNG", "RGB"),
    ("PNG", "RGBA"),
    ("PNG", "L"),
    ("PNG", "P"),
    ("PNG", "I;16"),
    ("JPEG", "RGB"),
    ("JPEG", "L"),
    ("JPEG", "CMYK"),
    ("WEBP", "RGB"),
    ("WEBP", "RGBA"),
)
MASK_FILES = (("PNG", "L"), ("PNG", "1"), ("PNG", "I;16"), ("JPEG", "L"))
# Images of formats the API refuses (it takes PNG, JPEG and WebP only), and decodable masks of more than one channel.
OTHER_FORMAT_FILES = (("GIF", "P"), ("BMP", "RGB"), ("TIFF", "RGB"), ("TIFF", "L"), ("PPM", "RGB"))
NOT_MASK_FILES = (("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "LA"), ("PNG", "P"), ("JPEG", "CMYK"), ("WEBP", "RGB"))
# The formats the API takes, as Pillow names its decoders: the fuzzer's own reading of an image tries only these.
DECODED_FORMATS = ("PNG", "JPEG", "WEBP")
# EXIF Orientation: the server turns a photo upright first, and 5 to 8 turn it a quarter, swapping its sides.
EXIF_ORIENTATION = 0x0112
ORIENTATIONS = (1, 3, 6, 8)
QUARTER_TURNS = frozenset({5, 6, 7, 8})
# Decompression bombs: PNG headers of a few dozen bytes claiming far more pixels than an input may have, or just more.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BOMB_SIZES = ((20_000, 20_000), (4097, 4096), (1, MAX_INPUT_PIXELS + 1), (INT32_MAX, INT32_MAX))
# Image fields of the size limit, one past it, and past the server's receive limit (which has room for two image
# fields of the limit and little else). Tens of megabytes to send: a few cases in a thousand carry one.
IMAGE_FIELD_BYTES = (MAX_IMAGE_BYTES, MAX_IMAGE_BYTES + 1, 2 * MAX_IMAGE_BYTES + 2**20)
# Strengths people use; a valid case takes those that leave its steps at least one to run.
NICE_STRENGTHS = (0.3, 0.5, 0.55, 0.7, 0.75, 0.8, 0.9, 1.0)
# The proto's defaults when strength is unset.
DEFAULT_STRENGTH = {pb.TASK_IMG2IMG: 0.8, pb.TASK_INPAINT: 1.0}
# A valid case is txt2img half the time, the rest image-to-image or inpainting, where the model serves them.
TASK_SLOTS = (pb.TASK_TXT2IMG, pb.TASK_TXT2IMG, pb.TASK_IMG2IMG, pb.TASK_INPAINT)
RESIZE_MODES = tuple(pb.ResizeMode.values())
SDXL_FAMILY = "sdxl"


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
    # Every (width, height) served, the tasks (pb.Task) served, and the model's family ("sd1", "sdxl", ...).
    sizes: tuple[tuple[int, int], ...]
    tasks: tuple[int, ...]
    family: str
    max_prompt_tokens: int
    default_guidance_scale: float
    guidance_embedded: bool

    @property
    def max_text_chunks(self) -> int:
        return max(1, self.max_prompt_tokens // CHUNK_TOKENS)


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
    # Edge cases: the fields given extreme values in an otherwise valid request, so only problems they can cause may
    # be named. None where that is not known (wild, raw, truncated and mutated cases).
    changed: frozenset[str] | None = None


@dataclass(frozen=True)
class Echo:
    """The settings a response says it used, of those the request decides."""

    task: int
    strength: float
    prompt_tokens: int
    negative_prompt_tokens: int
    text_chunks: int


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
    # The response's settings (a stream's from its completed event); None where none came.
    echo: Echo | None = None


@dataclass(frozen=True)
class Refusal:
    """Why a request is invalid whatever its other fields are, and the fields an error for it may be named after
    (its own, or one whose error keeps the server from reaching its check)."""

    reason: str
    fields: frozenset[str]


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
    # The task the request asks for by its images ("txt2img", ...); empty for a body that does not parse.
    task: str = ""


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
    # Requests served (OK) per task they asked for: how much of the image-to-image and inpainting paths ran.
    served: Mapping[str, int] = field(default_factory=dict)

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


# Prompts: free text that fits one chunk, long prompts of one-letter words, weighted ones, and ones past every limit.


def letter_words(count: int, seed: int) -> str:
    """`count` one-letter words: a prompt of exactly `count` tokens."""
    generator = random.Random(seed)
    return " ".join(generator.choice(LETTERS) for _ in range(count))


def letter_groups(counts: Sequence[int], seed: int) -> str:
    """Groups of one-letter words, each ending its chunk with BREAK: one chunk a group (of at most 75 words)."""
    return BREAK_WORD.join(letter_words(count, seed + i) for i, count in enumerate(counts))


def fits_one_chunk(text: str) -> bool:
    """Free text that is a valid prompt of one chunk: not blank, without BREAK, few bytes as the tokenizer sees it."""
    normalized = unicodedata.normalize("NFC", text).lower()
    return bool(text.strip()) and "BREAK" not in text and len(normalized.encode("utf-8")) <= ONE_CHUNK_BYTES


def weighted_segment(letters: int, wrapper: str, cents: int, seed: int) -> str:
    """Some one-letter words inside one of AUTOMATIC1111's brackets: `(w)`, `((w))`, `[w]`, `(w:1.25)`."""
    return wrapper.format(words=letter_words(letters, seed), weight=f"{cents / 100:.2f}")


WEIGHT_WRAPPERS = ("{words}", "({words})", "(({words}))", "[{words}]", "[[{words}]]", "({words}:{weight})")
# Segments of a weighted prompt and their words: a group holds at most 8 x 6 = 48 tokens, inside one chunk.
MAX_SEGMENTS, MAX_SEGMENT_LETTERS = 8, 6


def weighted_prompts(target: Target) -> SearchStrategy[str]:
    """Valid weighted prompts: bracketed one-letter words with weights in -10..10, in up to max_text_chunks groups
    joined by BREAK (each group fits a chunk, so the prompt takes one chunk a group)."""
    st = strategies()
    segment = st.builds(
        weighted_segment,
        st.integers(1, MAX_SEGMENT_LETTERS),
        st.sampled_from(WEIGHT_WRAPPERS),
        st.integers(-VALID_WEIGHT_CENTS, VALID_WEIGHT_CENTS),
        st.integers(0, 2**16),
    )
    group = st.lists(segment, min_size=1, max_size=MAX_SEGMENTS).map(" ".join)
    return st.lists(group, min_size=1, max_size=target.max_text_chunks).map(BREAK_WORD.join)


def valid_prompts(target: Target) -> SearchStrategy[str]:
    """Prompts that always fit: short phrases and free text of one chunk, one-letter words up to the longest prompt
    (more than one chunk's worth a third of the time, when the model takes more), weighted prompts."""
    st = strategies()
    seeds = st.integers(0, 2**32)
    counts = [st.integers(1, target.max_prompt_tokens)]
    if target.max_prompt_tokens > CHUNK_TOKENS:
        counts.append(st.integers(CHUNK_TOKENS + 1, target.max_prompt_tokens))
    free = st.characters(exclude_characters=PROMPT_SYNTAX, exclude_categories=("Cs",))
    return st.one_of(
        # A BREAK first adds an empty chunk; one last adds none.
        st.sampled_from((GOOD_PROMPT, "a cat", "a BREAK", *(("BREAK a",) if target.max_text_chunks > 1 else ()))),
        st.text(free, min_size=1, max_size=ONE_CHUNK_BYTES // 4).filter(fits_one_chunk),
        st.builds(letter_words, st.one_of(*counts), seeds),
        weighted_prompts(target),
    )


def valid_negative_prompts(target: Target) -> SearchStrategy[str]:
    """Negative prompts that fit whether or not guidance counts them."""
    st = strategies()
    return st.one_of(st.just(""), valid_prompts(target))


def nested_word(depth: int, closed: bool) -> str:
    """A word in `depth` round brackets, closed or left open: a weight of 1.1 ** depth either way."""
    return "(" * depth + "cat" + (")" * depth if closed else "")


# Weights at and past the limit (100 in size), past float32 (1e40), an exponent the syntax does not read (so
# `(a:1e30)` is the text "a:1e30", weighted 1.1), and nesting deep enough to pass the limit or overflow.
WEIGHT_PROMPTS = (
    "(a:1e30)",
    "(a:100)",
    "(a:-100)",
    "(a:100.5)",
    "(a:-101)",
    "(a:1000)",
    f"(a:{'9' * 40})",
    "(a:0)",
    "(a:.5)",
    "(a:1.5",
    "a:1.5)",
    "((a:20):20)",
    "\\(a:1000\\)",
    nested_word(48, closed=True),
    nested_word(49, closed=True),
    nested_word(60, closed=False),
    nested_word(MAX_PROMPT_CHARS // 2 - 4, closed=True),
    "[" * 1000 + "a" + "]" * 1000,
)


def extreme_prompts(target: Target) -> SearchStrategy[str]:
    """Prompts at and past the token limit (by length or by BREAK), weights past theirs, and hostile text."""
    st = strategies()
    seeds = st.integers(0, 2**32)
    most = target.max_prompt_tokens
    lengths = st.sampled_from((CHUNK_TOKENS, CHUNK_TOKENS + 1, most, most + 1)) | st.integers(most + 1, most + 60)
    too_many_groups = st.lists(
        st.integers(1, 5), min_size=target.max_text_chunks + 1, max_size=target.max_text_chunks + 3
    )
    # Hostile text half the time, as before prompts had a syntax and chunks.
    return st.one_of(
        hostile_text(target),
        st.one_of(
            st.builds(letter_words, lengths, seeds),
            st.builds(letter_groups, too_many_groups, seeds),
            st.sampled_from(WEIGHT_PROMPTS),
        ),
    )


# Images: files made in-process with Pillow, valid ones and every way one can be wrong.


def transposed(size: tuple[int, int]) -> tuple[int, int]:
    return size[1], size[0]


@functools.lru_cache(maxsize=IMAGE_CACHE_SIZE)
def image_file(size: tuple[int, int], fmt: str, mode: str, seed: int = 0, orientation: int = 1) -> bytes:
    """An image file of random pixels of this stored size, Pillow format and mode, with an EXIF Orientation when
    it is not 1 (upright)."""
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    if mode == "I;16":
        image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)  # 16-bit grayscale over its whole range
    else:
        image = Image.fromarray(pixels).convert(mode)
    extra = {}
    if orientation != 1:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        extra["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **extra)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(size: tuple[int, int]) -> bytes:
    """A PNG whose header claims this size (8-bit grayscale) and whose pixel data is a few bytes: small to send,
    huge to decode."""
    width, height = size
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def padded_image(total_bytes: int) -> bytes:
    """A valid small PNG padded with zeros after its end to total_bytes: decodable, its size alone at issue."""
    image = image_file((MIN_IMAGE_SIDE, MIN_IMAGE_SIDE), "PNG", "RGB")
    return image + bytes(max(0, total_bytes - len(image)))


def cut(data: bytes, fraction: float) -> bytes:
    return data[: max(1, int(len(data) * fraction))]


def overwritten(data: bytes, edits: list[tuple[float, int]]) -> bytes:
    body = bytearray(data)
    for fraction, value in edits:
        body[min(int(len(body) * fraction), len(body) - 1)] = value
    return bytes(body)


def image_sizes(smallest: int = 1) -> SearchStrategy[tuple[int, int]]:
    st = strategies()
    side = st.sampled_from(tuple(s for s in IMAGE_SIDES if s >= smallest)) | st.integers(smallest, MAX_IMAGE_SIDE)
    return st.tuples(side, side)


def image_files(kinds: Sequence[tuple[str, str]], sizes: SearchStrategy[tuple[int, int]]) -> SearchStrategy[bytes]:
    """Files of one of these (format, mode) kinds and a drawn size, as stored (upright)."""
    st = strategies()

    def make(size: tuple[int, int], kind: tuple[str, str], seed: int) -> bytes:
        return image_file(size, *kind, seed)

    return st.builds(make, sizes, st.sampled_from(tuple(kinds)), st.integers(0, IMAGE_SEEDS - 1))


def image_values(huge: bool = True) -> SearchStrategy[bytes]:
    """For init_image and mask_image: valid files of any mode, other formats, masks of many channels, files cut short,
    overwritten, or garbage, decompression bombs, and (where huge) files at and past the size limits."""
    st = strategies()
    any_file = image_files(INIT_FILES + MASK_FILES, image_sizes())
    fraction = st.floats(0.0, 1.0, exclude_max=True)
    values = [
        st.sampled_from(IMAGE_FIELD_BYTES).map(padded_image),
        st.just(b""),
        any_file,
        image_files(OTHER_FORMAT_FILES + NOT_MASK_FILES, image_sizes()),
        st.builds(cut, any_file, fraction),
        st.builds(overwritten, any_file, st.lists(st.tuples(fraction, st.integers(0, 255)), min_size=1, max_size=4)),
        st.binary(min_size=1, max_size=64),
        st.builds(lambda data: PNG_SIGNATURE + data, st.binary(max_size=64)),
        st.sampled_from(BOMB_SIZES).map(png_bomb),
    ]
    return st.one_of(*(values if huge else values[1:]))


def image_pairs() -> SearchStrategy[dict[str, object]]:
    """An init image with a mask that does not fit it: another size, several channels, or the size of the init
    image as stored where its EXIF Orientation turns it a quarter (the mask must match it upright)."""
    st = strategies()
    seeds = st.integers(0, IMAGE_SEEDS - 1)

    def other_size(init: tuple[int, int], mask: tuple[int, int], seed: int) -> dict[str, object]:
        mask = mask if mask != init else (init[0] + 1, init[1])
        return {"init_image": image_file(init, "PNG", "RGB", seed), "mask_image": image_file(mask, "PNG", "L", seed)}

    def many_channels(size: tuple[int, int], kind: tuple[str, str], seed: int) -> dict[str, object]:
        return {"init_image": image_file(size, "PNG", "RGB", seed), "mask_image": image_file(size, *kind, seed)}

    def turned(size: tuple[int, int], orientation: int, seed: int) -> dict[str, object]:
        init = image_file(size, "JPEG", "RGB", seed, orientation)
        return {"init_image": init, "mask_image": image_file(size, "PNG", "L", seed)}

    sizes = image_sizes(MIN_IMAGE_SIDE)
    return st.one_of(
        st.builds(other_size, sizes, sizes, seeds),
        st.builds(many_channels, sizes, st.sampled_from(NOT_MASK_FILES), seeds),
        st.builds(turned, sizes.filter(lambda size: size[0] != size[1]), st.sampled_from((6, 8)), seeds),
    )


def strength_values() -> SearchStrategy[object]:
    """Unset, NaN, the infinities, 0 and -0, negative, just past 1, tiny (no step left to run), and any float32."""
    st = strategies()
    special = (math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1.0, 1.0000001, 2.0, 3.4028235e38, 1e-45, 1e-7, 0.01)
    return st.one_of(st.just(ABSENT), st.sampled_from(special), st.sampled_from(NICE_STRENGTHS), st.floats(width=32))


def image_size_values(target: Target) -> SearchStrategy[object]:
    """SDXL's size conditioning: unset, or sides of any int32 near the model's size and the limit."""
    st = strategies()
    side = int32_values(target.width, MAX_CONDITIONING_SIZE)
    return st.one_of(st.just(ABSENT), st.builds(pb.ImageSize, width=side, height=side))


def extreme_fields(target: Target, huge: bool = True) -> dict[str, SearchStrategy]:
    """For every field of GenerateRequest, a strategy of extreme values (test_fuzz checks none is missing); image
    fields of tens of megabytes where huge."""
    st = strategies()
    return {
        # Half the time a served model, so the fields after it are checked too (an unknown model ends validation).
        "model": st.one_of(st.sampled_from(("", target.default_model)), hostile_text(target)),
        "request_id": st.one_of(hostile_text(target), printable_text(MAX_REQUEST_ID_CHARS + 2)),
        "prompt": extreme_prompts(target),
        "negative_prompt": extreme_prompts(target),
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
        "init_image": image_values(huge),
        "mask_image": image_values(huge),
        "strength": strength_values(),
        "resize_mode": enum_values(pb.ResizeMode),
        "mask_blur": int32_values(0, MAX_MASK_BLUR),
        "original_size": image_size_values(target),
        "crop_top": int32_values(0, MAX_CONDITIONING_SIZE),
        "crop_left": int32_values(0, MAX_CONDITIONING_SIZE),
        "target_size": image_size_values(target),
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
    fields = st.fixed_dictionaries(
        {
            "model": st.sampled_from(("", target.default_model)),
            "request_id": printable_text(MAX_REQUEST_ID_CHARS),
            "prompt": valid_prompts(target),
            "negative_prompt": valid_negative_prompts(target),
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
    tasks = tuple(task for task in TASK_SLOTS if task in target.tasks) or target.tasks
    task = st.sampled_from(tasks).flatmap(lambda drawn: task_fields(target, drawn, steps))
    seeds = st.lists(uint64_values(), max_size=images)
    return st.tuples(fields, task, conditioning_fields(target), seeds, st.booleans()).map(
        lambda drawn: with_images(merged(*drawn[:3]), drawn[3], drawn[4], images)
    )


def with_images(fields: dict, seeds: list[int], zero: bool, images: int) -> dict:
    """num_images 0 means max(1, len(seeds)): use it only where that is the drawn count."""
    implied = max(1, len(seeds))
    return {**fields, "seeds": seeds, "num_images": 0 if zero and implied == images else images}


def size_fields(size: tuple[int, int], default: tuple[int, int], zero_width: bool, zero_height: bool) -> dict:
    """width and height asking for `size`, each 0 (the default's side) where drawn so and that is the same."""
    return {
        "width": 0 if zero_width and default[0] == size[0] else size[0],
        "height": 0 if zero_height and default[1] == size[1] else size[1],
    }


def runs_a_step(steps: int, strength: float) -> bool:
    """Whether a strength is valid for these steps: in (0, 1], leaving int(steps * strength) >= 1 steps to run, read
    as the decimal the client wrote (diffusers' arithmetic on the float32 the wire carries, read back)."""
    if not (math.isfinite(strength) and 0.0 < strength <= 1.0):
        return False
    return int(steps * float(str(np.float32(strength)))) >= 1


def valid_strengths(task: int, steps: int) -> SearchStrategy[object]:
    """Strengths that leave at least one of the steps to run; unset too where the task's default does."""
    st = strategies()
    runs = functools.partial(runs_a_step, steps)
    # The smallest float32 that runs a step, so hypothesis's favourite, the lower bound, is valid too.
    lowest = float(np.float32(1.0 / steps))
    while not runs(lowest):
        lowest = float(np.nextafter(np.float32(lowest), np.float32(2.0)))
    drawn = st.one_of(st.sampled_from(NICE_STRENGTHS).filter(runs), st.floats(lowest, 1.0, width=32).filter(runs))
    return st.one_of(st.just(ABSENT), drawn) if runs(DEFAULT_STRENGTH[task]) else drawn


@functools.cache
def task_fields(target: Target, task: int, steps: int) -> SearchStrategy[dict]:
    """The size, and for image-to-image and inpainting the images and their options, of a valid request."""
    st = strategies()
    if task == pb.TASK_TXT2IMG:
        default = (target.width, target.height)
        return st.builds(size_fields, st.sampled_from(target.sizes), st.just(default), st.booleans(), st.booleans())
    return edit_fields(target, task, steps)


def edit_fields(target: Target, task: int, steps: int) -> SearchStrategy[dict]:
    """A valid edit: an init image of a served size or another (to be resized), upright or turned by its EXIF
    Orientation, a size the image fits or is resized to, a strength that runs a step; for inpainting a
    single-channel mask of the image's upright size, blurred or not."""
    st = strategies()
    strengths = valid_strengths(task, steps)

    @st.composite
    def draw_fields(draw) -> dict:
        size = draw(st.sampled_from(target.sizes))
        upright = size if draw(st.booleans()) else draw(image_sizes(MIN_IMAGE_SIDE))
        fmt, mode = draw(st.sampled_from(INIT_FILES))
        orientation = draw(st.sampled_from(ORIENTATIONS)) if fmt == "JPEG" else 1
        stored = transposed(upright) if orientation in QUARTER_TURNS else upright
        seed = draw(st.integers(0, IMAGE_SEEDS - 1))
        default = upright if upright in target.sizes else (target.width, target.height)
        fields = {
            "init_image": image_file(stored, fmt, mode, seed, orientation),
            **size_fields(size, default, draw(st.booleans()), draw(st.booleans())),
            "resize_mode": draw(st.sampled_from(RESIZE_MODES if upright == size else RESIZE_MODES[:2])),
            "strength": draw(strengths),
        }
        if task == pb.TASK_INPAINT:
            fields["mask_image"] = image_file(upright, *draw(st.sampled_from(MASK_FILES)), seed)
            fields["mask_blur"] = draw(st.sampled_from((0, 0, 4, MAX_MASK_BLUR)) | st.integers(0, MAX_MASK_BLUR))
        return fields

    return draw_fields()


def conditioning_fields(target: Target) -> SearchStrategy[dict]:
    """SDXL's size conditioning within its limits, unset or not; other families take none."""
    st = strategies()
    if target.family != SDXL_FAMILY:
        return st.just({})
    side = st.integers(1, MAX_CONDITIONING_SIZE)
    size = st.one_of(st.just(ABSENT), st.builds(pb.ImageSize, width=side, height=side))
    crop = st.integers(0, MAX_CONDITIONING_SIZE)
    return st.fixed_dictionaries({"original_size": size, "target_size": size, "crop_top": crop, "crop_left": crop})


def to_request(fields: Mapping[str, object]) -> pb.GenerateRequest:
    return pb.GenerateRequest(**{name: value for name, value in fields.items() if value is not ABSENT})


def valid_requests(target: Target) -> SearchStrategy[pb.GenerateRequest]:
    return valid_fields(target).map(to_request)


def edge_fields(target: Target) -> SearchStrategy[tuple[dict, frozenset[str]]]:
    """A valid request with one to three fields replaced by extreme values (init_image and mask_image at times as
    a pair that does not fit), and the names of the replaced fields: each reaches the checks of the others."""
    st = strategies()
    one_field = {name: values.map(functools.partial(single, name)) for name, values in extreme_fields(target).items()}
    one_field["mask_image"] = st.one_of(one_field["mask_image"], image_pairs())
    overrides = st.lists(st.sampled_from(REQUEST_FIELDS).flatmap(one_field.__getitem__), min_size=1, max_size=3)
    return st.tuples(valid_fields(target), overrides).map(
        lambda drawn: (merged(drawn[0], *drawn[1]), frozenset(name for one in drawn[1] for name in one))
    )


def edge_requests(target: Target) -> SearchStrategy[pb.GenerateRequest]:
    return edge_fields(target).map(lambda drawn: to_request(drawn[0]))


def single(name: str, value: object) -> dict[str, object]:
    return {name: value}


def merged(*fields: Mapping[str, object]) -> dict[str, object]:
    return {name: value for one in fields for name, value in one.items()}


def wild_requests(target: Target) -> SearchStrategy[pb.GenerateRequest]:
    """Every field extreme at once: many errors in one message. Both image fields are in every one, so none is tens
    of megabytes: huge strings already cross the receive limit here."""
    return strategies().fixed_dictionaries(extreme_fields(target, huge=False)).map(to_request)


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


def structured_case(
    kind: str, method: str, request: pb.GenerateRequest, changed: frozenset[str] | None = None
) -> Case:
    return Case(kind, method, request.SerializeToString(), request, changed=changed)


def edge_case(method: str, drawn: tuple[dict, frozenset[str]]) -> Case:
    fields, changed = drawn
    return structured_case("edge", method, to_request(fields), changed)


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
        "edge": st.builds(edge_case, methods, edge_fields(target)),
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
        echo=echo_of(response),
    )


def echo_of(response: pb.GenerateResponse) -> Echo:
    return Echo(
        task=response.task,
        strength=response.strength,
        prompt_tokens=response.prompt_tokens,
        negative_prompt_tokens=response.negative_prompt_tokens,
        text_chunks=response.text_chunks,
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
    completed = [event.completed for event in events if event.HasField("completed")]
    return {
        "request_ids": tuple(event.request_id for event in events),
        "images": tuple(image_summary(event.image) for event in events if event.HasField("image")),
        "events": tuple(event.WhichOneof("event") or "" for event in events),
        "echo": echo_of(completed[-1]) if completed else None,
    }


def send(channel: grpc.Channel, case: Case, timeout_s: float) -> Outcome:
    call = call_generate if case.method == GENERATE else call_stream
    return call(channel, case.body, timeout_s)


# The contract.


def names_field(message: str) -> bool:
    """params.py's style: each problem starts with the field's name and a colon ("steps: must be in 1..150")."""
    return bool(FIELD_LABEL.search(message))


def error_fields(message: str) -> frozenset[str]:
    """The fields an INVALID_ARGUMENT's problems start with."""
    return frozenset(ERROR_LABEL.findall(message))


# For each field an error may start with, the fields whose values decide its check (params.validate): an edge case
# that changed none of them must not be refused for it. The size is the init image's where width or height is 0;
# strength must leave a step of the steps, and applies with an init image (a mask without one is refused anyway);
# a mask must match its init image and the request's size; a blur or resize mode applies with the images.
ERROR_CAUSES: Mapping[str, frozenset[str]] = {
    **{name: frozenset({name}) for name in REQUEST_FIELDS},
    "width": frozenset({"width", "height", "init_image"}),
    "height": frozenset({"width", "height", "init_image"}),
    "num_images": frozenset({"num_images", "seeds"}),
    "seeds": frozenset({"seeds", "num_images"}),
    "steps": frozenset({"steps", "scheduler"}),
    "preview_interval": frozenset({"preview_interval", "steps"}),
    "init_image": frozenset({"init_image", "mask_image", "width", "height", "resize_mode"}),
    "mask_image": frozenset({"mask_image", "init_image", "width", "height", "resize_mode"}),
    "strength": frozenset({"strength", "steps", "scheduler", "init_image", "mask_image"}),
    "resize_mode": frozenset({"resize_mode", "init_image", "mask_image"}),
    "mask_blur": frozenset({"mask_blur", "init_image", "mask_image"}),
    "original_size": frozenset({"original_size", "crop_top", "crop_left", "target_size"}),
}


def expected_images(request: pb.GenerateRequest) -> int:
    """The proto's rule: num_images 0 means one image, or one per seed when seeds are given."""
    return request.num_images or max(1, len(request.seeds))


def expected_task(request: pb.GenerateRequest) -> int:
    """The proto's rule: the task is chosen by the images a request carries."""
    if request.mask_image:
        return pb.TASK_INPAINT
    return pb.TASK_IMG2IMG if request.init_image else pb.TASK_TXT2IMG


def for_default_model(request: pb.GenerateRequest, target: Target) -> bool:
    return request.model in ("", target.default_model)


def check_outcome(case: Case, outcome: Outcome, target: Target) -> tuple[Problem, ...]:
    """Every way the outcome breaks the API's contract; empty when it keeps it."""
    problems = list(status_problems(case, outcome, target))
    if case.request is not None:
        problems += refusal_problems(case, outcome, target)
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
    if code == "INVALID_ARGUMENT" and case.changed is not None and for_default_model(request, target):
        blamed = sorted(name for name in error_fields(message) if not ERROR_CAUSES[name] & case.changed)
        if blamed:
            problems.append(Problem("INVALID_ARGUMENT names a field the case did not make invalid", ", ".join(blamed)))
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


def refusal_problems(case: Case, outcome: Outcome, target: Target) -> list[Problem]:
    """A request invalid whatever its other fields must not be served, nor wait out its deadline (it is refused
    before any work), and its INVALID_ARGUMENT must name a field for each reason (or one whose error stops the
    server before that check)."""
    if outcome.code not in ("OK", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED"):
        return []
    refusals = expected_refusals(case.request, target)
    if not refusals:
        return []
    reasons = "; ".join(refusal.reason for refusal in refusals)
    if outcome.code == "OK":
        return [Problem("OK for a request that must be refused", reasons)]
    if outcome.code == "DEADLINE_EXCEEDED":
        return [Problem("DEADLINE_EXCEEDED for a request that must be refused", reasons)]
    named = error_fields(outcome.message)
    missed = [refusal.reason for refusal in refusals if not refusal.fields & named]
    return [Problem("INVALID_ARGUMENT does not name a field that is invalid", "; ".join(missed))] if missed else []


def expected_refusals(request: pb.GenerateRequest, target: Target) -> list[Refusal]:
    """What makes this request invalid for the default model whatever else it holds (none where it names another
    model, whose limits the fuzzer does not know)."""
    if not for_default_model(request, target):
        return []
    return [*prompt_refusals(request, target), *image_refusals(request, target), *option_refusals(request, target)]


def refusal(reason: str, *fields: str) -> Refusal:
    return Refusal(reason, frozenset(fields))


def prompt_refusals(request: pb.GenerateRequest, target: Target) -> list[Refusal]:
    """Blank or over-long prompts, weights past the limit, more chunks than the model's longest text length."""
    found = []
    texts = {"prompt": request.prompt, "negative_prompt": request.negative_prompt}
    if not request.prompt.strip():
        found.append(refusal("prompt: blank", "prompt"))
    for name, text in texts.items():
        if len(text) > MAX_PROMPT_CHARS:
            found.append(refusal(f"{name}: {len(text)} characters", name))
    # The prompt checks below run once both texts are within their length (params.prompt_texts).
    if any(len(text) > MAX_PROMPT_CHARS for text in texts.values()):
        return found
    for name, text in texts.items():
        weight = known_weight(text)
        if weight is not None and not weight_allowed(weight):
            found.append(refusal(f"{name}: weight {weight!r}", name))
    counted = {name: letter_tokens(text) for name, text in texts.items()}
    guided = guided_request(request, target)
    for name, tokens in counted.items():
        if tokens is not None and tokens[1] > target.max_text_chunks and (name == "prompt" or guided):
            # The longer of the two is named; both are right when they need as many chunks.
            found.append(refusal(f"{name}: {tokens[1]} chunks", "prompt", "negative_prompt"))
    return found


def guided_request(request: pb.GenerateRequest, target: Target) -> bool:
    """Classifier-free guidance, which encodes the negative prompt too: a scale above 1, no guidance embedding."""
    scale = request.guidance_scale if request.HasField("guidance_scale") else target.default_guidance_scale
    return scale > 1.0 and not target.guidance_embedded


def image_refusals(request: pb.GenerateRequest, target: Target) -> list[Refusal]:
    """Image fields too large, not decodable PNG/JPEG/WebP (or more pixels than allowed), a mask without its image,
    of another size or of several channels, a size not served (the init image's where width or height is 0), an
    image refused its resize."""
    found = []
    images = {name: getattr(request, name) for name in ("init_image", "mask_image")}
    decoded = {}
    for name, data in images.items():
        if len(data) > MAX_IMAGE_BYTES:
            found.append(refusal(f"{name}: {len(data)} bytes", name))
        elif data:
            decoded[name] = upright_image(data)
            if decoded[name] is None:
                found.append(refusal(f"{name}: not a decodable PNG, JPEG or WebP image", name))
    init, mask = decoded.get("init_image"), decoded.get("mask_image")
    if images["mask_image"] and not images["init_image"]:
        found.append(refusal("mask_image: without init_image", "mask_image"))
    if init is not None and mask is not None and init[0] != mask[0]:
        # Checked only at a size the model serves (images are never resized to one it does not).
        blockers = ("mask_image", "width", "height")
        found.append(refusal(f"mask_image: {mask[0]} for an init_image of {init[0]}", *blockers))
    if mask is not None and mask[1] not in MASK_MODES:
        # Checked only once the init image decoded, its size is valid and the blur is.
        blockers = ("mask_image", "init_image", "width", "height", "mask_blur")
        found.append(refusal(f"mask_image: mode {mask[1]}", *blockers))
    size = request_size(request, target, init[0] if init else None)
    if size not in target.sizes:
        found.append(refusal(f"width, height: {size[0]}x{size[1]} not served", "width", "height"))
    if init is not None and request.resize_mode == pb.RESIZE_MODE_REFUSE and size in target.sizes and size != init[0]:
        found.append(refusal(f"init_image: {init[0]} refused a resize to {size}", "init_image"))
    return found


def option_refusals(request: pb.GenerateRequest, target: Target) -> list[Refusal]:
    """Strength, resize mode, blur and size conditioning out of range or without the images they apply to."""
    found = []
    images = bool(request.init_image or request.mask_image)
    if request.HasField("strength") and not (math.isfinite(request.strength) and 0.0 < request.strength <= 1.0):
        found.append(refusal(f"strength: {request.strength}", "strength"))
    if request.HasField("strength") and not images:
        found.append(refusal("strength: without init_image", "strength"))
    if request.resize_mode not in RESIZE_MODES:
        found.append(refusal(f"resize_mode: #{request.resize_mode}", "resize_mode"))
    if request.resize_mode != pb.RESIZE_MODE_UNSPECIFIED and not images:
        found.append(refusal("resize_mode: without init_image", "resize_mode"))
    if not 0 <= request.mask_blur <= MAX_MASK_BLUR:
        found.append(refusal(f"mask_blur: {request.mask_blur}", "mask_blur"))
    if request.mask_blur and not request.mask_image:
        found.append(refusal("mask_blur: without mask_image", "mask_blur"))
    conditioned = request.HasField("original_size") or request.HasField("target_size")
    if target.family != SDXL_FAMILY and (conditioned or request.crop_top or request.crop_left):
        found.append(refusal(f"original_size: size conditioning on {target.family}", "original_size"))
    return found


def upright_image(data: bytes) -> tuple[tuple[int, int], str] | None:
    """(upright size, Pillow mode) of a PNG, JPEG or WebP file that decodes whole within the pixel limit; None for
    anything else. The fuzzer's own reading, with the same library the server uses, but not the server's code."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: the pixel limit below is stricter
            image = Image.open(io.BytesIO(data), formats=DECODED_FORMATS)
            if image.width * image.height > MAX_INPUT_PIXELS:
                return None
            image.load()
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # any reason Pillow cannot read it: not a valid image for the API
        return None
    return (transposed(image.size) if orientation in QUARTER_TURNS else image.size), image.mode


def request_size(request: pb.GenerateRequest, target: Target, init_size: tuple[int, int] | None) -> tuple[int, int]:
    """The proto's rule: width and height 0 take the init image's size when the model serves it, else the model's."""
    default = init_size if init_size in target.sizes else (target.width, target.height)
    return request.width or default[0], request.height or default[1]


def known_weight(text: str) -> float | None:
    """The weight of a prompt of one word in nested round brackets, or of one `(word:w)`; None for other prompts."""
    weighted = WEIGHTED_WORD.fullmatch(text)
    if weighted:
        return float(weighted[2])
    nested = NESTED_WORD.fullmatch(text)
    if nested is None or len(nested[3]) not in (0, len(nested[1])):
        return None
    weight = 1.0
    for _ in range(len(nested[1])):  # multiplied one bracket at a time, as the parser does, overflowing to inf
        weight *= ROUND_MULTIPLIER
        if math.isinf(weight):
            break
    return weight


def weight_allowed(weight: float) -> bool:
    """Finite and at most the limit in size, as the float32 the encoder's output is scaled by; a weight just past
    the limit that float32 rounds onto it is not claimed either way."""
    single = np.float32(weight) if abs(weight) < float(np.finfo(np.float32).max) else np.float32(np.inf)
    return bool(np.isfinite(single)) and (abs(weight) <= MAX_PROMPT_WEIGHT or abs(float(single)) <= MAX_PROMPT_WEIGHT)


def letter_tokens(text: str) -> tuple[int, int] | None:
    """(tokens, chunks) of a prompt of one-letter words in BREAK-cut groups: a word a token, a group its chunks (a
    BREAK right after a full chunk adds none); None for other prompts."""
    if len(text) > MAX_PROMPT_CHARS or not LETTER_GROUPS.fullmatch(text):
        return None
    counts = [len(group.split()) for group in text.split(BREAK_WORD)]
    return sum(counts), sum(math.ceil(count / CHUNK_TOKENS) for count in counts)


def has_text(prompt: str) -> bool:
    """Whether a prompt has a word the tokenizer must count: an ASCII letter that is not part of BREAK."""
    return any(char in string.ascii_letters for char in BREAK_TOKEN.sub("", prompt))


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
    if for_default_model(request, target):
        init = upright_image(request.init_image) if request.init_image else None
        size = request_size(request, target, init[0] if init else None)
        wrong = sorted({(w, h) for *_, w, h in images if (w, h) != size})
        if wrong:
            problems.append(Problem("image size is not the request's", f"{wrong} for {size}"))
    wanted = request.request_id
    if not outcome.request_ids or any((rid != wanted) if wanted else not rid for rid in outcome.request_ids):
        problems.append(Problem("request_id not echoed (or none generated)"))
    if case.method == GENERATE_STREAM and (outcome.events[:1], outcome.events[-1:]) != (("queued",), ("completed",)):
        problems.append(Problem("stream does not run from queued to completed", " ".join(outcome.events[:3])))
    if outcome.echo is not None:
        problems += echo_problems(request, outcome.echo, target)
    return problems


def echo_problems(request: pb.GenerateRequest, echo: Echo, target: Target) -> list[Problem]:
    """The task and strength a response reports are the request's; its token and chunk counts fit its prompts."""
    problems = []
    task = expected_task(request)
    if echo.task != task:
        problems.append(Problem("task is not the request's", f"{task_name(echo.task)} for {task_name(task)}"))
    if task != pb.TASK_TXT2IMG:
        strength = request.strength if request.HasField("strength") else DEFAULT_STRENGTH[task]
        if np.float32(echo.strength) != np.float32(strength):
            problems.append(Problem("strength is not the request's", f"{echo.strength:g} for {strength:g}"))
    return problems + token_problems(request, echo, target)


def task_name(task: int) -> str:
    return pb.Task.Name(task) if task in pb.Task.values() else f"#{task}"


def token_problems(request: pb.GenerateRequest, echo: Echo, target: Target) -> list[Problem]:
    problems = []
    if has_text(request.prompt) and echo.prompt_tokens <= 0:
        problems.append(Problem("prompt_tokens do not count the prompt", f"{echo.prompt_tokens}"))
    chunks = 1
    for text, tokens, guided in (
        (request.prompt, echo.prompt_tokens, True),
        (request.negative_prompt, echo.negative_prompt_tokens, guided_request(request, target)),
    ):
        known = letter_tokens(text) if text else (0, 1)
        if known is not None and tokens != known[0]:
            words = f"{known[0]} one-letter words" if text else "an empty prompt"
            problems.append(Problem("token count is not the prompt's", f"{tokens} for {words}"))
        needed = known[1] if known is not None else math.ceil(tokens / CHUNK_TOKENS)
        chunks = max(chunks, needed) if guided else chunks
    if not chunks <= echo.text_chunks <= target.max_text_chunks:
        problems.append(
            Problem("text_chunks outside the prompt's needs and the model's", f"{echo.text_chunks} for {chunks}..")
        )
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


def describe_bytes(data: bytes) -> str:
    """An image field by its length, and what Pillow's header parse makes of it (or its first bytes)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            kind = f"{image.format} {image.width}x{image.height} {image.mode}"
    except Exception:  # not an image Pillow knows: shown by its start
        kind = data[:8].hex() + ("..." if len(data) > 8 else "")
    return f"<{len(data)} bytes: {kind}>"


def describe_request(request: pb.GenerateRequest) -> str:
    parts = []
    for descriptor, value in request.ListFields():
        if isinstance(value, str):
            shown = describe_text(value)
        elif isinstance(value, bytes):
            shown = describe_bytes(value)
        elif isinstance(value, pb.ImageSize):
            shown = f"{value.width}x{value.height}"
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
        sizes=tuple((size.width, size.height) for size in info.sizes) or ((info.width, info.height),),
        tasks=tuple(info.tasks) or (pb.TASK_TXT2IMG,),
        family=info.family,
        max_prompt_tokens=info.max_prompt_tokens or CHUNK_TOKENS,
        default_guidance_scale=info.default_guidance_scale,
        guidance_embedded=info.guidance_embedded,
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
        task="" if case.request is None else task_label(expected_task(case.request)),
    )


def task_label(task: int) -> str:
    return pb.Task.Name(task).removeprefix("TASK_").lower()


def run_fuzz(server: str | Connection, count: int, seed: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S) -> FuzzReport:
    """Sends `count` cases to the server (an address, or a Connection with its TLS and token), one at a time, each
    with a deadline of timeout_s, checks every answer against the contract and, at the end, that the server still
    serves a good request."""
    require_hypothesis()
    # Client limits stay at grpcio's defaults (4 MiB received; metadata 8 KiB soft, 16 KiB hard): what a real client
    # has, so an error message too long for its metadata limit shows up here as it would there.
    link = server if isinstance(server, Connection) else Connection((server,))
    with link.plain_channel() as channel:
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
        served=dict(Counter(r.task for r in records if r.code == "OK" and r.task)),
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
        "served by task: " + (", ".join(f"{task} {n}" for task, n in sorted(report.served.items())) or "none"),
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
