"""LCM: diffusers' LCMScheduler, multistep sampling of a latent consistency model (Luo et al. 2023, "Latent
Consistency Models"; Song et al. 2023, "Consistency Models", Algorithm 1).

The distilled U-Net maps a noisy sample straight to a clean one: the consistency function f(x, t) = c_skip(t) * x +
c_out(t) * x0(x, t), whose boundary condition f(x, 0) = x fixes c_skip and c_out. A multistep run alternates that
denoising with re-noising to the next (lower) timestep by the DDPM forward process with fresh noise; the last call
returns the denoised sample. Timesteps are a subset of the distillation schedule: every k-th training timestep, k =
num_train_timesteps // original_inference_steps, from which `steps` are taken evenly by index.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from .base import Array, Plan, State, check_step, frozen, vp_plan_fields
from .config import SchedulerConfig, unsupported
from .ops import axpy, vp_noised
from .schedule import LCM_BETAS, alphas_cumprod, check_epsilon_signal, check_steps

# The distillation schedule's length that LCM-distilled Stable Diffusion models use (diffusers' default).
ORIGINAL_INFERENCE_STEPS = 50
# How much the timestep is stretched in the boundary-condition scalings: larger makes c_skip fall off sooner.
TIMESTEP_SCALING = 10.0
# The data standard deviation the consistency model's scalings assume (Song et al. 2023, sec. 3: sigma_data = 0.5).
SIGMA_DATA_SQUARED = np.float32(0.25)


@dataclass(frozen=True, eq=False, kw_only=True)
class LCMPlan(Plan):
    # float32 [calls]: the cumulative alpha product a at each call's timestep.
    alpha_prod: Array
    # float32 [calls]: a at the next call's timestep, where the denoised sample is noised back to (all but the last).
    alpha_prod_next: Array
    # float32 [calls]: the consistency function's weight of the sample and of the x0 prediction.
    c_skip: Array
    c_out: Array
    # Clip the x0 prediction to +-this (clip_sample); None: no clipping.
    clip_sample_range: float | None


def original_inference_steps(config: SchedulerConfig) -> int:
    """The config's original_inference_steps: an integer in 1 .. num_train_timesteps."""
    value = config.option("original_inference_steps", ORIGINAL_INFERENCE_STEPS)
    n = config.num_train_timesteps
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not 1 <= value <= n:
        raise unsupported("original_inference_steps", value, f"an integer in 1 .. {n} (num_train_timesteps)")
    return int(value)


def timestep_scaling(config: SchedulerConfig) -> float:
    """The config's timestep_scaling, a finite number."""
    value = config.option("timestep_scaling", TIMESTEP_SCALING)
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise unsupported("timestep_scaling", value, "a finite number")
    return float(value)


def lcm_timesteps(num_train_timesteps: int, original_steps: int, steps: int) -> np.ndarray:
    """int64 [steps]: evenly by index, from the top, out of every k-th training timestep (k - 1, 2k - 1, ...)."""
    k = num_train_timesteps // original_steps
    distillation = np.arange(original_steps, 0, -1, dtype=np.int64) * k - 1
    picked = np.floor(np.linspace(0, original_steps, num=steps, endpoint=False)).astype(np.int64)
    return distillation[picked]


def boundary_scalings(timesteps: np.ndarray, scaling: float) -> tuple[Array, Array]:
    """c_skip = s^2 / (t'^2 + s^2) and c_out = t' / sqrt(t'^2 + s^2), t' = t * scaling, s = sigma_data, in float32.

    LCM's form of the consistency model scalings (Song et al. 2023, appendix C): c_skip = 1 and c_out = 0 at t = 0,
    the boundary condition f(x, 0) = x.
    """
    scaled = timesteps.astype(np.float32) * np.float32(scaling)
    variance = scaled * scaled + SIGMA_DATA_SQUARED
    # torch divides a Python number by a tensor as its reciprocal times the number: two roundings, kept here.
    c_skip = (np.float32(1) / variance) * SIGMA_DATA_SQUARED
    return c_skip, scaled / np.sqrt(variance)


def predicted_x0(x: np.ndarray, model_output: np.ndarray, alpha_prod: np.float32, prediction_type: str) -> Array:
    """The x0 of x = sqrt(a) * x0 + sqrt(1 - a) * eps the model predicts, as a new array."""
    signal, noise = np.sqrt(alpha_prod), np.sqrt(np.float32(1) - alpha_prod)
    if prediction_type == "epsilon":
        x0 = axpy(x, -noise, model_output)
        x0 /= signal
        return x0
    if prediction_type == "v_prediction":
        # x0 = sqrt(a) * x - sqrt(1 - a) * v (Salimans & Ho 2022).
        x0 = np.multiply(x, signal, dtype=np.float32)
        x0 -= np.multiply(model_output, noise, dtype=np.float32)
        return x0
    return np.array(model_output, dtype=np.float32)


class LCMSampler:
    """Consistency-model steps: denoise in one jump, then (but at the last call) noise again to the next timestep."""

    __slots__ = ()
    name: str = "lcm"

    def plan(self, config: SchedulerConfig, steps: int) -> LCMPlan:
        check_steps(config, steps)
        original_steps = original_inference_steps(config)
        if steps > original_steps:
            raise ValueError(
                f"steps={steps} is more than LCM takes from its distillation schedule of original_inference_steps="
                f"{original_steps}; allowed: an integer in 1 .. {original_steps}"
            )
        timesteps = lcm_timesteps(config.num_train_timesteps, original_steps, steps)
        train_alpha_prod = alphas_cumprod(config, LCM_BETAS)
        alpha_prod = train_alpha_prod[timesteps]
        check_epsilon_signal(config, timesteps, alpha_prod)
        # The last call lands on the denoised sample itself; diffusers looks up its own timestep there, unused. No
        # timestep is below 0, so set_alpha_to_one never matters.
        alpha_prod_next = np.append(alpha_prod[1:], alpha_prod[-1])
        c_skip, c_out = boundary_scalings(timesteps, timestep_scaling(config))
        noise_calls = np.ones(steps, bool)
        noise_calls[-1] = False
        clip_sample = bool(config.clip_sample)  # diffusers' LCM default: no clipping
        return LCMPlan(
            **vp_plan_fields(self.name, config, steps, timesteps),
            noise_calls=frozen(noise_calls, bool),
            alpha_prod=frozen(alpha_prod),
            alpha_prod_next=frozen(alpha_prod_next),
            c_skip=frozen(c_skip),
            c_out=frozen(c_out),
            clip_sample_range=float(config.clip_sample_range) if clip_sample else None,
        )

    def step(
        self, plan: LCMPlan, index: int, sample: Array, model_output: Array, state: State, noise: Array | None
    ) -> tuple[Array, State]:
        check_step(self.name, plan, index, sample, model_output)
        x0 = predicted_x0(sample, model_output, plan.alpha_prod[index], plan.prediction_type)
        if plan.clip_sample_range is not None:
            np.clip(x0, -plan.clip_sample_range, plan.clip_sample_range, out=x0)
        # f(x, t) = c_out * x0 + c_skip * x, in place in x0.
        x0 *= plan.c_out[index]
        x0 += np.multiply(sample, plan.c_skip[index], dtype=np.float32)
        if not plan.noise_calls[index]:
            return x0, state
        if noise is None:
            raise ValueError(f"call {index} of an LCM plan needs noise")
        # Noised back to the next timestep, in place: sqrt(a) * f + sqrt(1 - a) * noise.
        alpha_prod_next = plan.alpha_prod_next[index]
        x0 *= np.sqrt(alpha_prod_next)
        x0 += np.multiply(noise, np.sqrt(np.float32(1) - alpha_prod_next), dtype=np.float32)
        return x0, state

    def add_noise(self, plan: LCMPlan, index: int, original: Array, noise: Array) -> Array:
        return vp_noised(original, noise, plan.alpha_prod[index])
