"""Stateless numpy samplers that reproduce diffusers' schedulers, and the img2img start of a plan.

Each sampler lives in its own module; this one names them, caches their plans and answers which suit a model.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping
from types import MappingProxyType

from .base import INITIAL_STATE, Array, Plan, Sampler, State, select_rows
from .config import SchedulerConfig
from .ddim import DDIMSampler
from .dpm import DPMSolverSampler
from .euler import EulerSampler
from .euler_ancestral import EulerAncestralSampler
from .heun import HeunSampler
from .lcm import LCMSampler
from .lms import LMSSampler
from .pndm import PNDMSampler
from .unipc import UniPCSampler

__all__ = [
    "INITIAL_STATE",
    "SAMPLERS",
    "Plan",
    "Sampler",
    "SchedulerConfig",
    "State",
    "available_samplers",
    "default_sampler_name",
    "get_sampler",
    "img2img_start",
    "make_plan",
    "noised_latents",
    "select_rows",
]

# Read-only: the samplers are shared by every request. The order is the one clients see in ListModels.
SAMPLERS: Mapping[str, Sampler] = MappingProxyType(
    {
        s.name: s
        for s in (
            DDIMSampler(),
            PNDMSampler(),
            EulerSampler(),
            EulerAncestralSampler(),
            HeunSampler(),
            LMSSampler(),
            DPMSolverSampler("dpmpp_2m", sde=False, karras=False),
            DPMSolverSampler("dpmpp_2m_karras", sde=False, karras=True),
            DPMSolverSampler("dpmpp_2m_sde_karras", sde=True, karras=True),
            UniPCSampler(),
            LCMSampler(),
        )
    }
)

# The sampler a model's own scheduler_config.json "_class_name" stands for; other classes get Euler.
DEFAULT_FOR_CLASS: Mapping[str, str] = MappingProxyType(
    {
        "DDIMScheduler": "ddim",
        "PNDMScheduler": "pndm",
        "EulerDiscreteScheduler": "euler",
        "EulerAncestralDiscreteScheduler": "euler_ancestral",
        "HeunDiscreteScheduler": "heun",
        "LMSDiscreteScheduler": "lms",
        "DPMSolverMultistepScheduler": "dpmpp_2m",
        "UniPCMultistepScheduler": "unipc",
        "LCMScheduler": "lcm",
    }
)
FALLBACK_SAMPLER = "euler"

# A server sees few distinct (sampler, config, steps) triples: one config per loaded model times the step counts
# clients ask for. Each plan is a few arrays of `steps` floats, so this bounds memory at well under a megabyte.
PLAN_CACHE_SIZE = 256
# Step counts tried to tell a sampler that cannot run a config at all from one with limits on the steps (PNDM's
# Runge-Kutta warm-up needs 4 steps or more; LCM allows at most its original_inference_steps).
AVAILABILITY_STEPS = (1, 25)


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
    """The sampler the model's own scheduler class is, with its DPM-Solver variant; Euler for other classes."""
    name = DEFAULT_FOR_CLASS.get(config.class_name, FALLBACK_SAMPLER)
    if name == "dpmpp_2m":
        if str(config.option("algorithm_type", "")).startswith("sde"):
            name = "dpmpp_2m_sde_karras"
        elif config.option("use_karras_sigmas") is True:
            name = "dpmpp_2m_karras"
    return name if name in SAMPLERS else FALLBACK_SAMPLER


def available_samplers(config: SchedulerConfig) -> dict[str, str]:
    """Each sampler's name mapped to why it cannot run this config ("" when it can), in SAMPLERS order.

    A sampler that runs at some step count is offered; a request's own step count is checked when it arrives.
    """
    reasons = {}
    for name in SAMPLERS:
        reasons[name] = ""
        for steps in AVAILABILITY_STEPS:
            try:
                make_plan(name, config, steps)
                reasons[name] = ""
                break
            except ValueError as error:
                reasons[name] = str(error)
    return reasons


def img2img_start(plan: Plan, strength: float) -> int:
    """The call index an img2img run at this strength starts from, as diffusers' img2img pipeline picks it.

    strength 1 runs the whole plan from pure noise; lower strengths skip the first (1 - strength) of the steps, whole
    steps of plan.order calls each, and start from the input image noised to that point.
    """
    is_real = isinstance(strength, numbers.Real) and not isinstance(strength, bool)
    if not is_real or not 0 <= strength <= 1 or math.isnan(strength):
        raise ValueError(f"strength={strength!r} is not supported; allowed: a number in 0 .. 1")
    # int() truncates the float product, as diffusers does: 0.29 * 100 is 28.999..., so 28 steps run, not 29.
    run_steps = min(int(plan.steps * strength), plan.steps)
    if run_steps < 1:
        raise ValueError(
            f"strength={strength!r} runs none of {plan.steps} steps; allowed: at least {1 / plan.steps:.3g} here"
        )
    return (plan.steps - run_steps) * plan.order


def noised_latents(plan: Plan, start: int, original: Array, noise: Array) -> Array:
    """img2img's initial latents: the image's latents noised to where call start begins."""
    return get_sampler(plan.sampler).add_noise(plan, start, original, noise)
