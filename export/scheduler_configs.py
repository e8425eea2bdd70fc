"""The scheduler configs Stable Diffusion releases ship (their scheduler/scheduler_config.json), for models built here.

Every release trains on the same noise schedule (scaled-linear betas 0.00085..0.012 over 1000 steps); they differ
in the default sampler, the prediction type and how inference timesteps are spaced.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

# The training noise schedule every Stable Diffusion release shares.
SD_BETAS: Mapping[str, Any] = MappingProxyType(
    {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
)

# SD 1.5's: PLMS (PNDM without its Runge-Kutta warm-up), epsilon prediction.
SD1_SCHEDULER_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "_class_name": "PNDMScheduler",
        **SD_BETAS,
        "prediction_type": "epsilon",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "clip_sample": False,
    }
)

# SD 2.1's (768 px): DDIM, v-prediction. The release leaves timestep_spacing to DDIM's default, "leading".
SD21_SCHEDULER_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "_class_name": "DDIMScheduler",
        **SD_BETAS,
        "prediction_type": "v_prediction",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "clip_sample": False,
        "trained_betas": None,
    }
)

# Zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"): the betas
# rescaled so the last step is pure noise, and timesteps spaced from the end so sampling starts there. What models
# fine-tuned that way (on SD 2.1, v-prediction) ship on top of SD 2.1's config.
ZERO_SNR_SCHEDULER_OVERRIDES: Mapping[str, Any] = MappingProxyType(
    {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
)

# SDXL 1.0 base's: Euler, epsilon prediction, leading spacing with an offset of 1.
SDXL_SCHEDULER_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "_class_name": "EulerDiscreteScheduler",
        **SD_BETAS,
        "prediction_type": "epsilon",
        "clip_sample": False,
        "interpolation_type": "linear",
        "sample_max_value": 1.0,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None,
        "use_karras_sigmas": False,
    }
)

# Latent Consistency Models' (LCM Dreamshaper v7): consistency steps over the 50 original inference steps.
LCM_SCHEDULER_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "_class_name": "LCMScheduler",
        **SD_BETAS,
        "prediction_type": "epsilon",
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "dynamic_thresholding_ratio": 0.995,
        "original_inference_steps": 50,
        "rescale_betas_zero_snr": False,
        "sample_max_value": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 1,
        "thresholding": False,
        "timestep_scaling": 10.0,
        "timestep_spacing": "leading",
        "trained_betas": None,
    }
)
