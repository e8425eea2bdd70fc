"""Model families: how a request's prompts become the U-Net's conditioning, one small module per family.

Each family gives `condition(model, params_list)`: per request, the U-Net inputs that stay fixed over the denoising
loop, name -> array whose first axis is (unconditional, conditional) under classifier-free guidance, or just
(conditional,) without it. The loop, the samplers and the tasks are the same for every family.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

import numpy as np

from diffuserve.engine.manifest import SD1, SD2, SDXL

from . import sd, sdxl

Conditioning = dict[str, np.ndarray]

CONDITIONERS: Mapping[str, Callable[..., list[Conditioning]]] = MappingProxyType(
    {SD1: sd.condition, SD2: sd.condition, SDXL: sdxl.condition}
)


def condition(model, params: Sequence) -> list[Conditioning]:
    """The fixed U-Net inputs of each request, by the model's family."""
    return CONDITIONERS[model.manifest.family](model, params)
