"""Euler ancestral: diffusers' EulerAncestralDiscreteScheduler (k-diffusion's sample_euler_ancestral, eta = 1).

Ancestral sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models") in the variance-exploding form of
Karras et al. 2022: each step follows the probability-flow ODE down to sigma_down, then adds fresh noise of size
sigma_up, so that the sample reaches sigma_next with the noise variance the forward process has there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Array, State, check_step, every_call_noise, frozen
from .config import SchedulerConfig, unsupported
from .euler import SigmaPlan, discrete_sigmas, sigma_noised, sigma_plan_fields
from .ops import denoised, euler_step, to_d
from .schedule import check_steps

# diffusers' class raises NotImplementedError in step() for an x0-predicting model.
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True, eq=False, kw_only=True)
class AncestralPlan(SigmaPlan):
    # float32 [calls]: where the deterministic part of each step ends.
    sigmas_down: Array
    # float32 [calls]: the scale of the fresh noise each step adds (0 at the last, which still draws it).
    sigmas_up: Array


def ancestral_split(sigma_from: Array, sigma_to: Array) -> tuple[Array, Array]:
    """sigma_down, sigma_up with sigma_down^2 + sigma_up^2 = sigma_to^2, the noise the step from sigma_from re-adds."""
    to_squared = sigma_to * sigma_to
    sigma_up = np.sqrt(to_squared * (sigma_from * sigma_from - to_squared) / (sigma_from * sigma_from))
    with np.errstate(invalid="ignore"):  # NaN as in diffusers, for check_real to refuse
        return np.sqrt(to_squared - sigma_up * sigma_up), sigma_up


def check_real(steps: int, sigmas: Array, sigmas_down: Array) -> None:
    """ValueError where sigma_down is NaN, as diffusers' is, and with it every later sample."""
    # Only where sigma_next / sigma < ~2.4e-4 (squaredcos_cap_v2's sigma_max of ~2e4, few steps): then sigma_up^2 is
    # sigma_next^2 to within float32 rounding, and can round above it.
    nan = np.flatnonzero(np.isnan(sigmas_down))
    if nan.size:
        sigma, sigma_next = sigmas[nan[0]], sigmas[nan[0] + 1]
        raise ValueError(
            f"steps={steps} makes euler_ancestral step from sigma {sigma:g} to {sigma_next:g}, where sigma_up rounds"
            " above sigma_next and sigma_down = sqrt(sigma_next^2 - sigma_up^2) is NaN, in diffusers too; allowed:"
            " another number of steps, one whose every step shrinks sigma less than about 4000-fold"
        )


class EulerAncestralSampler:
    """Euler steps to sigma_down, plus unit gaussian noise times sigma_up: a first-order ancestral SDE sampler."""

    __slots__ = ()
    name: str = "euler_ancestral"

    def plan(self, config: SchedulerConfig, steps: int) -> AncestralPlan:
        check_steps(config, steps)
        if config.prediction_type not in PREDICTION_TYPES:
            raise unsupported("prediction_type", config.prediction_type, ", ".join(PREDICTION_TYPES))
        # The class has no use_karras_sigmas: diffusers' from_config drops the key, so its value changes nothing.
        timesteps, sigmas = discrete_sigmas(config, steps, "linspace", karras=False)
        sigmas_down, sigmas_up = ancestral_split(sigmas[:-1], sigmas[1:])
        check_real(steps, sigmas, sigmas_down)
        return AncestralPlan(
            **sigma_plan_fields(self.name, config, steps, timesteps, sigmas),
            noise_calls=every_call_noise(steps),
            sigmas_down=frozen(sigmas_down),
            sigmas_up=frozen(sigmas_up),
        )

    def step(
        self, plan: AncestralPlan, index: int, sample: Array, model_output: Array, state: State, noise: Array | None
    ) -> tuple[Array, State]:
        check_step(self.name, plan, index, sample, model_output)
        if noise is None:
            raise ValueError(f"call {index} of {self.name!r} needs noise")
        sigma = plan.sigmas[index]
        x0 = denoised(sample, model_output, sigma, plan.prediction_type)
        out = euler_step(sample, to_d(sample, sigma, x0), sigma, plan.sigmas_down[index])
        out += noise * plan.sigmas_up[index]
        return out, state

    def add_noise(self, plan: AncestralPlan, index: int, original: Array, noise: Array) -> Array:
        return sigma_noised(plan, index, original, noise)
