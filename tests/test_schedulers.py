"""The numpy samplers against diffusers' EulerDiscreteScheduler and DDIMScheduler as the reference."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from diffuserve.server.schedulers import (
    SAMPLERS,
    SchedulerConfig,
    default_sampler_name,
    get_sampler,
    make_plan,
)

REFERENCE = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler}
# The bar for "the same numerics" (max |ours - theirs| / max |theirs|). Both compute in float32 in the same order and
# differ by the odd last bit: torch's x ** 0.5 is not always sqrt(x); a reciprocal multiplies where diffusers divides.
RTOL = 1e-5
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")

# scheduler/scheduler_config.json of runwayml/stable-diffusion-v1-5, as published.
SD15_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SMALL_SHAPE = (2, 4, 8, 8)

# diffusers' Euler hands a torch tensor to np.array(copy=False), which numpy 2 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max())


def run_both(name: str, d: Mapping[str, Any], steps: int, shape: tuple[int, ...], seed: int) -> None:
    """Denoise with random model outputs through ours and diffusers' scheduler, checking they agree at every step."""
    config = SchedulerConfig.from_dict(d)
    sampler = get_sampler(name)
    plan = make_plan(name, config, steps)
    reference = REFERENCE[name].from_config(dict(d))
    reference.set_timesteps(steps)

    np.testing.assert_array_equal(plan.timesteps, reference.timesteps.numpy().astype(np.float32))
    assert plan.init_noise_sigma == pytest.approx(float(reference.init_noise_sigma), rel=1e-6)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(shape, dtype=np.float32)
    ours = noise * np.float32(plan.init_noise_sigma)
    theirs = torch.from_numpy(noise) * reference.init_noise_sigma
    assert relative_error(ours, theirs.numpy()) <= RTOL

    for index, t in enumerate(reference.timesteps):
        scaled = reference.scale_model_input(theirs, t).numpy()
        assert relative_error(theirs.numpy() * plan.input_scales[index], scaled) <= RTOL, f"input scale, step {index}"
        model_output = rng.standard_normal(shape, dtype=np.float32)
        ours = sampler.step(plan, index, ours, model_output)
        theirs = reference.step(torch.from_numpy(model_output), t, theirs).prev_sample
        assert ours.dtype == np.float32
        error = relative_error(ours, theirs.numpy())
        assert error <= RTOL, f"step {index} (t={t}) of {steps}: relative error {error:.2e}"


def config_dict(**overrides: Any) -> dict[str, Any]:
    """A scheduler_config.json dict; a None override leaves the key out, so the sampler default applies."""
    d: dict[str, Any] = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012}
    d.update(overrides)
    return {key: value for key, value in d.items() if value is not None}


# --- Agreement with diffusers. ---


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_euler_matches_diffusers_for_every_spacing_prediction_offset_and_schedule(
    beta_schedule: str, steps_offset: int, spacing: str, prediction_type: str
) -> None:
    d = config_dict(
        beta_schedule=beta_schedule,
        steps_offset=steps_offset,
        timestep_spacing=spacing,
        prediction_type=prediction_type,
    )
    run_both("euler", d, steps=20, shape=SMALL_SHAPE, seed=0)


@pytest.mark.parametrize("clip_sample", [True, False])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_matches_diffusers_for_every_spacing_prediction_offset_schedule_and_clipping(
    clip_sample: bool,
    set_alpha_to_one: bool,
    beta_schedule: str,
    steps_offset: int,
    spacing: str,
    prediction_type: str,
) -> None:
    d = config_dict(
        clip_sample=clip_sample,
        set_alpha_to_one=set_alpha_to_one,
        beta_schedule=beta_schedule,
        steps_offset=steps_offset,
        timestep_spacing=spacing,
        prediction_type=prediction_type,
    )
    run_both("ddim", d, steps=20, shape=SMALL_SHAPE, seed=1)


@pytest.mark.parametrize("steps", [1, 2, 7, 20, 50])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_matches_diffusers_at_every_step_count(steps: int, spacing: str, name: str) -> None:
    d = config_dict(beta_schedule="scaled_linear", steps_offset=1, timestep_spacing=spacing)
    run_both(name, d, steps=steps, shape=(1, 4, 16, 16), seed=steps)


@pytest.mark.parametrize("steps", [1, 2, 7, 20, 50])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sd15_pndm_config_loaded_into_each_sampler_matches_diffusers(steps: int, name: str) -> None:
    run_both(name, SD15_CONFIG, steps=steps, shape=(1, 4, 64, 64), seed=steps)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_squaredcos_cap_v2_schedule_matches_diffusers(name: str) -> None:
    run_both(name, config_dict(beta_schedule="squaredcos_cap_v2"), steps=25, shape=SMALL_SHAPE, seed=2)


def test_ddim_clip_sample_limits_x0_on_these_random_model_outputs() -> None:
    # Keeps the clip_sample cases above from passing without clipping ever happening.
    rng = np.random.default_rng(4)
    sample, model_output = rng.standard_normal((2, *SMALL_SHAPE), dtype=np.float32)
    clipped, unclipped = (make_plan("ddim", SchedulerConfig(clip_sample=clip), 20) for clip in (True, False))
    ddim = get_sampler("ddim")
    assert not np.allclose(ddim.step(clipped, 0, sample, model_output), ddim.step(unclipped, 0, sample, model_output))


def test_euler_clamps_a_timestep_past_training_like_diffusers() -> None:
    # leading spacing at steps == num_train_timesteps with steps_offset 1 asks for timestep 100 of 0..99.
    d = config_dict(num_train_timesteps=100, timestep_spacing="leading", steps_offset=1)
    run_both("euler", d, steps=100, shape=(1, 1, 2, 2), seed=3)


@st.composite
def random_cases(draw: st.DrawFn) -> tuple[str, dict[str, Any], int, tuple[int, ...], int]:
    name = draw(st.sampled_from(sorted(SAMPLERS)))
    num_train_timesteps = draw(st.one_of(st.just(1000), st.integers(10, 1000)))
    d = config_dict(
        num_train_timesteps=num_train_timesteps,
        beta_start=draw(st.floats(1e-5, 2e-3)),
        beta_end=draw(st.floats(5e-3, 3e-2)),
        beta_schedule=draw(st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"])),
        prediction_type=draw(st.sampled_from(PREDICTION_TYPES)),
        steps_offset=draw(st.sampled_from([0, 1])),
        timestep_spacing=draw(st.sampled_from([None, *SPACINGS])),
        set_alpha_to_one=draw(st.booleans()),
        clip_sample=draw(st.sampled_from([None, True, False])),
        clip_sample_range=draw(st.floats(0.5, 3.0)),
    )
    steps = draw(st.integers(1, min(num_train_timesteps, 60)))
    # Any rank, but at least 32 elements: with a handful, max |expected| can land near zero by chance and turn a
    # one-ulp difference into a large relative error.
    shape = (*draw(st.lists(st.integers(1, 4), max_size=3)), draw(st.integers(32, 64)))
    return name, d, steps, shape, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_cases())
def test_matches_diffusers_for_random_configs_steps_and_shapes(
    case: tuple[str, dict[str, Any], int, tuple[int, ...], int],
) -> None:
    name, d, steps, shape, seed = case
    reference = REFERENCE[name].from_config(d)
    reference.set_timesteps(steps)
    timesteps = reference.timesteps.numpy()
    # Where diffusers itself goes wrong, the tests below pin what we do instead.
    assume(len(timesteps) == steps)
    assume(name == "euler" or timesteps.max() < d["num_train_timesteps"])
    run_both(name, d, steps, shape, seed)


def test_trailing_spacing_keeps_exactly_steps_where_diffusers_adds_one_at_timestep_minus_one() -> None:
    # np.arange(1000, 0, -1000 / 61) has 62 elements; diffusers runs the extra one at timestep -1.
    d = config_dict(timestep_spacing="trailing")
    reference = EulerDiscreteScheduler.from_config(d)
    reference.set_timesteps(61)
    assert len(reference.timesteps) == 62 and reference.timesteps[-1] == -1
    for name in SAMPLERS:
        plan = make_plan(name, SchedulerConfig.from_dict(d), 61)
        np.testing.assert_array_equal(plan.timesteps, reference.timesteps.numpy()[:61])


def test_ddim_rejects_a_steps_offset_that_pushes_a_timestep_past_training() -> None:
    d = config_dict(num_train_timesteps=100, timestep_spacing="leading", steps_offset=1)
    reference = DDIMScheduler.from_config(d)
    reference.set_timesteps(100)
    with pytest.raises(IndexError):  # diffusers indexes alphas_cumprod[100]
        reference.step(torch.zeros(1), reference.timesteps[0], torch.zeros(1))
    with pytest.raises(ValueError, match="steps_offset"):
        make_plan("ddim", SchedulerConfig.from_dict(d), 100)


# --- Sampler defaults for fields the config file leaves out. ---


def test_missing_spacing_and_clipping_take_each_samplers_own_diffusers_default() -> None:
    config = SchedulerConfig.from_dict({"_class_name": "PNDMScheduler"})
    assert config.timestep_spacing is None and config.clip_sample is None
    # Euler's default spacing is linspace (fractional timesteps), DDIM's is leading; DDIM clips by default.
    np.testing.assert_allclose(make_plan("euler", config, 3).timesteps, [999.0, 499.5, 0.0])
    ddim = make_plan("ddim", config, 3)
    np.testing.assert_array_equal(ddim.timesteps, [666, 333, 0])
    assert ddim.clip_sample_range == 1.0


def test_default_sampler_follows_the_config_class_and_falls_back_to_euler() -> None:
    assert default_sampler_name(SchedulerConfig(class_name="DDIMScheduler")) == "ddim"
    assert default_sampler_name(SchedulerConfig(class_name="EulerDiscreteScheduler")) == "euler"
    assert default_sampler_name(SchedulerConfig.from_dict(SD15_CONFIG)) == "euler"
    assert default_sampler_name(SchedulerConfig()) == "euler"


# --- Safety for concurrent requests. ---


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_step_returns_a_new_float32_array_and_leaves_its_inputs_alone(name: str, prediction_type: str) -> None:
    # clip_sample on: DDIM clips its x0 prediction in place, which for x0-prediction starts as the model output.
    plan = make_plan(name, SchedulerConfig(prediction_type=prediction_type, clip_sample=True), 10)
    rng = np.random.default_rng(0)
    sample, model_output = rng.standard_normal((2, *SMALL_SHAPE), dtype=np.float32)
    sample_before, model_output_before = sample.copy(), model_output.copy()
    for index in range(plan.steps):
        out = get_sampler(name).step(plan, index, sample, model_output)
        assert out.dtype == np.float32 and out.shape == sample.shape
        assert not np.shares_memory(out, sample) and not np.shares_memory(out, model_output)
    np.testing.assert_array_equal(sample, sample_before)
    np.testing.assert_array_equal(model_output, model_output_before)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_plans_are_cached_per_config_and_steps_and_cannot_be_modified(name: str) -> None:
    plan = make_plan(name, SchedulerConfig.from_dict(SD15_CONFIG), 10)
    assert make_plan(name, SchedulerConfig.from_dict(dict(SD15_CONFIG)), 10) is plan
    assert make_plan(name, SchedulerConfig.from_dict(SD15_CONFIG), 11) is not plan
    for array in (plan.timesteps, plan.input_scales, plan.sigmas, plan.alpha_prod, plan.alpha_prod_prev):
        with pytest.raises(ValueError, match="read-only"):
            array[0] = 0
    with pytest.raises(AttributeError):
        plan.init_noise_sigma = 2.0  # type: ignore[misc]


def test_step_refuses_another_samplers_plan_and_an_index_past_the_end() -> None:
    plan = make_plan("euler", SchedulerConfig(), 4)
    x = np.zeros(SMALL_SHAPE, np.float32)
    with pytest.raises(ValueError, match="euler"):
        get_sampler("ddim").step(plan, 0, x, x)
    with pytest.raises(IndexError, match="4"):
        get_sampler("euler").step(plan, 4, x, x)


def test_schedulers_module_imports_without_torch_or_diffusers() -> None:
    code = (
        "import sys, diffuserve.server.schedulers; "
        "bad = {'torch', 'diffusers', 'transformers'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- Config parsing and validation. ---


def test_from_dict_ignores_unknown_keys_and_round_trips_through_to_dict_and_json(tmp_path: Path) -> None:
    config = SchedulerConfig.from_dict({**SD15_CONFIG, "some_future_key": [1, 2]})
    assert config == SchedulerConfig(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        set_alpha_to_one=False,
        clip_sample=False,
        class_name="PNDMScheduler",
    )
    assert config.to_dict()["_class_name"] == "PNDMScheduler" and "timestep_spacing" not in config.to_dict()
    assert SchedulerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(SD15_CONFIG))
    assert SchedulerConfig.from_file(path) == config


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"thresholding": True}, "thresholding"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ({"use_karras_sigmas": True}, "use_karras_sigmas"),
        ({"use_exponential_sigmas": True}, "use_exponential_sigmas"),
        ({"use_beta_sigmas": True}, "use_beta_sigmas"),
        ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
        ({"interpolation_type": "log_linear"}, "interpolation_type"),
        ({"final_sigmas_type": "sigma_min"}, "final_sigmas_type"),
        ({"timestep_type": "continuous"}, "timestep_type"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"prediction_type": "flow"}, "prediction_type"),
        ({"timestep_spacing": "uniform"}, "timestep_spacing"),
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
        ({"num_train_timesteps": 1000.0}, "num_train_timesteps"),
        ({"beta_start": 0}, "beta_start"),
        ({"beta_end": 1.5}, "beta_end"),
        ({"steps_offset": -1}, "steps_offset"),
        ({"set_alpha_to_one": "yes"}, "set_alpha_to_one"),
        ({"clip_sample": 1}, "clip_sample"),
        ({"clip_sample_range": 0}, "clip_sample_range"),
    ],
)
def test_from_dict_rejects_unsupported_values_naming_the_key_and_what_is_allowed(
    overrides: dict[str, Any], key: str
) -> None:
    with pytest.raises(ValueError, match=rf"{key}=.*allowed: \S"):
        SchedulerConfig.from_dict(config_dict(**overrides))


def test_from_dict_accepts_supported_values_of_the_guarded_keys() -> None:
    d = config_dict(thresholding=False, use_karras_sigmas=False, interpolation_type="linear", final_sigmas_type="zero")
    assert SchedulerConfig.from_dict({**d, "trained_betas": None, "timestep_spacing": None}) == SchedulerConfig(
        beta_start=0.00085, beta_end=0.012
    )


def test_from_file_rejects_a_file_that_is_not_a_json_object(tmp_path: Path) -> None:
    path = tmp_path / "scheduler_config.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        SchedulerConfig.from_file(path)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, True])
def test_plan_rejects_steps_outside_one_to_num_train_timesteps_naming_the_value(name: str, steps: Any) -> None:
    with pytest.raises(ValueError, match=rf"steps={steps!r}.*1 \.\. 1000"):
        make_plan(name, SchedulerConfig(), steps)


def test_unknown_sampler_name_is_a_value_error_listing_the_allowed_names() -> None:
    for call in (lambda: get_sampler("heun"), lambda: make_plan("heun", SchedulerConfig(), 10)):
        with pytest.raises(ValueError, match="'heun'.*allowed: euler, ddim"):
            call()
