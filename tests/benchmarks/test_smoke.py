"""CI smoke runs of every benchmark at a tiny size: they run, write their JSON and plot.

These check that the scripts work and that their outputs hold what the docs say; the
numbers themselves are read from full runs (results/), never asserted here.
"""
from __future__ import annotations

import json

import pytest

from benchmarks import report
from tests.support.benchmarks import run


def test_placement_study_quick(tmp_path):
    out = tmp_path / "study.json"
    run("placement_study", "--quick", "--out", str(out))
    data = report.load(out, rows=True)
    assert data["summary"] and out.with_suffix(".png").exists()
    assert data["rows"] and all(len(r) == len(data["row_fields"]) for r in data["rows"])
    assert str(tmp_path) not in out.read_text()  # paths by name, never the machine's own
    assert data["arguments"]["out"] == "study.json" and "git_sha" in data["environment"]


def test_bench_planner_quick(tmp_path):
    out = tmp_path / "planner.json"
    run("bench_planner", "--quick", "--out", str(out))
    data = report.load(out, rows=True)
    assert data["summary"]["general"]["median_ms"] > 0 and data["num_nodes"] == 161
    assert len(data["instances"]["general"]) == 5  # --quick: 5 instances x 5 repeats
    assert all(len(i["samples_ms"]) == 5 for i in data["instances"]["general"])


@pytest.mark.engine
def test_profile_costs_quick(tmp_path):
    out = tmp_path / "profile.json"
    run("profile_costs", "--quick", "--out", str(out))
    profile = json.loads(out.read_text())
    from vllm_split.planner.profile import parse_profile

    parsed = parse_profile(profile)  # the planner reads what the profiler writes
    assert {d.role for d in parsed.devices} == {"server", "client"}
    assert all(m.seconds > 0 for d in parsed.devices for m in d.measurements)


@pytest.mark.engine
def test_bench_server_step_quick(tmp_path):
    out = tmp_path / "step.json"
    run("bench_server_step", "--quick", "--out", str(out), timeout=1200)  # interleaved: one split server
    data = report.load(out, rows=True)
    assert data["token_mismatches"] == 0  # replayed split sessions produced the ordinary requests' tokens
    assert data["design"] == "interleaved pairs on one split server"
    systems = {(r["kind"], r["system"]) for r in data["summary"]}
    assert {("decode", "0"), ("decode", "15"), ("decode", "mixed"), ("prefill", "15"), ("decode", "u7-22")} <= systems
    u_rows = [r for r in data["summary"] if r["system"] == "u7-22"]  # U-shaped: rows run [7, 22) only
    assert u_rows and all(r["layer_fraction"] == 15 / 30 for r in u_rows)
    u_steps = [s for p in data["pairs"] if p["system"] == "u7-22" for s in p["split"]]
    assert u_steps and all(s["return_layers"] == [22] * s["num_reqs"] for s in u_steps)
    for r in data["summary"]:
        assert r["steps"] > 0 and r["plain_steps"] > 0 and r["baseline"] == "ordinary"
        assert r["pairs"] == 2 and len(r["pair_step_ratios"]) == 2  # --quick: two repeats, each a pair
        lo, hi = r["step_ratio_ci95"]
        assert lo <= r["step_ratio_median"] <= hi
    assert {p["order"] for p in data["pairs"]} == {"ordinary-split", "split-ordinary"}
    assert all(not s["split_layers"] for p in data["pairs"] for s in p["ordinary"])  # the whole-model graph's steps
    assert data["recompiles_while_serving"]["compiled"] == {"split": 0}
    assert data["kv_capacity_tokens"]["split"] and out.with_suffix(".png").exists()


@pytest.mark.engine
def test_profile_split_step_quick(tmp_path):
    out = tmp_path / "profile.json"
    run("profile_split_step", "--quick", "--out", str(out), timeout=900)
    data = report.load(out, rows=True)
    assert data["token_mismatches"] == 0 and data["kernel_names_seen"]  # inductor's kernels by name
    assert [r["system"] for r in data["scenarios"]] == ["ordinary", "k=0", "k=15"]
    for r in data["scenarios"]:
        prof = r["profiled"]
        assert prof["steps"] > 0 and r["unprofiled"]["steps"] > 0
        assert prof["per_layer_ms"]["linear"] > 0 and prof["per_layer_ms"]["attention"] > 0
        assert sum(prof["forward_ms"].values()) == pytest.approx(prof["model_ms"], rel=0.02)
    assert {c["system"] for c in data["comparison"]} == {"k=0", "k=15"}
    assert all(data["steps"].values()) and out.with_suffix(".png").exists()


@pytest.mark.engine
def test_bench_admission_quick(tmp_path):
    out = tmp_path / "admission.json"
    run("bench_admission", "--quick", "--out", str(out))
    data = json.loads(out.read_text())
    assert data["summary"]["points"] == 2 and data["summary"]["all_exact"]
    assert all(s["predicted_tpot_s"] > 0 and s["measured_tpot_s"] > 0 for s in data["samples"])
    assert out.with_suffix(".png").exists()


def test_fuzz_decoder_quick(tmp_path):
    pytest.importorskip("atheris")
    out = tmp_path / "fuzz_decoder.json"
    run("fuzz_decoder", "--quick", "--out", str(out))
    data = json.loads(out.read_text())
    assert data["arguments"]["seconds"] == 5
    assert data["crashes"] == 0 and data["executions"] > 1000
    assert data["coverage_at_end"]["cov"] > data["coverage_at_start"]["cov"]  # the fuzzer found new branches


@pytest.mark.engine
def test_bench_throughput_quick(tmp_path):
    out = tmp_path / "throughput.json"
    run("bench_throughput", "--quick", "--out", str(out))
    data = report.load(out, rows=True)  # per-request samples: in the compressed sidecar
    assert set(data["systems"]) == {"plain", "split_dp"}
    for system in data["systems"].values():
        (point,) = system["points"]
        assert point["requests"] >= 1 and point["errors"] == 0 and point["wrong_outputs"] == 0
    samples = [s for per_rate in data["samples"]["split_dp"].values() for s in per_rate]
    assert all(s["exact"] for s in samples if s["output_tokens"])
    assert out.with_suffix(".png").exists()


@pytest.mark.engine
def test_bench_gather_quick(tmp_path):
    out = tmp_path / "gather.json"
    # two servers, eager to start fast (split_off differs only by --split-gather off: a unit test;
    # the compiled split path has its own smoke runs: bench_server_step, profile_split_step)
    run("bench_gather", "--quick", "--systems", "plain,split_adaptive", "--plain-eager", "--split-eager",
        "--out", str(out), timeout=1800)
    data = report.load(out, rows=True)
    summary = data["summary"]
    assert set(data["systems"]) == {"plain", "split_adaptive"}
    for name in ("plain", "split_adaptive"):
        s = summary[name]
        assert s["tokens_per_s_mean"] > 0 and s["tpot_p50_s"] > 0 and s["tpot_p90_s"] >= s["tpot_p50_s"]
        assert s["mismatches"] == 0  # every split token is plain vLLM's greedy token
        assert len(data["sessions"][name]) == data["arguments"]["sessions"] * data["arguments"]["repeats"]
    lo, hi = summary["split_adaptive"]["ratio_to_plain_ci95"]
    assert summary["split_adaptive"]["ratio_to_plain"] > 0 and lo <= hi
    assert data["systems"]["plain"]["eager"] is True and data["systems"]["split_adaptive"]["eager"] is True
    # the hold counters: None only when the window never held (its totals are logged after a hold)
    gather = summary["gather"]
    assert gather is None or {"num_holds", "held_s", "num_caught", "num_late", "num_probes"} <= set(gather)
    assert out.with_suffix(".png").exists()


@pytest.mark.engine
def test_bench_composition_quick(tmp_path):
    out = tmp_path / "composition.json"
    run("bench_composition", "--quick", "--out", str(out), timeout=1200)
    data = json.loads(out.read_text())
    (load,) = data["summary"]
    modes = data["summary"][load]["modes"]
    assert set(modes) == {"gathered", "auto"}
    for m in modes.values():
        assert m["mismatches"] == 0 and m["tokens_per_s"] > 0 and m["fitted_predicted_tokens_per_s"] > 0
    assert data["step_model_fitted"]["steps"] > 0 and out.with_suffix(".png").exists()


@pytest.mark.engine
def test_bench_wire_ttft_quick(tmp_path):
    out = tmp_path / "wire_ttft.json"
    run("bench_wire_ttft", "--quick", "--out", str(out), timeout=900)
    s = json.loads(out.read_text())["summary"]
    assert set(s) == {"float16", "int8_mixed"}
    assert s["int8_mixed"]["prompt_bytes"] < s["float16"]["prompt_bytes"]
    assert all(v["ttft_p50_s"] > 0 for v in s.values()) and out.with_suffix(".png").exists()


def test_draft_lookup_quick(tmp_path):
    out = tmp_path / "draft_lookup.json"
    run("draft_lookup", "--quick", "--out", str(out))
    data = report.load(out)
    assert set(data["results"]) == {"bench", "held_out"}
    for by_type in data["results"].values():
        for by_setting in by_type.values():
            assert set(by_setting) == {"old γ=4", "ngram γ=4", "old γ=8", "ngram γ=8"}
            # every round trip yields a token; every one but the first sends a row (plus its drafts)
            assert all(v["tokens_per_round_trip"] >= 1 and v["rows_per_round_trip"] > 0 for v in by_setting.values())
