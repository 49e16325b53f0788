"""Pure parts of the throughput experiment: workload and population, arrival traces,
attainment intervals, the 90% rate and its refinement, the split limit."""
import pytest

from benchmarks import report
from benchmarks.bench_throughput import k_by_device, reanalyse, resume_from, split_limit, summary, trace_counts
from benchmarks.report import ROOT
from benchmarks.throughput_requests import (arrivals, device_profiles, load_workload, refusal_reason, summarise,
                                            trace_duration, trace_seed)
from benchmarks.throughput_stats import (isotonic_decreasing, max_rate_at, max_rate_interval,
                                         max_rate_interval_by_trace, next_rate, ratio_interval, wilson)

WORKLOAD = ROOT / "benchmarks" / "workloads" / "default.json"


def test_default_workload_is_complete_and_sourced():
    w = load_workload(WORKLOAD)
    for key in ("laptop", "phone", "edge_box", "networks", "slas"):
        assert w["sources"][key]
    assert w["server_reference"]["source"]
    for r in w["request_types"]:
        assert r["prompt_tokens"] > 0 and r["output_tokens"] > 1 and r["sla"]["ttft_s"] > 0 and r["sla"]["tpot_s"] > 0
    for d in w["device_classes"]:  # clients slower than the modelled server, holding part of the model
        assert d["decode_multiple"] >= 1 and d["prefill_multiple"] >= 1 and 0 <= d["max_layers"] < 30
    assert w["rates"] == sorted(w["rates"])


def test_device_profiles_are_multiples_of_the_server():
    w = load_workload(WORKLOAD)
    server = {"decode_s": 0.002, "prefill_s_per_token": 5e-5}
    prof = device_profiles(w, server)
    laptop = next(d for d in w["device_classes"] if d["name"] == "laptop")
    assert prof["laptop"]["layer_decode_s"] == pytest.approx(0.002 * laptop["decode_multiple"])
    assert prof["laptop"]["max_layers"] == laptop["max_layers"]
    slow = device_profiles(w, server, speed_scale=2.0)
    assert slow["phone"]["layer_prefill_s_per_token"] == pytest.approx(2 * prof["phone"]["layer_prefill_s_per_token"])


def test_arrival_traces_are_poisson_reproducible_and_shared_across_systems():
    w = load_workload(WORKLOAD)
    a = arrivals(w, 4.0, 500.0, seed=trace_seed(w, 4.0, 0))
    assert a == arrivals(w, 4.0, 500.0, seed=trace_seed(w, 4.0, 0))
    assert a != arrivals(w, 4.0, 500.0, seed=trace_seed(w, 4.0, 1))
    assert len({trace_seed(w, r, i) for r in (1.0, 1.5, 2.0) for i in range(3)}) == 9
    assert len(a) == pytest.approx(2000, rel=0.1)
    assert all(0 <= x["t"] < 500 for x in a) and [x["t"] for x in a] == sorted(x["t"] for x in a)
    assert sum(x["type"] == "chat" for x in a) / len(a) == pytest.approx(0.5, abs=0.05)
    assert trace_duration(w, 0.1) == w["trace"]["max_s"] and trace_duration(w, 100.0) == w["trace"]["min_s"]


def test_wilson_interval():
    lo, hi = wilson(90, 100)
    assert lo < 0.9 < hi and hi - lo == pytest.approx(0.12, abs=0.02)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0) and wilson(0, 0) is None


def test_wilson_interval_contains_the_proportion_at_the_ends():
    # rounding once put the upper end of 36/36 a hair below 1: a negative error bar ended a run
    for n in range(1, 400):
        for met in (0, n):
            lo, hi = wilson(met, n)
            assert lo <= met / n <= hi


def test_isotonic_fit_pools_a_dip():
    assert isotonic_decreasing([1.0, 0.8, 0.9, 0.5], [1, 1, 1, 1]) == pytest.approx([1.0, 0.85, 0.85, 0.5])
    assert isotonic_decreasing([0.5, 1.0], [3, 1]) == pytest.approx([0.625, 0.625])


def pts(*rows):
    return [{"rate": r, "offered_rate": r, "requests": n, "met": m} for r, n, m in rows]


def test_max_rate_reads_through_a_dip_and_interpolates():
    # a dip below 90% at 2/s followed by 93% at 3/s: the isotonic fit pools them
    rate, how = max_rate_at(pts((1, 100, 99), (2, 100, 88), (3, 100, 93), (4, 100, 50)))
    assert how == "crossing" and rate == pytest.approx(3 + 0.005 / 0.405)  # 2-3/s pooled at 90.5%
    assert max_rate_at(pts((1, 100, 50))) == (None, "below_all")
    assert max_rate_at(pts((1, 100, 99), (2, 100, 95))) == (2, "above_all")


def test_max_rate_interval_brackets_the_estimate_and_narrows_with_requests():
    few = max_rate_interval(pts((1, 30, 30), (2, 30, 27), (3, 30, 15)), resamples=400)
    many = max_rate_interval(pts((1, 300, 300), (2, 300, 270), (3, 300, 150)), resamples=400)
    for m in (few, many):
        assert m["ci95"][0] <= m["rate"] <= m["ci95"][1]
    assert many["ci95"][1] - many["ci95"][0] < few["ci95"][1] - few["ci95"][0]
    assert ratio_interval({"ci95": (2.0, 3.0)}, {"ci95": (1.0, 2.0)}) == (1.0, 3.0)
    assert ratio_interval({"ci95": None}, {"ci95": (1.0, 2.0)}) is None


def test_next_rate_refines_extends_and_stops():
    assert next_rate(pts((1, 100, 99), (3, 100, 40))) == 2.0
    assert next_rate(pts((1, 100, 99), (2, 100, 95))) == 3.0  # above everywhere: grow
    assert next_rate(pts((1, 100, 10))) == 0.5  # below at the lowest: halve
    assert next_rate(pts((2.0, 100, 99), (2.2, 100, 40))) is None  # bracketed within 15%


def sample(**kw):
    base = {"device": "laptop", "output_tokens": 4, "split_layer": 3, "exact": True, "refused": None, "met": True,
            "client_s": 0.5, "ttft_s": 0.3, "tpot_s": 0.1}
    return {**base, **kw}


def test_summarise_counts_refusals_by_reason_and_measures_the_offered_rate():
    rows = [sample(), sample(met=False),
            sample(output_tokens=0, refused="server_busy", refusal_reason="queue_timeout", met=None, client_s=0.0)]
    p = summarise(rows, rate=1.0, arrival_s=2.0, wall_s=3.0, cpu_s=1.0)
    assert p["offered_rate"] == 1.5 and p["met"] == 1 and p["attainment"] == pytest.approx(1 / 3)
    assert p["refusal_reasons"] == {"queue_timeout": 1} and p["client_s_per_request"] == 0.5
    assert p["attainment_ci95"][0] < 1 / 3 < p["attainment_ci95"][1]
    assert refusal_reason("server_busy", "x; waited 5.0 s in the admission queue") == "queue_timeout"
    assert refusal_reason("server_busy", "x and the admission queue is full (64)") == "queue_full"
    assert refusal_reason("sla_unreachable", "no split layer") == "sla_unreachable"
    assert k_by_device({"split_dp": {"1@1": rows}}, "split_dp") == {"laptop": {"3": 2}}


def test_summary_ratios_with_intervals():
    def system(rate, lo, hi):
        return {"knobs": [], "points": [{"requests": 10, "wrong_outputs": 0, "client_s_per_request": 0.0}],
                "max_rate_at_90pct": {"rate": rate, "how": "crossing", "ci95": (lo, hi)}}

    s = summary({"plain": system(2.0, 1.5, 2.5), "split_dp": system(3.0, 2.8, 3.2), "split_greedy": system(2.5, 2, 3)},
                {"rate": 2.5})
    assert s["split_dp"]["vs_plain"] == 1.5 and s["split_dp"]["vs_plain_ci95"] == pytest.approx((2.8 / 2.5, 3.2 / 1.5))
    assert s["dp_over_greedy"] == pytest.approx(0.2) and s["wrong_outputs"] == 0


def test_split_limit_from_metrics():
    text = "\n".join([
        'vllm_split:server_step_cost_seconds{term="fixed",engine="0"} 0.01',
        'vllm_split:server_step_cost_seconds{term="layer",engine="0"} 0.002',
        'vllm_split:server_step_cost_seconds{term="row",engine="0"} 0.0',
        'vllm_split:server_occupancy{engine="0"} 1.0',
        'vllm_split:layers_offloaded_fraction_sum{engine="0"} 5.0',
        'vllm_split:layers_offloaded_fraction_count{engine="0"} 10.0',
    ])
    lim = split_limit(text, 30)
    assert lim["fixed_share_of_step"] == pytest.approx(0.01 / 0.07)
    assert lim["best_rate_ratio"] == pytest.approx(1 / (0.01 / 0.07 + (0.06 / 0.07) * 0.5))
    assert split_limit(None, 30) == {"unavailable": "no answer from /metrics"}
    assert split_limit("", 30)["unavailable"].startswith("missing ['vllm_split:layers_offloaded_fraction_count'")
    assert split_limit(text.replace("count{engine=\"0\"} 10.0", "count{engine=\"0\"} 0"), 30) == {
        "unavailable": "no session placed yet"}
    # as a server exports them: comments, other labels' order, no engine label
    exported = "\n".join(["# HELP vllm_split:server_occupancy Mean requests per engine step",
                          "# TYPE vllm_split:server_occupancy gauge"]
                         + [line.replace('{term="fixed",engine="0"}', '{engine="0",term="fixed"}')
                                .replace('{engine="0"}', "") for line in text.splitlines()])
    assert split_limit(exported, 30) == lim


def test_interval_over_traces_is_wider_when_traces_disagree():
    # same totals per point; traces that agree vs traces that do not (one queue blew up)
    agree = [{"rate": r, "offered_rate": r, "requests": 150, "met": m, "trace_counts": [[m // 3, 50]] * 3}
             for r, m in ((1, 150), (2, 141), (3, 60))]
    split = [{**p, "trace_counts": [[50, 50], [50, 50], [p["met"] - 100, 50]]} for p in agree]
    a, b = max_rate_interval_by_trace(agree, resamples=300), max_rate_interval_by_trace(split, resamples=300)
    assert a["rate"] == b["rate"] and a["by"] == "trace"
    assert a["ci95"][1] - a["ci95"][0] <= b["ci95"][1] - b["ci95"][0]
    assert b["ci95"][0] <= b["rate"] <= b["ci95"][1]


def test_reanalyse_recomputes_from_the_raw_samples(tmp_path):
    rows = [sample(trace=i % 3, met=i % 4 != 0) for i in range(12)]
    assert trace_counts(rows) == [[3, 4], [3, 4], [3, 4]]
    point = {"rate": 1.0, "speed_scale": 1.0, "offered_rate": 1.0, "requests": 12, "met": 9, "wrong_outputs": 0,
             "client_s_per_request": 0.5, "attainment": 0.75, "attainment_ci95": [0.5, 0.9], "goodput_rps": 0.75}
    data = {"systems": {"plain": {"knobs": [], "points": [point], "max_rate_at_90pct": {}}}, "crossover": {}}
    out = tmp_path / "tp.json"
    report.write(out, data, rows={"samples": {"plain": {"1@1": rows}}})
    again = reanalyse(out)
    assert again["systems"]["plain"]["points"][0]["trace_counts"] == [[3, 4], [3, 4], [3, 4]]
    assert again["summary"]["plain"]["how"] == "below_all" and report.load(out, rows=True)["samples"]


def test_resume_keeps_the_completed_systems_and_refuses_a_complete_run(tmp_path):
    out = tmp_path / "tp.json"
    with pytest.raises(SystemExit, match="does not exist"):
        resume_from(out)
    report.write(out, {"systems": {"plain": {"points": []}}, "sweeps": {"plain": {}}, "complete": False,
                       "server_layer_times": {"decode_s": 0.002}}, rows={"samples": {"plain": {"1@1": []}}})
    prior = resume_from(out)
    assert prior["resumed"]["kept_systems"] == ["plain"] and prior["samples"] == {"plain": {"1@1": []}}
    report.write(out, {"systems": {}, "complete": True})
    with pytest.raises(SystemExit, match="complete run"):
        resume_from(out)


def test_summary_takes_the_median_split_limit_and_says_why_there_is_none():
    def dp(limits):
        point = {"requests": 10, "wrong_outputs": 0, "client_s_per_request": 0.1, "split_limit": limits}
        return {"knobs": [], "points": [point], "max_rate_at_90pct": {"rate": 1.0, "how": "crossing", "ci95": (1, 1)}}

    plain = {"knobs": [], "points": [{"requests": 10, "wrong_outputs": 0, "client_s_per_request": 0.0}],
             "max_rate_at_90pct": {"rate": 1.0, "how": "crossing", "ci95": (1, 1)}}
    got = [{"best_rate_ratio": r} for r in (1.3, 1.1, 1.2)] + [{"unavailable": "no answer from /metrics"}]
    s = summary({"plain": plain, "split_dp": dp(got)}, {})
    assert s["split_limit_at_measured_occupancy"] == {"best_rate_ratio": 1.2}
    s = summary({"plain": plain, "split_dp": dp([{"unavailable": "b"}, {"unavailable": "a"}, {"unavailable": "a"}])}, {})
    assert s["split_limit_at_measured_occupancy"] == {"unavailable": ["a", "b"]}
