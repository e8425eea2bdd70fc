"""Per-image noise generators for the denoising pipeline, numpy only (this module must never import torch).

Two modes, both seeded per image:

- ``"numpy"``: ``np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)``, stream kept across calls.
- ``"torch_cpu"``: bit for bit what successive ``torch.randn(shape, generator=g)`` calls return for
  ``g = torch.Generator().manual_seed(seed)`` (float32, CPU), so a seed gives the latents a torch/diffusers CPU
  pipeline would start from.

How torch draws float32 normals on the CPU (ATen's CPUGeneratorImpl and cpu/DistributionTemplates.h), all of it
reproduced here:

- The engine is mt19937 seeded with the low 32 bits of the seed (classic init_genrand).
- numel >= 16: one 24-bit uniform per element, then Box-Muller on each block of 16 (8 u1 then 8 u2); when
  numel % 16 != 0 the last 16 elements are recomputed from 16 fresh uniforms. On x86 this is the AVX2 kernel
  (``normal_fill_16_AVX2`` with the Cephes-style float32 ``log256_ps``/``sincos256_ps`` of avx_mathfun.h), on AVX-512
  machines too, since that kernel has no AVX-512 registration and dispatch falls back to the AVX2 one. As built for
  the wheels, the kernel fuses most of those functions' multiply-adds into FMAs; which ones was settled by matching
  torch bit for bit, and each is emulated with a single rounding.
- numel < 16: the serial double-precision Box-Muller (53-bit uniforms from two words, ``log1p``, a cached second
  sample that carries over to later small calls), rounded to float32.

Other CPUs take another path for numel >= 16: aarch64 (ARM) builds, x86 CPUs without AVX2, and x86 run with
``ATEN_CPU_CAPABILITY=default`` use the scalar ``normal_fill_16`` (libm float log/cos/sin), which differs from the AVX2
kernel in the last bit for roughly 40% of elements and is not reproduced. The serial numel < 16 path is the same on
every CPU.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

NOISE_MODES = ("numpy", "torch_cpu")
# Same seed, same image as a diffusers pipeline given CPU torch generators.
DEFAULT_NOISE_MODE = "torch_cpu"

_F32 = np.float32
_BLOCK = 16  # torch's Box-Muller block: 8 u1 then 8 u2
_U24 = _F32(2.0**-24)
_TWO_PI = _F32(2.0 * math.pi)

# Cephes float32 constants as avx_mathfun.h holds them (its double literals rounded to float32).
_SQRT_HALF = _F32(0.707106781186547524)
_SQRT_HALF_MANT = int(_SQRT_HALF.view(np.int32)) & 0x007FFFFF
_LOG_P = tuple(
    _F32(c)
    for c in (
        7.0376836292e-2,
        -1.1514610310e-1,
        1.1676998740e-1,
        -1.2420140846e-1,
        1.4249322787e-1,
        -1.6668057665e-1,
        2.0000714765e-1,
        -2.4999993993e-1,
        3.3333331174e-1,
    )
)
_LOG_Q1 = _F32(-2.12194440e-4)
_LOG_Q2 = _F32(0.693359375)
_FOUR_OVER_PI = _F32(1.27323954473516)
_MINUS_DP1 = _F32(-0.78515625)
_MINUS_DP2 = _F32(-2.4187564849853515625e-4)
_MINUS_DP3 = _F32(-3.77489497744594108e-8)
_SIN_P = (_F32(-1.9515295891e-4), _F32(8.3321608736e-3), _F32(-1.6666654611e-1))
_COS_P = (_F32(2.443315711809948e-5), _F32(-1.388731625493765e-3), _F32(4.166664568298827e-2))


class NoiseGenerator(Protocol):
    """A seeded stream of standard normal noise."""

    def standard_normal(self, shape: tuple[int, ...]) -> np.ndarray:
        """A new C-contiguous float32 array of standard normals; advances the stream."""
        ...


def make_generator(mode: str, seed: int) -> NoiseGenerator:
    """The noise generator for `mode` (one of NOISE_MODES) seeded with `seed`."""
    if mode == "numpy":
        return NumpyGenerator(seed)
    if mode == "torch_cpu":
        return TorchCpuGenerator(seed)
    raise ValueError(f"unknown noise mode {mode!r}: expected one of {', '.join(NOISE_MODES)}")


def draw_noise(generators: Sequence[NoiseGenerator], latent_shape: tuple[int, ...]) -> np.ndarray:
    """[len(generators), *latent_shape] unit gaussian noise, each row the next draw of its image's generator."""
    # One [1, *latent_shape] draw per image, as diffusers draws from a list of generators.
    return np.concatenate([g.standard_normal((1, *latent_shape)) for g in generators])


class NumpyGenerator:
    """numpy's default generator (PCG64), float32 standard normals."""

    def __init__(self, seed: int) -> None:
        self.seed = operator.index(seed)
        self._rng = np.random.default_rng(self.seed)

    def standard_normal(self, shape: tuple[int, ...]) -> np.ndarray:
        """np.random.default_rng(seed).standard_normal(shape, dtype=float32), continuing the stream."""
        return self._rng.standard_normal(_check_shape(shape), dtype=np.float32)


class TorchCpuGenerator:
    """Bit-exact torch.randn on a CPU torch.Generator().manual_seed(seed) (x86 AVX2/AVX-512 path)."""

    def __init__(self, seed: int) -> None:
        seed = operator.index(seed)
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        self.seed = seed
        self._bits = _mt19937(seed & 0xFFFFFFFF)
        # torch's cached second sample of the double Box-Muller, used by the numel < 16 path only.
        self._next_normal: float | None = None

    def standard_normal(self, shape: tuple[int, ...]) -> np.ndarray:
        """What the next torch.randn(shape, generator=g) returns on an x86 CPU, as float32."""
        shape = _check_shape(shape)
        numel = math.prod(shape)
        flat = self._block_normals(numel) if numel >= _BLOCK else self._serial_normals(numel)
        return flat.reshape(shape)

    def _block_normals(self, numel: int) -> np.ndarray:
        """The float32 kernel for numel >= 16: Box-Muller on blocks of 16 uniforms, the tail redrawn."""
        tail = numel % _BLOCK
        words = self._bits.random_raw(numel + _BLOCK if tail else numel)
        if tail:
            # The tail's words are drawn but overwritten: the last 16 outputs come from 16 fresh words.
            words = np.concatenate((words[: numel - tail], words[numel:]))
        normals = _normal_blocks(words)
        if not tail:
            return normals
        out = np.empty(numel, _F32)
        out[: numel - tail] = normals[:-_BLOCK]
        out[numel - _BLOCK :] = normals[-_BLOCK:]
        return out

    def _serial_normals(self, numel: int) -> np.ndarray:
        """The serial double-precision kernel for numel < 16, rounded to float32."""
        return np.array([self._next_double_normal() for _ in range(numel)], dtype=_F32)

    def _next_double_normal(self) -> float:
        """One sample of torch's at::normal_distribution<double>(0, 1), caching the second Box-Muller value."""
        if self._next_normal is not None:
            value, self._next_normal = self._next_normal, None
        else:
            hi1, lo1, hi2, lo2 = self._bits.random_raw(4).tolist()
            u1, u2 = _uniform53(hi1, lo1), _uniform53(hi2, lo2)
            radius = math.sqrt(-2.0 * math.log1p(-u2))
            theta = 2.0 * math.pi * u1
            self._next_normal = radius * math.sin(theta)
            value = radius * math.cos(theta)
        # torch applies value * std + mean, which also turns -0.0 into 0.0.
        return value * 1.0 + 0.0


def _check_shape(shape: int | Iterable[int]) -> tuple[int, ...]:
    """The shape as a tuple of non-negative ints."""
    dims = (operator.index(shape),) if isinstance(shape, int) else tuple(operator.index(d) for d in shape)
    if any(d < 0 for d in dims):
        raise ValueError(f"negative dimension in shape {dims}")
    return dims


def _mt19937(seed32: int) -> np.random.MT19937:
    """numpy's MT19937 in the state torch's mt19937 has right after seeding with `seed32`."""
    bits = np.random.MT19937(0)
    # RandomState.seed is numpy's legacy seeding: init_genrand, as torch does, with pos=624 so the first draw twists
    # the state first, as torch's left_ = 1 does.
    np.random.RandomState(bits).seed(seed32)
    return bits


def _uniform53(hi: int, lo: int) -> float:
    """torch's double uniform in [0, 1) from the 64-bit word (hi << 32) | lo."""
    return (((hi << 32) | lo) & ((1 << 53) - 1)) * 2.0**-53


def _normal_blocks(words: np.ndarray) -> np.ndarray:
    """Box-Muller on consecutive blocks of 16 words (len(words) % 16 == 0), as normal_fill_16_AVX2 does it."""
    uniforms = (words.astype(np.uint32) & 0xFFFFFF).astype(_F32).reshape(-1, 2, 8)
    uniforms *= _U24
    u1 = (_F32(1) - uniforms[:, 0]).reshape(-1)  # [0, 1) -> (0, 1] for the log
    theta = (_TWO_PI * uniforms[:, 1]).reshape(-1)
    radius = np.sqrt(_F32(-2) * _log_ps(u1))
    sin, cos = _sincos_ps(theta)
    out = np.empty_like(uniforms)
    np.multiply(radius.reshape(-1, 8), cos.reshape(-1, 8), out=out[:, 0])
    np.multiply(radius.reshape(-1, 8), sin.reshape(-1, 8), out=out[:, 1])
    # The kernel ends with fma(n, std=1, mean=0): the same value, but -0.0 becomes 0.0.
    out += _F32(0)
    return out.reshape(-1)


def _fma(a: np.ndarray | np.float32, b: np.ndarray, c: np.ndarray | np.float32) -> np.ndarray:
    """a * b + c for float32 values, rounded once to float32 like an FMA instruction (b may be held as float64).

    The product is exact in float64; the sum is rounded to float64 and then to float32. That double rounding can
    differ from one rounding only when the float64 sum lands exactly halfway between two float32 values after an
    inexact addition. Checked over every input _log_ps and _sincos_ps can get (all 2**24 uniforms), it never changes
    their results, so no correction is needed (tests/test_noise.py samples that check; DIFFUSERVE_SLOW_TESTS=1 runs
    all of it).
    """
    total = np.multiply(a, b, dtype=np.float64)
    total += c
    return total.astype(_F32)


def _log_ps(x: np.ndarray) -> np.ndarray:
    """log256_ps for x in (0, 1]: Cephes logf with the exponent split off by bit tricks, as compiled (with FMAs).

    The kernel's handling of x <= 0 and of subnormals is left out: 1 - u is never either.
    """
    bits = x.view(np.int32)
    mant_bits = bits & 0x007FFFFF
    # -1 where the mantissa, scaled into [0.5, 1), is below sqrt(1/2): there Cephes uses 2m - 1 and exponent - 1.
    below = (mant_bits - _SQRT_HALF_MANT) >> 31
    mant_bits |= 0x3F000000
    mant = mant_bits.view(_F32)
    x = mant - _F32(1)
    x += (mant_bits & below).view(_F32)  # (m - 1) + m = 2m - 1, exact like m - 1
    e = ((bits >> 23) + below - 0x7E).astype(_F32)  # biased exponent - 127 + 1, as the kernel builds it
    z = x * x
    x64 = x.astype(np.float64)
    y = _fma(_LOG_P[0], x64, _LOG_P[1])
    for coeff in _LOG_P[2:]:
        y = _fma(y, x64, coeff)
    y *= x
    # y * z + e * q1: the compiler fuses the first product and rounds e * q1 on its own.
    y = _fma(y, z, e * _LOG_Q1)
    y -= z * _F32(0.5)
    # e * q2 is exact (small integer times a 9-bit constant), so the fused add rounds like this one.
    y += x
    y += e * _LOG_Q2
    return y


def _sincos_ps(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sincos256_ps for x >= 0: Cephes sinf/cosf after an octant reduction, as compiled (with FMAs)."""
    octant = (x * _FOUR_OVER_PI).astype(np.int32)  # truncates, like cvttps
    octant += 1
    octant &= ~1
    y = octant.astype(_F32)
    # Extended-precision x - y * pi/4: y * DP1 and y * DP2 are exact (y <= 8), so only the DP3 step is fused.
    x = x + y * _MINUS_DP1
    x += y * _MINUS_DP2
    x = _fma(y, _MINUS_DP3, x)
    z = x * x
    z64 = z.astype(np.float64)
    cos_poly = _fma(_COS_P[0], z64, _COS_P[1])
    cos_poly = _fma(cos_poly, z64, _COS_P[2])
    cos_poly *= z
    cos_poly = _fma(cos_poly, z64, -(z * _F32(0.5)))
    cos_poly += _F32(1)
    sin_poly = _fma(_SIN_P[0], z64, _SIN_P[1])
    sin_poly = _fma(sin_poly, z64, _SIN_P[2])
    sin_poly *= z
    sin_poly = _fma(sin_poly, x, x)
    # Select the polynomial and flip signs with bit operations, as the kernel does (np.where is slower here).
    use_sin_poly = ((octant & 2) >> 1) - 1  # -1 (all bits) where the sine comes from the sine polynomial
    sin_bits, cos_bits = sin_poly.view(np.int32), cos_poly.view(np.int32)
    swapped = (sin_bits ^ cos_bits) & ~use_sin_poly
    sin_out = sin_bits ^ swapped
    cos_out = cos_bits ^ swapped
    sin_out ^= (octant & 4) << 29
    cos_out ^= (~(octant - 2) & 4) << 29
    return sin_out.view(_F32), cos_out.view(_F32)
