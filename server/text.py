"""Prompts through a text encoder: AUTOMATIC1111-style chunks and weights, with a cache of encoded chunks.

A prompt is tokenized into chunks of the encoder's length (75 tokens + BOS/EOS); every chunk of every prompt of a
batch goes through the encoder in one pass, except chunks the cache already holds, keyed by model, encoder and the
chunk's token ids (so a repeated negative prompt, or a rerun with another seed, skips the encoder). Weights apply
after the cache: the same words at other weights share the encoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from diffuserve.engine.manifest import INPUT_IDS

from .prompts import PromptChunks, apply_weights, chunk_prompt, pad_chunks
from .rows import RowRunner


@dataclass(frozen=True)
class EncodedPrompt:
    """One prompt through one encoder: its weighted hidden states [chunks * length, width], and the pooled embedding
    of its first chunk where the encoder has one (AUTOMATIC1111 pools the first chunk too; weights leave it as is)."""

    hidden: np.ndarray
    pooled: np.ndarray | None


def prompt_chunks(model, component: str, texts: Sequence[str], chunks: int) -> list[PromptChunks]:
    """Each text's chunks for one encoder's tokenizer, padded with the empty prompt's chunk to `chunks` chunks: a
    prompt and its negative must have the same length to share the U-Net's rows."""
    tokenizer = model.tokenizers[component]
    empty = chunk_prompt(tokenizer, "")
    return [pad_chunks(chunk_prompt(tokenizer, text), chunks, empty) for text in texts]


def encode_prompts(model, component: str, prompts: Sequence[PromptChunks]) -> list[EncodedPrompt]:
    """Every prompt's chunks through the encoder (cached chunks skipped), weighted as AUTOMATIC1111 weights them."""
    engines = model.engines(component)
    spec = engines[0].spec
    hidden_name, *pooled_name = (t.name for t in spec.outputs)
    rows = [row for p in prompts for row in p.ids]
    keys = [(model.name, component, row.tobytes()) for row in rows]
    cache = model.text_cache
    found = [cache.get(key) if cache is not None else None for key in keys]
    missing = [i for i, value in enumerate(found) if value is None]
    if missing:
        ids = np.stack([rows[i] for i in missing]).astype(spec.inputs[0].np_dtype)
        outputs = RowRunner(engines, len(missing))({INPUT_IDS: ids})
        for j, i in enumerate(missing):
            found[i] = tuple(outputs[name][j] for name in (hidden_name, *pooled_name))
            if cache is not None:
                cache.put(keys[i], found[i])
    encoded, start = [], 0
    for prompt in prompts:
        parts = found[start : start + prompt.chunks]
        start += prompt.chunks
        hidden = apply_weights(np.stack([p[0] for p in parts]), prompt.weights)
        pooled = parts[0][1] if pooled_name else None
        encoded.append(EncodedPrompt(hidden.reshape(-1, hidden.shape[-1]), pooled))
    return encoded
