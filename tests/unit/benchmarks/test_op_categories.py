"""profile_split_step's pure parts: op categories from call chains, a step's breakdown (from a
real torch.profiler run through the worker's aggregation), per-layer comparisons, the plot."""
import pytest

from benchmarks import report
from benchmarks.op_categories import CATEGORIES, FORWARD, categorize, difference, scenario_breakdown, step_breakdown
from benchmarks.profile_split_step import compare_rows, decode_steps, draw, scenario_row


@pytest.mark.parametrize("chain, category", [
    (f"{FORWARD} > @Torch-Compiled Region: 0/0 > graph_0_cpp_fused_add_mean_mul_pow_rsqrt_0", "fused"),
    (f"{FORWARD} > cpp_fused__to_copy_1", "fused"),
    (f"{FORWARD} > vllm::unified_attention_with_output > aten::empty", "attention"),  # under attention
    (f"{FORWARD} > _C::cpu_attention_with_kv_cache", "attention"),
    (f"{FORWARD} > ## Call CompiledFxGraph fy4 ## > vllm::unified_kv_cache_update > aten::view", "attention"),
    (f"{FORWARD} > ## Call CompiledFxGraph fy4 ##", "python"),  # inductor's wrapper code (not an annotation)
    (f"{FORWARD} > Pregraph bytecode", "python"),
    ("graph_2_cpp_fused_add_mean_mul_onednn_mm_pow_rsqrt_8", "fused"),  # fused, though named after a matmul
    (f"{FORWARD} > @## Call CompiledFxGraph fabc ## > _C::onednn_mm", "linear"),
    ("aten::linear > aten::addmm > aten::copy_", "linear"),  # the LM head, outside the forward
    ("aten::mm", "linear"),
    (f"{FORWARD} > @## Call CompiledFxGraph fabc ##", "python"),
    (FORWARD, "python"),
    ("_C::fused_add_rms_norm", "elementwise"),
    ("aten::add_", "elementwise"),
    ("_C::rotary_embedding", "elementwise"),
    ("aten::cat", "copies"),
    ("aten::index_select", "copies"),
    ("aten::empty_strided", "copies"),
    ("aten::slice", "views"),
    ("aten::t", "views"),
    ("aten::argmax > aten::max", "elementwise"),
    ("aten::_local_scalar_dense", "other_ops"),
    ("aten::summary", "other_ops"),  # names match whole, not in part
])
def test_categorize(chain, category):
    assert categorize(chain) == category


def test_a_real_profiled_step_breaks_down_to_its_wall_time():
    torch = pytest.importorskip("torch")
    from harness.op_profile import ANNOTATION, chain_totals, thread_of

    x, w = torch.randn(8, 64), torch.nn.Linear(64, 64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function(FORWARD.removeprefix(ANNOTATION)):
            y = torch.cat([w(x), x]).relu_()
        y.argmax()
    events = prof.events()
    chains, elsewhere = chain_totals(events, thread=thread_of(events, FORWARD))
    assert f"{FORWARD} > aten::linear > aten::addmm" in chains and elsewhere == 0.0
    assert chains[f"{FORWARD} > aten::cat"][1] == 1  # calls
    forward_us = sum(e.cpu_time_total for e in events if e.name == FORWARD.removeprefix(ANNOTATION))
    step = {"step_s": forward_us / 1e6 + 0.002, "model_s": forward_us / 1e6, "chains": chains}
    b = step_breakdown(step)
    assert b["forward"]["linear"] > 0 and b["forward"]["copies"] > 0 and b["outside"]["elementwise"] > 0
    assert sum(b["forward"].values()) == pytest.approx(b["model_ms"], rel=1e-6)  # the forward's self times add up
    assert sum(b["forward"].values()) + sum(b["outside"].values()) == pytest.approx(b["step_ms"], rel=1e-6)


def synthetic_step(linear_us, fused_us, *, python_us=100.0, layers=30, split=()):
    chains = {f"{FORWARD} > _C::onednn_mm": [linear_us, 4 * layers],
              f"{FORWARD} > @Torch-Compiled Region: 0/0 > graph_0_cpp_fused_add_0": [fused_us, 3 * layers],
              FORWARD: [python_us, 1], "aten::argmax": [50.0, 1]}
    model_s = (linear_us + fused_us + python_us + 200.0) / 1e6  # 200 us unaccounted in the forward
    return {"step_s": model_s + 0.001, "model_s": model_s, "chains": chains, "num_reqs": 16, "num_tokens": 16,
            "split_layers": list(split)}


def test_scenario_breakdown_per_layer_and_the_difference():
    plain = scenario_breakdown([synthetic_step(30000, 6000), synthetic_step(30000, 6000)], layers_run=30)
    assert plain["per_layer_ms"]["linear"] == pytest.approx(1.0) and plain["per_layer_ms"]["fused"] == pytest.approx(0.2)
    assert plain["forward_ms"]["unaccounted"] == pytest.approx(0.2) and plain["outside_ms"]["elementwise"] == 0.05
    assert plain["outside_ms"]["unaccounted"] == pytest.approx(0.95)
    assert plain["top_forward_ops"][0] == {"op": "_C::onednn_mm", "category": "linear", "ms_per_step": 30.0,
                                           "calls_per_step": 120.0}
    split = scenario_breakdown([synthetic_step(18000, 4500, python_us=1500, layers=15)], layers_run=15)
    d = difference(split, plain)
    assert d["linear"] == pytest.approx(0.2) and d["fused"] == pytest.approx(0.1)
    assert d["python"] == pytest.approx(0.1 - 0.1 / 30) and set(d) == {*CATEGORIES, "total"}
    with pytest.raises(ValueError, match="no profiled steps"):
        scenario_breakdown([], layers_run=30)


def test_decode_steps_and_the_report_and_plot_from_the_json(tmp_path):
    steps = [synthetic_step(30000, 6000), synthetic_step(30000, 6000, split=[15] * 16),
             {**synthetic_step(1, 1), "num_tokens": 4096}]
    assert decode_steps(steps, 16, split=False) == steps[:1] and decode_steps(steps, 16, split=True) == [steps[1]]
    rows = [{"batch": 16, "system": "ordinary", "split_layer": None,
             "profiled": scenario_breakdown(steps[:1], layers_run=30)},
            {"batch": 16, "system": "k=15", "split_layer": 15,
             "profiled": scenario_breakdown([synthetic_step(18000, 4500, layers=15)], layers_run=15)}]
    (c,) = compare_rows(rows)
    assert c["system"] == "k=15" and c["split_minus_ordinary_per_layer_ms"]["linear"] == pytest.approx(0.2)
    out = tmp_path / "profile.json"
    report.write(out, {"arguments": {"context": 512}, "environment": {"vllm": "0.32.0"}, "scenarios": rows},
                 draw=draw)
    assert out.with_suffix(".png").stat().st_size > 0


def test_scenario_row_pools_the_rounds_and_keeps_each_rounds_total():
    fast, slow = synthetic_step(30000, 6000), synthetic_step(36000, 6000)
    rounds = [{**fast, "tag": "ordinary|B=16|r=0"}, {**slow, "tag": "ordinary|B=16|r=1"}]
    unprofiled = [{**fast, "step_s": 0.030}, {**fast, "step_s": 0.034}]
    row = scenario_row(16, None, unprofiled, rounds, num_layers=30)
    assert row["system"] == "ordinary" and row["profiled"]["steps"] == 2
    first, second = row["per_layer_total_ms_by_repeat"]
    assert second - first == pytest.approx(0.2)  # 6 ms more matmul over 30 layers
    assert row["unprofiled"]["step_ms_median"] == pytest.approx(32.0)
    assert row["profiler_inflation"] == pytest.approx(row["profiled"]["step_ms_median"] / 32.0)
    assert "profiled" not in scenario_row(16, 15, [], [], num_layers=30)  # nothing profiled: no breakdown
