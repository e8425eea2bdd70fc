"""AUTOMATIC1111-style prompts: attention weights such as `(red:1.3)`, `BREAK`, and prompts longer than one chunk.

A prompt is parsed into (text, weight) fragments, each fragment is tokenized on its own, and the tokens fill chunks of
the text encoder's length (BOS, up to max_length - 2 tokens, EOS, padding). Each chunk goes through the encoder on its
own; the weights apply to the encoder's output afterwards (apply_weights), so they never change the token ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .tokenizer import ClipTokenizer

# `(words)` multiplies its words' weight by this and `[words]` divides it by this: AUTOMATIC1111's values.
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
# When a full chunk meets one more token and a comma is among its last this many tokens, the chunk is cut after the
# comma and the phrase in progress moves whole to the next chunk: AUTOMATIC1111's default "comma padding backtrack".
COMMA_BACKTRACK = 20
# A chunk mean below this fraction of its mean magnitude is treated as zero (see apply_weights): far above the float32
# rounding of the sum (about 1e-7 relative), which is all such a mean holds.
NEGLIGIBLE_MEAN = 1e-3
# parse_prompt_attention's marker where `BREAK` stood. chunk_prompt tests for it by identity (`is BREAK`), so a text
# fragment that happens to read "BREAK" with this weight is never taken for it.
BREAK: tuple[str, float] = ("BREAK", -1.0)

# The prompt's lexical pieces; every character of a prompt falls in exactly one match, in order. A lone backslash is
# text here (AUTOMATIC1111 drops it), so such a prompt keeps the ids ClipTokenizer.encode gives it.
_PIECE = re.compile(
    r"""
      (?P<escaped>\\[\\()\[\]])                           # \( \) \[ \] \\ : that character, literally
    | :\s*(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+))\s*\)     # :1.5) : closes a ( with that multiplier
    | (?P<open>[(\[])
    | (?P<close>[)\]])
    | [^\\()\[\]:]+                                      # plain text
    | [\\:]                                              # a backslash or colon that starts none of the above: text
    """,
    re.VERBOSE,
)
# BREAK as a word of its own (as AUTOMATIC1111 matches it), with the spaces around it, which would only pad chunks.
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")
# Each closing bracket's opening bracket and multiplier.
_CLOSES = {")": ("(", ROUND_MULTIPLIER), "]": ("[", SQUARE_MULTIPLIER)}


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """A prompt's (text, weight) fragments, with BREAK markers, as AUTOMATIC1111's prompt attention parses it."""
    pieces: list[str | None] = []  # None where a BREAK stood
    weights: list[float] = []
    opened: dict[str, list[int]] = {"(": [], "[": []}  # where each still-open bracket's pieces start

    def multiply(start: int, factor: float) -> None:
        for i in range(start, len(weights)):
            weights[i] *= factor

    # BREAK inside brackets still breaks (AUTOMATIC1111 weights its marker there and then reads it as a word).
    def add_text(part: str) -> None:
        for i, words in enumerate(_BREAK_WORD.split(part)):
            if i:
                pieces.append(None)
                weights.append(1.0)
            pieces.append(words)
            weights.append(1.0)

    for match in _PIECE.finditer(text):
        opener, factor = _CLOSES.get(match["close"], (None, 1.0))
        if match["open"]:
            opened[match["open"]].append(len(pieces))
        elif match["weight"] is not None and opened["("]:
            multiply(opened["("].pop(), float(match["weight"]))
        elif opener and opened[opener]:
            multiply(opened[opener].pop(), factor)
        elif match["escaped"]:
            pieces.append(match["escaped"][1])
            weights.append(1.0)
        else:
            # Text, or a closer with nothing open: AUTOMATIC1111 keeps that as text, so `a)` still reads `a)`.
            add_text(match[0])
    # A bracket never closed weights everything after it.
    for opener, factor in _CLOSES.values():
        for start in opened[opener]:
            multiply(start, factor)
    return _merge(pieces, weights)


def _merge(pieces: list[str | None], weights: list[float]) -> list[tuple[str, float]]:
    """Fragments without empty text, neighbours of equal weight joined; BREAKs (None) become the marker."""
    fragments: list[tuple[str, float]] = []
    for piece, weight in zip(pieces, weights, strict=True):
        if piece is None:
            fragments.append(BREAK)
        elif piece and fragments and fragments[-1] is not BREAK and fragments[-1][1] == weight:
            fragments[-1] = (fragments[-1][0] + piece, weight)
        elif piece:
            fragments.append((piece, weight))
    return fragments or [("", 1.0)]


# eq=False: numpy arrays have no single truth value, so field-wise equality (and the hash frozen implies) cannot work.
@dataclass(frozen=True, eq=False)
class PromptChunks:
    """A prompt as its text encoder takes it: rows of BOS, tokens, EOS, padding, with one weight per id."""

    ids: np.ndarray  # int64 [chunks, length], each row as ClipTokenizer.encode writes one
    weights: np.ndarray  # float32 [chunks, length], 1 on BOS, EOS and padding
    tokens: int  # the prompt's tokens, without BOS, EOS or padding

    @property
    def chunks(self) -> int:
        return self.ids.shape[0]

    @property
    def weighted(self) -> bool:
        """Whether any weight differs from 1 (if not, apply_weights leaves the encoder's output as it is)."""
        return bool((self.weights != 1.0).any())


def chunk_prompt(tokenizer: ClipTokenizer, text: str) -> PromptChunks:
    """A prompt's ids and weights in chunks of the encoder's length, cut as AUTOMATIC1111 cuts them."""
    fragments = parse_prompt_attention(text)
    # The comma is tokenized with the fragments, in the same call, to find the id the comma backtrack looks for.
    comma_ids, *fragment_ids = tokenizer.token_ids([",", *(f[0] for f in fragments if f is not BREAK)])
    found = iter(fragment_ids)
    stream: list[tuple[int, float] | None] = []  # None where a BREAK stood
    for fragment in fragments:
        if fragment is BREAK:
            stream.append(None)
        else:
            stream.extend((token, fragment[1]) for token in next(found))
    comma = comma_ids[0] if len(comma_ids) == 1 else None
    return _to_arrays(tokenizer, _fill_chunks(stream, tokenizer.max_length - 2, comma))


def _fill_chunks(
    stream: list[tuple[int, float] | None], room: int, comma: int | None
) -> list[list[tuple[int, float]]]:
    """(token, weight) pairs cut into chunks of at most `room`; a BREAK (None) ends the chunk, even an empty one.

    As in AUTOMATIC1111, a full chunk stays open until a token or BREAK follows it, so a BREAK right after a full
    chunk adds no empty chunk; a BREAK at the start, or two in a row, does add one. A trailing BREAK adds nothing, and
    a prompt without tokens is one empty chunk.
    """
    chunks: list[list[tuple[int, float]]] = []
    chunk: list[tuple[int, float]] = []
    for item in stream:
        if item is None:
            chunks.append(chunk)
            chunk = []
            continue
        if len(chunk) == room:
            cut = _cut_after_comma(chunk, comma) if item[0] != comma else room
            chunks.append(chunk[:cut])
            chunk = chunk[cut:]
        chunk.append(item)
    if chunk or not chunks:
        chunks.append(chunk)
    return chunks


def _cut_after_comma(chunk: list[tuple[int, float]], comma: int | None) -> int:
    """Where a full chunk ends: after its last comma if that is among its last COMMA_BACKTRACK tokens, else its end."""
    for i in range(len(chunk) - 1, max(len(chunk) - COMMA_BACKTRACK, 0) - 1, -1):
        if chunk[i][0] == comma:
            return i + 1
    return len(chunk)


def _to_arrays(tokenizer: ClipTokenizer, chunks: list[list[tuple[int, float]]]) -> PromptChunks:
    """The chunks as rows laid out as ClipTokenizer.encode lays one out, with their weights."""
    ids = np.full((len(chunks), tokenizer.max_length), tokenizer.pad_token_id, dtype=np.int64)
    weights = np.ones(ids.shape, dtype=np.float32)
    for row, chunk in enumerate(chunks):
        ids[row, 0] = tokenizer.bos_token_id
        ids[row, 1 : len(chunk) + 1] = [token for token, _ in chunk]
        weights[row, 1 : len(chunk) + 1] = [weight for _, weight in chunk]
        ids[row, len(chunk) + 1] = tokenizer.eos_token_id
    return PromptChunks(ids, weights, sum(len(chunk) for chunk in chunks))


def pad_chunks(prompt: PromptChunks, chunks: int, empty: PromptChunks) -> PromptChunks:
    """The prompt followed by copies of `empty`'s one chunk (weights 1) up to `chunks` chunks."""
    if empty.chunks != 1 or empty.ids.shape[1] != prompt.ids.shape[1]:
        raise ValueError(f"empty must be one chunk of {prompt.ids.shape[1]} ids, got shape {empty.ids.shape}")
    if prompt.chunks > chunks:
        raise ValueError(f"prompt has {prompt.chunks} chunks, more than the {chunks} to pad to")
    extra = chunks - prompt.chunks
    if not extra:
        return prompt
    ids = np.concatenate([prompt.ids, np.repeat(empty.ids, extra, axis=0)])
    weights = np.concatenate([prompt.weights, np.ones((extra, prompt.weights.shape[1]), dtype=np.float32)])
    return PromptChunks(ids, weights, prompt.tokens)


def apply_weights(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The encoder's [chunks, length, width] output weighted per token, each chunk's mean restored (AUTOMATIC1111's
    "Original" emphasis); with every weight 1, `hidden` itself, untouched."""
    if weights.shape != hidden.shape[:2]:
        raise ValueError(f"weights of shape {weights.shape} do not match hidden states of shape {hidden.shape}")
    if (weights == 1.0).all():
        return hidden
    # Means in float64: a chunk's mean sums tens of thousands of values, and the ratio scales every one of them.
    before = hidden.mean(axis=(1, 2), dtype=np.float64)
    weighted = hidden * weights.astype(np.float32)[:, :, None]
    after = weighted.mean(axis=(1, 2), dtype=np.float64)
    # A chunk whose mean is negligible against its values (an encoder whose final norm has no bias) has no mean to
    # restore: the ratio of two rounding errors would scale the chunk at random, so it is left as weighted.
    magnitude = np.abs(hidden).mean(axis=(1, 2), dtype=np.float64)
    meaningful = (np.abs(before) > NEGLIGIBLE_MEAN * magnitude) & (np.abs(after) > NEGLIGIBLE_MEAN * magnitude)
    ratio = np.where(meaningful, before / np.where(meaningful, after, 1.0), 1.0)
    return weighted * ratio.astype(np.float32)[:, None, None]
