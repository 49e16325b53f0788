"""Pure parts of benchmarks/bench_throughput.py: arrivals, the 90% rate, the split limit."""
import pytest

from benchmarks.bench_throughput import arrivals, load_workload, max_rate_at, split_limit
from benchmarks.report import ROOT

WORKLOAD = ROOT / "benchmarks" / "workloads" / "default.json"


def test_default_workload_is_complete_and_sourced():
    w = load_workload(WORKLOAD)
    for key in ("laptop", "phone", "edge_box", "networks", "slas"):
        assert w["sources"][key]
    for r in w["request_types"]:
        assert r["prompt_tokens"] > 0 and r["output_tokens"] > 1 and r["sla"]["ttft_s"] > 0 and r["sla"]["tpot_s"] > 0
    assert w["rates"] == sorted(w["rates"])


def test_arrivals_are_poisson_at_the_rate_and_reproducible():
    w = load_workload(WORKLOAD)
    a = arrivals(w, 4.0, 500.0, seed=3)
    assert a == arrivals(w, 4.0, 500.0, seed=3)
    assert len(a) == pytest.approx(2000, rel=0.1)
    assert all(0 <= x["t"] < 500 for x in a) and [x["t"] for x in a] == sorted(x["t"] for x in a)
    chat = sum(x["type"] == "chat" for x in a) / len(a)
    assert chat == pytest.approx(0.5, abs=0.05)


def test_max_rate_interpolates_to_the_first_rate_below_target():
    pts = [{"rate": 1, "attainment": 1.0}, {"rate": 2, "attainment": 0.95}, {"rate": 3, "attainment": 0.85}]
    assert max_rate_at(pts) == pytest.approx(2.5)
    assert max_rate_at([{"rate": 1, "attainment": 0.5}]) is None
    assert max_rate_at([{"rate": 1, "attainment": 0.99}, {"rate": 2, "attainment": 0.9}]) == 2


def test_split_limit_from_metrics():
    text = "\n".join([
        'vllm_split:server_step_cost_seconds{term="fixed"} 0.01',
        'vllm_split:server_step_cost_seconds{term="layer"} 0.002',
        'vllm_split:server_step_cost_seconds{term="row"} 0.0',
        "vllm_split:server_occupancy 1.0",
        "vllm_split:layers_offloaded_fraction_sum 5.0",
        "vllm_split:layers_offloaded_fraction_count 10.0",
    ])
    lim = split_limit(text, 30)
    assert lim["fixed_share_of_step"] == pytest.approx(0.01 / 0.07)
    assert lim["best_rate_ratio"] == pytest.approx(1 / (0.01 / 0.07 + (0.06 / 0.07) * 0.5))
    assert split_limit("", 30) is None
