"""PNDM and LCM against diffusers: their own config keys, refusals, and the quirks of diffusers they reproduce."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, PNDMScheduler
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from diffuserve.server.schedulers import INITIAL_STATE, SchedulerConfig, get_sampler, make_plan

from .sampler_reference import (
    SD15_CONFIG,
    SPACINGS,
    config_dict,
    correctly_rounded_torch,  # noqa: F401  (autouse: correctly rounded exp, log, sqrt)
    relative_error,
    step_both,
)

SHAPE = (2, 4, 8, 8)
VP_PREDICTIONS = ("epsilon", "v_prediction")
# See the PNDM property test: below this a at the first timestep, a v model's PNDM step is too ill-conditioned to match
# torch to 1e-5 (Stable Diffusion's schedule has 0.0047 there).
TOP_ALPHA_PROD_FOR_V = 1e-3


def plan_of(name: str, d: dict[str, Any], steps: int) -> Any:
    return make_plan(name, SchedulerConfig.from_dict(d), steps)


def run_pndm(plan: Any, sample: np.ndarray, outputs: np.ndarray) -> list[np.ndarray]:
    """Every call of a PNDM plan on the given model outputs; the sample after each call."""
    pndm, state, samples = get_sampler("pndm"), INITIAL_STATE, []
    for index in range(plan.calls):
        sample, state = pndm.step(plan, index, sample, outputs[index], state, None)
        samples.append(sample)
    return samples


# --- PNDM. ---


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("prediction_type", VP_PREDICTIONS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("skip_prk_steps", [True, False])
def test_pndm_both_modes_match_diffusers_for_every_spacing_prediction_and_final_alpha(
    skip_prk_steps: bool, spacing: str, prediction_type: str, set_alpha_to_one: bool
) -> None:
    d = config_dict(
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing=spacing,
        prediction_type=prediction_type,
        skip_prk_steps=skip_prk_steps,
        set_alpha_to_one=set_alpha_to_one,
    )
    for steps in (4, 5, 13):
        step_both("pndm", d, steps, SHAPE, seed=steps)


@pytest.mark.parametrize("skip_prk_steps", [True, False])
def test_pndm_call_counts_and_timesteps_of_both_modes(skip_prk_steps: bool) -> None:
    plan = plan_of("pndm", {**SD15_CONFIG, "skip_prk_steps": skip_prk_steps}, 20)
    if skip_prk_steps:
        # The first step's pair: timestep 951 twice-evaluated as 951 then 901, 901 again from the start sample.
        assert plan.calls == 21 and plan.runge_kutta_calls == 0
        np.testing.assert_array_equal(plan.timesteps[:4], [951, 901, 901, 851])
    else:
        # Three Runge-Kutta steps of four calls (at t, twice at the midpoint, at the next), then PLMS from 801.
        assert plan.calls == 29 and plan.runge_kutta_calls == 12
        np.testing.assert_array_equal(plan.timesteps[:5], [951, 926, 926, 901, 901])
        np.testing.assert_array_equal(plan.timesteps[11:14], [801, 801, 751])
    assert plan.timesteps[-1] == 1 and plan.order == 1 and not plan.noise_calls.any()
    assert make_plan("pndm", SchedulerConfig.from_dict({**SD15_CONFIG, "skip_prk_steps": True}), 1).calls == 1


@pytest.mark.parametrize("strength", [0.1, 0.3, 0.55, 0.7, 0.9])
@pytest.mark.parametrize("skip_prk_steps", [True, False])
def test_pndm_img2img_restarts_its_count_as_diffusers_does(skip_prk_steps: bool, strength: float) -> None:
    # diffusers' PNDM has no set_begin_index: the run starts its count at 0 mid-plan, so a PLMS run redoes the pair
    # step at its second call, and a warm-up started in the middle steps from the plan's first Runge-Kutta timesteps.
    # 20 steps: starts inside the warm-up (strength 0.9: call 2), just past it, and deep in the PLMS calls.
    d = {**SD15_CONFIG, "skip_prk_steps": skip_prk_steps}
    step_both("pndm", d, 20, SHAPE, seed=int(strength * 100), strength=strength)
    for spacing in ("trailing", "linspace"):
        d = config_dict(
            timestep_spacing=spacing,
            skip_prk_steps=skip_prk_steps,
            prediction_type="v_prediction",
            set_alpha_to_one=True,
        )
        step_both("pndm", d, 10, SHAPE, seed=3, strength=strength)


def test_pndm_second_call_steps_again_from_the_first_calls_sample() -> None:
    # With skip_prk_steps, call 1 ignores the sample it is given: it redoes step 0 from call 0's input sample (State).
    plan = plan_of("pndm", SD15_CONFIG, 10)
    pndm = get_sampler("pndm")
    rng = np.random.default_rng(0)
    x, out0, out1 = rng.standard_normal((3, *SHAPE), dtype=np.float32)
    x1, state = pndm.step(plan, 0, x, out0, INITIAL_STATE, None)
    assert state[0] == 1 and state[2] is x
    a, _ = pndm.step(plan, 1, x1, out1, state, None)
    b, _ = pndm.step(plan, 1, x1 * 2, out1, state, None)
    np.testing.assert_array_equal(a, b)
    # ... whereas the same step from a fresh count would use the sample it is given.
    c, _ = pndm.step(plan, 1, x1 * 2, out1, INITIAL_STATE, None)
    assert not np.allclose(a, c)


def test_pndm_state_keeps_batch_first_arrays_and_only_three_earlier_outputs() -> None:
    plan = plan_of("pndm", {**SD15_CONFIG, "skip_prk_steps": False}, 8)
    rng = np.random.default_rng(1)
    pndm, state = get_sampler("pndm"), INITIAL_STATE
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    for index in range(plan.calls):
        x, state = pndm.step(plan, index, x, rng.standard_normal(SHAPE, dtype=np.float32), state, None)
        calls, outputs, start, stages = state
        assert calls == index + 1 and len(outputs) <= 3
        assert all(a.shape == SHAPE for a in (*outputs, *(s for s in (start, stages) if s is not None)))
    assert start is None and stages is None and len(outputs) == 3


def test_pndm_set_alpha_to_one_changes_only_the_last_step() -> None:
    plans = [plan_of("pndm", {**SD15_CONFIG, "set_alpha_to_one": v}, 10) for v in (True, False)]
    rng = np.random.default_rng(2)
    x, outputs = rng.standard_normal(SHAPE, dtype=np.float32), rng.standard_normal((11, *SHAPE), dtype=np.float32)
    one, zero = (run_pndm(plan, x, outputs) for plan in plans)
    np.testing.assert_array_equal(one[-2], zero[-2])
    assert not np.allclose(one[-1], zero[-1])


def test_pndm_absent_set_alpha_to_one_takes_pndms_own_default_false() -> None:
    step_both("pndm", config_dict(skip_prk_steps=True), 10, SHAPE, seed=4)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_pndm_refuses_a_runge_kutta_warm_up_longer_than_the_steps_like_diffusers(steps: int) -> None:
    d = config_dict(skip_prk_steps=False, set_alpha_to_one=False)
    with pytest.raises(ValueError):  # diffusers fails building the warm-up's timesteps
        PNDMScheduler.from_config(d).set_timesteps(steps)
    with pytest.raises(ValueError, match=rf"steps={steps}.*skip_prk_steps.*allowed: steps >= 4"):
        plan_of("pndm", d, steps)
    step_both("pndm", {**d, "skip_prk_steps": True}, steps, SHAPE, seed=steps)


def test_pndm_refuses_x0_prediction_which_diffusers_refuses_at_its_first_step() -> None:
    d = config_dict(prediction_type="sample", skip_prk_steps=True)
    reference = PNDMScheduler.from_config(d)
    reference.set_timesteps(5)
    with pytest.raises(ValueError, match="prediction_type"):
        reference.step(torch.zeros(1, 4), reference.timesteps[0], torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"prediction_type='sample'.*allowed: epsilon, v_prediction"):
        plan_of("pndm", d, 5)


@pytest.mark.parametrize("value", ["yes", 1, 0.0, [True]])
def test_pndm_refuses_a_skip_prk_steps_that_is_not_a_boolean(value: Any) -> None:
    # Not through make_plan: its cache holds configs equal to this one where 1 == True.
    with pytest.raises(ValueError, match=r"skip_prk_steps=.*allowed: true, false or null"):
        get_sampler("pndm").plan(SchedulerConfig.from_dict(config_dict(skip_prk_steps=value)), 10)


def test_pndm_refuses_a_steps_offset_past_the_training_timesteps() -> None:
    d = config_dict(num_train_timesteps=100, timestep_spacing="leading", steps_offset=1, skip_prk_steps=True)
    with pytest.raises(ValueError, match="steps_offset"):
        plan_of("pndm", d, 100)


@pytest.mark.parametrize("skip_prk_steps", [True, False])
def test_pndm_trailing_keeps_exactly_steps_timesteps_where_diffusers_adds_one_at_minus_one(
    skip_prk_steps: bool,
) -> None:
    # np.arange(1000, 0, -1000 / 61) has 62 elements: diffusers' PNDM keeps an extra timestep -1 (and indexes
    # alphas_cumprod[-1] there). Ours stops before it; every call up to there matches.
    d = config_dict(timestep_spacing="trailing", skip_prk_steps=skip_prk_steps, set_alpha_to_one=False)
    reference = PNDMScheduler.from_config(d)
    reference.set_timesteps(61)
    plan = plan_of("pndm", d, 61)
    assert reference.timesteps[-1] == -1 and len(reference.timesteps) == plan.calls + 1
    np.testing.assert_array_equal(plan.timesteps, reference.timesteps.numpy()[:-1])
    rng = np.random.default_rng(5)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    outputs = rng.standard_normal((plan.calls, *SHAPE), dtype=np.float32)
    theirs = torch.from_numpy(x)
    for index, ours in enumerate(run_pndm(plan, x, outputs)):
        theirs = reference.step(torch.from_numpy(outputs[index]), reference.timesteps[index], theirs).prev_sample
        assert relative_error(ours, theirs.numpy()) <= 1e-5, index


# --- LCM. ---


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("original_steps", [None, 1, 8, 25, 100, 1000])
def test_lcm_original_inference_steps_select_timesteps_as_diffusers_does(
    original_steps: int | None, prediction_type: str
) -> None:
    d = config_dict(
        beta_schedule="scaled_linear", original_inference_steps=original_steps, prediction_type=prediction_type
    )
    most = original_steps or 50
    for steps in sorted({min(most, s) for s in (1, 2, 4, most // 3 or 1, 50)}):
        step_both("lcm", d, steps, SHAPE, seed=steps)


def test_lcm_timesteps_of_the_usual_four_step_run() -> None:
    plan = plan_of("lcm", config_dict(beta_schedule="scaled_linear"), 4)
    np.testing.assert_array_equal(plan.timesteps, [999, 759, 499, 259])
    np.testing.assert_array_equal(plan.noise_calls, [True, True, True, False])


@pytest.mark.parametrize("steps", [51, 60, 1000])
def test_lcm_refuses_more_steps_than_original_inference_steps_naming_the_maximum(steps: int) -> None:
    d = config_dict(beta_schedule="scaled_linear")
    with pytest.raises(ValueError):
        LCMScheduler.from_config(d).set_timesteps(steps)
    with pytest.raises(ValueError, match=rf"steps={steps}\b.*allowed: an integer in 1 \.\. 50"):
        plan_of("lcm", d, steps)
    with pytest.raises(ValueError, match=rf"steps={steps}\b.*1 \.\. 20"):
        plan_of("lcm", {**d, "original_inference_steps": 20}, steps)


@pytest.mark.parametrize("value", [0, -5, 1001, 2.5, True, "50"])
def test_lcm_refuses_an_original_inference_steps_diffusers_cannot_use(value: Any) -> None:
    with pytest.raises(ValueError, match=r"original_inference_steps=.*allowed: an integer in 1 \.\. 1000"):
        plan_of("lcm", config_dict(original_inference_steps=value), 4)


@pytest.mark.parametrize("scaling", [10.0, 10, 1.0, 0.37, 25.5, 0.0, 1000.0])
def test_lcm_timestep_scaling_matches_diffusers(scaling: float) -> None:
    d = config_dict(beta_schedule="scaled_linear", timestep_scaling=scaling, original_inference_steps=100)
    for steps in (1, 4, 9):
        step_both("lcm", d, steps, SHAPE, seed=steps)


def test_lcm_boundary_scalings_are_diffusers_and_the_identity_at_timestep_zero() -> None:
    # original_inference_steps = num_train_timesteps puts the last call at t = 0, where f(x, 0) = x exactly.
    d = config_dict(beta_schedule="scaled_linear", original_inference_steps=1000, timestep_scaling=7.3)
    plan = plan_of("lcm", d, 1000)
    reference = LCMScheduler.from_config(d)
    reference.set_timesteps(1000)
    expected = [reference.get_scalings_for_boundary_condition_discrete(t) for t in reference.timesteps]
    np.testing.assert_allclose(plan.c_skip, [float(s) for s, _ in expected], rtol=1e-6)
    np.testing.assert_allclose(plan.c_out, [float(o) for _, o in expected], rtol=1e-6)
    assert plan.timesteps[-1] == 0 and plan.c_skip[-1] == 1 and plan.c_out[-1] == 0
    rng = np.random.default_rng(6)
    x, out = rng.standard_normal((2, *SHAPE), dtype=np.float32)
    np.testing.assert_array_equal(get_sampler("lcm").step(plan, plan.calls - 1, x, out, INITIAL_STATE, None)[0], x)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), True, "10"])
def test_lcm_refuses_a_timestep_scaling_that_is_not_a_finite_number(value: Any) -> None:
    with pytest.raises(ValueError, match=r"timestep_scaling=.*allowed: a finite number"):
        plan_of("lcm", config_dict(timestep_scaling=value), 4)


def test_lcm_noise_enters_every_call_but_the_last() -> None:
    plan = plan_of("lcm", config_dict(beta_schedule="scaled_linear"), 6)
    rng = np.random.default_rng(7)
    x, out, noise = rng.standard_normal((3, *SHAPE), dtype=np.float32)
    lcm = get_sampler("lcm")
    for index in range(plan.calls - 1):
        a, b = (lcm.step(plan, index, x, out, INITIAL_STATE, n)[0] for n in (noise, -noise))
        assert not np.allclose(a, b)
    with pytest.raises(ValueError, match="noise"):
        lcm.step(plan, 0, x, out, INITIAL_STATE, None)
    assert not plan.noise_calls[-1]
    last = lcm.step(plan, plan.calls - 1, x, out, INITIAL_STATE, None)[0]
    np.testing.assert_array_equal(last, lcm.step(plan, plan.calls - 1, x, out, INITIAL_STATE, noise)[0])


@pytest.mark.parametrize("clip_range", [0.5, 2.0])
def test_lcm_clip_sample_and_its_range_match_diffusers_and_clip_here(clip_range: float) -> None:
    d = config_dict(beta_schedule="scaled_linear", clip_sample=True, clip_sample_range=clip_range)
    step_both("lcm", d, 4, SHAPE, seed=8)
    unclipped = plan_of("lcm", {**d, "clip_sample": False}, 4)
    rng = np.random.default_rng(8)
    x, out, noise = rng.standard_normal((3, *SHAPE), dtype=np.float32)
    lcm = get_sampler("lcm")
    a, b = (lcm.step(p, 1, x, out, INITIAL_STATE, noise)[0] for p in (plan_of("lcm", d, 4), unclipped))
    assert not np.allclose(a, b)


def test_lcm_ignores_set_alpha_to_one_spacing_and_offset_as_diffusers_does() -> None:
    # No LCM timestep is below 0, so the final alpha is never used; set_timesteps reads neither spacing nor offset.
    base = config_dict(beta_schedule="scaled_linear")
    plans = []
    for extra in ({}, {"set_alpha_to_one": False}, {"timestep_spacing": "trailing", "steps_offset": 1}):
        step_both("lcm", {**base, **extra}, 5, SHAPE, seed=9)
        plans.append(plan_of("lcm", {**base, **extra}, 5))
    for plan in plans[1:]:
        for field in ("timesteps", "alpha_prod", "alpha_prod_next", "c_skip", "c_out"):
            np.testing.assert_array_equal(getattr(plan, field), getattr(plans[0], field))


@pytest.mark.parametrize("strength", [0.25, 0.5, 0.8])
def test_lcm_img2img_starts_where_the_img2img_pipeline_does(strength: float) -> None:
    d = config_dict(beta_schedule="scaled_linear", original_inference_steps=30)
    step_both("lcm", d, 8, SHAPE, seed=10, strength=strength)


# --- Random configurations, steps 1-50 and shapes, with each sampler's own keys. ---


def shapes() -> st.SearchStrategy[tuple[int, ...]]:
    # At least 32 elements: with fewer, max |expected| can be near zero and one ulp a large relative error.
    return st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(32, 48)).map(tuple)


def common_keys(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "num_train_timesteps": draw(st.one_of(st.just(1000), st.integers(60, 1000))),
        "beta_start": draw(st.floats(1e-4, 2e-3)),
        "beta_end": draw(st.floats(5e-3, 3e-2)),
        "beta_schedule": draw(st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"])),
        "set_alpha_to_one": draw(st.booleans()),
    }


@st.composite
def pndm_cases(draw: st.DrawFn) -> tuple[dict[str, Any], int, tuple[int, ...], int, float]:
    d = {
        **common_keys(draw),
        "prediction_type": draw(st.sampled_from(VP_PREDICTIONS)),
        "timestep_spacing": draw(st.sampled_from([None, *SPACINGS])),
        "steps_offset": draw(st.sampled_from([0, 1])),
        "skip_prk_steps": draw(st.sampled_from([None, True, False])),
    }
    steps = draw(st.integers(1, 50))
    strength = draw(st.sampled_from([1.0, 1.0, draw(st.floats(0.05, 1.0))]))
    return d, steps, draw(shapes()), draw(st.integers(0, 2**32 - 1)), strength


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pndm_cases())
def test_pndm_matches_diffusers_for_random_configs_steps_shapes_and_strengths(case: Any) -> None:
    d, steps, shape, seed, strength = case
    d = {key: value for key, value in d.items() if value is not None}
    assume(int(steps * strength) >= 1)
    reference = PNDMScheduler.from_config(d)
    try:
        reference.set_timesteps(steps)
    except ValueError:
        # Too few steps for the warm-up: refused by ours too.
        with pytest.raises(ValueError, match="skip_prk_steps"):
            plan_of("pndm", d, steps)
        return
    timesteps = reference.timesteps.numpy()
    # Past training (steps_offset) or at -1 (trailing's extra step): pinned by the tests above.
    assume(timesteps.min() >= 0 and timesteps.max() < d["num_train_timesteps"])
    if d["prediction_type"] == "v_prediction":
        # From a top timestep with a tiny a (the cosine schedule's last, or a linear one with a large beta_end), eq. 9
        # subtracts two terms of size sqrt(a_prev / a) * x that nearly cancel for a v model: a one-ulp difference in
        # a then exceeds the tolerance. torch's linspace rounds the betas that a comes from once (a fused multiply-add)
        # in its AVX2 and AVX-512 kernels, as ours does, and twice in its default one (ATEN_CPU_CAPABILITY=default).
        # Numerics, not a bug.
        assume(float(reference.alphas_cumprod[timesteps.max()]) > TOP_ALPHA_PROD_FOR_V)
    step_both("pndm", d, steps, shape, seed, strength)


@st.composite
def lcm_cases(draw: st.DrawFn) -> tuple[dict[str, Any], int, tuple[int, ...], int, float]:
    d = common_keys(draw)
    original_steps = draw(st.integers(1, min(d["num_train_timesteps"], 200)))
    d.update(
        prediction_type=draw(st.sampled_from(["epsilon", "v_prediction", "sample"])),
        original_inference_steps=original_steps,
        timestep_scaling=draw(st.sampled_from([10.0, draw(st.floats(0.0, 50.0))])),
        clip_sample=draw(st.booleans()),
        clip_sample_range=draw(st.floats(0.5, 3.0)),
    )
    steps = draw(st.integers(1, min(original_steps, 50)))
    strength = draw(st.sampled_from([1.0, draw(st.floats(0.05, 1.0))]))
    return d, steps, draw(shapes()), draw(st.integers(0, 2**32 - 1)), strength


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lcm_cases())
def test_lcm_matches_diffusers_for_random_configs_steps_shapes_and_strengths(case: Any) -> None:
    d, steps, shape, seed, strength = case
    assume(int(steps * strength) >= 1)
    step_both("lcm", d, steps, shape, seed, strength)
