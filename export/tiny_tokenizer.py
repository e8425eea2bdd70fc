"""A small but real CLIP byte-level BPE tokenizer, built offline for tests and tiny pipelines."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from itertools import pairwise
from pathlib import Path

logger = logging.getLogger(__name__)

TINY_VOCAB_SIZE = 1000
"""The vocab_size a tiny text encoder should use: the tokenizer's vocabulary always fits below it."""

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
_SUFFIX = "</w>"
_NUM_MERGES = 450

# Repeated words count more, so the merges learnt first are those a prompt is most likely to use.
_WORDS = (
    "a a a a the the the the on on on of of of in in and and with with an an at to by is"
    " photo photo photo photograph picture image painting drawing sketch render illustration portrait"
    " background background white black red green blue yellow orange purple pink brown grey gray gold silver"
    " circle square triangle rectangle star heart cube sphere cone cylinder shape shapes line lines dot dots"
    " cat dog bird horse fish tree flower house car city mountain river sea sky sun moon cloud forest road"
    " big small large tiny bright dark light colorful simple plain high quality detailed beautiful style art"
    " astronaut riding man woman person face hand water fire snow night day street room table chair window"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (whitespace and control bytes are shifted)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def _learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE training; ties break on the pair itself so the result never depends on dict or hash order."""
    byte_char = _bytes_to_unicode()
    words_freq: Counter[tuple[str, ...]] = Counter()
    for word in words:
        chars = tuple(byte_char[b] for b in word.encode("utf-8"))
        words_freq[chars[:-1] + (chars[-1] + _SUFFIX,)] += 1
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, freq in words_freq.items():
            for pair in pairwise(symbols):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words_freq = Counter({_merge(symbols, best): freq for symbols, freq in words_freq.items()})
    return merges


def build_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The tiny vocabulary in CLIP's layout: bytes, bytes + "</w>", merge results, then bos and eos."""
    merges = _learn_merges(list(_WORDS), _NUM_MERGES)
    tokens = list(_bytes_to_unicode().values())
    tokens += [t + _SUFFIX for t in tokens]
    tokens += ["".join(pair) for pair in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens) or len(vocab) >= TINY_VOCAB_SIZE:
        raise AssertionError(f"tiny vocabulary is malformed: {len(tokens)} tokens, {len(vocab)} distinct")
    return vocab, merges


def write_vocab_and_merges(folder: str | os.PathLike, model_max_length: int = 77, pad_token: str = EOS_TOKEN) -> None:
    """Write a legacy (pre-tokenizer.json) CLIP tokenizer folder: vocab.json, merges.txt, tokenizer_config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
        "model_max_length": model_max_length,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def save_tiny_clip_tokenizer(
    folder: str | os.PathLike, model_max_length: int = 77, pad_token: str = EOS_TOKEN
) -> None:
    """Save the tiny tokenizer through transformers' CLIPTokenizer, i.e. exactly as a real pipeline folder is saved."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_vocab_and_merges(tmp, model_max_length=model_max_length, pad_token=pad_token)
        # from_pretrained rather than the constructor: transformers 4 wants vocab_file=, 5 wants vocab=.
        tokenizer = CLIPTokenizer.from_pretrained(tmp, pad_token=pad_token, model_max_length=model_max_length)
        tokenizer.save_pretrained(str(folder))
    logger.debug("saved a %d-token CLIP tokenizer to %s", len(tokenizer), folder)
