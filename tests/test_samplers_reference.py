"""The reference the sampler tests compare against: diffusers with correctly rounded float32 exp, log and sqrt."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import pytest
import torch

from diffuserve.server.schedulers import SAMPLERS

from .sampler_reference import SD15_CONFIG, ZERO_SNR_CONFIG, CorrectlyRoundedTorch, config_dict, reference_scheduler

# diffusers' Euler-family schedulers hand a torch tensor to np.array(copy=False), which numpy 2 deprecates.
pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore:__array__ implementation doesn't accept a copy keyword"
)


def float_tables(name: str, d: dict[str, Any], mode: AbstractContextManager[Any]) -> dict[str, np.ndarray]:
    """The floating-point tensors diffusers' twin of name holds after set_timesteps(20), built under mode."""
    with mode:
        reference = reference_scheduler(name, d)
        reference.set_timesteps(20)
    return {k: v.numpy() for k, v in vars(reference).items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def rounded_once(function: Any, x: np.ndarray) -> np.ndarray:
    return function(x.astype(np.float64)).astype(np.float32)


def test_exp_log_sqrt_and_fractional_powers_are_rounded_once_from_float64() -> None:
    x = np.random.default_rng(0).uniform(1e-4, 20.0, 100_000).astype(np.float32)
    t = torch.from_numpy(x)
    with CorrectlyRoundedTorch():
        got = {
            "exp": (torch.exp(-t), rounded_once(np.exp, -x)),
            "log": (t.log(), rounded_once(np.log, x)),
            "sqrt": (torch.sqrt(t), np.sqrt(x)),
            "pow": (t**0.5, np.sqrt(x)),
            "expm1": (torch.expm1(-t / 10), rounded_once(np.expm1, -x / np.float32(10))),
            "0-dim log": (torch.log(t[7]), rounded_once(np.log, x[7])),
            # Integer powers stay torch's repeated products, as ours are.
            "cube": (t**3, x * x * x),
        }
    for name, (ours, expected) in got.items():
        assert ours.dtype == torch.float32, name
        np.testing.assert_array_equal(ours.numpy(), expected, err_msg=name)


@pytest.mark.parametrize(
    "d",
    [SD15_CONFIG, config_dict(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True, lambda_min_clipped=-5.1)],
)
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_it_moves_diffusers_tables_by_float32_rounding_only(name: str, d: dict[str, Any]) -> None:
    # So it cannot hide a real difference: with this CPU's own kernels diffusers' noise levels, lambdas and scales
    # are the same to within their rounding. (MKL's float32 sqrt and log are off by up to ~1.5 units in the last
    # place, 9e-8 relative, on some instruction sets; atol: lambda = log(alpha) - log(sigma) cancels near 0, where
    # both logs are about -0.35 and a few of their last bits are 1e-7.)
    plain, rounded = (float_tables(name, d, mode) for mode in (nullcontext(), CorrectlyRoundedTorch()))
    assert plain.keys() == rounded.keys() and "alphas_cumprod" in plain
    for key, value in plain.items():
        np.testing.assert_allclose(rounded[key], value, rtol=5e-7, atol=2e-7, err_msg=key)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_zero_snr_tables_move_by_the_spread_of_torchs_sqrt_only(name: str, beta_schedule: str) -> None:
    # Zero terminal SNR shifts sqrt(a) down by sqrt(a_T), which cancels near the last timestep and magnifies the last
    # bit of torch's sqrt there: this CPU's kernels move diffusers' a by up to ~2e-6 relative, its betas (1 - alpha
    # near 1) and lambdas (near 0) by ~1.5e-6 absolute. Still far inside the samplers' 1e-5 bar.
    d = {**ZERO_SNR_CONFIG, "beta_schedule": beta_schedule}
    plain, rounded = (float_tables(name, d, mode) for mode in (nullcontext(), CorrectlyRoundedTorch()))
    assert plain.keys() == rounded.keys() and "alphas_cumprod" in plain
    for key, value in plain.items():
        np.testing.assert_allclose(rounded[key], value, rtol=1e-5, atol=5e-6, err_msg=key)
