"""Part 3 of bench_kv_capacity: which steps count, the round order, the ratios per round."""
import pytest

from benchmarks import bench_kv_capacity, kv_step_time


def _line(step_s, *, num_reqs=8, num_tokens=8, model_s=None, split_layers=()):
    return {"step_s": step_s, "model_s": step_s * 0.8 if model_s is None else model_s, "prep_s": step_s * 0.05,
            "num_reqs": num_reqs,
            "num_tokens": num_tokens, "split_layers": list(split_layers)}


def test_decode_steps_keep_full_pure_decode_ordinary_steps_with_their_fixed_part():
    lines = [_line(0.10, model_s=0.07), _line(0.2, num_tokens=64), _line(0.1, num_reqs=7, num_tokens=7),
             _line(0.1, split_layers=[15])]
    steps = kv_step_time.decode_steps(lines, 8)
    assert len(steps) == 1 and steps[0]["fixed_s"] == pytest.approx(0.03)


def test_rounds_reverse_the_order_every_other_round():
    assert kv_step_time.round_orders([1, 6, 10], 3) == [[1, 6, 10], [10, 6, 1], [1, 6, 10]]


def _server(r, g, step_s, tokens=((1, 2),)):
    return {"round": r, "kv_ranges": g, "steps": kv_step_time.decode_steps([_line(x) for x in step_s], 8),
            "tokens": [list(tokens)]}


def test_ratios_are_per_round_against_the_same_rounds_baseline():
    # round 0 is 2x slower than round 1 for every G (drift): the per-round ratios cancel it
    servers = [_server(0, 1, [0.20, 0.22, 0.18]), _server(0, 6, [0.21, 0.21, 0.21]),
               _server(1, 6, [0.105, 0.105]), _server(1, 1, [0.10, 0.10, 0.10])]
    s = kv_step_time.summarize(servers)
    six = s["by_kv_ranges"]["6"]
    assert six["step_s_ratios"] == pytest.approx([1.05, 1.05])
    assert six["step_s_ratio_median"] == pytest.approx(1.05)
    lo, hi = six["step_s_ratio_ci95"]
    assert lo == pytest.approx(1.05) and hi == pytest.approx(1.05)  # equal ratios: a point interval
    assert s["by_kv_ranges"]["1"]["step_s_ratio_median"] == 1.0
    assert six["fixed_s_pooled_median_ms"] == pytest.approx(42)  # 20% of 0.21 s (three of five steps)
    assert six["prep_s_ratio_median"] == pytest.approx(1.05) and s["tokens_identical"]


def test_a_log_without_a_field_skips_that_field():
    old = [{"step_s": 0.1, "model_s": 0.08, "num_reqs": 8, "num_tokens": 8, "split_layers": []}]
    servers = [{"round": 0, "kv_ranges": g, "steps": kv_step_time.decode_steps(old, 8), "tokens": []} for g in (1, 6)]
    row = kv_step_time.summarize(servers)["by_kv_ranges"]["6"]
    assert row["step_s_ratio_median"] == 1.0 and "prep_s_ratios" not in row


def test_different_tokens_and_missing_steps_are_reported_not_hidden():
    servers = [_server(0, 1, [0.1]), _server(0, 6, [], tokens=((1, 3),))]
    s = kv_step_time.summarize(servers)
    assert not s["tokens_identical"]
    assert s["by_kv_ranges"]["6"]["step_s_ratios"] == [] and "step_s_ratio_median" not in s["by_kv_ranges"]["6"]


def test_the_plot_draws_the_step_panel(tmp_path):
    servers = [_server(r, g, [0.1 * (1 + 0.01 * g)]) for r in range(2) for g in (1, 6, 10)]
    data = {"arguments": {"kv_space_gib": "1", "kv_ranges": 6}, "kv_capacity_tokens": {}, "held_sessions": {},
            "ordinary_step_time": kv_step_time.summarize(servers), "summary": {}}
    fig = bench_kv_capacity.draw(data)
    assert len(fig.axes) == 1 and "batch 8" in fig.axes[0].get_title()
