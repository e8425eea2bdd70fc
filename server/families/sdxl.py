"""SDXL: two CLIP text encoders' penultimate hidden states side by side, the second's pooled embedding, and the
size and crop the image is conditioned on (time ids), as StableDiffusionXLPipeline computes them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffuserve.engine.manifest import ENCODER_HIDDEN_STATES, TEXT_EMBEDS, TEXT_ENCODERS, TIME_IDS

from .sd import encoded_texts, guided_texts


def time_ids(params) -> np.ndarray:
    """original size (h, w), crop top-left (y, x), target size (h, w): the micro-conditioning SDXL was trained with;
    the negative side takes the same, diffusers' default."""
    (orig_w, orig_h), (top, left), (target_w, target_h) = (
        params.original_size,
        params.crop_top_left,
        params.target_size,
    )
    return np.array([orig_h, orig_w, top, left, target_h, target_w], np.float32)


def condition(model, params_list: Sequence) -> list[dict[str, np.ndarray]]:
    per_encoder = [encoded_texts(model, component, params_list) for component in TEXT_ENCODERS]
    result = []
    for p in params_list:
        hidden, pooled = [], []
        for index, text in enumerate(guided_texts(p)):
            first, second = (next(encoded) for encoded in per_encoder)
            joined = np.concatenate([first.hidden, second.hidden], axis=-1)
            embeds = second.pooled
            # force_zeros_for_empty_prompt: an empty negative prompt is zeros, not the encoded empty text.
            negative = p.guided and index == 0
            if negative and not text and model.manifest.force_zeros_for_empty_prompt:
                joined, embeds = np.zeros_like(joined), np.zeros_like(embeds)
            hidden.append(joined)
            pooled.append(embeds)
        rows = len(hidden)
        result.append(
            {
                ENCODER_HIDDEN_STATES: np.stack(hidden),
                TEXT_EMBEDS: np.stack(pooled),
                TIME_IDS: np.repeat(time_ids(p)[None], rows, 0),
            }
        )
    return result
