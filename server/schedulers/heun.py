"""Heun: diffusers' HeunDiscreteScheduler, the second-order sampler of Karras et al. 2022 (Algorithm 1).

Each step from sigma to sigma_next takes an Euler step, evaluates the model again at its result, and redoes the step
with the mean of the two ODE derivatives (Heun's method, the explicit trapezoidal rule). That is two U-Net calls per
step, except the last, which lands on sigma = 0 where the derivative is undefined and so stays an Euler step: the plan
has 2 * steps - 1 calls, even ones first stages and odd ones second stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import INITIAL_STATE, Array, State, check_step, frozen, no_noise
from .config import SchedulerConfig, refuse_zero_terminal_snr
from .euler import SigmaPlan, discrete_sigmas, init_noise_sigma, sigma_noised, vp_input_scales
from .ops import axpy, denoised, euler_step, to_d
from .schedule import HEUN_BETAS, check_steps

# U-Net calls per step: diffusers' scheduler.order, which img2img's start index is a multiple of.
ORDER = 2


@dataclass(frozen=True, eq=False, kw_only=True)
class HeunPlan(SigmaPlan):
    # Clip the x0 prediction to +-this (clip_sample); None: no clipping.
    clip_sample_range: float | None


def interleaved(per_step: np.ndarray) -> np.ndarray:
    """The first entry once, each later one twice: per step to per call of a Heun plan."""
    return np.concatenate([per_step[:1], np.repeat(per_step[1:], ORDER)])


class HeunSampler:
    """Heun's second-order steps; the first stage's sample and derivative wait in the State for the second."""

    __slots__ = ()
    name: str = "heun"

    def plan(self, config: SchedulerConfig, steps: int) -> HeunPlan:
        check_steps(config, steps)
        refuse_zero_terminal_snr(config, "HeunDiscreteScheduler")
        timesteps, sigmas = discrete_sigmas(config, steps, "linspace", betas=HEUN_BETAS)
        # Call 2k (first stage of step k) starts at sigma_k, call 2k + 1 (its second stage) at sigma_{k+1}, where the
        # first stage's Euler step put the sample; the final 0 is not repeated.
        call_sigmas = np.append(interleaved(sigmas[:-1]), sigmas[-1])
        clip_sample = False if config.clip_sample is None else config.clip_sample
        return HeunPlan(
            sampler=self.name,
            prediction_type=config.prediction_type,
            steps=steps,
            timesteps=frozen(interleaved(timesteps)),
            input_scales=frozen(vp_input_scales(call_sigmas[:-1])),
            init_noise_sigma=init_noise_sigma(sigmas, config.timestep_spacing or "linspace"),
            noise_calls=no_noise(len(timesteps) * ORDER - 1),
            order=ORDER,
            sigmas=frozen(call_sigmas),
            clip_sample_range=float(config.clip_sample_range) if clip_sample else None,
        )

    def step(
        self, plan: HeunPlan, index: int, sample: Array, model_output: Array, state: State, noise: Array | None
    ) -> tuple[Array, State]:
        check_step(self.name, plan, index, sample, model_output)
        first_call = index - index % ORDER
        first_stage = index == first_call
        # Both stages step from the sigma entering the first to the one entering the second (0 after the last).
        sigma, sigma_next = plan.sigmas[first_call], plan.sigmas[first_call + 1]
        # The first stage's D is taken at sigma, the second's at sigma_next: the level of the sample each is given.
        level = sigma if first_stage else sigma_next
        x0 = denoised(sample, model_output, level, plan.prediction_type)
        if plan.clip_sample_range is not None:
            np.clip(x0, -plan.clip_sample_range, plan.clip_sample_range, out=x0)
        derivative = to_d(sample, level, x0)
        if first_stage:
            return euler_step(sample, derivative, sigma, sigma_next), (sample, derivative)
        if not state:
            raise ValueError(f"call {index} is a second stage of {self.name!r}: it needs the first stage's state")
        first_sample, first_derivative = state
        # The trapezoidal rule: the mean of the derivatives at both ends, applied from the first stage's sample.
        derivative += first_derivative
        derivative /= np.float32(2)
        return axpy(first_sample, sigma_next - sigma, derivative), INITIAL_STATE

    def add_noise(self, plan: HeunPlan, index: int, original: Array, noise: Array) -> Array:
        return sigma_noised(plan, index, original, noise)
