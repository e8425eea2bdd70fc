"""PNDM: diffusers' PNDMScheduler, pseudo linear multistep steps (Liu et al. 2022, "Pseudo Numerical Methods for
Diffusion Models on Manifolds").

Each step moves the VP sample x_t to x_t' along the DDIM transfer of an eps estimate (the paper's eq. 9). PLMS (eq. 12)
estimates eps by Adams-Bashforth over the last four U-Net outputs. It needs a history to start from: with
skip_prk_steps (Stable Diffusion 1.x's config) the first step is taken twice, once with its own eps to evaluate the
U-Net at the next timestep and again from the same sample with the mean of both outputs (second order, as in
crowsonkb's PLMS for latent diffusion), giving steps + 1 calls. Without it (diffusers' class default), three pseudo
Runge-Kutta steps of four calls each (eq. 13, F-PNDM's warm-up) come first.

What a call does depends on how many calls the run has made, not on its index: diffusers' PNDM counts from zero
wherever a run starts, and img2img starts it in the middle of the plan. So the State carries that count with the eps
history, and the plan keeps the whole training alpha table for the timestep pair each call works out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Array, Plan, State, check_step, frozen, no_noise, vp_plan_fields
from .config import SchedulerConfig, refuse_zero_terminal_snr, unsupported
from .ddim import integer_timesteps
from .ops import ax_plus_by, axpy, vp_noised
from .schedule import alphas_cumprod, check_steps

# The pseudo Runge-Kutta warm-up spans the four highest timesteps: three steps of four calls (stages) each.
RUNGE_KUTTA_TIMESTEPS = 4
RUNGE_KUTTA_STAGES = 4
# The Adams-Bashforth eps history a step keeps for the next: the three outputs before the current one.
HISTORY = 3
# Runge-Kutta weights of the four stage outputs (1/6, 1/3, 1/3, 1/6), rounded to float32 as torch rounds a Python
# scalar that multiplies a float32 tensor.
SIXTH, THIRD = np.float32(1 / 6), np.float32(1 / 3)
# Adams-Bashforth weights, newest output first, and the divisor of their sum (PNDM eq. 12 for order four).
ADAMS_BASHFORTH = {2: ((3, -1), 2), 3: ((23, -16, 5), 12)}
FOURTH_ORDER_WEIGHTS, FOURTH_ORDER_SCALE = (55, -59, 37, -9), np.float32(1 / 24)


@dataclass(frozen=True, eq=False, kw_only=True)
class PNDMPlan(Plan):
    # float32 [num_train_timesteps]: the cumulative alpha product a at every training timestep.
    train_alpha_prod: Array
    # a where a step's target timestep is below 0: 1 with set_alpha_to_one, else a_0.
    final_alpha_prod: float
    # num_train_timesteps // steps: how far a PLMS step moves down, whatever the spacing of the timesteps.
    stride: int
    # The calls of the pseudo Runge-Kutta warm-up a run makes first (0 with skip_prk_steps); their timesteps are the
    # plan's first ones, which a warm-up started later (img2img) still steps from.
    runge_kutta_calls: int


def skip_prk_steps(config: SchedulerConfig) -> bool:
    """The config's skip_prk_steps (default False, diffusers' class default), checked to be a boolean."""
    return config.flag("skip_prk_steps", False)


def plms_timesteps(descending: np.ndarray) -> np.ndarray:
    """Each timestep once, the second twice: the first step is taken again from the same sample (steps + 1 calls)."""
    return np.concatenate([descending[:2], descending[1:]])


def runge_kutta_timesteps(descending: np.ndarray, half_stride: int) -> np.ndarray:
    """The warm-up's calls: for each step down to the next timestep, at its top, twice half_stride above its end,
    and at its end."""
    high = descending[:RUNGE_KUTTA_TIMESTEPS]
    low = high[1:]
    return np.stack([high[:-1], low + half_stride, low + half_stride, low], axis=1).ravel()


def warm_started_timesteps(descending: np.ndarray, half_stride: int) -> np.ndarray:
    """The Runge-Kutta warm-up's calls, then one PLMS call per timestep below those it reached."""
    return np.concatenate([runge_kutta_timesteps(descending, half_stride), descending[RUNGE_KUTTA_TIMESTEPS - 1 :]])


def adams_bashforth(outputs: tuple[np.ndarray, ...]) -> Array:
    """The PLMS eps estimate from the latest 2 to 4 outputs, newest last, summed in diffusers' order."""
    newest_first = outputs[::-1]
    if len(newest_first) == len(FOURTH_ORDER_WEIGHTS):
        weights, divisor = FOURTH_ORDER_WEIGHTS, None
    else:
        weights, divisor = ADAMS_BASHFORTH[len(newest_first)]
    eps = np.multiply(newest_first[0], np.float32(weights[0]), dtype=np.float32)
    term = np.empty_like(eps)
    for weight, output in zip(weights[1:], newest_first[1:], strict=True):
        eps += np.multiply(output, np.float32(weight), out=term)
    if divisor is None:
        eps *= FOURTH_ORDER_SCALE
    else:
        eps /= np.float32(divisor)
    return eps


def mean_of_two(a: np.ndarray, b: np.ndarray) -> Array:
    """(a + b) / 2 in float32."""
    out = np.add(a, b, dtype=np.float32)
    out /= np.float32(2)
    return out


def transfer(
    x: np.ndarray, eps: np.ndarray, alpha_prod: np.float32, alpha_prod_prev: np.float32, prediction_type: str
) -> Array:
    """PNDM eq. 9: x_t to x_t' along eps, i.e. DDIM's step written with one coefficient for x and one for eps."""
    one = np.float32(1)
    if prediction_type == "v_prediction":
        # eps = sqrt(a) * v + sqrt(1 - a) * x (Salimans & Ho 2022).
        eps = ax_plus_by(np.sqrt(alpha_prod), eps, np.sqrt(one - alpha_prod), x)
    x_coefficient = np.sqrt(alpha_prod_prev / alpha_prod)
    eps_denominator = alpha_prod * np.sqrt(one - alpha_prod_prev) + np.sqrt(
        alpha_prod * (one - alpha_prod) * alpha_prod_prev
    )
    moved = np.multiply(eps, alpha_prod_prev - alpha_prod, dtype=np.float32)
    moved /= eps_denominator
    out = np.multiply(x, x_coefficient, dtype=np.float32)
    out -= moved
    return out


def alpha_prod_at(plan: PNDMPlan, timestep: int) -> np.float32:
    """a at a timestep; below 0 (past the last step) the final one."""
    return plan.train_alpha_prod[timestep] if timestep >= 0 else np.float32(plan.final_alpha_prod)


class PNDMSampler:
    """PLMS steps after a two-call first step (skip_prk_steps) or a pseudo Runge-Kutta warm-up."""

    __slots__ = ()
    name: str = "pndm"

    def plan(self, config: SchedulerConfig, steps: int) -> PNDMPlan:
        check_steps(config, steps)
        refuse_zero_terminal_snr(config, "PNDMScheduler")
        if config.prediction_type not in ("epsilon", "v_prediction"):
            # diffusers' PNDM raises at its first step for an x0-predicting model.
            raise unsupported("prediction_type", config.prediction_type, "epsilon, v_prediction")
        n = config.num_train_timesteps
        descending = integer_timesteps(config, steps, "leading")
        stride = n // steps
        if skip_prk_steps(config):
            timesteps, runge_kutta_calls = plms_timesteps(descending), 0
        else:
            if steps < RUNGE_KUTTA_TIMESTEPS:
                # diffusers' set_timesteps fails to build a warm-up shorter than its three steps.
                raise ValueError(
                    f"steps={steps} is too few for the Runge-Kutta warm-up of skip_prk_steps=false; allowed: steps >="
                    f" {RUNGE_KUTTA_TIMESTEPS}, or skip_prk_steps=true"
                )
            timesteps = warm_started_timesteps(descending, stride // 2)
            runge_kutta_calls = RUNGE_KUTTA_STAGES * (RUNGE_KUTTA_TIMESTEPS - 1)
        train_alpha_prod = alphas_cumprod(config)
        # diffusers' PNDM defaults set_alpha_to_one to false where DDIM defaults it to true.
        alpha_to_one = bool(config.set_alpha_to_one)
        return PNDMPlan(
            **vp_plan_fields(self.name, config, steps, timesteps),
            noise_calls=no_noise(len(timesteps)),
            train_alpha_prod=frozen(train_alpha_prod),
            final_alpha_prod=1.0 if alpha_to_one else float(train_alpha_prod[0]),
            stride=stride,
            runge_kutta_calls=runge_kutta_calls,
        )

    def step(
        self, plan: PNDMPlan, index: int, sample: Array, model_output: Array, state: State, noise: Array | None
    ) -> tuple[Array, State]:
        check_step(self.name, plan, index, sample, model_output)
        # calls: how many this run has made; outputs: the eps history; start: the sample a multi-call step began
        # from; stages: the Runge-Kutta sum of the stage outputs so far.
        calls, outputs, start, stages = state or (0, (), None, None)
        timestep = int(plan.timesteps[index])
        if calls < plan.runge_kutta_calls:
            return self._runge_kutta(plan, timestep, calls, sample, model_output, outputs, start, stages)
        if calls == 1:
            # The first step again, from its starting sample, with the mean of its two outputs.
            eps = mean_of_two(model_output, outputs[-1])
            high, low = timestep + plan.stride, timestep
            next_state: State = (calls + 1, outputs, None, None)
            x = start
        else:
            outputs = (*outputs[-HISTORY:], model_output)
            eps = model_output if len(outputs) == 1 else adams_bashforth(outputs)
            high, low = timestep, timestep - plan.stride
            next_state = (calls + 1, outputs[-HISTORY:], sample if calls == 0 else None, None)
            x = sample
        out = transfer(x, eps, alpha_prod_at(plan, high), alpha_prod_at(plan, low), plan.prediction_type)
        return out, next_state

    @staticmethod
    def _runge_kutta(
        plan: PNDMPlan,
        timestep: int,
        calls: int,
        sample: Array,
        model_output: Array,
        outputs: tuple[Array, ...],
        start: Array | None,
        stages: Array | None,
    ) -> tuple[Array, State]:
        """A stage of the warm-up: every stage steps from the sample its Runge-Kutta step began at."""
        stage = calls % RUNGE_KUTTA_STAGES
        eps = model_output
        if stage == 0:
            stages, start = np.multiply(model_output, SIXTH, dtype=np.float32), sample
            outputs = (*outputs, model_output)[-HISTORY:]
        elif stage < RUNGE_KUTTA_STAGES - 1:
            stages = axpy(stages, THIRD, model_output)
        else:
            eps, stages = axpy(stages, SIXTH, model_output), None
        # Every stage starts at the timestep of the warm-up step with this count, even where img2img started the run
        # elsewhere; the even stages aim half a stride below this call's timestep, the odd ones at it.
        high = int(plan.timesteps[calls - stage])
        low = timestep - (0 if calls % 2 else plan.stride // 2)
        out = transfer(start, eps, alpha_prod_at(plan, high), alpha_prod_at(plan, low), plan.prediction_type)
        return out, (calls + 1, outputs, None if stages is None else start, stages)

    def add_noise(self, plan: PNDMPlan, index: int, original: Array, noise: Array) -> Array:
        return vp_noised(original, noise, plan.train_alpha_prod[int(plan.timesteps[index])])
