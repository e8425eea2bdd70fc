"""Our samplers stepped side by side with their diffusers twins on the same model outputs and noise."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any
from unittest import mock

import diffusers
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from torch.overrides import TorchFunctionMode

from diffuserve.export.reference import DIFFUSERS_SCHEDULERS, diffusers_scheduler
from diffuserve.server.schedulers import (
    INITIAL_STATE,
    SchedulerConfig,
    get_sampler,
    img2img_start,
    make_plan,
    noised_latents,
)

# Our sampler names, the diffusers scheduler each reproduces, and the settings that make it that sampler.
REFERENCE = DIFFUSERS_SCHEDULERS

# The bar for "the same numerics" (max |ours - theirs| / max |theirs|). Both compute in float32 in the same order and
# differ by the odd last bit where a reciprocal multiplies where diffusers divides. (The last bit of exp, log and sqrt
# is taken out of the comparison by correctly_rounded_torch below.)
RTOL = 1e-5
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")

# scheduler/scheduler_config.json of runwayml/stable-diffusion-v1-5, as published.
SD15_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# SD 2.1's scheduler_config.json with zero terminal SNR (Lin et al. 2024), as models fine-tuned that way ship it: the
# betas rescaled so the last training timestep is pure noise, and trailing spacing so sampling starts there.
ZERO_SNR_CONFIG: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
}


def twin_takes(name: str, key: str) -> bool:
    """Whether diffusers' twin of sampler name has the config key: its from_config silently drops keys it has not."""
    class_name, _ = REFERENCE[name]
    return key in inspect.signature(getattr(diffusers, class_name).__init__).parameters


# torch's float32 transcendental functions whose last bit depends on the CPU: MKL's vector math (which torch uses for
# these, even on 0-dim tensors) takes another code path per instruction set and vendor, and ATen's own kernels per
# ATEN_CPU_CAPABILITY. Where a step cancels (a Heun second stage at a small sigma, UniPC at 99 steps), one bit of one
# sigma or lambda moves diffusers' result by 1e-5 relative, more than RTOL, on some CPUs and not on others.
_TRANSCENDENTAL = frozenset(
    {torch.exp, torch.log, torch.sqrt, torch.expm1, torch.log1p, torch.rsqrt}
    | {torch.Tensor.exp, torch.Tensor.log, torch.Tensor.sqrt, torch.Tensor.expm1, torch.Tensor.log1p}
    | {torch.Tensor.rsqrt}
)
_POWERS = frozenset({torch.pow, torch.Tensor.pow, torch.Tensor.__pow__})


def _is_float32(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.float32


class CorrectlyRoundedTorch(TorchFunctionMode):
    """torch with float32 exp, log, sqrt and fractional powers computed in float64 and rounded once to float32.

    That is the correctly rounded result (up to a float64 last bit, which changes the float32 one for about one input
    in 2**28) on every CPU, as our samplers compute them, so a comparison against diffusers' schedulers run under it
    stops depending on the CPU's kernels. The rest of diffusers' arithmetic runs as it is: integer powers stay
    repeated products, as torch computes them.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        if func in _TRANSCENDENTAL and not kwargs and len(args) == 1 and _is_float32(args[0]):
            return func(args[0].double()).float()
        if func in _POWERS and not kwargs and len(args) == 2 and _is_float32(args[0]):
            exponent = args[1]
            if isinstance(exponent, float) and not exponent.is_integer():
                return func(args[0].double(), exponent).float()
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module", autouse=True)
def correctly_rounded_torch() -> Iterator[None]:
    """Every diffusers reference in a test module that imports this fixture runs under CorrectlyRoundedTorch."""
    with CorrectlyRoundedTorch():
        yield


def reference_scheduler(name: str, d: Mapping[str, Any]):
    """diffusers' twin of sampler name, configured from the scheduler_config.json dict d."""
    return diffusers_scheduler(name, d)


def config_dict(**overrides: Any) -> dict[str, Any]:
    """A scheduler_config.json dict; a None override leaves the key out, so the sampler default applies."""
    d: dict[str, Any] = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012}
    d.update(overrides)
    return {key: value for key, value in d.items() if value is not None}


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max())


class NoiseFeed:
    """Stands in for diffusers' randn_tensor inside a scheduler module: hands out the noise we drew, and counts."""

    def __init__(self) -> None:
        self.pending: np.ndarray | None = None
        self.draws: list[int] = []
        self.index = -1

    def __call__(self, shape: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.draws.append(self.index)
        assert self.pending is not None, f"diffusers drew noise at call {self.index}, where our plan draws none"
        assert tuple(shape) == self.pending.shape
        noise, self.pending = self.pending, None
        return torch.from_numpy(noise.copy())


@contextmanager
def feeding_noise(reference: Any) -> Iterator[NoiseFeed]:
    feed = NoiseFeed()
    module = sys.modules[type(reference).__module__]
    if hasattr(module, "randn_tensor"):
        with mock.patch.object(module, "randn_tensor", feed):
            yield feed
    else:
        yield feed


def step_both(
    name: str, d: Mapping[str, Any], steps: int, shape: tuple[int, ...], seed: int, strength: float = 1.0
) -> None:
    """Denoise with random model outputs (and noise) through ours and diffusers' scheduler, checking every call.

    strength < 1 starts both where diffusers' img2img pipeline does, from the same latents noised the same way.
    """
    config = SchedulerConfig.from_dict(d)
    sampler = get_sampler(name)
    try:
        plan = make_plan(name, config, steps)
    except ValueError as error:
        # Configurations where diffusers fails or goes wrong are refused; each family's tests pin its refusals.
        assert "allowed:" in str(error), error
        pytest.skip(f"{name} refuses this configuration: {error}")
    reference = reference_scheduler(name, d)
    reference.set_timesteps(steps)
    # Equal on the CPUs tried, but not required bitwise: fractional timesteps interpolate in numpy's float32 log
    # sigma, whose last bit is numpy's to choose per CPU. (atol: Karras timesteps near 0 are far below one training
    # step, where that last bit is a large relative error.)
    np.testing.assert_allclose(plan.timesteps, reference.timesteps.numpy().astype(np.float32), rtol=1e-6, atol=1e-4)
    assert plan.calls == len(reference.timesteps)
    assert plan.order == reference.order
    rng = np.random.default_rng(seed)

    if strength == 1.0:
        start, timesteps = 0, reference.timesteps
        assert plan.init_noise_sigma == pytest.approx(float(reference.init_noise_sigma), rel=1e-6)
        noise = rng.standard_normal(shape, dtype=np.float32)
        ours = noise * np.float32(plan.init_noise_sigma)
        theirs = torch.from_numpy(noise) * reference.init_noise_sigma
    else:
        pipe = SimpleNamespace(scheduler=reference)
        timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(pipe, steps, strength, "cpu")
        start = img2img_start(plan, strength)
        assert start == plan.calls - len(timesteps)
        original, noise = rng.standard_normal((2, *shape), dtype=np.float32)
        ours = noised_latents(plan, start, original, noise)
        latent_timestep = timesteps[:1].repeat(shape[0])
        theirs = reference.add_noise(torch.from_numpy(original), torch.from_numpy(noise), latent_timestep)
    assert ours.dtype == np.float32
    assert relative_error(ours, theirs.numpy()) <= RTOL, "initial latents"

    state = INITIAL_STATE
    with feeding_noise(reference) as feed:
        for index, t in enumerate(timesteps, start):
            scaled = reference.scale_model_input(theirs, t).numpy()
            assert relative_error(ours * plan.input_scales[index], scaled) <= RTOL, f"input scale, call {index}"
            model_output = rng.standard_normal(shape, dtype=np.float32)
            noise = rng.standard_normal(shape, dtype=np.float32) if plan.noise_calls[index] else None
            feed.index, feed.pending = index, noise
            ours, state = sampler.step(plan, index, ours, model_output, state, noise)
            theirs = reference.step(torch.from_numpy(model_output), t, theirs).prev_sample
            assert ours.dtype == np.float32
            error = relative_error(ours, theirs.numpy())
            assert error <= RTOL, f"call {index} (t={t}) of {plan.calls}: relative error {error:.2e}"
    assert feed.draws == [i for i in range(start, plan.calls) if plan.noise_calls[i]], "noise draws differ"
