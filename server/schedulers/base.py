"""What every sampler shares: the Plan it computes once, the step signature, and the per-request State it threads.

A sampler turns a (config, steps) pair into an immutable Plan once, then steps any number of concurrent requests
through it. Whatever a step must remember for later steps (a multistep method's earlier outputs, Heun's first stage)
is returned to the caller as a State and handed back with the next call: the sampler itself holds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .config import SchedulerConfig

Array = npt.NDArray[np.float32]

# A sampler's memory between steps: a tuple of arrays whose first axis is the batch (one row per image), scalars
# shared by the whole batch, None, or nested tuples of these. () is the state before the first step.
State = tuple[Any, ...]
INITIAL_STATE: State = ()


@dataclass(frozen=True, eq=False, kw_only=True)
class Plan:
    """Everything a sampler needs for one (config, steps) pair, computed once; its arrays are read-only.

    One index of the plan is one U-Net call. Most samplers call it once per step; Heun calls it twice (less once), and
    PNDM's first step calls it twice too, so `calls` can exceed `steps`.
    """

    # Name of the sampler that made the plan; its step refuses anyone else's.
    sampler: str
    # What the model predicts: "epsilon", "v_prediction" or "sample" (x0).
    prediction_type: str
    # The number of denoising steps asked for.
    steps: int
    # float32 [calls]: the U-Net's timestep input at each call.
    timesteps: Array
    # float32 [calls]: multiply the latents by this before the U-Net (diffusers' scale_model_input).
    input_scales: Array
    # The initial latents are unit gaussian noise times this.
    init_noise_sigma: float
    # bool [calls]: the calls whose step takes fresh unit gaussian noise, one draw per image from its own generator.
    # A step may draw and not use it (diffusers does at the last step of some samplers): the draw keeps the stream.
    noise_calls: npt.NDArray[np.bool_]
    # U-Net calls per step in the part of the plan img2img can start in (diffusers' scheduler.order).
    order: int = 1

    @property
    def calls(self) -> int:
        return len(self.timesteps)

    def arrays(self) -> list[np.ndarray]:
        """The plan's arrays, for tests that check they are read-only."""
        return [v for f in fields(self) if isinstance(v := getattr(self, f.name), np.ndarray)]


class Sampler(Protocol):
    """A stateless sampler: plan once per (config, steps), then step every request through the shared plan."""

    name: str

    def plan(self, config: SchedulerConfig, steps: int) -> Plan: ...

    def step(
        self, plan: Plan, index: int, sample: Array, model_output: Array, state: State, noise: Array | None
    ) -> tuple[Array, State]:
        """The sample after call index (a new float32 array) and the state for the next call.

        sample, model_output, state and noise are left as they are; noise is given exactly where plan.noise_calls is
        set. The first call of a run (index 0, or img2img's start) gets INITIAL_STATE.
        """
        ...

    def add_noise(self, plan: Plan, index: int, original: Array, noise: Array) -> Array:
        """original latents noised to the level the sample entering call index has (img2img's starting point)."""
        ...


def frozen(array: npt.ArrayLike, dtype: npt.DTypeLike = np.float32) -> np.ndarray:
    """A read-only copy: plans are shared by every request, so nothing may write to them."""
    out = np.array(array, dtype=dtype)
    out.setflags(write=False)
    return out


def vp_plan_fields(name: str, config: SchedulerConfig, steps: int, timesteps: npt.ArrayLike) -> dict[str, Any]:
    """The fields every variance-preserving plan fills the same way: the U-Net takes the sample as it is, and the
    initial latents are unit gaussian noise."""
    calls = len(np.asarray(timesteps))
    return {
        "sampler": name,
        "prediction_type": config.prediction_type,
        "steps": steps,
        "timesteps": frozen(timesteps),
        "input_scales": frozen(np.ones(calls)),
        "init_noise_sigma": 1.0,
    }


def no_noise(calls: int) -> npt.NDArray[np.bool_]:
    return frozen(np.zeros(calls, bool), bool)


def every_call_noise(calls: int) -> npt.NDArray[np.bool_]:
    return frozen(np.ones(calls, bool), bool)


def check_step(name: str, plan: Plan, index: int, sample: np.ndarray, model_output: np.ndarray) -> None:
    if plan.sampler != name:
        raise ValueError(f"a {plan.sampler!r} plan cannot be stepped by the {name!r} sampler")
    if not 0 <= index < plan.calls:
        raise IndexError(f"call index {index} is out of range for a plan of {plan.calls} calls")
    if sample.shape != model_output.shape:
        raise ValueError(f"sample shape {sample.shape} and model_output shape {model_output.shape} differ")


def select_rows(state: Any, rows: npt.NDArray[np.intp]) -> Any:
    """The state of the chosen batch rows, e.g. when a request leaves a shared batch; scalars stay as they are."""
    if isinstance(state, np.ndarray):
        return state[rows]
    if isinstance(state, tuple):
        return tuple(select_rows(part, rows) for part in state)
    return state
