"""Long and weighted prompts served end to end, against diffusers' prompt_embeds path fed embeddings computed here
independently with torch (the text encoder per 77-token chunk, AUTOMATIC1111's weighting); the text-encoder cache."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from diffuserve.export.reference import diffusers_scheduler
from diffuserve.server.models import ServedModel
from diffuserve.server.params import GenerateParams, validate
from diffuserve.server.pipeline import render, to_uint8
from diffuserve.server.prompts import NEGLIGIBLE_MEAN, apply_weights
from diffuserve.v1 import diffusion_pb2 as pb

from .serving_helpers import serving

TOLERANCE = 1e-4
WORDS = "red blue green circle square star tree house sky sun moon cloud".split()


def long_prompt(tokens: int) -> str:
    """A prompt of exactly this many tokens: every word of the tiny vocabulary is one token."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(tokens))


def served_params(model: ServedModel, prompt: str, negative: str = "blurry", **fields) -> GenerateParams:
    fields = {
        "steps": 6,
        "guidance_scale": 7.5,
        "scheduler": pb.SCHEDULER_EULER,
        "noise_mode": pb.NOISE_MODE_TORCH_CPU,
        "seeds": [9],
        **fields,
    }
    request = pb.GenerateRequest(prompt=prompt, negative_prompt=negative, **fields)
    return validate(request, {model.name: model}, model.name)


class TorchText:
    """The source model's tokenizer and text encoder in torch: chunks of 75 tokens + BOS/EOS, padded as CLIP pads."""

    def __init__(self, source: Path):
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(source / "tokenizer")
        self.encoder = CLIPTextModel.from_pretrained(source / "text_encoder").eval()

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def chunk(self, ids: list[int]) -> list[int]:
        t = self.tokenizer
        row = [t.bos_token_id, *ids, t.eos_token_id]
        return row + [t.pad_token_id] * (t.model_max_length - len(row))

    @torch.no_grad()
    def encode(self, rows: list[list[int]], weights: list[list[float]] | None = None) -> torch.Tensor:
        """[1, 77 * chunks, width]: each chunk through the encoder; weighted, each chunk's mean restored."""
        out = []
        for i, row in enumerate(rows):
            z = self.encoder(torch.tensor([row]))[0]
            if weights is not None:
                z = weighted(z, torch.tensor(weights[i]))
            out.append(z)
        return torch.cat(out, dim=1)


def weighted(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """AUTOMATIC1111's emphasis: each token's vector times its weight, then the chunk's mean restored, where it has
    one: a random encoder's final norm has no bias, its mean is rounding noise and is left alone."""
    mean, magnitude = z.double().mean(), z.double().abs().mean()
    z = z * weights.reshape(1, -1, 1)
    if abs(mean) > NEGLIGIBLE_MEAN * magnitude and abs(z.double().mean()) > NEGLIGIBLE_MEAN * magnitude:
        z = z * (mean / z.double().mean()).float()
    return z


def diffusers_with_embeds(source: Path, p: GenerateParams, embeds: torch.Tensor, negative: torch.Tensor) -> np.ndarray:
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        source, use_safetensors=True, dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = diffusers_scheduler(p.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            height=p.height,
            width=p.width,
            num_inference_steps=p.steps,
            guidance_scale=p.guidance_scale,
            generator=[torch.Generator().manual_seed(s) for s in p.seeds],
            output_type="np",
        ).images


def test_a_long_prompt_is_encoded_in_chunks_as_diffusers_fed_their_embeddings(tiny_source: Path, tiny_model):
    text = TorchText(tiny_source)
    prompt = long_prompt(100)
    p = served_params(tiny_model, prompt)
    ids = text.ids(prompt)
    assert (p.text_chunks, p.text_length, p.prompt_tokens) == (2, 154, 100)
    assert p.negative_prompt_tokens == len(text.ids("blurry"))
    embeds = text.encode([text.chunk(ids[:75]), text.chunk(ids[75:])])
    # The negative prompt is padded to the prompt's chunks with the empty prompt's chunk, as AUTOMATIC1111 pads it.
    negative = text.encode([text.chunk(text.ids("blurry")), text.chunk([])])
    reference = diffusers_with_embeds(tiny_source, p, embeds, negative)
    assert np.abs(render(tiny_model, p) - reference).max() <= TOLERANCE
    # Not the truncated prompt's image: the tokens past 75 count.
    cut = diffusers_with_embeds(
        tiny_source, p, text.encode([text.chunk(ids[:75])]), text.encode([text.chunk(text.ids("blurry"))])
    )
    assert np.abs(reference - cut).max() > 1e-3


def test_break_starts_a_new_chunk(tiny_source: Path, tiny_model):
    text = TorchText(tiny_source)
    p = served_params(tiny_model, "red circle BREAK blue sky")
    assert p.text_chunks == 2 and p.prompt_tokens == 4
    embeds = text.encode([text.chunk(text.ids("red circle")), text.chunk(text.ids("blue sky"))])
    negative = text.encode([text.chunk(text.ids("blurry")), text.chunk([])])
    assert np.abs(render(tiny_model, p) - diffusers_with_embeds(tiny_source, p, embeds, negative)).max() <= TOLERANCE


def test_weighted_prompt_scales_token_embeddings_as_automatic1111(tiny_source: Path, tiny_model):
    text = TorchText(tiny_source)
    p = served_params(tiny_model, "a (red:1.5) circle on [blue] sky", negative="(blurry)")
    a, red, circle, on, blue, sky = (text.ids(w) for w in ("a", "red", "circle", "on", "blue", "sky"))
    ids = [*a, *red, *circle, *on, *blue, *sky]
    weights = [1.0] * (len(a)) + [1.5] * len(red) + [1.0] * (len(circle) + len(on)) + [1 / 1.1] * len(blue)
    weights += [1.0] * len(sky)
    row_weights = [1.0, *weights] + [1.0] * (77 - 1 - len(weights))
    embeds = text.encode([text.chunk(ids)], [row_weights])
    blurry = text.ids("blurry")
    negative = text.encode([text.chunk(blurry)], [[1.0] + [1.1] * len(blurry) + [1.0] * (76 - len(blurry))])
    ours = render(tiny_model, p)
    assert np.abs(ours - diffusers_with_embeds(tiny_source, p, embeds, negative)).max() <= TOLERANCE
    plain = render(tiny_model, served_params(tiny_model, "a red circle on blue sky", negative="blurry"))
    assert np.abs(ours - plain).max() > 1e-3


def test_a_prompt_past_the_longest_text_length_is_refused_naming_the_field(stub):
    with pytest.raises(grpc.RpcError) as refused:
        stub.Generate(pb.GenerateRequest(prompt=long_prompt(151), steps=2))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt: needs 3 chunks of 75 tokens" in refused.value.details()
    with pytest.raises(grpc.RpcError) as refused:
        stub.Generate(pb.GenerateRequest(prompt="a circle", negative_prompt=long_prompt(160), steps=2))
    assert "negative_prompt: needs 3 chunks" in refused.value.details()


def test_long_prompt_served_reports_its_tokens_and_listing_its_limit(tiny_model):
    with serving(tiny_model) as (_, stub, _):
        response = stub.Generate(pb.GenerateRequest(prompt=long_prompt(80), steps=2, seeds=[1]))
        (info,) = stub.ListModels(pb.ListModelsRequest()).models
    assert (response.prompt_tokens, response.text_chunks) == (80, 2)
    assert list(info.text_lengths) == [77, 154] and info.max_prompt_tokens == 150
    assert Image.open(io.BytesIO(response.images[0].data)).size == (128, 128)


def test_a_repeated_prompt_skips_the_text_encoder_and_gives_the_same_image(tiny_model):
    request = pb.GenerateRequest(
        prompt="a green star",
        negative_prompt="dark sky",
        steps=3,
        seeds=[4],
        guidance_scale=7.5,
        scheduler=pb.SCHEDULER_EULER,
        noise_mode=pb.NOISE_MODE_TORCH_CPU,
    )
    with serving(tiny_model) as (_, stub, _):
        before = stub.GetServerInfo(pb.GetServerInfoRequest()).text_cache
        first = stub.Generate(request)
        after_first = stub.GetServerInfo(pb.GetServerInfoRequest()).text_cache
        request.seeds[:] = [5]
        second = stub.Generate(request)
        request.seeds[:] = [4]
        third = stub.Generate(request)
        after = stub.GetServerInfo(pb.GetServerInfoRequest()).text_cache
    # Two chunks (prompt, negative) per request: encoded once, then found twice.
    assert after_first.misses - before.misses == 2 and after_first.hits == before.hits
    assert after.hits - after_first.hits == 4 and after.misses == after_first.misses
    assert after.entries >= 2 and 0 < after.bytes <= after.max_bytes and 0 < after.hit_rate <= 1
    assert first.images[0].data == third.images[0].data != second.images[0].data
    decoded = np.asarray(Image.open(io.BytesIO(first.images[0].data)).convert("RGB"))
    p = served_params(tiny_model, "a green star", negative="dark sky", steps=3, seeds=[4])
    np.testing.assert_array_equal(decoded, to_uint8(render(tiny_model, p))[0])


def test_weighting_restores_each_chunks_mean_on_an_encoder_with_one(tiny_source: Path):
    """The tiny encoder's mean is noise; with a final-norm bias, as trained encoders have, the mean is restored."""
    text = TorchText(tiny_source)
    with torch.no_grad():
        text.encoder.final_layer_norm.bias.normal_(0.3, 0.2, generator=torch.Generator().manual_seed(0))
    rows = [text.chunk(text.ids("red circle blue sky")), text.chunk(text.ids("green star"))]
    weights = np.ones((2, 77), np.float32)
    weights[0, 1:3], weights[1, 2] = 1.4, 0.7
    hidden = text.encode(rows).reshape(2, 77, -1).numpy()
    ours = apply_weights(hidden, weights)
    reference = text.encode(rows, weights.tolist()).reshape(2, 77, -1).numpy()
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.mean(axis=(1, 2)), hidden.mean(axis=(1, 2)), rtol=1e-4)
    assert np.abs(ours - hidden).max() > 0.1
