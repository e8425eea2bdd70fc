"""A model's scheduler_config.json: the fields every sampler reads, plus the rest for samplers that read more."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# Keys that change the numerics of every diffusers sampler that has them, with the only values ours implement (None:
# the key may also be absent or null). Any other value would silently give different images, so the model is refused.
ONLY_SUPPORTED_VALUES: Mapping[str, tuple[Any, ...]] = {
    "thresholding": (False, None),
    "use_exponential_sigmas": (False, None),
    "use_beta_sigmas": (False, None),
    "trained_betas": (None,),
    "interpolation_type": ("linear", None),
    "final_sigmas_type": ("zero", None),
    "timestep_type": ("discrete", None),
}


def unsupported(key: str, value: object, allowed: object) -> ValueError:
    """The error for a config value no sampler (or not this sampler) implements, naming what is allowed."""
    return ValueError(f"scheduler config {key}={value!r} is not supported; allowed: {allowed}")


def _canonical_json(d: Mapping[str, Any]) -> str:
    """One spelling per JSON object, so equal configs compare and hash equal, and true never equals 1 as it would in
    a tuple (a plan cached for one must not serve the other). NaN and infinity pass, for the samplers to refuse."""
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return _is_int(value) or isinstance(value, float)


@dataclass(frozen=True)
class SchedulerConfig:
    """The model's scheduler_config.json. None = the sampler's own diffusers default."""

    num_train_timesteps: int = 1000
    # None: the sampler's own diffusers default (most: 0.0001 to 0.02, linear; see schedule.BetaDefaults).
    beta_start: float | None = None
    beta_end: float | None = None
    beta_schedule: str | None = None
    prediction_type: str = "epsilon"
    steps_offset: int = 0
    # None: the sampler's own default (e.g. Euler: linspace, DDIM: leading), as diffusers' from_config does.
    timestep_spacing: str | None = None
    # None: the sampler's own default (DDIM and LCM: true, PNDM: false).
    set_alpha_to_one: bool | None = None
    # None: the sampler's own default (DDIM: True; Euler never clips).
    clip_sample: bool | None = None
    clip_sample_range: float = 1.0
    # Rescale the betas to zero terminal SNR (Lin et al. 2024): the last training timestep is pure noise. Only the
    # samplers whose diffusers class has the option run such a model; the others refuse it.
    rescale_betas_zero_snr: bool = False
    # "_class_name" of the file, e.g. "PNDMScheduler".
    class_name: str = ""
    # Every other key of the file as canonical JSON: the sampler-specific ones (solver_order, use_karras_sigmas,
    # skip_prk_steps ...) each sampler reads and checks through option().
    options: str = "{}"

    def __post_init__(self) -> None:
        if not _is_int(self.num_train_timesteps) or self.num_train_timesteps < 1:
            raise unsupported("num_train_timesteps", self.num_train_timesteps, "an integer >= 1")
        for key in ("beta_start", "beta_end"):
            value = getattr(self, key)
            # beta = 0 would make sigma zero at t = 0, where the Euler derivative divides by sigma.
            if value is not None and (not _is_real(value) or not 0 < value < 1):
                raise unsupported(key, value, "a number in (0, 1) or null")
        if self.beta_schedule is not None and self.beta_schedule not in BETA_SCHEDULES:
            raise unsupported("beta_schedule", self.beta_schedule, ", ".join(BETA_SCHEDULES) + " or null")
        if self.prediction_type not in PREDICTION_TYPES:
            raise unsupported("prediction_type", self.prediction_type, ", ".join(PREDICTION_TYPES))
        if not _is_int(self.steps_offset) or self.steps_offset < 0:
            raise unsupported("steps_offset", self.steps_offset, "an integer >= 0")
        if self.timestep_spacing is not None and self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise unsupported("timestep_spacing", self.timestep_spacing, ", ".join(TIMESTEP_SPACINGS) + " or null")
        if self.set_alpha_to_one is not None and not isinstance(self.set_alpha_to_one, bool):
            raise unsupported("set_alpha_to_one", self.set_alpha_to_one, "true, false or null")
        if self.clip_sample is not None and not isinstance(self.clip_sample, bool):
            raise unsupported("clip_sample", self.clip_sample, "true, false or null")
        if not _is_real(self.clip_sample_range) or not self.clip_sample_range > 0:
            raise unsupported("clip_sample_range", self.clip_sample_range, "a number > 0")
        if not isinstance(self.rescale_betas_zero_snr, bool):
            raise unsupported("rescale_betas_zero_snr", self.rescale_betas_zero_snr, "true, false or null")
        # The rescaling divides by sqrt(a_0) - sqrt(a_T), which is 0 with a single training timestep (diffusers: NaN).
        if self.rescale_betas_zero_snr and self.num_train_timesteps < 2:
            raise unsupported(
                "num_train_timesteps", self.num_train_timesteps, "an integer >= 2 with rescale_betas_zero_snr"
            )
        if not isinstance(self.class_name, str):
            raise unsupported("_class_name", self.class_name, "a string")
        if not isinstance(self.options, str) or not isinstance(json.loads(self.options), dict):
            raise unsupported("options", self.options, "a JSON object")

    def option(self, key: str, default: Any = None) -> Any:
        """A sampler-specific key of the file; default when it is absent or null."""
        value = json.loads(self.options).get(key)
        return default if value is None else value

    def flag(self, key: str, default: bool) -> bool:
        """A boolean sampler-specific key; unsupported unless true, false or null."""
        value = self.option(key, default)
        if not isinstance(value, bool):
            raise unsupported(key, value, "true, false or null")
        return value

    def positive(self, key: str) -> float | None:
        """A sampler-specific key that is a finite number > 0, or None where it is absent or null."""
        value = self.option(key)
        if value is None:
            return None
        if not _is_real(value) or not 0 < value < math.inf:
            raise unsupported(key, value, "a number > 0 or null")
        return float(value)

    def with_options(self, **overrides: Any) -> SchedulerConfig:
        """This config with some sampler-specific keys set, e.g. a Karras sampler's use_karras_sigmas=True."""
        return replace(self, options=_canonical_json({**json.loads(self.options), **overrides}))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SchedulerConfig:
        """Read a scheduler_config.json dict; unsupported values of the shared keys raise ValueError."""
        for key, allowed in ONLY_SUPPORTED_VALUES.items():
            if key in d and not any(d[key] is value or d[key] == value for value in allowed):
                raise unsupported(key, d[key], " or ".join(json.dumps(value) for value in allowed))
        values: dict[str, Any] = {}
        named = set()
        for field in fields(cls):
            if field.name == "options":
                continue
            key = "_class_name" if field.name == "class_name" else field.name
            named.add(key)
            # JSON null means "not set": the dataclass default, which is the sampler default where that matters.
            if d.get(key) is not None:
                values[field.name] = d[key]
        for key in ("beta_start", "beta_end", "clip_sample_range"):
            # JSON may write a float as an integer (e.g. "clip_sample_range": 1); keep the field a float.
            if type(values.get(key)) is int:
                values[key] = float(values[key])
        # Bookkeeping keys ("_diffusers_version") never change numerics; the shared keys above hold their defaults.
        skip = named | set(ONLY_SUPPORTED_VALUES)
        rest = {k: v for k, v in d.items() if k not in skip and not k.startswith("_") and v is not None}
        return cls(**values, options=_canonical_json(rest))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SchedulerConfig:
        """Read a diffusers scheduler_config.json file."""
        with open(path, encoding="utf-8") as file:
            d = json.load(file)
        if not isinstance(d, dict):
            raise ValueError(f"{os.fspath(path)}: a scheduler config must be a JSON object, got {type(d).__name__}")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        """The scheduler_config.json form that from_dict reads back; unset (None) fields are left out."""
        d = {key: value for key, value in asdict(self).items() if value is not None}
        d.update(json.loads(d.pop("options")))
        class_name = d.pop("class_name")
        if class_name:
            d["_class_name"] = class_name
        return d


def refuse_zero_terminal_snr(config: SchedulerConfig, class_name: str) -> None:
    """A sampler whose diffusers class has no rescale_betas_zero_snr would run the model on the wrong schedule: its
    from_config drops the key, and the model's images come out wrong without failing. Refused instead."""
    if config.rescale_betas_zero_snr:
        raise unsupported("rescale_betas_zero_snr", True, f"false or null ({class_name} has no such option)")
