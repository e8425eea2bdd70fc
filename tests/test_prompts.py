"""AUTOMATIC1111-style prompts: the attention parser, chunks of 75 tokens, padding, weighting the hidden states."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diffuserve.server.prompts import (
    BREAK,
    COMMA_BACKTRACK,
    PromptChunks,
    apply_weights,
    chunk_prompt,
    pad_chunks,
    parse_prompt_attention,
)
from diffuserve.server.tokenizer import ClipTokenizer

COMMITTED_TOKENIZER = Path(__file__).resolve().parents[1] / "models" / "shapes-sd" / "tokenizer"
ROOM = 75  # CLIP's 77 ids less BOS and EOS
# Each of these words is one token of CLIP's vocabulary (checked in the fixture).
WORDS = "red blue green circle square star tree house sky sun moon cloud".split()


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    tokenizer = ClipTokenizer.from_folder(COMMITTED_TOKENIZER)
    assert tokenizer.max_length == ROOM + 2
    assert all(len(ids) == 1 for ids in tokenizer.token_ids(WORDS))
    return tokenizer


def words(count: int, start: int = 0) -> str:
    """A prompt of exactly `count` tokens."""
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(count))


def ids_of(tokenizer: ClipTokenizer, text: str) -> list[int]:
    return tokenizer.token_ids([text])[0]


def row(tokenizer: ClipTokenizer, tokens: list[int]) -> list[int]:
    """One chunk's ids as CLIP lays them out: BOS, the tokens, EOS, padding."""
    ids = [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id]
    return ids + [tokenizer.pad_token_id] * (tokenizer.max_length - len(ids))


# The parser.

W2 = 1.1 * 1.1  # ((a)), multiplied in the parser's order


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a red circle", [("a red circle", 1.0)]),
        ("a (red) circle", [("a ", 1.0), ("red", 1.1), (" circle", 1.0)]),
        ("((red))", [("red", W2)]),
        ("[red]", [("red", 1 / 1.1)]),
        ("[[red]]", [("red", 1 / 1.1 / 1.1)]),
        ("a (red:1.5) circle", [("a ", 1.0), ("red", 1.5), (" circle", 1.0)]),
        ("(red: 0.25 )", [("red", 0.25)]),
        ("(red:.5)", [("red", 0.5)]),
        ("(red:-1)", [("red", -1.0)]),
        ("(red:-0.5) sky", [("red", -0.5), (" sky", 1.0)]),
        ("(a (b:2))", [("a ", 1.1), ("b", 2 * 1.1)]),
        ("[a (b)]", [("a ", 1 / 1.1), ("b", 1.1 / 1.1)]),
        # AUTOMATIC1111's own documented example.
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.3 * 1.1 * 1.1),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.1 * 1.1 * 1.1 * 1.1),
                (".", 1.1),
            ],
        ),
    ],
)
def test_brackets_multiply_weights_and_nest(text: str, expected: list[tuple[str, float]]) -> None:
    parsed = parse_prompt_attention(text)
    assert [t for t, _ in parsed] == [t for t, _ in expected]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_escaped_brackets_and_backslash_are_literal() -> None:
    assert parse_prompt_attention(r"\(a\) \[b\] c\\d") == [(r"(a) [b] c\d", 1.0)]
    assert parse_prompt_attention(r"(\(a\))") == [("(a)", 1.1)]


def test_a_lone_backslash_or_colon_is_text() -> None:
    assert parse_prompt_attention(r"a\b c:d (e:f)") == [(r"a\b c:d ", 1.0), ("e:f", 1.1)]


def test_an_unclosed_bracket_weights_the_rest_of_the_prompt() -> None:
    assert parse_prompt_attention("a (b") == [("a ", 1.0), ("b", 1.1)]
    assert parse_prompt_attention("a [b (c") == [("a ", 1.0), ("b ", 1 / 1.1), ("c", pytest.approx(1.1 / 1.1))]
    # Without its closing bracket, `:1.5` is text.
    assert parse_prompt_attention("(a:1.5") == [("a:1.5", 1.1)]


def test_a_closing_bracket_with_nothing_open_is_kept_as_text() -> None:
    assert parse_prompt_attention("a) b] c") == [("a) b] c", 1.0)]
    assert parse_prompt_attention("a :1.5) b") == [("a :1.5) b", 1.0)]
    assert parse_prompt_attention("(a)) b") == [("a", 1.1), (") b", 1.0)]


def test_break_is_a_marker_between_fragments() -> None:
    assert parse_prompt_attention("red circle BREAK blue sky") == [("red circle", 1.0), BREAK, ("blue sky", 1.0)]
    assert parse_prompt_attention("(a BREAK b)") == [("a", 1.1), BREAK, ("b", 1.1)]
    assert parse_prompt_attention("BREAK") == [BREAK]
    assert parse_prompt_attention("a BREAK BREAK b") == [("a", 1.0), BREAK, BREAK, ("b", 1.0)]
    # Only the uppercase word on its own.
    assert parse_prompt_attention("BREAKfast break Break") == [("BREAKfast break Break", 1.0)]
    assert parse_prompt_attention("a BREAK, b") == [("a", 1.0), BREAK, (", b", 1.0)]


def test_neighbours_of_equal_weight_merge() -> None:
    assert parse_prompt_attention("(a)(b)") == [("ab", 1.1)]
    assert parse_prompt_attention("a (b:1) c") == [("a b c", 1.0)]
    assert parse_prompt_attention("a () b") == [("a  b", 1.0)]


@pytest.mark.parametrize("text", ["", "()", "[]"])
def test_an_empty_prompt_is_one_empty_fragment(text: str) -> None:
    assert parse_prompt_attention(text) == [("", 1.0)]


# Chunks.


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "a photo of a red circle on a white background",
        "Hello, World!!! What's up? 50% a-b_c/d",
        "a) stray closers] and a\\backslash and a:colon",
        "café crème 東京 🐱 BREAKfast",
        "multiple     spaces\n\nnewlines\tand\ttabs",
        words(ROOM),
    ],
)
def test_an_unweighted_prompt_of_one_chunk_is_exactly_what_encode_gives(tokenizer: ClipTokenizer, text: str) -> None:
    prompt = chunk_prompt(tokenizer, text)
    assert prompt.chunks == 1 and not prompt.weighted
    assert prompt.ids.dtype == np.int64 and prompt.weights.dtype == np.float32
    np.testing.assert_array_equal(prompt.ids[0], tokenizer.encode([text])[0])
    np.testing.assert_array_equal(prompt.weights, np.ones((1, ROOM + 2), np.float32))
    assert prompt.tokens == len(ids_of(tokenizer, text))


def test_75_tokens_are_one_chunk_and_76_are_two(tokenizer: ClipTokenizer) -> None:
    assert chunk_prompt(tokenizer, words(ROOM)).chunks == 1
    prompt = chunk_prompt(tokenizer, words(ROOM + 1))
    ids = ids_of(tokenizer, words(ROOM + 1))
    assert (prompt.chunks, prompt.tokens) == (2, ROOM + 1)
    np.testing.assert_array_equal(prompt.ids, [row(tokenizer, ids[:ROOM]), row(tokenizer, ids[ROOM:])])
    assert not prompt.weighted


def test_a_long_prompt_keeps_every_token(tokenizer: ClipTokenizer) -> None:
    prompt = chunk_prompt(tokenizer, words(200))
    ids = ids_of(tokenizer, words(200))
    assert (prompt.chunks, prompt.tokens) == (3, 200)
    expected = [row(tokenizer, ids[:75]), row(tokenizer, ids[75:150]), row(tokenizer, ids[150:])]
    np.testing.assert_array_equal(prompt.ids, expected)


def test_break_starts_a_new_chunk(tokenizer: ClipTokenizer) -> None:
    prompt = chunk_prompt(tokenizer, "red circle BREAK blue sky")
    assert (prompt.chunks, prompt.tokens) == (2, 4)
    expected = [row(tokenizer, ids_of(tokenizer, "red circle")), row(tokenizer, ids_of(tokenizer, "blue sky"))]
    np.testing.assert_array_equal(prompt.ids, expected)


@pytest.mark.parametrize(
    ("text", "chunks"),
    [
        ("BREAK red", ["", "red"]),  # a BREAK at the start leaves an empty chunk, as in AUTOMATIC1111
        ("red BREAK BREAK blue", ["red", "", "blue"]),  # so does a second BREAK in a row
        ("red BREAK", ["red"]),  # a trailing BREAK adds nothing
        ("BREAK", [""]),
        (f"{words(ROOM)} BREAK blue", [words(ROOM), "blue"]),  # a full chunk is already closed: no empty one
    ],
)
def test_break_edge_cases(tokenizer: ClipTokenizer, text: str, chunks: list[str]) -> None:
    prompt = chunk_prompt(tokenizer, text)
    np.testing.assert_array_equal(prompt.ids, [row(tokenizer, ids_of(tokenizer, c)) for c in chunks])
    assert prompt.tokens == sum(len(ids_of(tokenizer, c)) for c in chunks)


def test_weights_land_on_their_tokens(tokenizer: ClipTokenizer) -> None:
    prompt = chunk_prompt(tokenizer, "a (red:1.5) circle on [blue] sky")
    assert prompt.weighted and (prompt.chunks, prompt.tokens) == (1, 6)
    np.testing.assert_array_equal(prompt.ids[0], tokenizer.encode(["a red circle on blue sky"])[0])
    expected = np.ones(ROOM + 2, np.float32)
    expected[1:7] = [1.0, 1.5, 1.0, 1.0, 1 / 1.1, 1.0]  # BOS at 0; EOS and padding keep 1
    np.testing.assert_array_equal(prompt.weights[0], expected)


def test_weights_follow_their_tokens_into_the_next_chunk(tokenizer: ClipTokenizer) -> None:
    prompt = chunk_prompt(tokenizer, f"{words(74)} (blue sky:1.5)")
    assert (prompt.chunks, prompt.tokens) == (2, 76)
    assert prompt.weights[0, 75] == np.float32(1.5) and prompt.weights[1, 1] == np.float32(1.5)
    assert prompt.weights[0, :75].tolist() == [1.0] * 75 and prompt.weights[1, 2:].tolist() == [1.0] * 75


def test_a_full_chunk_is_cut_after_a_recent_comma(tokenizer: ClipTokenizer) -> None:
    # 70 tokens, a comma, then a 5-token phrase: cut after the comma, the phrase whole in the next chunk.
    ids = ids_of(tokenizer, f"{words(70)}, blue sky green tree star")
    assert len(ids) == ROOM + 1
    prompt = chunk_prompt(tokenizer, f"{words(70)}, (blue sky green tree star:1.3)")
    assert (prompt.chunks, prompt.tokens) == (2, ROOM + 1)
    np.testing.assert_array_equal(prompt.ids, [row(tokenizer, ids[:71]), row(tokenizer, ids[71:])])
    np.testing.assert_array_equal(prompt.weights[1, 1:6], np.full(5, 1.3, np.float32))
    assert prompt.weights[0].tolist() == [1.0] * (ROOM + 2)


def test_a_comma_further_back_than_the_backtrack_does_not_move_the_cut(tokenizer: ClipTokenizer) -> None:
    before = ROOM - COMMA_BACKTRACK - 1  # the comma sits just outside the last COMMA_BACKTRACK tokens
    text = f"{words(before)}, {words(ROOM - before)}"
    ids = ids_of(tokenizer, text)
    assert len(ids) == ROOM + 1
    prompt = chunk_prompt(tokenizer, text)
    np.testing.assert_array_equal(prompt.ids, [row(tokenizer, ids[:ROOM]), row(tokenizer, ids[ROOM:])])


def test_a_comma_that_overflows_a_chunk_starts_the_next(tokenizer: ClipTokenizer) -> None:
    text = f"{words(60)}, {words(14)}, blue"  # the second comma is token 76
    ids = ids_of(tokenizer, text)
    prompt = chunk_prompt(tokenizer, text)
    np.testing.assert_array_equal(prompt.ids, [row(tokenizer, ids[:ROOM]), row(tokenizer, ids[ROOM:])])


# Padding to a batch's chunks.


def test_pad_chunks_appends_the_empty_prompts_chunk(tokenizer: ClipTokenizer) -> None:
    empty = chunk_prompt(tokenizer, "")
    prompt = chunk_prompt(tokenizer, "(red) circle")
    padded = pad_chunks(prompt, 3, empty)
    assert (padded.chunks, padded.tokens) == (3, prompt.tokens)
    np.testing.assert_array_equal(padded.ids, [prompt.ids[0], empty.ids[0], empty.ids[0]])
    np.testing.assert_array_equal(padded.weights[0], prompt.weights[0])
    np.testing.assert_array_equal(padded.weights[1:], np.ones((2, ROOM + 2), np.float32))
    assert padded.weights.dtype == np.float32 and padded.ids.dtype == np.int64
    assert pad_chunks(prompt, 1, empty) is prompt


def test_pad_chunks_refuses_to_shorten(tokenizer: ClipTokenizer) -> None:
    empty = chunk_prompt(tokenizer, "")
    with pytest.raises(ValueError, match="2 chunks, more than the 1"):
        pad_chunks(chunk_prompt(tokenizer, words(80)), 1, empty)
    with pytest.raises(ValueError, match="one chunk"):
        pad_chunks(empty, 3, chunk_prompt(tokenizer, words(80)))


# Weighting the encoder's output.


def test_unit_weights_return_the_hidden_states_untouched() -> None:
    hidden = np.random.default_rng(0).standard_normal((2, 77, 8), dtype=np.float32)
    assert apply_weights(hidden, np.ones((2, 77), np.float32)) is hidden


def test_weights_multiply_each_token_then_restore_the_chunks_mean() -> None:
    hidden = np.array([[[1.0, 2.0], [3.0, 4.0]]], np.float32)  # mean 2.5
    # Token 0 doubled: [[2, 4], [3, 4]], mean 3.25; rescaled by 2.5 / 3.25 = 10 / 13.
    out = apply_weights(hidden, np.array([[2.0, 1.0]], np.float32))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, np.array([[[20, 40], [30, 40]]]) / 13, rtol=1e-6)
    assert out.mean() == pytest.approx(2.5, rel=1e-6)


def test_each_chunk_keeps_its_own_mean_and_an_unweighted_chunk_its_values() -> None:
    rng = np.random.default_rng(1)
    hidden = (rng.standard_normal((3, 77, 16)) + 0.5).astype(np.float32)
    weights = np.ones((3, 77), np.float32)
    weights[0, 3:6] = 1.5
    weights[2, 10] = 1 / 1.1
    out = apply_weights(hidden, weights)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), hidden.mean(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_array_equal(out[1], hidden[1])
    assert not np.array_equal(out[0], hidden[0])


def test_prompt_chunks_says_whether_it_is_weighted(tokenizer: ClipTokenizer) -> None:
    assert chunk_prompt(tokenizer, "(red)").weighted
    assert not chunk_prompt(tokenizer, "(red:1)").weighted
    assert isinstance(chunk_prompt(tokenizer, "red"), PromptChunks)
