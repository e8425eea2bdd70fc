"""The DDPM noise schedule and the timestep and sigma grids built on it, computed as diffusers computes them.

Ho et al. 2020, "Denoising Diffusion Probabilistic Models", define the schedule; Karras et al. 2022, "Elucidating the
Design Space of Diffusion-Based Generative Models", the variance-exploding sigma = sqrt((1 - a) / a) view of it; Lin et
al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", its rescaling to zero terminal SNR.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .config import SchedulerConfig

Array = npt.NDArray[np.float32]

# Improved DDPM (Nichol & Dhariwal 2021, eq. 17): the cosine schedule's small offset s, and the cap on each beta that
# keeps the last steps from becoming singular near t = T.
COSINE_OFFSET = 0.008
COSINE_MAX_BETA = 0.999
# Karras et al. 2022, eq. 5: the exponent spacing sigmas densely at the low-noise end.
KARRAS_RHO = 7.0
# Zero terminal SNR makes the last a exactly 0, and its sigma infinite. diffusers' sigma-based schedulers (Euler, Euler
# ancestral, DPM-Solver, UniPC) put float16's smallest positive subnormal there instead, a finite first sigma of ~4096.
ZERO_SNR_TERMINAL_ALPHA_PROD = np.float32(2**-24)


@dataclass(frozen=True)
class BetaDefaults:
    """A diffusers scheduler class's own beta range and schedule, used where the model's config leaves them out."""

    start: float
    end: float
    schedule: str


# Most classes default to DDPM's range; Heun's and LCM's defaults are latent diffusion's.
DDPM_BETAS = BetaDefaults(0.0001, 0.02, "linear")
HEUN_BETAS = BetaDefaults(0.00085, 0.012, "linear")
LCM_BETAS = BetaDefaults(0.00085, 0.012, "scaled_linear")


def check_steps(config: SchedulerConfig, steps: int, most: int | None = None) -> None:
    """ValueError unless steps is an integer in 1 .. most (default: num_train_timesteps)."""
    most = config.num_train_timesteps if most is None else most
    is_integer = isinstance(steps, numbers.Integral) and not isinstance(steps, bool)
    if not is_integer or not 1 <= steps <= most:
        raise ValueError(f"steps={steps!r} is not supported; allowed: an integer in 1 .. {most}")


def betas(config: SchedulerConfig, defaults: BetaDefaults = DDPM_BETAS) -> Array:
    """beta_t for t = 0 .. num_train_timesteps - 1, the DDPM forward-process variances (rescaled where asked)."""
    n = config.num_train_timesteps
    start = defaults.start if config.beta_start is None else config.beta_start
    end = defaults.end if config.beta_end is None else config.beta_end
    schedule = beta_schedule(config, defaults)
    if schedule == "linear":
        scheduled = linspace_float32(start, end, n)
    elif schedule == "scaled_linear":
        # Latent diffusion's schedule: linear in sqrt(beta), squared in float32 as diffusers does.
        scheduled = linspace_float32(math.sqrt(start), math.sqrt(end), n) ** 2
    else:
        scheduled = cosine_betas(n)
    return rescale_zero_terminal_snr(scheduled) if config.rescale_betas_zero_snr else scheduled


def beta_schedule(config: SchedulerConfig, defaults: BetaDefaults = DDPM_BETAS) -> str:
    return defaults.schedule if config.beta_schedule is None else config.beta_schedule


def linspace_float32(start: float, end: float, n: int) -> Array:
    """n evenly spaced float32 values from start to end, rounded exactly as torch.linspace(dtype=float32) does."""
    # A correctly rounded linspace differs from torch's in the last bit of about a third of the betas, and where the
    # cumulative product a is near 1, one bit of a is a large part of the 1 - a that sigma and the noise prediction
    # divide by. torch steps from each end by a float32 step: start + step * i for the first half, end - step *
    # (n - 1 - i) for the rest, each a fused multiply-add (one rounding) in its AVX2 and AVX-512 kernels, which every
    # x86-64 CPU with AVX2 runs (its ATEN_CPU_CAPABILITY=default kernel rounds twice, and differs); in float64 the
    # product of a float32 step and an integer below 2**29 is exact, so only the final cast rounds.
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


def rescale_zero_terminal_snr(betas: Array) -> Array:
    """Betas whose last a is exactly 0 (zero terminal SNR) and first a as before (Lin et al. 2024, Algorithm 1).

    sqrt(a_t) is shifted down by its last value and scaled back up to its first, then turned back into betas: each
    operation in float32 in diffusers' order, so the result is theirs to the bit where torch's sqrt rounds correctly.
    Some CPUs' kernels do not, and as the shift cancels near t = T their last bit moves diffusers' rescaled a there by
    up to a few parts in a million: a spread between CPUs that no implementation can match on all of them.
    """
    alpha_bar_sqrt = np.sqrt(cumprod_float32(np.float32(1) - betas))
    first, last = alpha_bar_sqrt[0], alpha_bar_sqrt[-1]
    alpha_bar_sqrt = (alpha_bar_sqrt - last) * (first / (first - last))
    alpha_bar = alpha_bar_sqrt * alpha_bar_sqrt
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return np.float32(1) - alphas


def cumprod_float32(alphas: Array) -> Array:
    """The running product of float32 factors, as torch.cumprod computes it: accumulated in double, rounded once."""
    return np.cumprod(alphas, dtype=np.float64).astype(np.float32)


def alphas_cumprod(
    config: SchedulerConfig, defaults: BetaDefaults = DDPM_BETAS, *, finite_sigmas: bool = False
) -> Array:
    """a_t = prod_{s <= t} (1 - beta_s), the signal fraction of the DDPM forward process.

    finite_sigmas: as diffusers' sigma-based schedulers hold it, whose zero terminal a (rescale_betas_zero_snr) is
    ZERO_SNR_TERMINAL_ALPHA_PROD; DDIM, PNDM and LCM keep the 0.
    """
    alpha_prod = cumprod_float32(np.float32(1) - betas(config, defaults))
    if finite_sigmas and config.rescale_betas_zero_snr:
        alpha_prod[-1] = ZERO_SNR_TERMINAL_ALPHA_PROD
    return alpha_prod


def check_epsilon_signal(config: SchedulerConfig, timesteps: npt.ArrayLike, alpha_prod: Array) -> None:
    """ValueError where an epsilon model is called at a = 0 (zero terminal SNR), for the samplers that keep that 0.

    There the sample is pure noise: the model's x0 = (x - sqrt(1 - a) eps) / sqrt(a) divides by 0 (inf in diffusers),
    which is why Lin et al. 2024 train zero-SNR models to predict v.
    """
    zero = np.flatnonzero(alpha_prod == 0)
    if config.prediction_type == "epsilon" and zero.size:
        timestep = int(np.asarray(timesteps)[zero[0]])
        raise ValueError(
            f"prediction_type='epsilon' with rescale_betas_zero_snr=true calls the model at timestep {timestep}, where"
            " the signal is 0 and the x0 prediction divides by it (diffusers: inf, or every x0 at the clip limit);"
            " allowed: prediction_type v_prediction or sample, or steps whose timesteps stay below the last training"
            " timestep"
        )


def sigma_from_alpha_prod(alpha_prod: Array) -> Array:
    """sigma = sqrt((1 - a) / a): the variance-exploding noise level of x / sqrt(a) (Karras et al. 2022, sec. 2)."""
    return np.sqrt((np.float32(1) - alpha_prod) / alpha_prod)


def train_sigmas(config: SchedulerConfig, defaults: BetaDefaults = DDPM_BETAS) -> Array:
    """float32 sigma at each training timestep 0 .. num_train_timesteps - 1, ascending, finite at zero terminal SNR."""
    return sigma_from_alpha_prod(alphas_cumprod(config, defaults, finite_sigmas=True))


def spaced_timesteps(spacing: str, num_train_timesteps: int, steps: int, steps_offset: int) -> npt.NDArray[np.float64]:
    """The descending timesteps of each spacing in Lin et al. 2024, "Common Diffusion Noise Schedules ...", table 2."""
    n = num_train_timesteps
    if spacing == "linspace":
        # Fractional: Euler interpolates sigma between training timesteps; DDIM rounds.
        return np.linspace(0, n - 1, steps)[::-1].copy()
    if spacing == "leading":
        return (np.arange(steps) * (n // steps))[::-1] + float(steps_offset)
    # Trailing: the first `steps` of the grid are the intended ones.
    return trailing_grid(n, steps)[:steps] - 1.0


def trailing_grid(num_train_timesteps: int, steps: int) -> npt.NDArray[np.float64]:
    """diffusers' trailing timesteps plus one, with the element too many it has at some step counts.

    np.arange with a float step yields one element too many for some step counts (1000 / 61 ...), which diffusers
    keeps as an extra step at timestep -1.
    """
    return np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / steps))


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int) -> npt.NDArray[np.float64]:
    """steps sigmas from sigma_max down to sigma_min, even in sigma ** (1 / rho) (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** KARRAS_RHO


def sigma_to_t(sigmas: npt.ArrayLike, log_train_sigmas: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    """The fractional training timestep of each sigma, interpolating linearly in log sigma (k-diffusion's t(sigma))."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas), 1e-10))
    above = log_sigma[np.newaxis, :] - log_train_sigmas[:, np.newaxis] >= 0
    # The last training timestep whose sigma is at most this one, kept one short of the end to have a neighbour.
    low = np.cumsum(above, axis=0).argmax(axis=0).clip(max=len(log_train_sigmas) - 2)
    low_log, high_log = log_train_sigmas[low], log_train_sigmas[low + 1]
    w = np.clip((low_log - log_sigma) / (low_log - high_log), 0, 1)
    return (1 - w) * low + w * (low + 1)
