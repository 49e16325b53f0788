"""Pure parts of bench_server_step's interleaved mode: pairs, their ratios and intervals, the
steps a scenario keeps, the summary and the plot from the JSON; pipeline stages' pairs and rows."""
import argparse
import json
import statistics

import pytest

from benchmarks import report
from benchmarks.bench_server_step import draw, pooled_samples, summarize
from benchmarks.server_step_runs import (by_stage, client_ks, decode_tokens, layer_fraction, pick, pipeline_server,
                                         recompiles, split_batch, split_layers_of, stage_layers, systems, u_shape_of)
from harness.replay import Script
from benchmarks.step_pairs import compare, median_interval, pair_ratios, quantile, summarize_pairs


def step(step_s, model_s, *, reqs=4, tokens=4, split_layers=()):
    return {"step_s": step_s, "model_s": model_s, "num_reqs": reqs, "num_tokens": tokens,
            "split_layers": list(split_layers)}


def test_compare_gives_median_ratios_and_the_limit_from_the_baselines_split():
    base = [step(0.100, 0.080), step(0.110, 0.090), step(0.300, 0.280)]  # medians 0.110 / 0.090
    got = [step(0.070, 0.050), step(0.066, 0.046)]  # medians 0.068 / 0.048
    c = compare(base, got, layer_fraction=0.5)
    assert c["step_ratio"] == pytest.approx(0.068 / 0.110) and c["layers_ratio"] == pytest.approx(0.048 / 0.090)
    assert c["plain_fixed_s"] == pytest.approx(0.020)
    assert c["step_limit_ratio"] == pytest.approx((0.020 + 0.5 * 0.090) / 0.110)
    assert c["steps"] == 2 and c["plain_steps"] == 3
    with pytest.raises(ValueError, match="no steps"):
        compare([], got, layer_fraction=1.0)


def test_a_pair_without_steps_of_either_side_gives_no_ratio():
    pair = {"repeat": 0, "order": "ordinary-split", "ordinary": [step(0.1, 0.08)], "split": []}
    assert pair_ratios(pair, layer_fraction=1.0) is None
    pair["split"] = [step(0.12, 0.1)]
    r = pair_ratios(pair, layer_fraction=1.0)
    assert r["step_ratio"] == pytest.approx(1.2) and r["layers_ratio"] == pytest.approx(1.25)
    assert r["steps"] == (1, 1) and r["step_minus_limit"] == pytest.approx(0.2)


def test_quantile_interpolates_between_order_statistics():
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([1.0, 2.0], 0.25) == pytest.approx(1.25)
    assert quantile([5.0], 0.975) == 5.0
    with pytest.raises(ValueError, match=r"quantile 1.5: expected a fraction in \[0, 1\]"):
        quantile([1.0], 1.5)


def test_median_interval_brackets_the_median_within_the_values_range():
    values = [1.10, 1.25, 1.18, 1.31, 1.22, 1.15, 1.27]
    lo, hi = median_interval(values, seed=3)
    assert min(values) <= lo <= statistics.median(values) <= hi <= max(values)
    assert median_interval(values, seed=3) == [lo, hi]  # seeded: reproducible
    assert median_interval([0.7], seed=0) == [0.7, 0.7]  # one pair: no spread
    assert median_interval([2.0] * 5, seed=0) == [2.0, 2.0]


def test_summary_of_pairs_pools_and_pairs_each_scenario_and_system():
    def pair(system, repeat, ordinary, split):
        return {"mode": "compiled", "kind": "decode", "batch": 4, "context": 64, "system": system, "repeat": repeat,
                "order": "ordinary-split" if repeat % 2 == 0 else "split-ordinary",
                "ordinary": [step(o, o - 0.02) for o in ordinary], "split": [step(s, s - 0.02) for s in split]}

    # the machine drifts 1.5x between repeats; each pair's ratio does not
    pairs = [pair("15", 0, [0.10, 0.10], [0.06, 0.06]), pair("15", 1, [0.15, 0.15], [0.09, 0.09]),
             pair("15", 2, [0.12], [0.072]), pair("mixed", 0, [0.10], [0.09]), pair("mixed", 1, [0.10], [])]
    rows = summarize_pairs(pairs, layer_fraction=lambda system, batch: layer_fraction(system, [0, 15], batch, 30))
    by_system = {r["system"]: r for r in rows}
    r15 = by_system["15"]
    assert r15["pairs"] == 3 and r15["pair_step_ratios"] == pytest.approx([0.6, 0.6, 0.6])
    assert r15["step_ratio_median"] == pytest.approx(0.6) and r15["step_ratio_ci95"] == pytest.approx([0.6, 0.6])
    assert r15["layer_fraction"] == 0.5 and r15["baseline"] == "ordinary" and r15["steps"] == 5
    assert by_system["mixed"]["pairs"] == 1 and by_system["mixed"]["layer_fraction"] == pytest.approx(0.75)


def args(**kw):
    base = dict(batches=[1, 4], contexts=[64], prefills=[64], ks=[0, 15], mixed=True, decode_tokens=6,
                modes=["compiled"])
    return argparse.Namespace(**{**base, **kw})


def test_systems_fractions_and_decode_tokens():
    a = args()
    assert systems(a, {"kind": "decode"}) == ["0", "15", "mixed"]
    assert systems(a, {"kind": "prefill"}) == ["0", "15"]
    assert systems(args(mixed=False), {"kind": "decode"}) == ["0", "15"]
    assert layer_fraction("mixed", [0, 15], 1, 30) == 1.0  # one request: the first split layer
    assert decode_tokens(args(decode_tokens=10), {"kind": "decode", "batch": 16, "context": 1024}) == 14
    assert decode_tokens(a, {"kind": "prefill", "batch": 1, "context": 64}) == 1


def test_u_shapes_are_systems_with_their_own_layer_fraction_and_scripts():
    a = args(u_shapes=["7:22", "0:30"])
    assert systems(a, {"kind": "decode"}) == ["0", "15", "mixed", "u7-22", "u0-30"]
    assert systems(a, {"kind": "prefill"}) == ["0", "15", "u7-22", "u0-30"]
    assert u_shape_of("u7-22") == (7, 22) and u_shape_of("15") is None and u_shape_of("mixed") is None
    assert layer_fraction("u7-22", a.ks, 4, 30) == 0.5 and layer_fraction("u0-30", a.ks, 1, 30) == 1.0
    assert split_layers_of("u7-22", a.ks, 3) == [7, 7, 7] and client_ks(a) == [0, 7, 15]
    scripts = {k: Script(split_layer=k, prompt_rows=None, decode_rows=None, expected=[1]) for k in (0, 7, 15)}
    batch = split_batch("u7-22", a.ks, 2, scripts)
    assert [(s.split_layer, s.return_layer) for s in batch] == [(7, 22), (7, 22)]
    assert [(s.split_layer, s.return_layer) for s in split_batch("mixed", a.ks, 3, scripts)] == [
        (0, None), (15, None), (0, None)]
    for bad in ("u22-7", "u7", "ux-y"):
        with pytest.raises(ValueError, match="U shape"):
            u_shape_of(bad)


def test_pick_keeps_the_scenarios_shape_and_kind_of_requests():
    steps = [step(0.1, 0.1), step(0.1, 0.1, split_layers=[15] * 4), step(0.1, 0.1, split_layers=[15, 15]),
             step(0.5, 0.5, reqs=4, tokens=260), step(0.1, 0.1, reqs=3, tokens=3)]
    sc = {"kind": "decode", "batch": 4, "context": 64}
    assert len(pick(steps, sc)) == 3
    assert pick(steps, sc, split=False) == [steps[0]]
    assert pick(steps, sc, split=True) == [steps[1]]  # a batch half split is neither
    assert pick([step(0.5, 0.5, reqs=1, tokens=64)], {"kind": "prefill", "batch": 1, "context": 64}, split=False)


def test_interleaved_report_and_plot_from_the_json(tmp_path):
    a = args(batches=[4], prefills=[])
    pairs = [{"mode": "compiled", "kind": "decode", "batch": 4, "context": 64, "system": s, "repeat": r,
              "order": "ordinary-split", "ordinary": [step(0.1 * (1 + r), 0.08 * (1 + r))],
              "split": [step(0.07 * (1 + r), 0.05 * (1 + r), split_layers=[int(s)] * 4)]}
             for s in ("0", "15") for r in range(2)]
    samples = pooled_samples(pairs)
    assert set(samples) == {"compiled|ordinary|decode|B=4|C=64", "compiled|0|decode|B=4|C=64",
                            "compiled|15|decode|B=4|C=64"}
    assert len(samples["compiled|ordinary|decode|B=4|C=64"]) == 4  # one ordinary batch per pair
    rows = summarize_pairs(pairs, layer_fraction=lambda s, b: layer_fraction(s, a.ks, b, 30))
    plain = {"compiled|plain|decode|B=4|C=64": [step(0.09, 0.07)], **samples}
    (ref,) = summarize(plain, a, 30, compared=["ordinary"])  # --plain-reference
    assert ref["baseline"] == "plain" and ref["layer_fraction"] == 1.0
    out = tmp_path / "bss.json"
    report.write(out, {"environment": {"vllm": "0.32.0"}, "summary": rows}, draw=draw)
    assert out.with_suffix(".png").stat().st_size > 0
    two_phase = summarize({"compiled|plain|decode|B=4|C=64": [step(0.1, 0.08)], **samples}, a, 30)
    assert {r["system"] for r in two_phase} == {"0", "15"} and all("pairs" not in r for r in two_phase)
    report.write(out, {"environment": {"vllm": "0.32.0"}, "summary": two_phase}, draw=draw)


# ---------------------------------------------------------------- pipeline parallelism
def test_layer_fraction_of_a_pipeline_stage_counts_the_stages_layers_at_or_above_k():
    stages = {0: (0, 15), 1: (15, 30)}
    assert [layer_fraction("15", [15], 4, 30, stages[r]) for r in (0, 1)] == [0.0, 1.0]
    assert [layer_fraction("7", [7], 1, 30, stages[r]) for r in (0, 1)] == [pytest.approx(8 / 15), 1.0]
    assert [layer_fraction("22", [22], 1, 30, stages[r]) for r in (0, 1)] == [0.0, pytest.approx(8 / 15)]
    assert layer_fraction("30", [30], 1, 30, stages[1]) == 0.0 and layer_fraction("0", [0], 1, 30, stages[0]) == 1.0
    assert layer_fraction("mixed", [0, 15], 2, 30, stages[0]) == 0.5  # one row on all 15, one on none
    assert layer_fraction("15", [15], 4, 30) == 0.5  # no stage: the whole model, as before
    with pytest.raises(ValueError, match="single-stage"):
        layer_fraction("u7-22", [7], 1, 30, stages[0])


def test_pipeline_server_binds_one_core_per_stage():
    assert pipeline_server(1) == ((), {})
    assert pipeline_server(2) == (("--pipeline-parallel-size", "2"), {"VLLM_CPU_OMP_THREADS_BIND": "0|1"})


def test_stage_layers_come_from_each_stages_compact_forward_line():
    log = ("(EngineCore pid=1) INFO vllm-split: split steps take the COMPACT forward on this stage's layers [15, 30) "
           "(pipeline stage 1 of 2)\nnoise\n(EngineCore pid=1) INFO vllm-split: split steps take the COMPACT forward"
           " on this stage's layers [0, 15) (pipeline stage 0 of 2)\n")
    assert stage_layers(log, 2) == {0: (0, 15), 1: (15, 30)}
    with pytest.raises(RuntimeError, match=r"each of 2 stages; the server log names stages \[1\]"):
        stage_layers(log.split("noise")[0], 2)  # a stage that took the exact path (or none logged)


def test_pairs_split_by_stage_give_one_row_per_stage_against_its_own_layers():
    def staged(step_s, model_s, rank, **kw):
        return {**step(step_s, model_s, reqs=1, tokens=1, **kw), "pp_rank": rank}

    stages = {0: (0, 15), 1: (15, 30)}
    pairs = []
    for r, drift in enumerate((1.0, 1.5, 1.2)):  # the machine drifts; each pair's ratios do not
        pair = {"mode": "compiled", "kind": "decode", "batch": 1, "context": 128, "system": "15", "repeat": r,
                "order": "ordinary-split",
                "ordinary": [staged(0.040 * drift, 0.036 * drift, 0), staged(0.050 * drift, 0.045 * drift, 1)],
                "split": [staged(0.004 * drift, 0.0009 * drift, 0, split_layers=[15]),
                          staged(0.050 * drift, 0.045 * drift, 1, split_layers=[15])]}
        assert by_stage(pair, 1) == [pair]  # no pipeline: the pair itself
        pairs += by_stage(pair, 2)
    assert [(p["stage"], len(p["ordinary"]), len(p["split"])) for p in pairs[:2]] == [(0, 1, 1), (1, 1, 1)]
    rows = summarize_pairs(pairs, layer_fraction=lambda s, b, stage=None: layer_fraction(
        s, [15], b, 30, None if stage is None else stages[stage]))
    assert [(r["stage"], r["pairs"], r["layer_fraction"]) for r in rows] == [(0, 3, 0.0), (1, 3, 1.0)]
    s0, s1 = rows
    assert s0["layers_ratio_median"] == pytest.approx(0.025) and s0["layers_ratio_ci95"] == pytest.approx([0.025] * 2)
    assert s0["step_ratio_median"] == pytest.approx(0.1)
    assert s0["step_limit_ratio_median"] == pytest.approx(0.004 / 0.040)  # fixed part only: no layer on stage 0
    assert s1["layers_ratio_median"] == pytest.approx(1.0) and s1["step_ratio_median"] == pytest.approx(1.0)
    fig = draw({"environment": {"vllm": "0.32.0"}, "pipeline": {"size": 2, "stage_layers": stages}, "summary": rows})
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["c d B1 C128 k=15 stage 0",
                                                                     "c d B1 C128 k=15 stage 1"]


def test_recompiles_are_counted_per_worker(tmp_path):
    log = tmp_path / "steps.jsonl"
    lines = [{"t": 1, "pp_rank": 0, "compiled_graphs": 5}, {"t": 2, "pp_rank": 1, "compiled_graphs": 9},
             {"t": 3, "pp_rank": 0, "compiled_graphs": 5}, {"t": 4, "pp_rank": 1, "compiled_graphs": 10}]
    log.write_text("".join(json.dumps(s) + "\n" for s in lines))
    assert recompiles(log) == 1  # not 10 - 5: the stages' counters are their own
    log.write_text(json.dumps({"t": 1, "compiled_graphs": 3}) + "\n" + json.dumps({"t": 2, "compiled_graphs": 3}) + "\n")
    assert recompiles(log) == 0
