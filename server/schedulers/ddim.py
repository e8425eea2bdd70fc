"""DDIM: diffusers' DDIMScheduler with eta = 0, as StableDiffusionPipeline runs it (Song et al. 2021, "DDIM").

DDIM works in the variance-preserving parametrisation, x = sqrt(a) * x0 + sqrt(1 - a) * eps, for the cumulative alpha
product a at each timestep.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Array, Plan, State, check_step, frozen, no_noise, vp_plan_fields
from .config import SchedulerConfig
from .ops import vp_noised, vp_predictions
from .schedule import alphas_cumprod, check_epsilon_signal, check_steps, spaced_timesteps


@dataclass(frozen=True, eq=False, kw_only=True)
class DDIMPlan(Plan):
    # float32 [calls]: the cumulative alpha product a at each call's timestep.
    alpha_prod: Array
    # float32 [calls]: the one each step moves to. For trailing or linspace spacing this is not the next call's
    # alpha_prod: diffusers moves to t - num_train_timesteps // steps whatever the spacing, and so do we.
    alpha_prod_prev: Array
    # Clip the x0 prediction to +-this (clip_sample); None: no clipping.
    clip_sample_range: float | None


def integer_timesteps(config: SchedulerConfig, steps: int, default_spacing: str) -> np.ndarray:
    """int64 descending timesteps, refusing a steps_offset that pushes the first past the training range."""
    n = config.num_train_timesteps
    spacing = config.timestep_spacing or default_spacing
    timesteps = np.round(spaced_timesteps(spacing, n, steps, config.steps_offset)).astype(np.int64)
    if timesteps[0] >= n:
        raise ValueError(
            f"steps_offset={config.steps_offset} puts timestep {timesteps[0]} past num_train_timesteps={n} at"
            f" steps={steps}; allowed: steps_offset + (steps - 1) * (num_train_timesteps // steps) < {n}"
        )
    return timesteps


def final_alpha_prod(config: SchedulerConfig, train_alpha_prod: Array) -> np.float32:
    """Where the last step lands: a = 1 (a clean sample; the default), or a_0 when set_alpha_to_one is false."""
    return train_alpha_prod[0] if config.set_alpha_to_one is False else np.float32(1)


class DDIMSampler:
    """Deterministic DDIM steps: predict x0 and eps, then move both to the previous timestep."""

    __slots__ = ()
    name: str = "ddim"

    def plan(self, config: SchedulerConfig, steps: int) -> DDIMPlan:
        check_steps(config, steps)
        n = config.num_train_timesteps
        timesteps = integer_timesteps(config, steps, "leading")
        train_alpha_prod = alphas_cumprod(config)
        prev_timesteps = timesteps - n // steps
        alpha_prod = train_alpha_prod[timesteps]
        check_epsilon_signal(config, timesteps, alpha_prod)
        alpha_prod_prev = np.where(
            prev_timesteps >= 0,
            train_alpha_prod[prev_timesteps.clip(0)],
            final_alpha_prod(config, train_alpha_prod),
        )
        clip_sample = True if config.clip_sample is None else config.clip_sample
        return DDIMPlan(
            **vp_plan_fields(self.name, config, steps, timesteps),
            noise_calls=no_noise(steps),
            alpha_prod=frozen(alpha_prod),
            alpha_prod_prev=frozen(alpha_prod_prev),
            clip_sample_range=float(config.clip_sample_range) if clip_sample else None,
        )

    def step(
        self, plan: DDIMPlan, index: int, sample: Array, model_output: Array, state: State, noise: Array | None
    ) -> tuple[Array, State]:
        check_step(self.name, plan, index, sample, model_output)
        # eps comes from the unclipped prediction, as in diffusers (use_clipped_model_output off).
        x0, eps = vp_predictions(sample, model_output, plan.alpha_prod[index], plan.prediction_type)
        if plan.clip_sample_range is not None:
            np.clip(x0, -plan.clip_sample_range, plan.clip_sample_range, out=x0)
        return vp_noised(x0, eps, plan.alpha_prod_prev[index]), state

    def add_noise(self, plan: DDIMPlan, index: int, original: Array, noise: Array) -> Array:
        return vp_noised(original, noise, plan.alpha_prod[index])
