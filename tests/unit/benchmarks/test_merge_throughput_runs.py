"""Points of bench_throughput run in several processes, as one report (benchmarks/merge_throughput_runs.py)."""
import pytest

from benchmarks import report
from benchmarks.bench_throughput import reanalyse
from benchmarks.merge_throughput_runs import MergeError, merge, seeded

EXPERIMENT = {"workload": {"seed": 7}, "server_layer_times": {"decode_s": 0.002}, "client_profiles": {"phone": 1}}


def point(rate: float, met: int, requests: int = 10) -> dict:
    return {"rate": rate, "speed_scale": 1.0, "offered_rate": rate, "requests": requests, "met": met,
            "wrong_outputs": 0, "client_s_per_request": 0.0, "attainment": met / requests,
            "attainment_ci95": [0.0, 1.0], "goodput_rps": rate * met / requests}


def rows(rate: float, met: int, requests: int = 10) -> dict:
    return {f"{rate:.4g}@1": [{"trace": i % 2, "met": i < met} for i in range(requests)]}


def run(points: dict, knobs=("--max-num-seqs", "32"), **changes) -> dict:
    """A loaded report: ``points`` {system: [(rate, met), ...]}."""
    systems = {s: {"knobs": list(knobs), "points": [point(r, m) for r, m in pts], "max_rate_at_90pct": {}}
               for s, pts in points.items()}
    samples = {s: {k: v for r, m in pts for k, v in rows(r, m).items()} for s, pts in points.items()}
    return {**EXPERIMENT, **changes, "systems": systems, "samples": samples, "crossover": {}}


def test_seeded_keeps_the_experiment_and_drops_the_results():
    source = {**run({"plain": [(1.0, 9)]}), "sweeps": {"plain": {"chosen": ["--max-num-seqs", "32"]}},
              "complete": True}
    seed = seeded(source)
    assert seed["workload"] == EXPERIMENT["workload"] and seed["sweeps"] == source["sweeps"]
    assert seed["systems"] == {} and seed["complete"] is False and "samples" not in seed
    with pytest.raises(MergeError, match="server_layer_times"):
        seeded({"workload": {}, "client_profiles": {}})


def test_merge_appends_new_points_with_their_process_and_skips_kept_ones(tmp_path):
    base = run({"plain": [(0.8, 10), (1.0, 10)], "split_dp": [(0.8, 7), (1.0, 6)]})
    high = run({"plain": [(1.5, 5)]})
    low = run({"plain": [(0.5, 10)], "split_dp": [(0.5, 10)]})
    kept = run({"plain": [(0.5, 10)], "split_drafts": []})  # resumed from `low`: plain's point is kept
    del kept["systems"]["split_drafts"], kept["samples"]["split_drafts"]
    data = merge(base, [high, low, kept])
    assert [p["rate"] for p in data["systems"]["plain"]["points"]] == [0.5, 0.8, 1.0, 1.5]
    assert [p.get("process", 1) for p in data["systems"]["plain"]["points"]] == [3, 1, 1, 2]
    assert [p["rate"] for p in data["systems"]["split_dp"]["points"]] == [0.5, 0.8, 1.0]
    assert sorted(data["samples"]["plain"]) == ["0.5@1", "0.8@1", "1.5@1", "1@1"]
    assert {(m["system"], m["rate"], m["process"]) for m in data["merged"]["points"]} == {
        ("plain", 1.5, 2), ("plain", 0.5, 3), ("split_dp", 0.5, 3)}
    out = tmp_path / "merged.json"
    samples = data.pop("samples")
    del data["workload"]  # a made-up workload: no placement ceiling to recompute
    report.write(out, data, rows={"samples": samples})
    again = reanalyse(out)  # both crossings bracketed now
    assert again["summary"]["plain"]["how"] == "crossing" and again["summary"]["split_dp"]["how"] == "crossing"
    assert 1.0 < again["summary"]["plain"]["max_rate_at_90pct"] < 1.5
    assert 0.5 < again["summary"]["split_dp"]["max_rate_at_90pct"] < 0.8


@pytest.mark.parametrize("change, match", [
    ({"workload": {"seed": 8}}, "another workload"),
    ({"client_profiles": {"phone": 2}}, "another client_profiles"),
])
def test_merge_refuses_another_experiment(change, match):
    with pytest.raises(MergeError, match=match):
        merge(run({"plain": [(1.0, 9)]}), [run({"plain": [(1.5, 5)]}, **change)])


def test_merge_refuses_other_knobs_or_an_unknown_system():
    with pytest.raises(MergeError, match="ran plain with"):
        merge(run({"plain": [(1.0, 9)]}), [run({"plain": [(1.5, 5)]}, knobs=("--max-num-seqs", "128"))])
    with pytest.raises(MergeError, match="which the base does not"):
        merge(run({"plain": [(1.0, 9)]}), [run({"split_greedy": [(1.5, 5)]})])
