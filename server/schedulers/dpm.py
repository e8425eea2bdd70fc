"""DPM-Solver++(2M): diffusers' DPMSolverMultistepScheduler at solver order 2, as an ODE or an SDE solver.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models". The sampler works in
the variance-preserving parametrisation x = alpha * x0 + sigma * eps with alpha = 1 / sqrt(s^2 + 1), sigma = s * alpha
for the variance-exploding noise level s, and integrates the linear part of the diffusion ODE exactly in the half log
signal-to-noise ratio lambda = log(alpha / sigma). Between two noise levels it takes the data prediction x0 as constant
(first order, DDIM) or linear in lambda through the previous call's prediction (second order, multistep "2M"). The SDE
variant integrates the reverse-time SDE the same way and adds fresh noise at every call.

UniPC (unipc.py) shares the noise levels and the data prediction defined here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, localcontext
from types import MappingProxyType
from typing import Any

import numpy as np

from .base import Array, Plan, State, check_step, every_call_noise, frozen, no_noise, vp_plan_fields
from .config import SchedulerConfig, unsupported
from .euler import use_karras_sigmas
from .ops import ax_plus_by, axpy
from .schedule import alphas_cumprod, check_steps, karras_sigmas, sigma_to_t, train_sigmas

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")
# diffusers maps UniPC's and DEIS's solver types onto midpoint, so a UniPC model config runs DPM-Solver++ as midpoint.
SOLVER_TYPES = {"midpoint": "midpoint", "heun": "heun", "logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}
SOLVER_ORDER = 2


@dataclass(frozen=True, eq=False, kw_only=True)
class DPMSolverPlan(Plan):
    # float32 [calls + 1]: the VE noise level s of the sample entering each call, then of the result (0).
    sigmas: Array
    # float32 [calls + 1]: alpha = 1 / sqrt(s^2 + 1), the VP signal scale at each noise level.
    alphas: Array
    # float32 [calls + 1]: sigma = s * alpha, the VP noise scale at each noise level.
    noise_scales: Array
    # float32 [calls]: the next sample is sample_coefs * x + denoised_coefs * x0 + difference_coefs * (x0 - x0_prev)
    # (+ noise_coefs * noise for the SDE), x0 this call's data prediction and x0_prev the previous call's.
    sample_coefs: Array
    denoised_coefs: Array
    # 0 at the first and last call, which are always first order.
    difference_coefs: Array
    # None for the ODE solver.
    noise_coefs: Array | None


def exp32(x: np.ndarray) -> Array:
    """e^x of float32 x, rounded to float32 from float64."""
    # diffusers steps with 0-dim torch tensors, whose exp and log are within a last bit of the correctly rounded
    # result, which bit depending on the CPU (MKL picks a code path per instruction set and vendor). Correct rounding
    # is the one result that is the same everywhere and closest to all of them; numpy's vectorised float32 functions
    # are further off, and UniPC's weights amplify a last-bit difference in them.
    return np.exp(np.asarray(x, np.float64)).astype(np.float32)


def expm1_32(x: np.ndarray) -> Array:
    """e^x - 1 of float32 x without cancellation, rounded to float32 from float64."""
    return np.expm1(np.asarray(x, np.float64)).astype(np.float32)


def log32(x: np.ndarray) -> Array:
    """log x of float32 x, rounded to float32 from float64 (-inf at 0)."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(x, np.float64)).astype(np.float32)


def vp_scales(sigmas: Array) -> tuple[Array, Array]:
    """alpha = 1 / sqrt(s^2 + 1) and sigma = s * alpha: the VP scales of VE noise levels s, in float32."""
    alphas = np.float32(1) / np.sqrt(sigmas * sigmas + np.float32(1))
    return alphas, sigmas * alphas


def log_snr(alphas: Array, noise_scales: Array) -> Array:
    """lambda = log(alpha) - log(sigma), the half log signal-to-noise ratio (+inf where sigma is 0)."""
    return log32(alphas) - log32(noise_scales)


def data_prediction(
    x: np.ndarray, model_output: np.ndarray, alpha: np.float32, noise_scale: np.float32, prediction_type: str
) -> Array:
    """The x0 prediction of an eps-, v- or x0-predicting model at x = alpha * x0 + sigma * eps, a new array."""
    if prediction_type == "epsilon":
        x0 = axpy(x, -noise_scale, model_output)
        x0 /= alpha
        return x0
    if prediction_type == "v_prediction":
        # v = alpha * eps - sigma * x0 (Salimans & Ho 2022), so x0 = alpha * x - sigma * v.
        return ax_plus_by(alpha, x, -noise_scale, model_output)
    # Copied: the caller keeps it as history, and model_output is the caller's to reuse.
    return np.array(model_output, dtype=np.float32)


def vp_noised_at(alpha: np.float32, noise_scale: np.float32, original: np.ndarray, noise: np.ndarray) -> Array:
    """alpha * x0 + sigma * eps: the forward process at one noise level (img2img's starting point)."""
    return ax_plus_by(alpha, original, noise_scale, noise)


# --- The noise levels, shared with UniPC. ---


def refuse_flow_sigmas(config: SchedulerConfig) -> None:
    """Flow-matching sigmas belong to other model families (SD3, Flux); Stable Diffusion's are discrete DDPM ones."""
    if config.flag("use_flow_sigmas", False):
        raise unsupported("use_flow_sigmas", True, "false or null")


def solver_timesteps(config: SchedulerConfig, steps: int, last_timestep: int) -> np.ndarray:
    """int64 descending timesteps of the DPM-Solver family (their own grids, not DDIM's or Euler's) below last."""
    n = config.num_train_timesteps
    spacing = config.timestep_spacing or "linspace"
    if spacing == "linspace":
        # steps + 1 points rounded to integers; the last (0) is the destination, not a call.
        timesteps = np.linspace(0, last_timestep - 1, steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        timesteps = (np.arange(steps + 1) * (last_timestep // (steps + 1)))[::-1][:-1] + config.steps_offset
    else:
        # np.arange with a float step can yield one element too many (1000 / 61 ...), which diffusers runs as an
        # extra call at timestep -1; the first `steps` are the intended ones, as for Euler and DDIM.
        timesteps = np.arange(last_timestep, 0, -n / steps).round()[:steps] - 1
    timesteps = timesteps.astype(np.int64)
    if len(timesteps) < steps or timesteps.min() < 0:
        raise ValueError(
            f"lambda_min_clipped={config.option('lambda_min_clipped')!r} leaves {last_timestep} training timesteps,"
            f" too few for steps={steps} with {spacing} spacing; allowed: fewer steps or a lower lambda_min_clipped"
        )
    if timesteps.max() >= n:
        raise ValueError(
            f"steps_offset={config.steps_offset} puts timestep {timesteps.max()} past num_train_timesteps={n} at"
            f" steps={steps}; allowed: steps_offset + steps * (num_train_timesteps // (steps + 1)) < {n}"
        )
    return timesteps


def karras_range(config: SchedulerConfig, train: Array) -> tuple[float, float]:
    """The (sigma_min, sigma_max) of a Karras schedule: the config's own, else the ends of the training sigmas."""
    # diffusers keeps these keys of compatible schedulers (Euler's) in a DPM-Solver config too, and reads them here.
    sigma_min, sigma_max = config.positive("sigma_min"), config.positive("sigma_max")
    sigma_min = train[0].item() if sigma_min is None else sigma_min
    sigma_max = train[-1].item() if sigma_max is None else sigma_max
    if not sigma_min < sigma_max:
        raise unsupported("sigma_min", sigma_min, f"a number below sigma_max={sigma_max}")
    return sigma_min, sigma_max


def log_uniform_sigmas(log_train: Array, steps: int) -> np.ndarray:
    """Noise levels evenly spaced in log s over the training range (the uniform-lambda steps of DPM-Solver)."""
    log_min, log_max = log_train[0].item(), log_train[-1].item()
    return np.exp(log_max + np.linspace(0, 1, steps) * (log_min - log_max))


def noise_levels(
    config: SchedulerConfig,
    steps: int,
    *,
    last_timestep: int | None = None,
    lu_lambdas: bool = False,
    round_cosine_timesteps: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """The float32 timesteps [steps] and VE noise levels [steps + 1, ending in 0] of the DPM-Solver family."""
    n = config.num_train_timesteps
    train = train_sigmas(config)
    log_train = np.log(train)
    if use_karras_sigmas(config) or lu_lambdas:
        if use_karras_sigmas(config):
            sigmas = karras_sigmas(*karras_range(config, train), steps)
        else:
            sigmas = log_uniform_sigmas(log_train, steps)
        timesteps = sigma_to_t(sigmas, log_train)
        # DPM-Solver keeps the cosine schedule's fractional timesteps, which its int64 cast then truncates.
        if round_cosine_timesteps or config.beta_schedule != "squaredcos_cap_v2":
            timesteps = timesteps.round()
        timesteps = timesteps.astype(np.int64)
        if np.count_nonzero(timesteps == timesteps[0]) > 1:
            # diffusers finds its first step by timestep and takes the second match: its txt2img run skips a noise
            # level and then indexes past the end of its sigmas. (The cosine schedule crowds its largest sigmas
            # into the last training timesteps.)
            raise ValueError(
                f"steps={steps} gives several calls at the first timestep {timesteps[0]} with these noise levels"
                f" (beta_schedule={config.beta_schedule!r}), where diffusers' txt2img fails; allowed: a step count or"
                " schedule whose first timestep occurs once"
            )
    else:
        timesteps = solver_timesteps(config, steps, n if last_timestep is None else last_timestep)
        sigmas = train[timesteps]
    sigmas = np.append(sigmas, 0.0).astype(np.float32)
    if not np.all(sigmas[1:] < sigmas[:-1]):
        same = timesteps[np.flatnonzero(sigmas[1:] >= sigmas[:-1])[0]]
        raise ValueError(
            f"steps={steps} puts two calls at the noise level of timestep {same} (timestep_spacing="
            f"{config.timestep_spacing or 'linspace'!r}), where diffusers' multistep solvers divide by a zero step;"
            " allowed: fewer steps"
        )
    return timesteps.astype(np.float32), sigmas


# --- DPM-Solver++(2M). ---


def clipped_last_timestep(config: SchedulerConfig) -> int:
    """One past the last training timestep whose lambda is at least lambda_min_clipped (all of them by default).

    The lambda of timestep t is the exact log(sqrt(a_t) / sqrt(1 - a_t)) of our float32 a_t (diffusers' too, bit for
    bit, with torch's AVX2 and AVX-512 kernels), and the threshold is the config's number as written. diffusers
    compares a float32 lambda table with the threshold rounded to float32, and the last bit of that table is however
    torch's log and sqrt rounded on the CPU at hand: a threshold within float32 rounding of a training lambda keeps
    that timestep on some CPUs and clips it on others. Exact lambdas make the choice the same on every CPU, and the
    one the threshold means. (With rescale_betas_zero_snr diffusers' a_t near the last timestep itself varies by CPU,
    in its last bits: see schedule.rescale_zero_terminal_snr.)
    """
    value = config.option("lambda_min_clipped", -math.inf)
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise unsupported("lambda_min_clipped", value, "a number or null")
    n = config.num_train_timesteps
    if value == -math.inf:
        return n
    # lambda rises with a, and lambda >= L exactly where a >= 1 / (1 + e^(-2 L)): one exponential, in decimal
    # arithmetic (software, the same everywhere) to far more digits than float32 a has, which Decimal holds exactly.
    # Every finite float32 lambda lies in (-52, 9), so clamping L to +-64 changes no comparison and keeps e^(-2 L) in
    # range.
    threshold = Decimal(min(max(value, -64.0), 64.0))
    with localcontext() as context:
        context.prec = 40
        bound = 1 / (1 + (-2 * threshold).exp())
        kept = sum(1 for a in alphas_cumprod(config, finite_sigmas=True).tolist() if Decimal(a) >= bound)
    # a falls with t, so the kept timesteps are the first `kept`.
    return kept


def solver_type(config: SchedulerConfig) -> str:
    value = config.option("solver_type", "midpoint")
    if value not in SOLVER_TYPES:
        raise unsupported("solver_type", value, ", ".join(SOLVER_TYPES))
    return SOLVER_TYPES[value]


def check_dpm_options(config: SchedulerConfig) -> None:
    """Refuse what this sampler does not implement; keys without effect here are only type-checked."""
    algorithm = config.option("algorithm_type", "dpmsolver++")
    if algorithm not in ALGORITHMS:
        raise unsupported("algorithm_type", algorithm, ", ".join(ALGORITHMS))
    if config.option("solver_order", SOLVER_ORDER) != SOLVER_ORDER:
        raise unsupported("solver_order", config.option("solver_order"), SOLVER_ORDER)
    # With the final noise level 0 (the only final_sigmas_type supported) diffusers takes a first-order last step
    # whatever these say.
    config.flag("lower_order_final", True)
    config.flag("euler_at_final", False)
    refuse_flow_sigmas(config)
    variance_type = config.option("variance_type")
    # A learned variance would be the second half of the channels of an eps prediction, which diffusers drops.
    if variance_type is not None and config.prediction_type == "epsilon":
        raise unsupported("variance_type", variance_type, "null (with prediction_type epsilon)")


def first_order_coefs(alphas: Array, noise_scales: Array, h: Array, sde: bool) -> tuple[Array, Array, Array | None]:
    """The sample, x0 and noise coefficients of each call's first-order (DDIM-like) step over log-SNR step h."""
    alpha_next, ratio = alphas[1:], noise_scales[1:] / noise_scales[:-1]
    if not sde:
        # x0 held constant over the step: x' = (sigma' / sigma) x - alpha' (e^-h - 1) x0.
        return ratio, -(alpha_next * (exp32(-h) - np.float32(1))), None
    # The SDE counterpart: the decay doubles, and the variance it removes comes back as fresh noise.
    decay = np.float32(1) - exp32(np.float32(-2) * h)
    return ratio * exp32(-h), alpha_next * decay, noise_scales[1:] * np.sqrt(decay)


def difference_coefs(alphas: Array, h: Array, sde: bool, kind: str) -> Array:
    """The coefficient of x0 - x0_prev at each call: the second-order term D1 = (x0 - x0_prev) * h / h_prev."""
    # Second order runs at calls 1 .. calls - 2: the first call of a run has no history and the last lands on
    # noise level 0 (h infinite), where diffusers always steps first order.
    coefs = np.zeros(len(h), np.float32)
    alpha_next, h_prev, h = alphas[2:-1], h[:-2], h[1:-1]
    if not sde:
        em1 = exp32(-h) - np.float32(1)
        if kind == "midpoint":
            d1 = -(np.float32(0.5) * (alpha_next * em1))
        else:
            d1 = alpha_next * (em1 / h + np.float32(1))
    else:
        decay = np.float32(1) - exp32(np.float32(-2) * h)
        if kind == "midpoint":
            d1 = np.float32(0.5) * (alpha_next * decay)
        else:
            d1 = alpha_next * (decay / (np.float32(-2) * h) + np.float32(1))
    # Folded into one coefficient: diffusers rounds D1 first, a last-bit difference on a small term.
    coefs[1:-1] = d1 * (np.float32(1) / (h_prev / h))
    return coefs


class DPMSolverSampler:
    """Multistep DPM-Solver++ of order 2, the ODE or the SDE variant, with or without Karras noise levels."""

    __slots__ = ("name", "settings", "sde")

    def __init__(self, name: str, *, sde: bool, karras: bool) -> None:
        self.name = name
        self.sde = sde
        # What makes this sampler what it is, overriding the model config's keys as diffusers' from_config does.
        settings: dict[str, Any] = {"algorithm_type": ALGORITHMS[sde], "solver_order": SOLVER_ORDER}
        if karras:
            settings["use_karras_sigmas"] = True
        self.settings: Mapping[str, Any] = MappingProxyType(settings)

    def plan(self, config: SchedulerConfig, steps: int) -> DPMSolverPlan:
        check_steps(config, steps)
        config = config.with_options(**self.settings)
        check_dpm_options(config)
        kind = solver_type(config)
        timesteps, sigmas = noise_levels(
            config,
            steps,
            last_timestep=clipped_last_timestep(config),
            lu_lambdas=config.flag("use_lu_lambdas", False),
            round_cosine_timesteps=False,
        )
        alphas, noise_scales = vp_scales(sigmas)
        lambdas = log_snr(alphas, noise_scales)
        h = lambdas[1:] - lambdas[:-1]
        sample_coefs, denoised_coefs, noise_coefs = first_order_coefs(alphas, noise_scales, h, self.sde)
        return DPMSolverPlan(
            **vp_plan_fields(self.name, config, steps, timesteps),
            noise_calls=every_call_noise(steps) if self.sde else no_noise(steps),
            sigmas=frozen(sigmas),
            alphas=frozen(alphas),
            noise_scales=frozen(noise_scales),
            sample_coefs=frozen(sample_coefs),
            denoised_coefs=frozen(denoised_coefs),
            difference_coefs=frozen(difference_coefs(alphas, h, self.sde, kind)),
            noise_coefs=None if noise_coefs is None else frozen(noise_coefs),
        )

    def step(
        self, plan: DPMSolverPlan, index: int, sample: Array, model_output: Array, state: State, noise: Array | None
    ) -> tuple[Array, State]:
        check_step(self.name, plan, index, sample, model_output)
        x0 = data_prediction(sample, model_output, plan.alphas[index], plan.noise_scales[index], plan.prediction_type)
        out = ax_plus_by(plan.sample_coefs[index], sample, plan.denoised_coefs[index], x0)
        # The first call of a run has no history, and the last lands on noise level 0: both first order.
        if state and index < plan.calls - 1:
            (x0_prev,) = state
            difference = np.subtract(x0, x0_prev, dtype=np.float32)
            difference *= plan.difference_coefs[index]
            out += difference
        if plan.noise_coefs is not None:
            if noise is None or noise.shape != sample.shape:
                raise ValueError(f"the {self.name!r} sampler needs noise of the sample's shape at every call")
            out += np.multiply(noise, plan.noise_coefs[index], dtype=np.float32)
        return out, (x0,)

    def add_noise(self, plan: DPMSolverPlan, index: int, original: Array, noise: Array) -> Array:
        return vp_noised_at(plan.alphas[index], plan.noise_scales[index], original, noise)
