"""The live cost model recovers step costs from step records."""
import random

import pytest

from vllm_split.control.live_cost import DEFAULT_PRIOR, LiveCostModel, StepCost, fit_step_cost
from vllm_split.wire.contract import StepRecord

TRUE = StepCost(fixed_s=4e-3, layer_s=1.8e-3, row_s=1e-4)


def _records(n, *, noise=0.0, seed=0, now=1000.0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        calls = rng.choice([8, 15, 23, 30])
        rows = calls * rng.randint(1, 32)
        t = TRUE.step_s(calls, rows) * (1 + rng.uniform(-noise, noise))
        out.append(StepRecord(i + 1, now - (n - i) * 0.01, t, calls, rows, rows // calls, rows // calls))
    return out


def test_fit_recovers_the_true_costs():
    fit = fit_step_cost(_records(200), prior=DEFAULT_PRIOR, prior_weight=2.0)
    assert fit.samples == 200
    assert fit.fixed_s == pytest.approx(TRUE.fixed_s, rel=0.2)  # the intercept is the least determined
    assert fit.layer_s == pytest.approx(TRUE.layer_s, rel=0.05)
    assert fit.row_s == pytest.approx(TRUE.row_s, rel=0.05)


def test_noisy_fit_predicts_steps_within_a_few_percent():
    fit = fit_step_cost(_records(300, noise=0.2, seed=1), prior=DEFAULT_PRIOR, prior_weight=2.0)
    for calls, rows in [(30, 30), (15, 240), (8, 8)]:
        assert fit.step_s(calls, rows) == pytest.approx(TRUE.step_s(calls, rows), rel=0.06)


def test_no_records_gives_the_prior_and_coefficients_stay_non_negative():
    assert fit_step_cost([], prior=DEFAULT_PRIOR, prior_weight=2.0) == DEFAULT_PRIOR
    # steps whose time falls with rows would fit a negative row cost: clamped to 0
    recs = [StepRecord(i + 1, 0.0, 0.05 - 1e-4 * rows, 30, rows, 1, 1) for i, rows in enumerate(range(30, 300, 30))]
    fit = fit_step_cost(recs, prior=StepCost(0.0, 0.0, 0.0), prior_weight=0.1)
    assert min(fit.fixed_s, fit.layer_s, fit.row_s) >= 0.0


def test_one_shape_only_stays_close_to_its_own_time():
    recs = [StepRecord(i + 1, 0.0, 0.06, 30, 30, 1, 1) for i in range(50)]  # one shape, 60 ms
    fit = fit_step_cost(recs, prior=DEFAULT_PRIOR, prior_weight=2.0)
    assert fit.step_s(30, 30) == pytest.approx(0.06, rel=0.02)


def test_model_window_and_occupancy():
    model = LiveCostModel(window=100, occupancy_window_s=1.0)
    assert model.occupancy(now=1000.0) == 0.0 and model.cost == DEFAULT_PRIOR
    model.add(_records(150, now=1000.0))
    assert len(model.records) == 100 and model.last_seq == 150
    recent = [r.num_reqs for r in model.records if 1000.0 - r.wall_time <= 1.0]
    assert model.occupancy(now=1000.0) == pytest.approx(sum(recent) / len(recent))
    assert model.occupancy(now=5000.0) == 0.0  # nothing ran lately: idle
    assert model.refit().samples == 100


def test_lowest_split_layer_of_the_recent_steps():
    model = LiveCostModel(occupancy_window_s=1.0)
    assert model.recent_min_split_layer(30, now=1000.0) == 0  # idle
    # steps at k >= 20 and >= 12 (10 and 18 layer calls) lately, an ordinary request long ago
    model.add([StepRecord(1, 990.0, 0.05, 30, 30, 1, 1), StepRecord(2, 999.5, 0.02, 10, 10, 1, 1),
               StepRecord(3, 999.9, 0.03, 18, 28, 2, 2)])
    assert model.recent_min_split_layer(30, now=1000.0) == 12
    model.add([StepRecord(4, 1000.0, 0.05, 30, 30, 1, 1)])  # an ordinary request runs every layer
    assert model.recent_min_split_layer(30, now=1000.0) == 0
