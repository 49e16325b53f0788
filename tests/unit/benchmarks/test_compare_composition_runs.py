"""Pooling two settings' bench_composition runs (benchmarks/compare_composition_runs.py)."""
import pytest

from benchmarks.compare_composition_runs import compare, ratio_interval


def run(tps: list[float], ordinary: float, split: float) -> dict:
    rounds = [{"tokens_per_s": t, "tpot_ordinary": [ordinary] * 2, "tpot_split": [split], "mismatches": 0}
              for t in tps]
    return {"results": {"gathered": {"mostly_ordinary": {"rounds": rounds}, "only_a": {"rounds": rounds}}}}


def test_medians_and_ratios_over_the_pooled_rounds():
    a = [run([100, 110], 0.09, 0.13), run([104], 0.09, 0.13)]
    b = [run([90, 95, 93], 0.10, 0.13)]
    for r in b:
        del r["results"]["gathered"]["only_a"]  # a load missing from a run is not compared
    out = compare(a, b, "gathered", ("on", "off"))
    assert list(out) == ["mostly_ordinary"]
    m = out["mostly_ordinary"]
    assert m["on"]["rounds"] == 3 and m["off"]["rounds"] == 3
    assert m["on"]["tokens_per_s_p50"] == 104 and m["off"]["tokens_per_s_p50"] == 93
    assert m["tokens_per_s_ratio"] == pytest.approx(104 / 93)
    assert m["tpot_ordinary_ratio"] == pytest.approx(0.9)
    lo, hi = m["tokens_per_s_ratio_ci95"]
    assert lo <= 104 / 93 <= hi and 100 / 95 <= lo and hi <= 110 / 90
    assert m["tpot_split_ratio_ci95"] == pytest.approx([1.0, 1.0])


def test_no_interval_without_samples():
    assert ratio_interval([], [1.0], seed=0) is None
