"""The parity gate: each exported component against PyTorch on the same random inputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from diffuserve.engine.base import Engine
from diffuserve.engine.manifest import TIMESTEP, ComponentSpec, TensorSpec

# fp32 graphs agree with PyTorch to about 1e-6 on tiny models; full-size U-Nets accumulate more rounding across
# hundreds of kernels, so the gate allows 1e-3 of the output's magnitude before calling the export broken.
DEFAULT_TOLERANCE = 1e-3


class ParityError(RuntimeError):
    """An exported component's outputs drifted from PyTorch's beyond the tolerance."""


@dataclass(frozen=True)
class ParityResult:
    component: str
    max_abs_diff: float
    reference_scale: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance * self.reference_scale

    def to_dict(self) -> dict[str, float]:
        return {
            "max_abs_diff": self.max_abs_diff,
            "reference_scale": self.reference_scale,
            "tolerance": self.tolerance,
        }


def random_feeds(
    spec: ComponentSpec, vocab_size: int, num_train_timesteps: int, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def draw(t: TensorSpec) -> np.ndarray:
        if t.dtype.startswith("int"):
            return rng.integers(0, vocab_size, size=t.shape).astype(t.np_dtype)
        if t.name == TIMESTEP:
            return rng.uniform(0, num_train_timesteps - 1, size=t.shape).astype(t.np_dtype)
        return rng.standard_normal(t.shape).astype(t.np_dtype)

    return {t.name: draw(t) for t in spec.inputs}


@torch.no_grad()
def check_parity(
    module: nn.Module, engine: Engine, feeds: dict[str, np.ndarray], tolerance: float = DEFAULT_TOLERANCE
) -> ParityResult:
    """Max |torch - runtime| over all outputs, against tolerance times the reference's magnitude (at least 1)."""
    spec = engine.spec
    reference = module(*(torch.from_numpy(feeds[t.name]) for t in spec.inputs))
    if isinstance(reference, torch.Tensor):
        reference = (reference,)
    actual = engine.run(feeds)
    diff, scale = 0.0, 1.0
    for t, ref in zip(spec.outputs, reference, strict=True):
        ref = ref.float().numpy()
        diff = max(diff, float(np.max(np.abs(actual[t.name].astype(np.float32) - ref))))
        scale = max(scale, float(np.max(np.abs(ref))))
    return ParityResult(spec.name, diff, scale, tolerance)
