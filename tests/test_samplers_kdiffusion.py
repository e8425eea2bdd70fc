"""Euler ancestral, Heun and LMS: their own config keys, plan layouts and the diffusers quirks they reproduce."""

from __future__ import annotations

import inspect
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, LMSDiscreteScheduler
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from diffuserve.server.schedulers import (
    INITIAL_STATE,
    SchedulerConfig,
    available_samplers,
    get_sampler,
    img2img_start,
    make_plan,
    noised_latents,
)
from diffuserve.server.schedulers.lms import lms_coefficients

from .sampler_reference import (
    PREDICTION_TYPES,
    SD15_CONFIG,
    SPACINGS,
    config_dict,
    correctly_rounded_torch,  # noqa: F401  (autouse: correctly rounded exp, log, sqrt)
    reference_scheduler,
    step_both,
)

NAMES = ("euler_ancestral", "heun", "lms")
SMALL_SHAPE = (2, 4, 8, 8)

# diffusers' Euler-family schedulers hand a torch tensor to np.array(copy=False), which numpy 2 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def random_arrays(seed: int, count: int, shape: tuple[int, ...] = SMALL_SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, *shape), dtype=np.float32)


# --- use_karras_sigmas: read by Heun and LMS, dropped by Euler ancestral's class. ---


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", ["heun", "lms"])
def test_karras_sigmas_from_the_config_match_diffusers(name: str, spacing: str) -> None:
    d = config_dict(beta_schedule="scaled_linear", use_karras_sigmas=True, timestep_spacing=spacing)
    for steps in (1, 2, 5, 30):
        step_both(name, d, steps=steps, shape=SMALL_SHAPE, seed=steps)
    step_both(name, d, steps=12, shape=SMALL_SHAPE, seed=3, strength=0.6)
    # Karras sigmas are not the interpolated ones: without the key the plan differs.
    karras, plain = (make_plan(name, SchedulerConfig.from_dict(c), 10) for c in (d, {**d, "use_karras_sigmas": False}))
    assert not np.allclose(karras.sigmas, plain.sigmas)


@pytest.mark.parametrize(("num_train_timesteps", "steps"), [(1000, 61), (102, 47)])
@pytest.mark.parametrize("name", ["euler", "heun", "lms"])
def test_karras_sigma_min_counts_the_extra_trailing_step_at_timestep_minus_one(
    name: str, num_train_timesteps: int, steps: int
) -> None:
    # diffusers' trailing grid has steps + 1 timesteps here, the last -1; its Karras schedule takes sigma_min from
    # that one (the first training sigma, np.interp clamping) and then runs exactly `steps` steps.
    d = config_dict(num_train_timesteps=num_train_timesteps, use_karras_sigmas=True, timestep_spacing="trailing")
    step_both(name, d, steps=steps, shape=SMALL_SHAPE, seed=steps)
    plan = make_plan(name, SchedulerConfig.from_dict(d), steps)
    alpha_prod = reference_scheduler(name, d).alphas_cumprod[0].numpy()
    assert plan.sigmas[-2] == pytest.approx(np.sqrt((np.float32(1) - alpha_prod) / alpha_prod), rel=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name", ["heun", "lms"])
def test_karras_sigmas_match_diffusers_for_every_prediction_type(name: str, prediction_type: str) -> None:
    d = config_dict(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True, prediction_type=prediction_type)
    step_both(name, d, steps=9, shape=SMALL_SHAPE, seed=11)


@pytest.mark.parametrize("value", [True, "yes"])
def test_euler_ancestral_ignores_use_karras_sigmas_as_its_diffusers_class_does(value: Any) -> None:
    d = config_dict(beta_schedule="scaled_linear", use_karras_sigmas=value)
    # from_config keeps the unknown key in .config but passes it to nothing.
    assert "use_karras_sigmas" not in inspect.signature(EulerAncestralDiscreteScheduler.__init__).parameters
    step_both("euler_ancestral", d, steps=15, shape=SMALL_SHAPE, seed=4)
    plain = make_plan("euler_ancestral", SchedulerConfig.from_dict(config_dict(beta_schedule="scaled_linear")), 15)
    np.testing.assert_array_equal(make_plan("euler_ancestral", SchedulerConfig.from_dict(d), 15).sigmas, plain.sigmas)


@pytest.mark.parametrize("name", ["heun", "lms"])
@pytest.mark.parametrize("value", ["yes", 1, [True]])
def test_heun_and_lms_refuse_a_use_karras_sigmas_that_is_not_a_boolean(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=r"use_karras_sigmas=.*allowed: true, false"):
        make_plan(name, SchedulerConfig.from_dict(config_dict(use_karras_sigmas=value)), 10)


# --- Euler ancestral: noise at every call, no x0 prediction. ---


def test_euler_ancestral_refuses_sample_prediction_which_its_diffusers_class_does_not_implement() -> None:
    d = config_dict(prediction_type="sample")
    reference = reference_scheduler("euler_ancestral", d)
    reference.set_timesteps(4)
    with pytest.raises(NotImplementedError):
        reference.step(torch.zeros(1, 4), reference.timesteps[0], torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"prediction_type='sample'.*allowed: epsilon, v_prediction"):
        make_plan("euler_ancestral", SchedulerConfig.from_dict(d), 4)
    reasons = available_samplers(SchedulerConfig.from_dict(d))
    assert "prediction_type" in reasons["euler_ancestral"] and reasons["heun"] == reasons["lms"] == ""


@pytest.mark.parametrize("steps", [1, 2, 10])
def test_euler_ancestral_draws_noise_at_every_call_even_the_last_where_it_adds_none(steps: int) -> None:
    plan = make_plan("euler_ancestral", SchedulerConfig.from_dict(SD15_CONFIG), steps)
    assert plan.noise_calls.all() and plan.calls == steps
    # The last step lands on sigma 0: sigma_up is 0, so its draw only keeps the generators in step with diffusers'.
    assert plan.sigmas_up[-1] == 0 and (plan.sigmas_up[:-1] > 0).all()
    sample, model_output, noise = random_arrays(steps, 3)
    sampler, last = get_sampler("euler_ancestral"), steps - 1
    with_noise = sampler.step(plan, last, sample, model_output, INITIAL_STATE, noise)[0]
    np.testing.assert_array_equal(with_noise, sampler.step(plan, last, sample, model_output, (), noise * 7)[0])
    if steps > 1:
        first = [sampler.step(plan, 0, sample, model_output, (), n)[0] for n in (noise, -noise)]
        assert not np.allclose(*first)
    with pytest.raises(ValueError, match="noise"):
        sampler.step(plan, 0, sample, model_output, INITIAL_STATE, None)


@pytest.mark.parametrize(("spacing", "steps"), [("trailing", 3), ("linspace", 4)])
def test_euler_ancestral_refuses_steps_whose_sigma_down_is_nan_in_diffusers(spacing: str, steps: int) -> None:
    # squaredcos_cap_v2 starts at sigma 20291; a step down to 1.75 leaves sigma_up^2 a rounding above sigma_next^2.
    d = config_dict(beta_schedule="squaredcos_cap_v2", timestep_spacing=spacing)
    reference = reference_scheduler("euler_ancestral", d)
    reference.set_timesteps(steps)
    out = reference.step(torch.zeros(1, 4), reference.timesteps[0], torch.ones(1, 4)).prev_sample
    assert torch.isnan(out).all()
    with pytest.raises(ValueError, match=rf"steps={steps} .*NaN.*allowed: another number of steps"):
        make_plan("euler_ancestral", SchedulerConfig.from_dict(d), steps)
    step_both("euler_ancestral", d, steps=steps + 1, shape=SMALL_SHAPE, seed=0)


def test_euler_ancestral_splits_each_step_into_sigma_down_and_sigma_up_that_add_up_to_sigma_next() -> None:
    plan = make_plan("euler_ancestral", SchedulerConfig.from_dict(SD15_CONFIG), 25)
    down, up, nxt = (a.astype(np.float64) for a in (plan.sigmas_down, plan.sigmas_up, plan.sigmas[1:]))
    np.testing.assert_allclose(down**2 + up**2, nxt**2, rtol=1e-5)
    assert (down <= nxt).all()


# --- Heun: two calls per step but the last, interleaved timesteps, the first stage in the State. ---


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_heun_plan_interleaves_two_calls_per_step_except_the_last(steps: int) -> None:
    plan = make_plan("heun", SchedulerConfig.from_dict(SD15_CONFIG), steps)
    euler = make_plan("euler", SchedulerConfig.from_dict(SD15_CONFIG), steps)
    assert plan.calls == 2 * steps - 1 and plan.order == 2 and not plan.noise_calls.any()
    # Call 2k at step k's timestep and sigma; call 2k + 1 where its Euler stage landed, at step k + 1's.
    np.testing.assert_array_equal(plan.timesteps[::2], euler.timesteps)
    np.testing.assert_array_equal(plan.timesteps[1::2], euler.timesteps[1:])
    np.testing.assert_array_equal(plan.sigmas[::2], euler.sigmas[:-1])
    np.testing.assert_array_equal(plan.sigmas[1::2], euler.sigmas[1:])
    np.testing.assert_array_equal(plan.input_scales[::2], euler.input_scales)


@pytest.mark.parametrize("strength", [0.3, 0.5, 0.95])
def test_heun_img2img_starts_at_a_first_stage_noised_to_that_steps_sigma(strength: float) -> None:
    plan = make_plan("heun", SchedulerConfig.from_dict(SD15_CONFIG), 10)
    start = img2img_start(plan, strength)
    skipped = 10 - int(10 * strength)
    assert start == 2 * skipped
    original, noise = random_arrays(0, 2)
    euler = make_plan("euler", SchedulerConfig.from_dict(SD15_CONFIG), 10)
    expected = noised_latents(euler, skipped, original, noise)
    np.testing.assert_array_equal(noised_latents(plan, start, original, noise), expected)
    step_both("heun", SD15_CONFIG, steps=10, shape=SMALL_SHAPE, seed=5, strength=strength)


def test_heun_keeps_the_first_stage_in_the_state_and_refuses_a_second_stage_without_it() -> None:
    plan = make_plan("heun", SchedulerConfig.from_dict(SD15_CONFIG), 5)
    sampler = get_sampler("heun")
    sample, first_output, second_output = random_arrays(1, 3)
    moved, state = sampler.step(plan, 0, sample, first_output, INITIAL_STATE, None)
    first_sample, derivative = state
    np.testing.assert_array_equal(first_sample, sample)
    assert derivative.shape == sample.shape and derivative.dtype == np.float32
    # The Euler stage moved the sample to sigma_1 along that derivative.
    np.testing.assert_allclose(moved, sample + (plan.sigmas[1] - plan.sigmas[0]) * derivative, rtol=1e-5, atol=1e-5)
    final, state = sampler.step(plan, 1, moved, second_output, state, None)
    assert state == INITIAL_STATE and not np.allclose(final, moved)
    with pytest.raises(ValueError, match="first stage"):
        sampler.step(plan, 1, moved, second_output, INITIAL_STATE, None)


@pytest.mark.parametrize("clip_sample_range", [0.5, 2.0])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_heun_clip_sample_and_its_range_match_diffusers(prediction_type: str, clip_sample_range: float) -> None:
    d = config_dict(clip_sample=True, clip_sample_range=clip_sample_range, prediction_type=prediction_type)
    step_both("heun", d, steps=8, shape=SMALL_SHAPE, seed=6)
    step_both("heun", d, steps=8, shape=SMALL_SHAPE, seed=6, strength=0.5)


def test_heun_clips_by_default_never_and_clipping_changes_these_steps() -> None:
    sample, model_output = random_arrays(2, 2)
    sample *= 3
    plans = {
        clip: make_plan("heun", SchedulerConfig(prediction_type="sample", clip_sample=clip, clip_sample_range=0.5), 6)
        for clip in (None, False, True)
    }
    assert plans[None].clip_sample_range is None and plans[True].clip_sample_range == 0.5
    heun = get_sampler("heun")
    out = {clip: heun.step(plan, 0, sample, model_output, INITIAL_STATE, None)[0] for clip, plan in plans.items()}
    np.testing.assert_array_equal(out[None], out[False])
    assert not np.allclose(out[True], out[False])


# --- LMS: the weights of the plan, the derivatives in the State. ---


def exact_weights(sigmas: np.ndarray, index: int, order: int) -> list[float]:
    """The integrals over [sigma_index, sigma_index+1] of the Lagrange basis on the stencil, in exact arithmetic."""
    nodes = [Fraction(float(sigmas[index - k])) for k in range(order)]
    a, b = Fraction(float(sigmas[index])), Fraction(float(sigmas[index + 1]))
    weights = []
    for j in range(order):
        # prod_{k != j} (tau - s_k) / (s_j - s_k) as monomial coefficients, lowest power first, then integrated.
        poly = [Fraction(1)]
        for k in range(order):
            if k != j:
                shifted = [Fraction(0), *poly]
                lowered = [*(nodes[k] * c for c in poly), Fraction(0)]
                poly = [(hi - lo) / (nodes[j] - nodes[k]) for hi, lo in zip(shifted, lowered, strict=True)]
        weights.append(float(sum(c * (b ** (p + 1) - a ** (p + 1)) / (p + 1) for p, c in enumerate(poly))))
    return weights


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "beta_schedule": "scaled_linear",
            "use_karras_sigmas": True,
            "timestep_spacing": "leading",
            "steps_offset": 1,
        },
        {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True, "timestep_spacing": "trailing"},
    ],
)
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 6, 25])
def test_lms_weights_are_diffusers_quad_integrals_to_the_float32_bit(steps: int, overrides: dict[str, Any]) -> None:
    d = config_dict(**overrides)
    plan = make_plan("lms", SchedulerConfig.from_dict(d), steps)
    reference = LMSDiscreteScheduler.from_config(d)
    reference.set_timesteps(steps)
    # Bitwise on diffusers' own sigmas only: with the CPU's own kernels torch's x ** 0.5 is a bit off at some of
    # them, and the extrapolating Lagrange weights turn one bit of a node into a few parts in a million.
    on_their_sigmas = lms_coefficients(reference.sigmas.numpy())
    for index in range(steps):
        order = min(index + 1, 4)
        theirs = [reference.get_lms_coefficient(order, index, j) for j in range(order)]
        np.testing.assert_array_equal(np.float32(on_their_sigmas[index, :order]), np.float32(theirs))
        np.testing.assert_allclose(plan.coefficients[index, :order], theirs, rtol=1e-5)
        assert (plan.coefficients[index, order:] == 0).all()
        # And they are the exact integrals of the Lagrange basis, to the precision of a float32 integrand.
        exact = exact_weights(plan.sigmas, index, order)
        np.testing.assert_allclose(plan.coefficients[index, :order], exact, rtol=1e-5)
        # The basis sums to 1, so the weights sum to the step's length.
        step = float(plan.sigmas[index + 1]) - float(plan.sigmas[index])
        assert float(sum(exact)) == pytest.approx(step, rel=1e-9)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_lms_matches_diffusers_where_the_exact_weights_would_not(prediction_type: str) -> None:
    # Three Karras steps from sigma 20291 to 0.59: the second step's weighted derivatives cancel to a thousandth of
    # their size, and the exactly integrated weight 10.91332 rounds one float32 bit above quad's 10.913319: ~2e-5 off.
    d = config_dict(
        beta_schedule="squaredcos_cap_v2",
        use_karras_sigmas=True,
        timestep_spacing="trailing",
        prediction_type=prediction_type,
    )
    plan = make_plan("lms", SchedulerConfig.from_dict(d), 3)
    assert np.float32(exact_weights(plan.sigmas, 1, 2)[1]) != plan.coefficients[1, 1]
    for seed in range(3):
        step_both("lms", d, steps=3, shape=(1, 4, 8, 8), seed=seed)


def test_lms_state_holds_the_last_four_derivatives_newest_first() -> None:
    plan = make_plan("lms", SchedulerConfig.from_dict(SD15_CONFIG), 8)
    lms, state = get_sampler("lms"), INITIAL_STATE
    sample, *outputs = random_arrays(3, 1 + plan.calls)
    for index, model_output in enumerate(outputs):
        previous = state
        sample_in = sample
        sample, state = lms.step(plan, index, sample, model_output, state, None)
        assert len(state) == min(index + 1, 4)
        expected = (sample_in - (sample_in - plan.sigmas[index] * model_output)) / plan.sigmas[index]
        np.testing.assert_allclose(state[0], expected, rtol=1e-5, atol=1e-5)
        assert all(new is old for new, old in zip(state[1:], previous, strict=False))


@pytest.mark.parametrize("strength", [0.3, 0.6])
def test_lms_img2img_start_uses_the_first_weight_of_the_full_stencil_as_diffusers_does(strength: float) -> None:
    # diffusers sizes the stencil by the call index, not by the derivatives it has: an img2img run's first step
    # takes the order-4 stencil's weight for the newest derivative alone, which is not an Euler step.
    plan = make_plan("lms", SchedulerConfig.from_dict(SD15_CONFIG), 20)
    start = img2img_start(plan, strength)
    assert start >= 3
    sample, model_output = random_arrays(7, 2)
    out, state = get_sampler("lms").step(plan, start, sample, model_output, INITIAL_STATE, None)
    euler = sample + (plan.sigmas[start + 1] - plan.sigmas[start]) * state[0]
    np.testing.assert_allclose(out, sample + plan.coefficients[start, 0] * state[0], rtol=1e-6, atol=1e-6)
    assert not np.allclose(out, euler, rtol=1e-4, atol=1e-4)
    step_both("lms", SD15_CONFIG, steps=20, shape=SMALL_SHAPE, seed=8, strength=strength)


def test_lms_refuses_a_steps_offset_that_clamps_two_timesteps_onto_one_sigma_where_diffusers_gives_nan() -> None:
    d = config_dict(num_train_timesteps=100, timestep_spacing="leading", steps_offset=1)
    reference = reference_scheduler("lms", d)
    reference.set_timesteps(100)
    x = torch.ones(1, 4)
    with np.errstate(all="ignore"):
        for t in reference.timesteps[:2]:
            reference.scale_model_input(x, t)
            x = reference.step(torch.ones(1, 4), t, x).prev_sample
    assert not torch.isfinite(x).all()
    with pytest.raises(ValueError, match=r"steps_offset=1 .*timesteps 100 and 99.*allowed: steps_offset"):
        make_plan("lms", SchedulerConfig.from_dict(d), 100)
    # One timestep past the end alone keeps the sigmas distinct: that still runs, and matches diffusers.
    step_both("lms", config_dict(num_train_timesteps=100, timestep_spacing="leading", steps_offset=2), 50, (1, 32), 0)


@pytest.mark.parametrize("name", ["euler_ancestral", "heun"])
def test_heun_and_euler_ancestral_clamp_a_timestep_past_training_like_diffusers(name: str) -> None:
    d = config_dict(num_train_timesteps=100, timestep_spacing="leading", steps_offset=1)
    step_both(name, d, steps=100, shape=(1, 1, 2, 16), seed=3)


# --- Random configs, including the keys only these samplers read. ---


@st.composite
def random_cases(draw: st.DrawFn) -> tuple[str, dict[str, Any], int, tuple[int, ...], int, float]:
    name = draw(st.sampled_from(NAMES))
    num_train_timesteps = draw(st.one_of(st.just(1000), st.integers(10, 1000)))
    d = config_dict(
        num_train_timesteps=num_train_timesteps,
        beta_start=draw(st.floats(1e-5, 2e-3)),
        beta_end=draw(st.floats(5e-3, 3e-2)),
        beta_schedule=draw(st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"])),
        prediction_type=draw(st.sampled_from(PREDICTION_TYPES[:2] if name == "euler_ancestral" else PREDICTION_TYPES)),
        steps_offset=draw(st.sampled_from([0, 1])),
        timestep_spacing=draw(st.sampled_from([None, *SPACINGS])),
        use_karras_sigmas=draw(st.sampled_from([None, True, False])),
        clip_sample=draw(st.sampled_from([None, True, False])),
        clip_sample_range=draw(st.floats(0.5, 3.0)),
    )
    steps = draw(st.integers(1, min(num_train_timesteps, 50)))
    shape = (*draw(st.lists(st.integers(1, 3), max_size=3)), draw(st.integers(32, 64)))
    strength = draw(st.one_of(st.just(1.0), st.floats(0.05, 0.99)))
    return name, d, steps, shape, draw(st.integers(0, 2**32 - 1)), strength


# Derandomized: rare random configs magnify one float32 rounding done another way past the bar (near-zero Karras
# timesteps compared by relative error, Heun clipping after a 500-fold first step), which no sampler here can change.
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(random_cases())
def test_random_configs_with_karras_and_clipping_match_diffusers(
    case: tuple[str, dict[str, Any], int, tuple[int, ...], int, float],
) -> None:
    name, d, steps, shape, seed, strength = case
    assume(int(steps * strength) >= 1)
    reference = reference_scheduler(name, d)
    reference.set_timesteps(steps)
    timesteps = reference.timesteps.numpy()
    # Where diffusers goes wrong (an extra step at timestep -1, a timestep past training) other tests pin ours.
    assume(timesteps.min() >= 0 and timesteps.max() < d["num_train_timesteps"])
    try:
        make_plan(name, SchedulerConfig.from_dict(d), steps)
    except ValueError:
        assume(False)  # where diffusers gives NaN: pinned above
    step_both(name, d, steps, shape, seed, strength)
