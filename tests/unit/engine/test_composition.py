"""The step-composition model and choice (pure: no engine)."""
from __future__ import annotations

import pytest

from vllm_split.engine.composition import Choice, RooflineCost, Row, candidates, choose, predict

N = 30
COST = RooflineCost(fixed_s=0.010, layer_s=0.002, row_s=0.0001, kv_s=0.0)


def test_a_step_of_present_rows_is_the_additive_model_from_the_lowest_split_layer():
    rows = [Row(0), Row(10), Row(20)]
    p = predict(rows, Choice("mixed"), N, COST)
    assert p.cycle_s == pytest.approx(0.010 + 30 * 0.002 + 0.0001 * (30 + 20 + 10))
    assert p.tokens_per_s == pytest.approx(3 / p.cycle_s) and p.tpot_s == (p.cycle_s,) * 3
    high = predict([Row(20), Row(25)], Choice("mixed"), N, COST)  # layers below 20 never run
    assert high.cycle_s == pytest.approx(0.010 + 10 * 0.002 + 0.0001 * 15)


def test_a_turnaround_costs_steps_in_mixed_and_a_hold_in_gathered():
    fast = [Row(0), Row(0, turnaround_s=0.005)]
    mixed = predict(fast, Choice("mixed"), N, COST)
    assert mixed.tpot_s[1] == pytest.approx(2 * mixed.cycle_s)  # misses every other step
    gathered = predict(fast, Choice("gathered"), N, COST, gather_max_s=0.025)
    step = 0.010 + 30 * 0.002 + 0.0001 * 60
    assert gathered.cycle_s == pytest.approx(step + 0.005) and gathered.tpot_s == (gathered.cycle_s,) * 2
    assert gathered.tokens_per_s > mixed.tokens_per_s
    slow = [Row(0), Row(0, turnaround_s=0.2)]  # beyond the window's bound: gathered is mixed
    g, m = predict(slow, Choice("gathered"), N, COST), predict(slow, Choice("mixed"), N, COST)
    assert (g.tokens_per_s, g.cycle_s, g.tpot_s) == (m.tokens_per_s, m.cycle_s, m.tpot_s)


def test_grouping_slow_split_only_batches_reads_fewer_layers_and_shortens_their_tpot():
    rows = [Row(15, turnaround_s=0.03)] * 6 + [Row(22, turnaround_s=0.03)] * 6
    mixed = predict(rows, Choice("mixed"), N)
    grouped = predict(rows, Choice("grouped", 22), N)
    assert grouped.tokens_per_s > 1.1 * mixed.tokens_per_s
    assert max(grouped.tpot_s) < min(mixed.tpot_s)
    assert choose(rows, "auto", N).choice == Choice("grouped", 22)
    assert choose(rows, "grouped", N).choice == Choice("grouped", 22)


def test_auto_spares_requests_without_a_bound_and_honours_stated_bounds():
    split = [Row(22, turnaround_s=0.03)] * 8
    with_plain = [Row(0)] * 4 + split
    assert predict(with_plain, Choice("grouped", 22), N).tokens_per_s > predict(with_plain, Choice("gathered"), N).tokens_per_s
    assert choose(with_plain, "auto", N).choice == Choice("gathered")  # grouping would slow the ordinary ones
    bounded = [Row(15, turnaround_s=0.03, tpot_bound_s=0.05)] * 6 + [Row(22, turnaround_s=0.03, tpot_bound_s=0.2)] * 6
    grouped = predict(bounded, Choice("grouped", 22), N)
    assert grouped.tpot_s[0] > 0.05  # the k = 15 sessions would miss their bound...
    assert predict(bounded, Choice("gathered"), N).tpot_s[0] > grouped.tpot_s[0]  # ...and miss it more without it
    assert choose(bounded, "auto", N).choice == Choice("grouped", 22)  # not made slower: allowed


def test_candidates_and_bad_modes():
    rows = [Row(0), Row(7), Row(7), Row(22)]
    assert candidates(rows) == [Choice("gathered"), Choice("mixed"), Choice("grouped", 7), Choice("grouped", 22)]
    assert choose([Row(5)] * 3, "grouped", N).choice == Choice("mixed")  # one split layer: nothing to group
    assert predict([], Choice("mixed"), N).tokens_per_s == 0.0
    with pytest.raises(ValueError, match="composition: expected one of"):
        choose(rows, "fastest", N)
