"""CI smoke run of bench_wire_precision on the real model (transformers only, no vLLM engine):
it runs, writes its JSON, sidecar and plot, and the JSON holds every (format, k) figure."""
from __future__ import annotations

from benchmarks import report
from tests.support.benchmarks import run

FIELDS = {"format", "split_layer", "token_match_rate", "first_divergence_median", "first_divergence_min",
          "prompts_without_divergence", "reference_margin_at_divergence_median", "kl_mean", "kl_max",
          "tf_top1_agreement", "bytes_per_token", "bytes_per_token_formula"}


def test_bench_wire_precision_quick(tmp_path, model_dir):
    out = tmp_path / "wire.json"
    run("bench_wire_precision", "--quick", "--model", str(model_dir), "--out", str(out))
    data = report.load(out, rows=True)
    assert data["prompts"]["count"] == 2 and data["tokens"] == 8 and data["split_layers"] == [1, 15]
    assert {"float32", "float16", "bfloat16", "int8_row", "int8_mixed"} <= set(data["formats"])
    results = {(r["format"], r["split_layer"]): r for r in data["results"]}
    assert set(results) == {(f, k) for f in data["formats"] for k in data["split_layers"]}
    for r in results.values():
        assert set(r) == FIELDS
        assert 0.0 <= r["token_match_rate"] <= 1.0 and 0 <= r["first_divergence_min"] <= 8 and r["kl_mean"] >= 0
        assert r["bytes_per_token"] == r["bytes_per_token_formula"]  # measured frames = the planner's sizes
    for k in data["split_layers"]:  # the unrounded element is the reference, computed in the same batch
        assert results[("float32", k)]["token_match_rate"] == 1.0 and results[("float32", k)]["kl_mean"] < 1e-9
        assert results[("int8_row", k)]["bytes_per_token"] == 576 + 4
        assert results[("int8_row", k)]["kl_mean"] > results[("float16", k)]["kl_mean"]
    assert len(data["per_prompt"]) == 2 and len(data["variants"]) == 1 + len(results)
    assert set(data["summary"]) == set(data["formats"])
    assert data["arguments"]["out"] == "wire.json" and "git_sha" in data["environment"]
    assert out.with_suffix(".png").exists()
