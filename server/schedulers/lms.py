"""LMS: diffusers' LMSDiscreteScheduler, a fourth-order linear multistep method on the probability-flow ODE.

k-diffusion's sample_lms (Karras et al. 2022 give the ODE dx/dsigma = (x - D(x; sigma)) / sigma): each step integrates
the Lagrange polynomial through the last (up to) four derivatives over [sigma, sigma_next], an Adams-Bashforth method
on the non-uniform sigma grid. The weights depend only on the grid, so the plan holds them; the State holds the
derivatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .base import Array, State, check_step, frozen, no_noise
from .config import SchedulerConfig, refuse_zero_terminal_snr
from .euler import SigmaPlan, discrete_sigmas, sigma_noised, sigma_plan_fields
from .ops import denoised, to_d
from .schedule import check_steps

# The most earlier derivatives a step uses: diffusers' step(order=4), which the pipelines never change.
LMS_ORDER = 4


# The 21-point Gauss-Kronrod rule on [-1, 1] (Piessens et al. 1983, "QUADPACK", qk21; L. W. Fullerton's values), in
# the order QUADPACK accumulates it: the centre, then the +-pairs of the 10-point Gauss rule's nodes, then the rest.
KRONROD_NODES = (
    0.0,
    0.973906528517171720077964012084452,
    0.865063366688984510732096688423493,
    0.679409568299024406234327365114874,
    0.433395394129247190799265943165784,
    0.148874338981631210884826001129720,
    0.995657163025808080735527280689003,
    0.930157491355708226001207180059508,
    0.780817726586416897063717578345042,
    0.562757134668604683339000099272694,
    0.294392862701460198131126603103866,
)
KRONROD_WEIGHTS = (
    0.149445554002916905664936468389821,
    0.032558162307964727478818972459390,
    0.075039674810919952767043140916190,
    0.109387158802297641899210590325805,
    0.134709217311473325928054001771707,
    0.147739104901338491374841515972068,
    0.011694638867371874278064396062192,
    0.054755896574351996031381300244580,
    0.093125454583697605535065465083366,
    0.123491976262065851077958109831074,
    0.142775938577060080797094273138717,
)


@dataclass(frozen=True, eq=False, kw_only=True)
class LMSPlan(SigmaPlan):
    # float32 [calls, LMS_ORDER]: at call i, the weight of the derivative of call i - j, zero past the stencil. The
    # stencil reaches back min(i + 1, LMS_ORDER) calls even where a run started later (img2img) and has fewer
    # derivatives yet: as in diffusers, such a call uses the first weights of the longer stencil.
    coefficients: Array


def stencils(sigmas: Array) -> tuple[Array, npt.NDArray[np.bool_]]:
    """float32 [calls, LMS_ORDER]: the sigmas of calls i, i - 1, ... and which of them are in call i's stencil."""
    calls = len(sigmas) - 1
    back = np.arange(calls)[:, np.newaxis] - np.arange(LMS_ORDER)
    return sigmas[back.clip(0)], back >= 0


def lagrange_basis(tau: np.ndarray, nodes: Array, used: npt.NDArray[np.bool_], j: int) -> Array:
    """float32 [rows, points]: the Lagrange basis polynomial of stencil node j at the points tau, row by row.

    Evaluated in float32, factor by factor in node order, as diffusers' integrand does on torch scalars.
    """
    tau = tau.astype(np.float32)
    value = np.ones(tau.shape, np.float32)
    for k in range(LMS_ORDER):
        if k != j:
            node, in_stencil = nodes[:, k : k + 1], used[:, k : k + 1]
            # A node outside the stencil contributes a factor of exactly 1 (its sigma would divide by zero).
            value *= np.divide(tau - node, nodes[:, j : j + 1] - node, out=np.ones_like(value), where=in_stencil)
    return value


def lms_coefficients(sigmas: Array) -> np.ndarray:
    """The LMS weights of every call [calls, LMS_ORDER]: the integrals of the Lagrange basis over [sigma, sigma_next].

    diffusers integrates each with scipy's quad, whose first 21-point Gauss-Kronrod pass it always accepts here (the
    rule is exact for these cubics): this is that pass, on the same float32 integrand. The exact integrals differ
    from it in the last float32 bit of some weights, and where a step's weighted derivatives nearly cancel (few
    Karras steps over a wide sigma range) that bit alone moves the sample by more than 1e-5 of its size.
    """
    nodes, used = stencils(sigmas)
    lower, upper = sigmas[:-1].astype(np.float64), sigmas[1:].astype(np.float64)
    centre, half = (lower + upper) / 2, (upper - lower) / 2
    offsets = half[:, np.newaxis] * np.array(KRONROD_NODES)
    coefficients = np.zeros((len(lower), LMS_ORDER))
    for j in range(LMS_ORDER):
        rows = used[:, j]
        args = nodes[rows], used[rows], j
        values = lagrange_basis(centre[rows, np.newaxis] + offsets[rows], *args).astype(np.float64)
        values[:, 1:] += lagrange_basis(centre[rows, np.newaxis] - offsets[rows, 1:], *args)
        total = values[:, 0] * KRONROD_WEIGHTS[0]
        for point in range(1, len(KRONROD_NODES)):
            total += values[:, point] * KRONROD_WEIGHTS[point]
        coefficients[rows, j] = total * half[rows]
    return coefficients


def check_distinct(config: SchedulerConfig, steps: int, timesteps: np.ndarray, sigmas: Array) -> None:
    """ValueError where two calls share a sigma: the Lagrange weights divide by their difference (diffusers: NaN)."""
    # Only leading spacing with a steps_offset can do it, pushing timesteps past the last, which they clamp to.
    same = np.flatnonzero(sigmas[1:-1] == sigmas[:-2])
    if same.size:
        first, second = timesteps[same[0]], timesteps[same[0] + 1]
        raise ValueError(
            f"steps_offset={config.steps_offset} at steps={steps} gives timesteps {first:g} and {second:g}, which"
            f" share the sigma of the last training timestep {config.num_train_timesteps - 1}, and LMS cannot step"
            " between equal sigmas; allowed: steps_offset + (steps - 2) * (num_train_timesteps // steps)"
            " < num_train_timesteps - 1"
        )


class LMSSampler:
    """Linear multistep steps of order up to four along the probability-flow ODE."""

    __slots__ = ()
    name: str = "lms"

    def plan(self, config: SchedulerConfig, steps: int) -> LMSPlan:
        check_steps(config, steps)
        refuse_zero_terminal_snr(config, "LMSDiscreteScheduler")
        timesteps, sigmas = discrete_sigmas(config, steps, "linspace")
        check_distinct(config, steps, timesteps, sigmas)
        return LMSPlan(
            **sigma_plan_fields(self.name, config, steps, timesteps, sigmas),
            noise_calls=no_noise(steps),
            # float32 as torch rounds a Python float scalar multiplying a float32 tensor.
            coefficients=frozen(lms_coefficients(sigmas)),
        )

    def step(
        self, plan: LMSPlan, index: int, sample: Array, model_output: Array, state: State, noise: Array | None
    ) -> tuple[Array, State]:
        check_step(self.name, plan, index, sample, model_output)
        sigma = plan.sigmas[index]
        x0 = denoised(sample, model_output, sigma, plan.prediction_type)
        # Newest first, as many as the run has made, up to LMS_ORDER.
        derivatives = (to_d(sample, sigma, x0), *state)[:LMS_ORDER]
        weights = plan.coefficients[index]
        # Summed newest first and the sample last, in diffusers' order; one scratch array for the terms.
        out = np.multiply(derivatives[0], weights[0], dtype=np.float32)
        term = np.empty_like(out)
        for weight, derivative in zip(weights[1:], derivatives[1:], strict=False):
            out += np.multiply(derivative, weight, out=term)
        out += sample
        return out, derivatives

    def add_noise(self, plan: LMSPlan, index: int, original: Array, noise: Array) -> Array:
        return sigma_noised(plan, index, original, noise)
