"""Euler: diffusers' EulerDiscreteScheduler with linear sigma interpolation, final sigma 0 and s_churn 0.

Euler works in the variance-exploding parametrisation, x = x0 + sigma * eps (Karras et al. 2022, "Elucidating the
Design Space of Diffusion-Based Generative Models"); its U-Net input is x / sqrt(sigma^2 + 1), the VP sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import Array, Plan, State, check_step, frozen, no_noise
from .config import SchedulerConfig
from .ops import axpy, denoised, euler_step, to_d
from .schedule import (
    DDPM_BETAS,
    BetaDefaults,
    check_steps,
    karras_sigmas,
    sigma_to_t,
    spaced_timesteps,
    trailing_grid,
    train_sigmas,
)


@dataclass(frozen=True, eq=False, kw_only=True)
class SigmaPlan(Plan):
    # float32 [calls + 1]: the noise level sigma of the sample entering each call, then of the result.
    sigmas: Array


def use_karras_sigmas(config: SchedulerConfig) -> bool:
    """The config's use_karras_sigmas, checked to be a boolean."""
    return config.flag("use_karras_sigmas", False)


def karras_bounds(config: SchedulerConfig, sigmas: np.ndarray) -> tuple[float, float]:
    """The (sigma_min, sigma_max) of a Karras schedule: the config's own keys where the file has them (diffusers reads
    them whichever class the file was written for), else the ends of the spaced sigmas."""
    sigma_min, sigma_max = config.positive("sigma_min"), config.positive("sigma_max")
    return (
        sigmas[-1].item() if sigma_min is None else sigma_min,
        sigmas[0].item() if sigma_max is None else sigma_max,
    )


def discrete_sigmas(
    config: SchedulerConfig,
    steps: int,
    default_spacing: str,
    karras: bool | None = None,
    betas: BetaDefaults = DDPM_BETAS,
) -> tuple[np.ndarray, np.ndarray]:
    """The float32 timesteps [steps] and sigmas [steps + 1, ending in 0] of the k-diffusion style samplers.

    karras: Karras et al.'s sigma spacing or not; None reads use_karras_sigmas, for the classes that have that key.
    betas: the class's own beta defaults, for a config that leaves them out.
    """
    n = config.num_train_timesteps
    spacing = config.timestep_spacing or default_spacing
    timesteps = spaced_timesteps(spacing, n, steps, config.steps_offset).astype(np.float32)
    train = train_sigmas(config, betas)
    # Linear interpolation between training timesteps, in float64 and then rounded, as diffusers does; a timestep
    # past the last (leading spacing with steps_offset) clamps to the last sigma there too.
    sigmas = np.interp(timesteps, np.arange(n), train)
    if karras is None:
        karras = use_karras_sigmas(config)
    if karras:
        if spacing == "trailing" and len(trailing_grid(n, steps)) > steps:
            # diffusers reads sigma_min off all its spaced sigmas, the extra one at timestep -1 too, which np.interp
            # clamps to the first training sigma.
            sigmas = np.append(sigmas, train[0])
        sigmas = karras_sigmas(*karras_bounds(config, sigmas), steps)
        timesteps = sigma_to_t(sigmas, np.log(train)).astype(np.float32)
    return timesteps, np.append(sigmas, 0.0).astype(np.float32)


def vp_input_scales(sigmas: Array) -> Array:
    """1 / sqrt(sigma^2 + 1) per call: the VE sample scaled back to the unit variance the U-Net was trained on."""
    return np.float32(1) / np.sqrt(sigmas * sigmas + np.float32(1))


def init_noise_sigma(sigmas: Array, spacing: str) -> float:
    """diffusers' starting scale: k-diffusion's sigma_max, but sqrt(sigma_max^2 + 1) for leading spacing."""
    max_sigma = sigmas.max()
    return float(max_sigma if spacing in ("linspace", "trailing") else np.sqrt(max_sigma * max_sigma + 1))


def sigma_plan_fields(
    name: str, config: SchedulerConfig, steps: int, timesteps: Array, sigmas: Array
) -> dict[str, Any]:
    """The fields every one-call-per-step SigmaPlan fills the same way, from its timesteps and sigmas [steps + 1]."""
    return {
        "sampler": name,
        "prediction_type": config.prediction_type,
        "steps": steps,
        "timesteps": frozen(timesteps),
        "input_scales": frozen(vp_input_scales(sigmas[:-1])),
        "init_noise_sigma": init_noise_sigma(sigmas, config.timestep_spacing or "linspace"),
        "sigmas": frozen(sigmas),
    }


def sigma_noised(plan: SigmaPlan, index: int, original: Array, noise: Array) -> Array:
    """x0 + sigma * eps at the sigma entering call index: the VE forward process."""
    return axpy(original, plan.sigmas[index], noise)


class EulerSampler:
    """First-order steps along the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""

    __slots__ = ()
    name: str = "euler"

    def plan(self, config: SchedulerConfig, steps: int) -> SigmaPlan:
        check_steps(config, steps)
        timesteps, sigmas = discrete_sigmas(config, steps, "linspace")
        return SigmaPlan(**sigma_plan_fields(self.name, config, steps, timesteps, sigmas), noise_calls=no_noise(steps))

    def step(
        self, plan: SigmaPlan, index: int, sample: Array, model_output: Array, state: State, noise: Array | None
    ) -> tuple[Array, State]:
        check_step(self.name, plan, index, sample, model_output)
        sigma, sigma_next = plan.sigmas[index], plan.sigmas[index + 1]
        x0 = denoised(sample, model_output, sigma, plan.prediction_type)
        return euler_step(sample, to_d(sample, sigma, x0), sigma, sigma_next), state

    def add_noise(self, plan: SigmaPlan, index: int, original: Array, noise: Array) -> Array:
        return sigma_noised(plan, index, original, noise)
