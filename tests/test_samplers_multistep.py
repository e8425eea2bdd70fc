"""DPM-Solver++(2M) and UniPC against diffusers for their own config keys, where they refuse a config, and why."""

from __future__ import annotations

import math
from decimal import Decimal, localcontext
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from diffuserve.server.schedulers import INITIAL_STATE, SchedulerConfig, get_sampler, make_plan
from diffuserve.server.schedulers.schedule import alphas_cumprod

from .sampler_reference import (
    PREDICTION_TYPES,
    SD15_CONFIG,
    SPACINGS,
    ZERO_SNR_CONFIG,
    config_dict,
    correctly_rounded_torch,  # noqa: F401  (autouse: correctly rounded exp, log, sqrt)
    reference_scheduler,
    step_both,
)

DPM_NAMES = ("dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2m_sde_karras")
NAMES = (*DPM_NAMES, "unipc")
SHAPE = (2, 4, 8, 8)

# diffusers warns about its deprecated DPM-Solver (non ++) algorithm types, about unknown keys, and hands a torch
# tensor to np.array(copy=False), which numpy 2 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning", "ignore::UserWarning", "ignore:__array__ implementation doesn't accept a copy keyword"
)


def sd_config(**overrides: Any) -> dict[str, Any]:
    return config_dict(beta_schedule="scaled_linear", **overrides)


def run_diffusers(name: str, d: dict[str, Any], steps: int, seed: int = 0) -> torch.Tensor:
    """A whole txt2img run of diffusers' twin of name on random model outputs (and noise)."""
    generator = torch.Generator().manual_seed(seed)
    reference = reference_scheduler(name, d)
    reference.set_timesteps(steps)
    x = torch.randn(SHAPE, generator=generator)
    for t in reference.timesteps:
        model_output = torch.randn(SHAPE, generator=generator)
        x = reference.step(model_output, t, x, **({"generator": generator} if "sde" in name else {})).prev_sample
    return x


# --- DPM-Solver++ keys, against diffusers. ---


@pytest.mark.parametrize("solver_type", ["midpoint", "heun", "bh2", "logrho"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("name", DPM_NAMES)
def test_dpm_solver_types_including_unipcs_remapped_ones_match_diffusers(
    name: str, prediction_type: str, solver_type: str
) -> None:
    step_both(name, sd_config(solver_type=solver_type, prediction_type=prediction_type), 15, SHAPE, seed=1)


def test_dpm_heun_and_midpoint_differ() -> None:
    # Keeps the test above from passing with solver_type ignored.
    midpoint, heun = (
        make_plan("dpmpp_2m", SchedulerConfig.from_dict(sd_config(solver_type=kind)), 10).difference_coefs
        for kind in ("midpoint", "heun")
    )
    assert not np.allclose(midpoint, heun)


@pytest.mark.parametrize(
    "model_keys",
    [
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
        {"algorithm_type": "dpmsolver", "solver_order": 1, "final_sigmas_type": "zero"},
        {"use_karras_sigmas": True},
        {"use_karras_sigmas": False, "solver_type": "heun"},
    ],
)
@pytest.mark.parametrize("name", DPM_NAMES)
def test_dpm_sampler_settings_override_the_model_configs_keys_as_from_config_does(
    name: str, model_keys: dict[str, Any]
) -> None:
    # dpmpp_2m keeps a model's use_karras_sigmas; the Karras samplers force it, and all force algorithm and order.
    step_both(name, sd_config(**model_keys), 12, SHAPE, seed=2)
    step_both(name, sd_config(**model_keys), 12, SHAPE, seed=3, strength=0.5)


def test_dpmpp_2m_on_a_karras_model_config_is_dpmpp_2m_karras() -> None:
    config = SchedulerConfig.from_dict(sd_config(use_karras_sigmas=True))
    karras = make_plan("dpmpp_2m_karras", SchedulerConfig.from_dict(sd_config()), 20)
    np.testing.assert_array_equal(make_plan("dpmpp_2m", config, 20).sigmas, karras.sigmas)


@pytest.mark.parametrize("euler_at_final", [True, False])
@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("name", DPM_NAMES)
def test_dpm_lower_order_final_and_euler_at_final_match_diffusers(
    name: str, lower_order_final: bool, euler_at_final: bool
) -> None:
    # With final noise level 0 diffusers' last step is first order whatever these say; fewer than 15 steps is
    # where lower_order_final would act.
    d = sd_config(lower_order_final=lower_order_final, euler_at_final=euler_at_final)
    for steps in (2, 3, 7, 14, 16):
        step_both(name, d, steps, SHAPE, seed=steps)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
@pytest.mark.parametrize("name", DPM_NAMES)
def test_dpm_lu_lambdas_match_diffusers_and_karras_takes_precedence(name: str, beta_schedule: str) -> None:
    d = config_dict(beta_schedule=beta_schedule, use_lu_lambdas=True)
    for steps in (1, 2, 9, 25):
        step_both(name, d, steps, SHAPE, seed=steps)
    step_both(name, d, 20, SHAPE, seed=4, strength=0.7)
    if name == "dpmpp_2m":
        uniform = make_plan(name, SchedulerConfig.from_dict(config_dict(beta_schedule=beta_schedule)), 10)
        assert not np.allclose(make_plan(name, SchedulerConfig.from_dict(d), 10).sigmas, uniform.sigmas)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize(
    ("beta_schedule", "lambda_min_clipped", "zero_snr"),
    [
        ("squaredcos_cap_v2", -5.1, False),
        ("scaled_linear", -2.0, False),
        # Zero terminal SNR: lambda falls to -8.3 at the last timestep (a = 2**-24, not 0), so -6 clips the top few
        # and -9 keeps them all.
        ("scaled_linear", -6.0, True),
        ("scaled_linear", -9.0, True),
    ],
)
@pytest.mark.parametrize("name", ["dpmpp_2m"])
def test_dpm_lambda_min_clipped_matches_diffusers(
    name: str, beta_schedule: str, lambda_min_clipped: float, zero_snr: bool, spacing: str
) -> None:
    d = config_dict(
        beta_schedule=beta_schedule,
        lambda_min_clipped=lambda_min_clipped,
        timestep_spacing=spacing,
        rescale_betas_zero_snr=zero_snr,
        prediction_type="v_prediction" if zero_snr else None,
    )
    for steps in (1, 4, 9, 20):
        reference = reference_scheduler(name, d)
        reference.set_timesteps(steps)
        if len(reference.timesteps) < steps:
            # Trailing spacing below a clipped end runs fewer steps than asked for in diffusers.
            with pytest.raises(ValueError, match=r"lambda_min_clipped=.*too few.*allowed: \S"):
                make_plan(name, SchedulerConfig.from_dict(d), steps)
            continue
        step_both(name, d, steps, SHAPE, seed=steps)
        if steps > 1:
            step_both(name, d, steps, SHAPE, seed=steps, strength=0.6)


def test_lambda_min_clipped_changes_the_timesteps_and_is_ignored_by_karras_sigmas() -> None:
    clipped = SchedulerConfig.from_dict(sd_config(lambda_min_clipped=-2.0))
    plain = SchedulerConfig.from_dict(sd_config())
    assert make_plan("dpmpp_2m", clipped, 10).timesteps[0] < make_plan("dpmpp_2m", plain, 10).timesteps[0]
    np.testing.assert_array_equal(
        make_plan("dpmpp_2m_karras", clipped, 10).sigmas, make_plan("dpmpp_2m_karras", plain, 10).sigmas
    )


def exact_lambda(alpha_prod: np.float32) -> Decimal:
    """log(sqrt(a) / sqrt(1 - a)) of a float32 a, to 40 digits (decimal logarithms: no CPU's kernel involved)."""
    with localcontext() as context:
        context.prec = 40
        a = Decimal(float(alpha_prod))
        return (a.ln() - (1 - a).ln()) / 2


def test_lambda_min_clipped_keeps_a_timestep_exactly_when_its_exact_lambda_reaches_it() -> None:
    # The boundary case: a threshold within float32 rounding of training timestep 600's lambda. diffusers rounds the
    # threshold to float32 and compares it with its float32 lambda table, whose last bit is however torch's log and
    # sqrt rounded on that CPU, so whether it keeps timestep 600 differs between CPUs (600 on some, 599 on others
    # for the same config). Ours keeps a timestep exactly when the exact lambda of its float32 a reaches the
    # threshold, on every CPU: the two float64 thresholds either side of that lambda give a first timestep of 600
    # and 599.
    exact = exact_lambda(alphas_cumprod(SchedulerConfig.from_dict(sd_config()))[600])
    below = float(exact)
    if Decimal(below) > exact:
        below = float(np.nextafter(below, -np.inf))
    above = float(np.nextafter(below, np.inf))
    assert Decimal(below) <= exact < Decimal(above)
    for threshold, first in ((below, 600), (above, 599)):
        plan = make_plan("dpmpp_2m", SchedulerConfig.from_dict(sd_config(lambda_min_clipped=threshold)), 5)
        assert plan.timesteps[0] == first, threshold
    # Away from float32 rounding of a training lambda (neighbours are ~5e-3 apart here) diffusers agrees on any CPU.
    for threshold, first in ((below - 1e-4, 600), (below + 1e-4, 599)):
        d = sd_config(lambda_min_clipped=threshold)
        reference = reference_scheduler("dpmpp_2m", d)
        reference.set_timesteps(5)
        plan = make_plan("dpmpp_2m", SchedulerConfig.from_dict(d), 5)
        assert plan.timesteps[0] == first
        np.testing.assert_array_equal(plan.timesteps, reference.timesteps)


@pytest.mark.parametrize("name", ["dpmpp_2m_karras", "dpmpp_2m_sde_karras", "unipc"])
def test_karras_sigma_min_and_max_from_the_config_match_diffusers(name: str) -> None:
    # diffusers keeps Euler's sigma_min / sigma_max keys in a DPM-Solver config, and its Karras schedule reads them.
    d = sd_config(sigma_min=0.1, sigma_max=10.0, use_karras_sigmas=True)
    for steps in (1, 5, 20):
        step_both(name, d, steps, SHAPE, seed=steps)
    step_both(name, sd_config(sigma_min=0.5, use_karras_sigmas=True), 12, SHAPE, seed=5, strength=0.5)
    plan = make_plan(name, SchedulerConfig.from_dict(d), 5)
    assert plan.sigmas[0] == pytest.approx(10.0, rel=1e-6) and plan.sigmas[-2] == pytest.approx(0.1, rel=1e-6)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_dpm_variance_type_without_effect_off_epsilon_prediction_matches_diffusers(prediction_type: str) -> None:
    step_both("dpmpp_2m", sd_config(variance_type="learned_range", prediction_type=prediction_type), 10, SHAPE, 6)


def test_dpm_sde_draws_noise_at_every_call_and_uses_it_at_all_but_the_last() -> None:
    plan = make_plan("dpmpp_2m_sde_karras", SchedulerConfig.from_dict(SD15_CONFIG), 6)
    assert plan.noise_calls.all()
    rng = np.random.default_rng(0)
    sample, model_output, noise = rng.standard_normal((3, *SHAPE), dtype=np.float32)
    sampler = get_sampler("dpmpp_2m_sde_karras")
    for index in (0, plan.calls - 1):
        a, _ = sampler.step(plan, index, sample, model_output, INITIAL_STATE, noise)
        b, _ = sampler.step(plan, index, sample, model_output, INITIAL_STATE, -noise)
        assert np.array_equal(a, b) == (index == plan.calls - 1)
    with pytest.raises(ValueError, match="noise"):
        sampler.step(plan, 0, sample, model_output, INITIAL_STATE, None)


# --- UniPC keys, against diffusers. ---


@pytest.mark.parametrize("solver_type", ["bh2", "midpoint", "heun", "logrho"])
@pytest.mark.parametrize("solver_order", [1, 2])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_unipc_orders_and_solver_types_match_diffusers(
    prediction_type: str, solver_order: int, solver_type: str
) -> None:
    d = sd_config(solver_order=solver_order, solver_type=solver_type, prediction_type=prediction_type)
    step_both("unipc", d, 14, SHAPE, seed=solver_order)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_unipc_karras_sigmas_match_diffusers(spacing: str) -> None:
    d = sd_config(use_karras_sigmas=True, timestep_spacing=spacing)
    for steps in (1, 2, 3, 10, 30):
        step_both("unipc", d, steps, SHAPE, seed=steps)


@pytest.mark.parametrize("disable_corrector", [[0], [0, 3, 7], list(range(20))])
def test_unipc_disable_corrector_matches_diffusers_at_absolute_indices(disable_corrector: list[int]) -> None:
    d = sd_config(disable_corrector=disable_corrector)
    step_both("unipc", d, 12, SHAPE, seed=7)
    # img2img counts the disabled calls from the start of the whole plan, not of the run.
    for strength in (0.5, 0.75):
        step_both("unipc", d, 12, SHAPE, seed=8, strength=strength)


def test_unipc_disable_corrector_changes_the_result() -> None:
    rng = np.random.default_rng(3)
    sample = rng.standard_normal(SHAPE, dtype=np.float32)
    outputs = rng.standard_normal((5, *SHAPE), dtype=np.float32)
    results = []
    for disabled in ([], [2]):
        plan = make_plan("unipc", SchedulerConfig.from_dict(sd_config(disable_corrector=disabled)), 5)
        x, state = sample, INITIAL_STATE
        for index in range(plan.calls):
            x, state = get_sampler("unipc").step(plan, index, x, outputs[index], state, None)
        results.append(x)
    assert not np.allclose(*results)


def test_unipc_first_order_without_lower_order_final_matches_diffusers() -> None:
    step_both("unipc", sd_config(solver_order=1, lower_order_final=False), 9, SHAPE, seed=9)


@pytest.mark.parametrize("name", NAMES)
def test_state_is_batch_first_keeps_only_the_history_it_needs_and_shares_nothing_with_the_result(name: str) -> None:
    plan = make_plan(name, SchedulerConfig.from_dict(SD15_CONFIG), 8)
    rng = np.random.default_rng(1)
    x, state = rng.standard_normal(SHAPE, dtype=np.float32), INITIAL_STATE
    for index in range(plan.calls):
        model_output, noise = rng.standard_normal((2, *SHAPE), dtype=np.float32)
        x, state = get_sampler(name).step(
            plan, index, x, model_output, state, noise if plan.noise_calls[index] else None
        )
        arrays = [a for a in _leaves(state) if isinstance(a, np.ndarray)]
        assert arrays and all(a.shape == SHAPE and a.dtype == np.float32 for a in arrays)
        assert not any(np.shares_memory(x, a) for a in arrays)
        assert len(arrays) == (1 if name in DPM_NAMES else 1 + min(index + 1, 2))


def _leaves(state: Any) -> list[Any]:
    return [leaf for part in state for leaf in _leaves(part)] if isinstance(state, tuple) else [state]


# --- Refusals. ---


@pytest.mark.parametrize(
    ("name", "overrides", "key"),
    [
        ("dpmpp_2m", {"solver_type": "logrho2"}, "solver_type"),
        ("dpmpp_2m", {"use_flow_sigmas": True}, "use_flow_sigmas"),
        ("dpmpp_2m", {"lambda_min_clipped": "low"}, "lambda_min_clipped"),
        ("dpmpp_2m", {"lambda_min_clipped": math.nan}, "lambda_min_clipped"),
        ("dpmpp_2m", {"lambda_min_clipped": True}, "lambda_min_clipped"),
        ("dpmpp_2m", {"variance_type": "learned_range"}, "variance_type"),
        ("dpmpp_2m", {"lower_order_final": "yes"}, "lower_order_final"),
        ("dpmpp_2m_sde_karras", {"euler_at_final": 1}, "euler_at_final"),
        ("dpmpp_2m", {"use_lu_lambdas": "yes"}, "use_lu_lambdas"),
        ("dpmpp_2m", {"use_karras_sigmas": 1}, "use_karras_sigmas"),
        ("dpmpp_2m_karras", {"sigma_min": 0}, "sigma_min"),
        ("dpmpp_2m_karras", {"sigma_max": "big"}, "sigma_max"),
        ("dpmpp_2m_karras", {"sigma_min": 20.0, "sigma_max": 10.0}, "sigma_min"),
        ("unipc", {"solver_order": 0}, "solver_order"),
        ("unipc", {"solver_order": 3}, "solver_order"),
        ("unipc", {"solver_order": True}, "solver_order"),
        ("unipc", {"solver_type": "bh1"}, "solver_type"),
        ("unipc", {"solver_type": "bh3"}, "solver_type"),
        ("unipc", {"predict_x0": False}, "predict_x0"),
        ("unipc", {"lower_order_final": False}, "lower_order_final"),
        ("unipc", {"lower_order_final": "no", "solver_order": 1}, "lower_order_final"),
        ("unipc", {"disable_corrector": "all"}, "disable_corrector"),
        ("unipc", {"disable_corrector": [1.5]}, "disable_corrector"),
        ("unipc", {"disable_corrector": [True]}, "disable_corrector"),
        ("unipc", {"solver_p": {"_class_name": "DDIMScheduler"}}, "solver_p"),
        ("unipc", {"use_flow_sigmas": True}, "use_flow_sigmas"),
        ("unipc", {"use_dynamic_shifting": True}, "use_dynamic_shifting"),
        ("unipc", {"shift_terminal": 0.5}, "shift_terminal"),
        ("unipc", {"use_karras_sigmas": True, "sigma_max": -1}, "sigma_max"),
    ],
)
def test_plan_refuses_unsupported_values_naming_the_key_and_what_is_allowed(
    name: str, overrides: dict[str, Any], key: str
) -> None:
    with pytest.raises(ValueError, match=rf"{key}=.*allowed: \S"):
        make_plan(name, SchedulerConfig.from_dict(sd_config(**overrides)), 10)


@pytest.mark.parametrize("overrides", [{"solver_type": "bh1"}, {"predict_x0": False}, {"lower_order_final": False}])
def test_refused_unipc_variants_give_non_finite_samples_in_diffusers(overrides: dict[str, Any]) -> None:
    # The last step lands on noise level 0, where lambda is infinite: bh1 and noise prediction multiply inf by 0, and
    # a second-order last step divides by r = 0. They would need final_sigmas_type sigma_min.
    assert not torch.isfinite(run_diffusers("unipc", sd_config(**overrides), 20)).all()
    assert torch.isfinite(run_diffusers("unipc", sd_config(), 20)).all()


@pytest.mark.parametrize(
    "d",
    [
        config_dict(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True),
        # Zero terminal SNR: sigma climbs steeply at the end, ~1100, ~2300 and ~4096 at timesteps 997 .. 999.
        {**ZERO_SNR_CONFIG, "use_karras_sigmas": True},
    ],
)
@pytest.mark.parametrize("name", ["dpmpp_2m_karras", "dpmpp_2m_sde_karras", "unipc"])
def test_a_repeated_first_timestep_is_refused_where_diffusers_txt2img_fails(name: str, d: dict[str, Any]) -> None:
    # The cosine and zero-SNR schedules' largest sigmas all map to the last training timesteps; diffusers then starts
    # at the second call at that timestep and indexes past its sigmas (UniPC: asserts a positive order) at the end.
    with pytest.raises((IndexError, AssertionError)):
        run_diffusers(name, d, 25)
    with pytest.raises(ValueError, match=r"first timestep .*allowed: \S"):
        make_plan(name, SchedulerConfig.from_dict(d), 25)
    make_plan(name, SchedulerConfig.from_dict(d), 1)  # one call cannot repeat


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_two_calls_at_one_noise_level_are_refused_where_diffusers_divides_by_zero(name: str) -> None:
    # linspace rounding at steps == num_train_timesteps repeats a timestep; the step between them has h = 0.
    d = config_dict(num_train_timesteps=100)
    assert not torch.isfinite(run_diffusers(name, d, 100)).all()
    with pytest.raises(ValueError, match=r"noise level .*allowed: \S"):
        make_plan(name, SchedulerConfig.from_dict(d), 100)
    step_both(name, d, 99, SHAPE, seed=0)


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_a_timestep_past_training_is_refused(name: str) -> None:
    # leading spacing: 499 * (1000 // 500) + 2 = 1000; diffusers would feed the U-Net timestep 1000.
    d = sd_config(timestep_spacing="leading", steps_offset=2)
    reference = reference_scheduler(name, d)
    reference.set_timesteps(499)
    assert reference.timesteps.max() == 1000
    with pytest.raises(ValueError, match=r"steps_offset=2 .*allowed: \S"):
        make_plan(name, SchedulerConfig.from_dict(d), 499)


# --- Random configs with the extra keys. ---


@st.composite
def multistep_cases(draw: st.DrawFn) -> tuple[str, dict[str, Any], int, tuple[int, ...], int, float]:
    name = draw(st.sampled_from(NAMES))
    n = draw(st.one_of(st.just(1000), st.integers(20, 1000)))

    def optional(strategy: st.SearchStrategy[Any]) -> Any:
        return draw(st.one_of(st.none(), strategy))

    d = config_dict(
        num_train_timesteps=n,
        beta_start=draw(st.floats(1e-4, 2e-3)),
        beta_end=draw(st.floats(5e-3, 3e-2)),
        beta_schedule=draw(st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"])),
        prediction_type=draw(st.sampled_from(PREDICTION_TYPES)),
        steps_offset=draw(st.sampled_from([0, 1])),
        timestep_spacing=optional(st.sampled_from(SPACINGS)),
        use_karras_sigmas=optional(st.booleans()),
        solver_type=optional(st.sampled_from(["midpoint", "heun", "bh2", "logrho"])),
        solver_order=optional(st.sampled_from([1, 2])),
        lower_order_final=True if name == "unipc" else optional(st.booleans()),
        euler_at_final=optional(st.booleans()),
        use_lu_lambdas=optional(st.booleans()),
        lambda_min_clipped=optional(st.floats(-8.0, -1.0)),
        disable_corrector=optional(st.lists(st.integers(0, 50), max_size=5)),
        sigma_min=optional(st.floats(0.02, 0.5)),
        rescale_betas_zero_snr=optional(st.booleans()),
    )
    steps = draw(st.integers(1, min(n, 50)))
    # A batch axis and at least one more: diffusers' UniPC sums its terms with einsum("k,bkc...").
    shape = (draw(st.integers(1, 3)), *draw(st.lists(st.integers(1, 3), max_size=2)), draw(st.integers(32, 64)))
    strength = draw(st.one_of(st.just(1.0), st.floats(0.1, 1.0)))
    return name, d, steps, shape, draw(st.integers(0, 2**32 - 1)), strength


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(multistep_cases())
def test_matches_diffusers_for_random_configs_with_the_extra_keys(
    case: tuple[str, dict[str, Any], int, tuple[int, ...], int, float],
) -> None:
    name, d, steps, shape, seed, strength = case
    assume(int(steps * strength) >= 1)
    try:
        make_plan(name, SchedulerConfig.from_dict(d), steps)
    except ValueError:
        assume(False)  # refusals are pinned by the tests above
    reference = reference_scheduler(name, d)
    reference.set_timesteps(steps)
    # Trailing spacing's extra call at timestep -1 in diffusers: solver_timesteps keeps the intended `steps`.
    assume(reference.timesteps.min() >= 0)
    step_both(name, d, steps, shape, seed, strength)
