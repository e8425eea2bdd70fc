"""CLIP prompt tokenization that gives the ids transformers' CLIPTokenizer gives, with only the tokenizers library."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 77
# transformers stores int(1e30) for "unset"; no text encoder has a context anywhere near this.
_MAX_SANE_LENGTH = 1 << 16
_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# transformers registers named tokens in this order, so when several share a text the last one's flags win.
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_DEFAULT_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
_TokenSpec = str | dict[str, Any]


def _content(token: _TokenSpec) -> str:
    return token if isinstance(token, str) else token["content"]


def _added_token(token: _TokenSpec, named: bool) -> AddedToken:
    if isinstance(token, str):
        return AddedToken(token, special=True, normalized=False)
    special = named or bool(token.get("special", False))
    # A dict without "normalized" means transformers' default, which it derives from the *serialised* special flag.
    normalized = token.get("normalized", not token.get("special", False))
    flags = {key: bool(token.get(key, False)) for key in ("single_word", "lstrip", "rstrip")}
    return AddedToken(token["content"], special=special, normalized=normalized, **flags)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _max_length(config: dict[str, Any]) -> int:
    value = config.get("model_max_length", DEFAULT_MAX_LENGTH)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 2 <= value <= _MAX_SANE_LENGTH:
        logger.info("model_max_length %r is unset or unusable; using %d", value, DEFAULT_MAX_LENGTH)
        return DEFAULT_MAX_LENGTH
    return int(value)


def build_clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], unk_token: str) -> Tokenizer:
    """The pipeline transformers' CLIPTokenizer builds around a CLIP BPE vocabulary, without special tokens."""
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=unk_token,
        )
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return tokenizer


class ClipTokenizer:
    """Turns prompts into fixed-length CLIP input ids: bos, the (truncated) text, eos, then padding."""

    def __init__(
        self, tokenizer: Tokenizer, *, bos_token: str, eos_token: str, pad_token: str, max_length: int
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must leave room for bos and eos, got {max_length}")
        self._tokenizer = tokenizer
        # Padding, truncation and bos/eos are done in encode(), so whatever a tokenizer.json carried must not apply.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self._tokenizer.post_processor = None
        self.max_length = max_length
        self.bos_token_id, self.eos_token_id, self.pad_token_id = (
            self._token_id(bos_token),
            self._token_id(eos_token),
            self._token_id(pad_token),
        )

    def _token_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} is not in the vocabulary")
        return token_id

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> ClipTokenizer:
        """Load a diffusers pipeline's tokenizer folder: tokenizer.json, or the older vocab.json + merges.txt."""
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        if (folder / "tokenizer.json").is_file():
            data = _read_json(folder / "tokenizer.json")
            model = data.get("model", {})
            if model.get("type") != "BPE":
                raise ValueError(f"{folder / 'tokenizer.json'} holds a {model.get('type')} model, not CLIP's BPE")
            vocab = model["vocab"]
            merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            file_tokens = data.get("added_tokens", [])
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab, merges = BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
            file_tokens = []
        else:
            raise FileNotFoundError(
                f"no CLIP tokenizer in {folder}: looked for tokenizer.json, or vocab.json and merges.txt"
            )

        # Mirror transformers' precedence: a config's added_tokens_decoder beats everything; otherwise the
        # tokenizer.json's added tokens and special_tokens_map.json's entries do.
        if "added_tokens_decoder" in config:
            base_tokens = [config["added_tokens_decoder"][i] for i in sorted(config["added_tokens_decoder"], key=int)]
        else:
            base_tokens = sorted(file_tokens, key=lambda t: t["id"])
            special_map = _read_json(folder / "special_tokens_map.json")
            config = {**config, **{key: special_map[key] for key in _NAMED_TOKENS if special_map.get(key)}}
        named = {key: config.get(key) or _DEFAULT_TOKENS.get(key) for key in _NAMED_TOKENS}
        by_content = {_content(token): token for token in base_tokens}
        added = [_added_token(token, named=False) for token in base_tokens]
        added += [_added_token(by_content.get(_content(t), t), named=True) for t in named.values() if t is not None]

        tokenizer = build_clip_tokenizer(vocab, merges, unk_token=_content(named["unk_token"]))
        tokenizer.add_tokens(added)
        max_length = _max_length(config)
        logger.debug("loaded CLIP tokenizer from %s (max_length %d)", folder, max_length)
        return cls(
            tokenizer,
            bos_token=_content(named["bos_token"]),
            eos_token=_content(named["eos_token"]),
            pad_token=_content(named["pad_token"]),
            max_length=max_length,
        )

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """int64 ids of shape [len(texts), max_length], as CLIPTokenizer(padding="max_length", truncation=True)."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of prompts, not a single string")
        ids = np.full((len(texts), self.max_length), self.pad_token_id, dtype=np.int64)
        room = self.max_length - 2
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        for row, encoding in zip(ids, encodings, strict=True):
            tokens = encoding.ids[:room]
            row[0] = self.bos_token_id
            row[1 : len(tokens) + 1] = tokens
            row[len(tokens) + 1] = self.eos_token_id
        return ids

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """The BPE ids of each text, without bos/eos, truncation or padding (what encode() wraps and cuts)."""
        if isinstance(texts, str):
            raise TypeError("token_ids takes a sequence of texts, not a single string")
        return [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]
