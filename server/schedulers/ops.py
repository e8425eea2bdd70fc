"""The per-step float32 arithmetic samplers share, in diffusers' order of operations.

The order matters: with x and the model output far apart, x - sqrt(1 - a) * F cancels, and the same result rounded
another way (e.g. x / sqrt(a) - F * sqrt(1 - a) / sqrt(a)) differs from diffusers' by 1e-4 where sqrt(a) is small.
"""

from __future__ import annotations

import numpy as np

from .base import Array


def axpy(x: np.ndarray, a: np.float32, y: np.ndarray) -> Array:
    """x + a * y in float32, the result the only new array."""
    out = np.multiply(y, a, dtype=np.float32)
    out += x
    return out


def ax_plus_by(a: np.float32, x: np.ndarray, b: np.float32, y: np.ndarray) -> Array:
    """a * x + b * y in float32 with one temporary."""
    out = np.multiply(y, b, dtype=np.float32)
    out += np.multiply(x, a, dtype=np.float32)
    return out


def denoised(x: np.ndarray, model_output: np.ndarray, sigma: np.float32, prediction_type: str) -> Array:
    """D(x; sigma), the x0 prediction of an eps-, v- or x0-predicting model, VE form (Karras et al. 2022, table 1)."""
    if prediction_type == "epsilon":
        return axpy(x, -sigma, model_output)
    if prediction_type == "v_prediction":
        # c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1) (Salimans & Ho 2022, v-parametrisation).
        variance = sigma * sigma + np.float32(1)
        out = np.multiply(model_output, -sigma / np.sqrt(variance), dtype=np.float32)
        out += np.divide(x, variance, dtype=np.float32)
        return out
    # An x0-predicting model: D is model_output itself, copied so callers may modify it.
    return np.array(model_output, dtype=np.float32)


def to_d(x: np.ndarray, sigma: np.float32, denoised: np.ndarray) -> Array:
    """The probability-flow ODE derivative dx/dsigma = (x - D) / sigma (Karras et al. 2022, eqs. 1 and 3)."""
    d = np.subtract(x, denoised, dtype=np.float32)
    d /= sigma
    return d


def euler_step(x: np.ndarray, d: np.ndarray, sigma: np.float32, sigma_next: np.float32) -> Array:
    """x + d * (sigma_next - sigma): one Euler step (Karras et al. 2022, Algorithm 2, gamma = 0, first order)."""
    return axpy(x, sigma_next - sigma, d)


def vp_predictions(
    x: np.ndarray, model_output: np.ndarray, alpha_prod: np.float32, prediction_type: str
) -> tuple[Array, Array]:
    """The predicted x0 and eps of x = sqrt(a) * x0 + sqrt(1 - a) * eps (DDIM, Song et al. 2021, eq. 12)."""
    # x0 is always a new array, for the caller to clip in place; eps may be model_output itself.
    signal, noise = np.sqrt(alpha_prod), np.sqrt(np.float32(1) - alpha_prod)
    if prediction_type == "epsilon":
        x0 = axpy(x, -noise, model_output)
        x0 /= signal
        return x0, np.asarray(model_output, dtype=np.float32)
    if prediction_type == "v_prediction":
        # v = sqrt(a) * eps - sqrt(1 - a) * x0 (Salimans & Ho 2022, "Progressive Distillation", sec. 4).
        return ax_plus_by(signal, x, -noise, model_output), ax_plus_by(signal, model_output, noise, x)
    eps = axpy(x, -signal, model_output)
    eps /= noise
    return np.array(model_output, dtype=np.float32), eps


def vp_noised(original: np.ndarray, noise: np.ndarray, alpha_prod: np.float32) -> Array:
    """sqrt(a) * x0 + sqrt(1 - a) * eps: the DDPM forward process q(x_t | x0) at cumulative alpha a."""
    return ax_plus_by(np.sqrt(alpha_prod), original, np.sqrt(np.float32(1) - alpha_prod), noise)
