"""UniPC: diffusers' UniPCMultistepScheduler, the B(h) = e^h - 1 (bh2) data-prediction variant.

Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models". Like
DPM-Solver++ (dpm.py, whose noise levels and data prediction it shares) it integrates the linear part of the diffusion
ODE exactly in lambda = log(alpha / sigma) and fits the data predictions x0 of the last p calls by a polynomial in
lambda (the predictor UniP-p). Once the model has been called at the predicted sample, the corrector UniC-p refits
with that new x0 included and replaces the predicted sample before the next predictor step, raising the order by one
at no extra model call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Array, Plan, State, check_step, frozen, no_noise, vp_plan_fields
from .config import SchedulerConfig, unsupported
from .dpm import (
    data_prediction,
    expm1_32,
    log_snr,
    noise_levels,
    refuse_flow_sigmas,
    vp_noised_at,
    vp_scales,
)
from .ops import ax_plus_by
from .schedule import check_steps

# diffusers maps DPM-Solver's solver types onto bh2, so a DPM-Solver model config runs UniPC as bh2.
SOLVER_TYPES = {"bh2": "bh2", "midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}
# diffusers computes UniPC's weights in float32 by recurrences that lose a digit per order to cancellation; from order
# 3 on they hang on the last bit of torch's (MKL's, not correctly rounded) sqrt, and we differ from diffusers by up to
# 1e-4 at 20 - 50 steps. Order 2 stays within 1e-5 up to about 100 steps.
MAX_SOLVER_ORDER = 2


@dataclass(frozen=True, eq=False, kw_only=True)
class UniPCPlan(Plan):
    # float32 [calls + 1]: the VE noise level s of the sample entering each call, then of the result (0).
    sigmas: Array
    # float32 [calls + 1]: alpha = 1 / sqrt(s^2 + 1) and sigma = s * alpha, the VP scales at each noise level.
    alphas: Array
    noise_scales: Array
    # How many earlier x0 the state keeps: the corrector fits up to solver_order of them, the predictor one fewer.
    solver_order: int
    # int [calls]: the highest predictor order each call may use; lower at the end (lower_order_final).
    order_caps: np.ndarray
    # bool [calls]: whether the corrector runs at each call that has a previous one in its run (disable_corrector).
    corrects: np.ndarray
    # float32 [calls]: call i's first-order step is sample_coefs[i] * x - term_coefs[i] * x0, and its higher-order
    # terms (the predictor's, and the next call's corrector's) are scaled by term_coefs[i] too: alpha' (e^-h - 1).
    sample_coefs: Array
    term_coefs: Array
    # float32 [calls, solver_order - 1]: r_k = (lambda_{i-k} - lambda_i) / h_i, the k-th earlier noise level of call
    # i in units of its step h_i; the divided difference of x0 over it is D_k = (x0_{i-k} - x0_i) / r_k.
    ratios: Array
    # float32 [calls, solver_order, solver_order]: [i, p - 1, :p - 1] weighs D_1 .. D_{p-1} in the order-p predictor
    # of call i, and corrector_weights[i, p - 1, :p] those and x0_{i+1} - x0_i in the corrector of call i + 1.
    predictor_weights: Array
    corrector_weights: Array


def integer_power(x: Array, exponent: int) -> Array:
    """x ** exponent in float32 by repeated products, which is how torch rounds the small powers needed here."""
    out = np.ones_like(x)
    for _ in range(exponent):
        out = out * x
    return out


def unipc_weights(rks: Array, hh: np.float32, order: int) -> tuple[Array, Array]:
    """The predictor's (order - 1) and corrector's (order) weights of UniPC-bh2 for a step of hh = -h in lambda."""
    # The weights w solve sum_m w_m r_m^(k-1) = k! hh phi_{k+1}(hh) / B(h) for k = 1 .. order (Zhao et al. 2023,
    # UniP and UniC), phi_k the phi-functions of exponential integrators, with B(h) = e^hh - 1 (bh2). Each
    # hh phi_{k+1}(hh) comes from the previous one by a recurrence that cancels, as diffusers computes it.
    h_phi = expm1_32(hh)
    b_h = h_phi
    h_phi_k = h_phi / hh - np.float32(1)
    factorial = 1
    rows, b = [], []
    for k in range(1, order + 1):
        rows.append(integer_power(rks, k - 1))
        b.append(h_phi_k * np.float32(factorial) / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - np.float32(1 / factorial)
    r, b = np.array(rows, np.float32), np.array(b, np.float32)
    # diffusers fixes the single weight of the order-2 predictor and of the order-1 corrector at 1/2.
    predictor = np.float32([0.5]) if order == 2 else np.linalg.solve(r[:-1, :-1], b[:-1]) if order > 2 else b[:0]
    corrector = np.float32([0.5]) if order == 1 else np.linalg.solve(r, b)
    return predictor.astype(np.float32), corrector.astype(np.float32)


def check_unipc_options(config: SchedulerConfig) -> tuple[int, frozenset[int]]:
    """The solver order and the calls before a disabled corrector; refuse what this sampler does not implement."""
    order = config.option("solver_order", 2)
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= MAX_SOLVER_ORDER:
        raise unsupported("solver_order", order, f"an integer in 1 .. {MAX_SOLVER_ORDER}")
    # With the final noise level 0 (the only final_sigmas_type supported), lambda is infinite at the last step:
    # diffusers' bh1 and noise-prediction variants then multiply infinity by zero (NaN), and a last step of order > 1
    # divides by r = 0 (inf). So those are refused; they only work with final_sigmas_type sigma_min.
    solver_type = config.option("solver_type", "bh2")
    if solver_type not in SOLVER_TYPES:
        raise unsupported("solver_type", solver_type, ", ".join(SOLVER_TYPES) + " (bh1 gives NaN at noise level 0)")
    if not config.flag("predict_x0", True):
        raise unsupported("predict_x0", False, "true or null (false gives NaN at noise level 0)")
    lower_order_final = config.flag("lower_order_final", True)
    if order > 1 and not lower_order_final:
        raise unsupported("lower_order_final", False, "true or null with solver_order > 1 (false gives inf)")
    disabled = config.option("disable_corrector", [])
    if not isinstance(disabled, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in disabled):
        raise unsupported("disable_corrector", disabled, "a list of integer step indices or null")
    if config.option("solver_p") is not None:
        raise unsupported("solver_p", config.option("solver_p"), "null")
    refuse_flow_sigmas(config)
    # diffusers' set_timesteps requires a shift mu that Stable Diffusion pipelines never pass, and its constructor
    # refuses shift_terminal without flow sigmas.
    if config.flag("use_dynamic_shifting", False):
        raise unsupported("use_dynamic_shifting", True, "false or null")
    if config.option("shift_terminal") is not None:
        raise unsupported("shift_terminal", config.option("shift_terminal"), "null")
    return order, frozenset(disabled)


class UniPCSampler:
    """UniPC multistep predictor-corrector steps on the data prediction x0 (B(h) = e^h - 1)."""

    __slots__ = ()
    name: str = "unipc"

    def plan(self, config: SchedulerConfig, steps: int) -> UniPCPlan:
        check_steps(config, steps)
        solver_order, disabled = check_unipc_options(config)
        timesteps, sigmas = noise_levels(config, steps)
        alphas, noise_scales = vp_scales(sigmas)
        lambdas = log_snr(alphas, noise_scales)
        h = lambdas[1:] - lambdas[:-1]
        hh = -h
        h_phi = expm1_32(hh)
        ratios = np.zeros((steps, solver_order - 1), np.float32)
        predictor_weights = np.zeros((steps, solver_order, solver_order), np.float32)
        corrector_weights = np.zeros((steps, solver_order, solver_order), np.float32)
        # Plan-time loops over (call, order): the step itself only reads these tables. The last call (h infinite)
        # is always first order and never corrected.
        for i in range(steps - 1):
            for k in range(1, min(i, solver_order - 1) + 1):
                ratios[i, k - 1] = (lambdas[i - k] - lambdas[i]) / h[i]
            for order in range(1, min(i + 1, solver_order) + 1):
                rks = np.append(ratios[i, : order - 1], np.float32(1))
                predictor, corrector = unipc_weights(rks, hh[i], order)
                predictor_weights[i, order - 1, : order - 1] = predictor
                corrector_weights[i, order - 1, :order] = corrector
        return UniPCPlan(
            **vp_plan_fields(self.name, config, steps, timesteps),
            noise_calls=no_noise(steps),
            sigmas=frozen(sigmas),
            alphas=frozen(alphas),
            noise_scales=frozen(noise_scales),
            solver_order=solver_order,
            order_caps=frozen(np.minimum(solver_order, steps - np.arange(steps)), np.int64),
            corrects=frozen([i > 0 and i - 1 not in disabled for i in range(steps)], bool),
            sample_coefs=frozen(noise_scales[1:] / noise_scales[:-1]),
            term_coefs=frozen(alphas[1:] * h_phi),
            ratios=frozen(ratios),
            predictor_weights=frozen(predictor_weights),
            corrector_weights=frozen(corrector_weights),
        )

    def step(
        self, plan: UniPCPlan, index: int, sample: Array, model_output: Array, state: State, noise: Array | None
    ) -> tuple[Array, State]:
        check_step(self.name, plan, index, sample, model_output)
        # x0 comes from the sample as it entered the model, before the corrector revises that sample.
        x0 = data_prediction(sample, model_output, plan.alphas[index], plan.noise_scales[index], plan.prediction_type)
        history: tuple[Array, ...] = ()
        if state:
            previous_order, previous_base, history = state
            if plan.corrects[index]:
                sample = corrected(plan, index - 1, previous_order, previous_base, history, x0)
        # Warm-up: the first calls of a run have fewer earlier x0 to fit.
        order = min(int(plan.order_caps[index]), len(history) + 1)
        # The first-order (DDIM) step: (sigma' / sigma) x - alpha' (e^-h - 1) x0.
        base = ax_plus_by(plan.sample_coefs[index], sample, -plan.term_coefs[index], x0)
        if order == 1:
            out = base.copy()
        else:
            weights = plan.predictor_weights[index, order - 1, : order - 1]
            residual = weighted_differences(weights, plan.ratios[index], history, x0)
            residual *= plan.term_coefs[index]
            out = np.subtract(base, residual, out=residual)
        # The corrector of the next call starts from this call's first-order step and fits up to solver_order x0.
        return out, (order, base, (*history, x0)[-plan.solver_order :])

    def add_noise(self, plan: UniPCPlan, index: int, original: Array, noise: Array) -> Array:
        return vp_noised_at(plan.alphas[index], plan.noise_scales[index], original, noise)


def weighted_differences(weights: Array, ratios: Array, history: tuple[Array, ...], x0: Array) -> Array:
    """sum_k weights[k - 1] * (x0_{-k} - x0) / ratios[k - 1] over the earlier x0 (newest last), a new array."""
    total = None
    for k, weight in enumerate(weights, start=1):
        term = np.subtract(history[-k], x0, dtype=np.float32)
        term /= ratios[k - 1]
        term *= weight
        if total is None:
            total = term
        else:
            total += term
    return total


def corrected(plan: UniPCPlan, previous: int, order: int, base: Array, history: tuple[Array, ...], x0: Array) -> Array:
    """UniC-order: the sample predicted at call previous, refit with x0 of the model call it led to (a new array)."""
    weights = plan.corrector_weights[previous, order - 1, :order]
    anchor = history[-1]
    # The earlier differences are those of the previous predictor, about its own x0 (the newest in history).
    newest = np.subtract(x0, anchor, dtype=np.float32)
    newest *= weights[order - 1]
    if order > 1:
        residual = weighted_differences(weights[: order - 1], plan.ratios[previous], history[:-1], anchor)
        residual += newest
    else:
        residual = newest
    residual *= plan.term_coefs[previous]
    return np.subtract(base, residual, out=residual)
