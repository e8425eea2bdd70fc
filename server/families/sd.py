"""Stable Diffusion 1.x and 2.x: one CLIP text encoder's last hidden state conditions the U-Net's cross-attention.

2.x differs only in its encoder (OpenCLIP, as diffusers stores it) and its v-prediction, which the sampler handles.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from diffuserve.engine.manifest import ENCODER_HIDDEN_STATES, TEXT_ENCODER

from ..text import EncodedPrompt, encode_prompts, prompt_chunks


def guided_texts(params) -> list[str]:
    """The texts one request conditions on: its negative prompt, then its prompt, under guidance; its prompt alone
    without (diffusers encodes no negative prompt then)."""
    return [params.negative_prompt, params.prompt] if params.guided else [params.prompt]


def encoded_texts(model, component: str, params_list: Sequence) -> Iterator[EncodedPrompt]:
    """Every request's guided texts through one text encoder, in order, in one pass."""
    chunks = [c for p in params_list for c in prompt_chunks(model, component, guided_texts(p), p.text_chunks)]
    return iter(encode_prompts(model, component, chunks))


def condition(model, params_list: Sequence) -> list[dict[str, np.ndarray]]:
    encoded = encoded_texts(model, TEXT_ENCODER, params_list)
    return [{ENCODER_HIDDEN_STATES: np.stack([next(encoded).hidden for _ in guided_texts(p)])} for p in params_list]
