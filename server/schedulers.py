"""Stateless numpy samplers matching diffusers' EulerDiscreteScheduler and DDIMScheduler (eta = 0).

A sampler turns a (config, steps) pair into an immutable Plan once, then steps any number of concurrent requests
through it: nothing is stored between steps, so one Plan and one Sampler serve every request at once.

Euler works in the variance-exploding parametrisation, x = x0 + sigma * eps with sigma = sqrt((1 - a) / a) for the
cumulative alpha product a (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"),
and DDIM in the variance-preserving one, x = sqrt(a) * x0 + sqrt(1 - a) * eps, as diffusers does; the two differ by the
scale sqrt(a) that Euler's U-Net input gets multiplied with.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float32]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# Keys of a scheduler_config.json that change diffusers' Euler/DDIM numerics, with the only value these samplers
# implement (None: the key may also be absent or null). Any other value would silently give different images.
ONLY_SUPPORTED_VALUES: Mapping[str, tuple[Any, ...]] = {
    "thresholding": (False, None),
    "rescale_betas_zero_snr": (False, None),
    "use_karras_sigmas": (False, None),
    "use_exponential_sigmas": (False, None),
    "use_beta_sigmas": (False, None),
    "trained_betas": (None,),
    "interpolation_type": ("linear", None),
    "final_sigmas_type": ("zero", None),
    "timestep_type": ("discrete", None),
}

# Improved DDPM (Nichol & Dhariwal 2021, eq. 17): the cosine schedule's small offset s, and the cap on each beta that
# keeps the last steps from becoming singular near t = T.
COSINE_OFFSET = 0.008
COSINE_MAX_BETA = 0.999

# A server sees few distinct (sampler, config, steps) triples: one config per loaded model times the step counts
# clients ask for. Each plan is a few arrays of `steps` floats, so this bounds memory at well under a megabyte.
PLAN_CACHE_SIZE = 256


def _unsupported(key: str, value: object, allowed: object) -> ValueError:
    return ValueError(f"scheduler config {key}={value!r} is not supported; allowed: {allowed}")


@dataclass(frozen=True)
class SchedulerConfig:
    """The model's scheduler_config.json, the fields samplers use. None = the sampler's own diffusers default."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    steps_offset: int = 0
    # None: the sampler's own default (Euler: linspace, DDIM: leading), as diffusers' from_config does.
    timestep_spacing: str | None = None
    set_alpha_to_one: bool = True
    # None: the sampler's own default (DDIM: True; Euler never clips).
    clip_sample: bool | None = None
    clip_sample_range: float = 1.0
    # "_class_name" of the file, e.g. "PNDMScheduler".
    class_name: str = ""

    def __post_init__(self) -> None:
        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_real(value: object) -> bool:
            return is_int(value) or isinstance(value, float)

        if not is_int(self.num_train_timesteps) or self.num_train_timesteps < 1:
            raise _unsupported("num_train_timesteps", self.num_train_timesteps, "an integer >= 1")
        for key in ("beta_start", "beta_end"):
            value = getattr(self, key)
            # beta = 0 would make sigma zero at t = 0, where the Euler derivative divides by sigma.
            if not is_real(value) or not 0 < value < 1:
                raise _unsupported(key, value, "a number in (0, 1)")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise _unsupported("beta_schedule", self.beta_schedule, ", ".join(BETA_SCHEDULES))
        if self.prediction_type not in PREDICTION_TYPES:
            raise _unsupported("prediction_type", self.prediction_type, ", ".join(PREDICTION_TYPES))
        if not is_int(self.steps_offset) or self.steps_offset < 0:
            raise _unsupported("steps_offset", self.steps_offset, "an integer >= 0")
        if self.timestep_spacing is not None and self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise _unsupported("timestep_spacing", self.timestep_spacing, ", ".join(TIMESTEP_SPACINGS) + " or null")
        if not isinstance(self.set_alpha_to_one, bool):
            raise _unsupported("set_alpha_to_one", self.set_alpha_to_one, "true, false")
        if self.clip_sample is not None and not isinstance(self.clip_sample, bool):
            raise _unsupported("clip_sample", self.clip_sample, "true, false or null")
        if not is_real(self.clip_sample_range) or not self.clip_sample_range > 0:
            raise _unsupported("clip_sample_range", self.clip_sample_range, "a number > 0")
        if not isinstance(self.class_name, str):
            raise _unsupported("_class_name", self.class_name, "a string")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SchedulerConfig:
        """Read a scheduler_config.json dict; unknown keys are ignored, unsupported values raise ValueError."""
        for key, allowed in ONLY_SUPPORTED_VALUES.items():
            if key in d and not any(d[key] is value or d[key] == value for value in allowed):
                raise _unsupported(key, d[key], " or ".join(json.dumps(value) for value in allowed))
        values: dict[str, Any] = {}
        for field in fields(cls):
            key = "_class_name" if field.name == "class_name" else field.name
            # JSON null means "not set": the dataclass default, which is the sampler default where that matters.
            if d.get(key) is not None:
                values[field.name] = d[key]
        for key in ("beta_start", "beta_end", "clip_sample_range"):
            # JSON may write a float as an integer (e.g. "clip_sample_range": 1); keep the field a float.
            if type(values.get(key)) is int:
                values[key] = float(values[key])
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SchedulerConfig:
        """Read a diffusers scheduler_config.json file."""
        with open(path, encoding="utf-8") as file:
            d = json.load(file)
        if not isinstance(d, dict):
            raise ValueError(f"{os.fspath(path)}: a scheduler config must be a JSON object, got {type(d).__name__}")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """The scheduler_config.json form that from_dict reads back; unset (None) fields are left out."""
        d = {key: value for key, value in asdict(self).items() if value is not None}
        class_name = d.pop("class_name")
        if class_name:
            d["_class_name"] = class_name
        return d


@dataclass(frozen=True, eq=False)
class Plan:
    """Everything a sampler needs for one (config, steps) pair, computed once; its arrays are read-only."""

    # Name of the sampler that made the plan; its step refuses anyone else's.
    sampler: str
    # What the model predicts: "epsilon", "v_prediction" or "sample" (x0).
    prediction_type: str
    # float32 [steps]: the U-Net's timestep input at each step.
    timesteps: Array
    # float32 [steps]: multiply the latents by this before the U-Net (diffusers' scale_model_input).
    input_scales: Array
    # The initial latents are unit gaussian noise times this.
    init_noise_sigma: float
    # float32 [steps + 1]: the noise level sqrt((1 - a) / a) of the sample entering each step, then of the result.
    sigmas: Array
    # float32 [steps]: the cumulative alpha product a at each step's timestep.
    alpha_prod: Array
    # float32 [steps]: the one each step moves to. For DDIM with trailing or linspace spacing this is not the next
    # step's alpha_prod: diffusers moves to t - num_train_timesteps // steps whatever the spacing, and so do we.
    alpha_prod_prev: Array
    # Clip the x0 prediction to +-this (DDIM's clip_sample); None: no clipping.
    clip_sample_range: float | None

    @property
    def steps(self) -> int:
        return len(self.timesteps)


class Sampler(Protocol):
    """A stateless sampler: plan once per (config, steps), then step every request through the shared plan."""

    name: str

    def plan(self, config: SchedulerConfig, steps: int) -> Plan: ...

    # The sample after step index, a new float32 array; sample and model_output are left as they are.
    def step(self, plan: Plan, index: int, sample: np.ndarray, model_output: np.ndarray) -> np.ndarray: ...


# --- The noise schedule (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"), as diffusers computes it. ---


def betas(config: SchedulerConfig) -> Array:
    """beta_t for t = 0 .. num_train_timesteps - 1, the DDPM forward-process variances."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return linspace_float32(config.beta_start, config.beta_end, n)
    if config.beta_schedule == "scaled_linear":
        # Latent diffusion's schedule: linear in sqrt(beta), squared in float32 as diffusers does.
        return linspace_float32(math.sqrt(config.beta_start), math.sqrt(config.beta_end), n) ** 2
    return cosine_betas(n)


def linspace_float32(start: float, end: float, n: int) -> Array:
    """n evenly spaced float32 values from start to end, rounded exactly as torch.linspace(dtype=float32) does."""
    # A correctly rounded linspace differs from torch's in the last bit of about a third of the betas, and where the
    # cumulative product a is near 1, one bit of a is a large part of the 1 - a that sigma and the noise prediction
    # divide by. torch steps from each end by a float32 step: start + step * i for the first half, end - step *
    # (n - 1 - i) for the rest, each a fused multiply-add (one rounding); in float64 the product of a float32 step and
    # an integer below 2**29 is exact, so only the final cast rounds.
    if n == 1:
        return np.array([start], dtype=np.float32)
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    from_start = np.float64(start32) + step * i
    from_end = np.float64(end32) - step * (n - 1 - i)
    return np.where(i < n // 2, from_start, from_end).astype(np.float32)


def cosine_betas(n: int) -> Array:
    """Improved DDPM cosine schedule: beta_t = 1 - alpha_bar((t + 1) / n) / alpha_bar(t / n), capped (Nichol 2021)."""
    t = np.arange(n + 1, dtype=np.float64) / n
    alpha_bar = np.cos((t + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
    return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], COSINE_MAX_BETA).astype(np.float32)


def alphas_cumprod(beta: Array) -> Array:
    """a_t = prod_{s <= t} (1 - beta_s), the signal fraction of the DDPM forward process."""
    # torch.cumprod accumulates float32 in double, so this is bitwise what diffusers gets.
    return np.cumprod(np.float32(1) - beta, dtype=np.float64).astype(np.float32)


def sigma_from_alpha_prod(alpha_prod: Array) -> Array:
    """sigma = sqrt((1 - a) / a): the variance-exploding noise level of x / sqrt(a) (Karras et al. 2022, sec. 2)."""
    return np.sqrt((np.float32(1) - alpha_prod) / alpha_prod)


def spaced_timesteps(spacing: str, num_train_timesteps: int, steps: int, steps_offset: int) -> npt.NDArray[np.float64]:
    """The descending timesteps of each spacing in Lin et al. 2024, "Common Diffusion Noise Schedules ...", table 2."""
    n = num_train_timesteps
    if spacing == "linspace":
        # Fractional: Euler interpolates sigma between training timesteps; DDIM rounds.
        return np.linspace(0, n - 1, steps)[::-1].copy()
    if spacing == "leading":
        return (np.arange(steps) * (n // steps))[::-1] + float(steps_offset)
    # Trailing. np.arange with a float step yields one element too many for some step counts (1000 / 61 ...), which
    # diffusers keeps as an extra step at timestep -1; the first `steps` are the intended ones.
    return np.round(np.arange(n, 0, -n / steps))[:steps] - 1.0


def _check_steps(config: SchedulerConfig, steps: int) -> None:
    is_integer = isinstance(steps, numbers.Integral) and not isinstance(steps, bool)
    if not is_integer or not 1 <= steps <= config.num_train_timesteps:
        raise ValueError(f"steps={steps!r} is not supported; allowed: an integer in 1 .. {config.num_train_timesteps}")


def _frozen(array: npt.ArrayLike) -> Array:
    out = np.array(array, dtype=np.float32)
    out.setflags(write=False)
    return out


# --- The per-step arithmetic: pure functions of arrays and plan scalars, in diffusers' order of float32 operations.
# The order matters: with x and the model output far apart, x - sqrt(1 - a) * F cancels, and the same result rounded
# another way (e.g. x / sqrt(a) - F * sqrt(1 - a) / sqrt(a)) differs from diffusers' by 1e-4 where sqrt(a) is small.


def _axpy(x: np.ndarray, a: np.float32, y: np.ndarray) -> Array:
    """x + a * y in float32, the result the only new array."""
    out = np.multiply(y, a, dtype=np.float32)
    out += x
    return out


def _ax_plus_by(a: np.float32, x: np.ndarray, b: np.float32, y: np.ndarray) -> Array:
    """a * x + b * y in float32 with one temporary."""
    out = np.multiply(y, b, dtype=np.float32)
    out += np.multiply(x, a, dtype=np.float32)
    return out


def denoised(x: np.ndarray, model_output: np.ndarray, sigma: np.float32, prediction_type: str) -> Array:
    """D(x; sigma), the x0 prediction of an eps-, v- or x0-predicting model, VE form (Karras et al. 2022, table 1)."""
    if prediction_type == "epsilon":
        return _axpy(x, -sigma, model_output)
    if prediction_type == "v_prediction":
        # c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1) (Salimans & Ho 2022, v-parametrisation).
        variance = sigma * sigma + np.float32(1)
        out = np.multiply(model_output, -sigma / np.sqrt(variance), dtype=np.float32)
        out += np.divide(x, variance, dtype=np.float32)
        return out
    # An x0-predicting model: D is model_output itself, which nothing downstream modifies.
    return np.asarray(model_output, dtype=np.float32)


def to_d(x: np.ndarray, sigma: np.float32, denoised: np.ndarray) -> Array:
    """The probability-flow ODE derivative dx/dsigma = (x - D) / sigma (Karras et al. 2022, eqs. 1 and 3)."""
    d = np.subtract(x, denoised, dtype=np.float32)
    d /= sigma
    return d


def euler_step(x: np.ndarray, d: np.ndarray, sigma: np.float32, sigma_next: np.float32) -> Array:
    """x + d * (sigma_next - sigma): one Euler step (Karras et al. 2022, Algorithm 2, gamma = 0, first order)."""
    return _axpy(x, sigma_next - sigma, d)


def ddim_predictions(
    x: np.ndarray, model_output: np.ndarray, alpha_prod: np.float32, prediction_type: str
) -> tuple[Array, Array]:
    """The predicted x0 and eps of x = sqrt(a) * x0 + sqrt(1 - a) * eps (DDIM, Song et al. 2021, eq. 12)."""
    # x0 is always a new array, for the caller to clip in place; eps may be model_output itself.
    signal, noise = np.sqrt(alpha_prod), np.sqrt(np.float32(1) - alpha_prod)
    if prediction_type == "epsilon":
        x0 = _axpy(x, -noise, model_output)
        x0 /= signal
        return x0, np.asarray(model_output, dtype=np.float32)
    if prediction_type == "v_prediction":
        # v = sqrt(a) * eps - sqrt(1 - a) * x0 (Salimans & Ho 2022, "Progressive Distillation", sec. 4).
        return _ax_plus_by(signal, x, -noise, model_output), _ax_plus_by(signal, model_output, noise, x)
    eps = _axpy(x, -signal, model_output)
    eps /= noise
    return np.array(model_output, dtype=np.float32), eps


def ddim_step(x0: np.ndarray, eps: np.ndarray, alpha_prod_prev: np.float32) -> Array:
    """x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps: DDIM with eta = 0 (Song et al. 2021, eq. 12)."""
    return _ax_plus_by(np.sqrt(alpha_prod_prev), x0, np.sqrt(np.float32(1) - alpha_prod_prev), eps)


def _check_step(name: str, plan: Plan, index: int, sample: np.ndarray, model_output: np.ndarray) -> None:
    if plan.sampler != name:
        raise ValueError(f"a {plan.sampler!r} plan cannot be stepped by the {name!r} sampler")
    if not 0 <= index < len(plan.timesteps):
        raise IndexError(f"step index {index} is out of range for a {len(plan.timesteps)}-step plan")
    if sample.shape != model_output.shape:
        raise ValueError(f"sample shape {sample.shape} and model_output shape {model_output.shape} differ")


# --- The samplers. ---


class EulerSampler:
    """diffusers' EulerDiscreteScheduler with its defaults: linear sigma interpolation, final sigma 0, s_churn 0."""

    __slots__ = ()
    name: str = "euler"

    def plan(self, config: SchedulerConfig, steps: int) -> Plan:
        _check_steps(config, steps)
        n = config.num_train_timesteps
        spacing = config.timestep_spacing or "linspace"
        timesteps = spaced_timesteps(spacing, n, steps, config.steps_offset).astype(np.float32)
        train_sigmas = sigma_from_alpha_prod(alphas_cumprod(betas(config)))
        # Linear interpolation between training timesteps, in float64 and then rounded, as diffusers does; a timestep
        # past the last (leading spacing with steps_offset) clamps to the last sigma there too.
        sigmas = np.interp(timesteps.astype(np.float64), np.arange(n), train_sigmas)
        sigmas = np.append(sigmas, 0.0).astype(np.float32)
        max_sigma = sigmas.max()
        # diffusers starts leading spacing from a unit-variance VP sample divided by sqrt(a), of standard deviation
        # sqrt(sigma_max^2 + 1), and the other spacings from k-diffusion's sigma_max.
        init_noise_sigma = max_sigma if spacing in ("linspace", "trailing") else np.sqrt(max_sigma * max_sigma + 1)
        variance = sigmas * sigmas + np.float32(1)
        return Plan(
            sampler=self.name,
            prediction_type=config.prediction_type,
            timesteps=_frozen(timesteps),
            input_scales=_frozen(np.float32(1) / np.sqrt(variance[:-1])),
            init_noise_sigma=float(init_noise_sigma),
            sigmas=_frozen(sigmas),
            alpha_prod=_frozen(np.float32(1) / variance[:-1]),
            alpha_prod_prev=_frozen(np.float32(1) / variance[1:]),
            clip_sample_range=None,
        )

    def step(self, plan: Plan, index: int, sample: np.ndarray, model_output: np.ndarray) -> np.ndarray:
        _check_step(self.name, plan, index, sample, model_output)
        sigma, sigma_next = plan.sigmas[index], plan.sigmas[index + 1]
        x0 = denoised(sample, model_output, sigma, plan.prediction_type)
        return euler_step(sample, to_d(sample, sigma, x0), sigma, sigma_next)


class DDIMSampler:
    """diffusers' DDIMScheduler with eta = 0, as StableDiffusionPipeline runs it (Song et al. 2021, "DDIM")."""

    __slots__ = ()
    name: str = "ddim"

    def plan(self, config: SchedulerConfig, steps: int) -> Plan:
        _check_steps(config, steps)
        n = config.num_train_timesteps
        spacing = config.timestep_spacing or "leading"
        timesteps = np.round(spaced_timesteps(spacing, n, steps, config.steps_offset)).astype(np.int64)
        if timesteps[0] >= n:
            raise ValueError(
                f"steps_offset={config.steps_offset} puts timestep {timesteps[0]} past num_train_timesteps={n} at"
                f" steps={steps}; allowed: steps_offset + (steps - 1) * (num_train_timesteps // steps) < {n}"
            )
        train_alpha_prod = alphas_cumprod(betas(config))
        final_alpha_prod = np.float32(1) if config.set_alpha_to_one else train_alpha_prod[0]
        prev_timesteps = timesteps - n // steps
        alpha_prod = train_alpha_prod[timesteps]
        # Past timestep 0 the last step lands on the final alpha product (1, or a_0 without set_alpha_to_one).
        alpha_prod_prev = np.where(prev_timesteps >= 0, train_alpha_prod[prev_timesteps.clip(0)], final_alpha_prod)
        clip_sample = True if config.clip_sample is None else config.clip_sample
        return Plan(
            sampler=self.name,
            prediction_type=config.prediction_type,
            timesteps=_frozen(timesteps),
            input_scales=_frozen(np.ones(steps)),
            init_noise_sigma=1.0,
            sigmas=_frozen(sigma_from_alpha_prod(np.append(alpha_prod, alpha_prod_prev[-1]))),
            alpha_prod=_frozen(alpha_prod),
            alpha_prod_prev=_frozen(alpha_prod_prev),
            clip_sample_range=float(config.clip_sample_range) if clip_sample else None,
        )

    def step(self, plan: Plan, index: int, sample: np.ndarray, model_output: np.ndarray) -> np.ndarray:
        _check_step(self.name, plan, index, sample, model_output)
        # eps comes from the unclipped prediction, as in diffusers (use_clipped_model_output off).
        x0, eps = ddim_predictions(sample, model_output, plan.alpha_prod[index], plan.prediction_type)
        if plan.clip_sample_range is not None:
            np.clip(x0, -plan.clip_sample_range, plan.clip_sample_range, out=x0)
        return ddim_step(x0, eps, plan.alpha_prod_prev[index])


# Read-only: the samplers are shared by every request.
SAMPLERS: Mapping[str, Sampler] = MappingProxyType({s.name: s for s in (EulerSampler(), DDIMSampler())})


def get_sampler(name: str) -> Sampler:
    """The sampler called name; ValueError listing the allowed names otherwise."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}") from None


# typed: True == 1 with the same hash, so without it steps=True would get steps=1's cached plan, not a ValueError.
@functools.lru_cache(maxsize=PLAN_CACHE_SIZE, typed=True)
def make_plan(name: str, config: SchedulerConfig, steps: int) -> Plan:
    """The plan of sampler name for (config, steps), computed once and shared: its arrays are read-only."""
    return get_sampler(name).plan(config, steps)


def default_sampler_name(config: SchedulerConfig) -> str:
    """The sampler the model's own scheduler class is: "ddim" for DDIMScheduler, otherwise "euler"."""
    return "ddim" if config.class_name == "DDIMScheduler" else "euler"
