import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import CLIPTokenizer

from diffuserve.export.tiny_tokenizer import (
    TINY_VOCAB_SIZE,
    build_vocab_and_merges,
    save_tiny_clip_tokenizer,
    write_vocab_and_merges,
)
from diffuserve.server.tokenizer import ClipTokenizer

TRICKY_PROMPTS = [
    "a photo of a red circle on a white background",
    "Hello, World!!! What's up? (it's) [fine]; ok... \"quoted\" #hash @at 50% a-b_c/d",
    "café crème brûlée naïve résumé Ångström",
    "e\u0301 (combining accent) vs \u00e9",
    "東京タワー 北京 서울",
    "🐱 emoji 👍🏽 family 👨\u200d👩\u200d👧 flag 🇯🇵",
    "   leading and trailing spaces   ",
    "multiple     spaces\n\nnewlines\tand\ttabs\r\n",
    "",
    " ",
    "\n\t",
    "1234567890 3.14 1,000,000 2nd",
    "UPPERCASE MiXeD cAsE",
    "don't it's we're I've I'm you'll he'd DON'T",
    "<|startoftext|> literal special tokens <|endoftext|> <|ENDOFTEXT|> <|StartOfText|>",
    "a!b!c ! !! ??? wow!",
    "zero\u200bwidth non\u00a0breaking",
]


def _sd15_style_config(folder: Path) -> None:
    """Serialise special tokens as real SD 1.x folders do: AddedToken dicts, and a special_tokens_map.json."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    special_map = {"pad_token": config["pad_token"]}
    for key in ("bos_token", "eos_token", "unk_token"):
        special_map[key] = {
            "__type": "AddedToken",
            "content": config[key],
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        }
        # bos stays a plain string in the config, so only the special map (which wins) makes it normalized.
        if key != "bos_token":
            config[key] = special_map[key]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    made = {name: root / name for name in ("json", "legacy", "json_sd2", "legacy_sd2", "legacy_dict_tokens")}
    save_tiny_clip_tokenizer(made["json"])
    write_vocab_and_merges(made["legacy"])
    save_tiny_clip_tokenizer(made["json_sd2"], model_max_length=32, pad_token="!")
    write_vocab_and_merges(made["legacy_sd2"], model_max_length=32, pad_token="!")
    write_vocab_and_merges(made["legacy_dict_tokens"])
    _sd15_style_config(made["legacy_dict_tokens"])
    return made


@pytest.fixture(params=["json", "legacy", "json_sd2", "legacy_sd2", "legacy_dict_tokens"])
def folder(request: pytest.FixtureRequest, folders: dict[str, Path]) -> Path:
    return folders[request.param]


def reference_ids(folder: Path, texts: list[str], max_length: int | None = None) -> np.ndarray:
    """What diffusers' StableDiffusionPipeline feeds the text encoder."""
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    return tokenizer(
        texts,
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="np",
    ).input_ids


def test_ids_match_transformers_on_tricky_prompts(folder: Path) -> None:
    ids = ClipTokenizer.from_folder(folder).encode(TRICKY_PROMPTS)
    np.testing.assert_array_equal(ids, reference_ids(folder, TRICKY_PROMPTS))


def test_each_prompt_encodes_alone_as_in_a_batch(folder: Path) -> None:
    tokenizer = ClipTokenizer.from_folder(folder)
    batch = tokenizer.encode(TRICKY_PROMPTS)
    for row, prompt in zip(batch, TRICKY_PROMPTS, strict=True):
        np.testing.assert_array_equal(tokenizer.encode([prompt])[0], row)


def test_prompts_around_the_length_limit_match_transformers_and_end_with_eos(folder: Path) -> None:
    tokenizer = ClipTokenizer.from_folder(folder)
    room = tokenizer.max_length - 2
    # "a" is one token, so these are exactly room-1 .. room+2 text tokens, plus a far-too-long one.
    texts = ["a " * n for n in (room - 1, room, room + 1, room + 2, 5 * room)]
    ids = tokenizer.encode(texts)
    np.testing.assert_array_equal(ids, reference_ids(folder, texts))
    assert ids[0, -1] == tokenizer.pad_token_id
    assert (ids[1:, -1] == tokenizer.eos_token_id).all()
    assert (ids[:, 0] == tokenizer.bos_token_id).all()


def test_words_longer_than_the_limit_are_truncated_mid_word_like_transformers(folder: Path) -> None:
    texts = ["antidisestablishmentarianism" * 20, "東京" * 80]
    ids = ClipTokenizer.from_folder(folder).encode(texts)
    np.testing.assert_array_equal(ids, reference_ids(folder, texts))


def test_output_is_int64_with_one_row_per_prompt(folder: Path) -> None:
    tokenizer = ClipTokenizer.from_folder(folder)
    ids = tokenizer.encode(("one", "two", "three"))
    assert ids.dtype == np.int64
    assert ids.shape == (3, tokenizer.max_length)
    assert tokenizer.encode([]).shape == (0, tokenizer.max_length)


def test_pad_token_and_max_length_come_from_tokenizer_config(folders: dict[str, Path]) -> None:
    sd1 = ClipTokenizer.from_folder(folders["legacy"])
    assert sd1.max_length == 77
    assert sd1.pad_token_id == sd1.eos_token_id
    for name in ("json_sd2", "legacy_sd2"):
        sd2 = ClipTokenizer.from_folder(folders[name])
        assert sd2.max_length == 32
        assert sd2.pad_token_id == build_vocab_and_merges()[0]["!"] != sd2.eos_token_id
        assert (sd2.encode([""])[0, 2:] == sd2.pad_token_id).all()


def test_exclamation_mark_is_the_pad_id_in_sd2_folders_as_in_transformers(folders: dict[str, Path]) -> None:
    # The SD 2 quirk: "!" is a registered special token, so a prompt's "!" becomes the pad id, not "!</w>".
    texts = ["wow!", "a ! b"]
    sd2 = ClipTokenizer.from_folder(folders["legacy_sd2"]).encode(texts)
    sd1 = ClipTokenizer.from_folder(folders["legacy"]).encode(texts)
    assert not np.array_equal(sd1[:, :5], sd2[:, :5])
    np.testing.assert_array_equal(sd2, reference_ids(folders["legacy_sd2"], texts))


def test_unset_model_max_length_falls_back_to_77(tmp_path: Path) -> None:
    write_vocab_and_merges(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["model_max_length"] = int(1e30)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = ClipTokenizer.from_folder(tmp_path)
    assert tokenizer.max_length == 77
    np.testing.assert_array_equal(tokenizer.encode(TRICKY_PROMPTS), reference_ids(tmp_path, TRICKY_PROMPTS, 77))


def test_missing_tokenizer_config_uses_clip_defaults(tmp_path: Path) -> None:
    write_vocab_and_merges(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    tokenizer = ClipTokenizer.from_folder(tmp_path)
    assert tokenizer.max_length == 77
    np.testing.assert_array_equal(tokenizer.encode(TRICKY_PROMPTS), reference_ids(tmp_path, TRICKY_PROMPTS, 77))


def test_truncation_and_padding_saved_in_tokenizer_json_are_ignored(tmp_path: Path, folders: dict[str, Path]) -> None:
    save_tiny_clip_tokenizer(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    data["truncation"] = {"direction": "Left", "max_length": 5, "strategy": "LongestFirst", "stride": 0}
    data["padding"] = {
        "strategy": {"Fixed": 9},
        "direction": "Left",
        "pad_to_multiple_of": None,
        "pad_id": 3,
        "pad_type_id": 0,
        "pad_token": "$",
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    ids = ClipTokenizer.from_folder(tmp_path).encode(TRICKY_PROMPTS)
    np.testing.assert_array_equal(ids, ClipTokenizer.from_folder(folders["json"]).encode(TRICKY_PROMPTS))


@pytest.mark.parametrize("present", [(), ("vocab.json",), ("merges.txt", "tokenizer_config.json")])
def test_folder_without_tokenizer_files_names_folder_and_files(tmp_path: Path, present: tuple[str, ...]) -> None:
    for name in present:
        (tmp_path / name).write_text("{}")
    with pytest.raises(FileNotFoundError) as error:
        ClipTokenizer.from_folder(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message
    assert all(name in message for name in ("tokenizer.json", "vocab.json", "merges.txt"))


def test_encode_rejects_a_bare_string(folders: dict[str, Path]) -> None:
    with pytest.raises(TypeError):
        ClipTokenizer.from_folder(folders["json"]).encode("a cat")


def test_tiny_vocabulary_is_deterministic_and_fits_the_text_encoder(tmp_path: Path) -> None:
    write_vocab_and_merges(tmp_path / "first")
    write_vocab_and_merges(tmp_path / "second")
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes()
    vocab, merges = build_vocab_and_merges()
    assert len(vocab) < TINY_VOCAB_SIZE
    assert len(merges) >= 200
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert {"photo</w>", "background</w>", "red</w>"} <= vocab.keys()


def test_server_tokenizer_imports_without_torch_transformers_or_diffusers() -> None:
    code = (
        "import sys, diffuserve.server.tokenizer; "
        "sys.exit(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules) or 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
