"""benchmarks/step_models.py and benchmarks/fit_roofline.py: the step models recover the
parameters of synthetic steps, and the script turns a step benchmark's report into fits and
predicted ratios."""
import json

import numpy as np
import pytest

from benchmarks import fit_roofline, report
from benchmarks.step_models import StepModel, error_stats, fit, layer_loads, relative_errors

L = 30
KS = (0, 7, 15, 22)


def steps(*, batches=(1, 4, 16, 64), contexts=(128, 1024), prefills=(128, 1024)):
    """(rows, kv) of the step benchmark's shapes: decodes at each k and mixed, prefills at each k."""
    shapes = []
    for b in batches:
        for c in contexts:
            for ks in [[k] * b for k in KS] + [[KS[i % len(KS)] for i in range(b)]]:
                shapes.append(layer_loads(ks, [1] * b, [c] * b, L))
    for p in prefills:
        shapes += [layer_loads([k], [p], [0], L) for k in KS]
    rows, kv = zip(*shapes)
    return np.array(rows), np.array(kv)


def test_layer_loads_counts_the_rows_and_cached_tokens_each_layer_runs():
    rows, kv = layer_loads([0, 7, 15], [1, 1, 4], [100, 200, 0], L)
    assert rows[:7].tolist() == [1] * 7 and rows[7:15].tolist() == [2] * 8 and rows[15:].tolist() == [6] * 15
    assert kv[0] == 100 and kv[7] == 300 and kv[29] == 300  # the prefill rows read no cache
    with pytest.raises(ValueError, match=r"split layer 30 outside \[0, 30\)"):
        layer_loads([30], [1], [0], L)
    with pytest.raises(ValueError, match="one split layer, token count and context per request; got 2, 1, 1"):
        layer_loads([0, 1], [1], [0], L)


@pytest.mark.parametrize("kind", ["additive", "additive_kv"])
def test_additive_fit_recovers_known_parameters(kind):
    rows, kv = steps()
    truth = StepModel(kind, fixed_s=0.013, layer_s=1.8e-3, row_s=7e-5, kv_s=2.5e-7 if kind == "additive_kv" else 0.0)
    got = fit(kind, rows, kv, truth.predict(rows, kv))
    for name in ("fixed_s", "layer_s", "row_s", "kv_s"):
        assert getattr(got, name) == pytest.approx(getattr(truth, name), rel=1e-6, abs=1e-12), name


@pytest.mark.parametrize("kind", ["roofline", "roofline_kv"])
def test_roofline_fit_recovers_weight_read_row_compute_and_fixed_part(kind):
    rows, kv = steps()
    truth = StepModel(kind, fixed_s=0.013, layer_s=2e-3, row_s=7e-5, kv_s=2.5e-7 if kind == "roofline_kv" else 0.0)
    got = fit(kind, rows, kv, truth.predict(rows, kv))
    assert got.layer_s == pytest.approx(truth.layer_s, rel=0.01)
    assert got.row_s == pytest.approx(truth.row_s, rel=0.01)
    assert got.kv_s == pytest.approx(truth.kv_s, rel=0.02, abs=1e-12)
    assert got.fixed_s == pytest.approx(truth.fixed_s, rel=0.02)
    assert got.crossover_rows() == pytest.approx(2e-3 / 7e-5, rel=0.02)  # weight-bound below ~29 rows


def test_roofline_fit_with_noise_stays_close():
    rows, kv = steps()
    truth = StepModel("roofline_kv", fixed_s=0.013, layer_s=2e-3, row_s=7e-5, kv_s=2.5e-7)
    y = truth.predict(rows, kv) * np.random.default_rng(0).normal(1.0, 0.03, len(rows))
    got = fit("roofline_kv", rows, kv, y)
    assert got.layer_s == pytest.approx(truth.layer_s, rel=0.1)
    assert got.row_s == pytest.approx(truth.row_s, rel=0.1)
    assert got.kv_s == pytest.approx(truth.kv_s, rel=0.15)


def test_each_form_fits_its_own_data_better_than_the_other():
    rows, kv = steps()
    roof = StepModel("roofline", fixed_s=0.013, layer_s=2e-3, row_s=7e-5)
    add = StepModel("additive", fixed_s=0.013, layer_s=2e-3, row_s=7e-5)
    for truth, worse in ((roof, "additive"), (add, "roofline")):
        y = truth.predict(rows, kv)
        own = np.abs(relative_errors(fit(truth.kind, rows, kv, y), rows, kv, y)).max()
        other = np.median(np.abs(relative_errors(fit(worse, rows, kv, y), rows, kv, y)))
        assert own < 0.01 < other, (truth.kind, own, other)


def test_pinned_fixed_part_separates_layer_and_row_costs_when_every_step_runs_all_layers():
    rows, kv = steps(batches=(1, 16), contexts=(1024,), prefills=(1024,))
    plain = rows[:, 0] > 0  # the k = 0 steps: layer calls never vary, fixed and layer_s are collinear
    truth = StepModel("additive_kv", fixed_s=0.012, layer_s=1.6e-3, row_s=6e-5, kv_s=2e-7)
    got = fit("additive_kv", rows[plain], kv[plain], truth.predict(rows[plain], kv[plain]), fixed_s=0.012)
    assert got.fixed_pinned and got.fixed_s == 0.012
    assert got.layer_s == pytest.approx(1.6e-3, rel=1e-6) and got.kv_s == pytest.approx(2e-7, rel=1e-6)


def test_fits_keep_every_coefficient_non_negative():
    rows, kv = steps()
    calls = (rows > 0).sum(axis=1)
    y = 0.05 + 2e-3 * calls - 1e-6 * rows.sum(axis=1)  # a row "saves" time: not a physical step
    got = fit("additive", rows, kv, y)
    assert got.row_s == 0.0 and got.layer_s > 0 and got.fixed_s > 0


def test_fit_rejects_bad_input_with_the_shapes():
    rows, kv = steps(batches=(1,), contexts=(128,), prefills=())
    with pytest.raises(ValueError, match=r"expected \(steps, layers\) twice and \(steps,\)"):
        fit("additive", rows, kv, np.ones(3))
    with pytest.raises(ValueError, match="step times must be > 0"):
        fit("roofline", rows, kv, np.zeros(len(rows)))
    with pytest.raises(ValueError, match="model kind 'linear'"):
        fit("linear", rows, kv, np.ones(len(rows)))


def test_error_stats():
    s = error_stats(np.array([-0.1, 0.0, 0.05, 0.2, 0.3]))
    assert s["median_abs"] == pytest.approx(0.1) and s["median"] == pytest.approx(0.05) and s["steps"] == 5
    assert s["p90_abs"] == pytest.approx(0.26)


# ------------------------------------------------------------------- the script on a report
PLAIN = StepModel("additive_kv", fixed_s=0.012, layer_s=1.6e-3, row_s=6e-5, kv_s=2e-7)
SPLIT = StepModel("additive_kv", fixed_s=0.013, layer_s=2.4e-3, row_s=6e-5, kv_s=2e-7)


def _sample(model, ks, tokens, context):
    rows, kv = layer_loads(ks, [tokens] * len(ks), [context] * len(ks), L)
    step = float(model.predict(rows, kv)[0])
    return {"num_reqs": len(ks), "num_tokens": tokens * len(ks), "split_layers": ks, "step_s": step,
            "model_s": step - model.fixed_s}


def _report(tmp_path):
    cells = [("decode", 1, 128), ("decode", 4, 1024), ("prefill", 1, 128)]
    samples, summary = {}, []
    for kind, b, c in cells:
        tokens, context = (1, c) if kind == "decode" else (c, 0)
        plain = _sample(PLAIN, [0] * b, tokens, context)
        samples[f"compiled|plain|{kind}|B={b}|C={c}"] = [{**plain, "split_layers": []}] * 3
        for system in ("0", "15", "mixed"):
            ks = [KS[i % len(KS)] for i in range(b)] if system == "mixed" else [int(system)] * b
            s = _sample(SPLIT, ks, tokens, context)
            samples[f"compiled|{system}|{kind}|B={b}|C={c}"] = [s] * 3
            summary.append({"mode": "compiled", "kind": kind, "batch": b, "context": c, "system": system,
                            "step_ratio": s["step_s"] / plain["step_s"], "layers_ratio": 1.0, "step_limit_ratio": 1.0})
    out = tmp_path / "bench_server_step_x.json"
    report.write(out, {"environment": {"num_layers": L, "git_sha": "abc"}, "summary": summary},
                 rows={"samples": samples})
    return out


def test_keys_of_both_benchmark_versions_parse():
    assert fit_roofline.parse_key("compiled|mixed|decode|B=16|C=1024") == {
        "mode": "compiled", "system": "mixed", "kind": "decode", "batch": 16, "context": 1024}
    assert fit_roofline.parse_key("7|prefill|B=1|C=128")["mode"] == "eager"  # the first run had no modes


def test_report_to_fits_and_predicted_ratios(tmp_path):
    run, data, groups = fit_roofline.read_groups(_report(tmp_path))
    assert run == "bench_server_step_x" and set(groups) == {"compiled|plain", "compiled|split"}
    fits = {name: fit_roofline.fit_group(g) for name, g in groups.items()}
    plain, split = fits["compiled|plain"], fits["compiled|split"]
    assert plain[0]["layer_calls"] == [30] and plain[1]["additive_kv"].fixed_pinned  # measured outside the forward
    assert plain[1]["additive_kv"].layer_s == pytest.approx(PLAIN.layer_s, rel=1e-6)
    assert not split[1]["additive_kv"].fixed_pinned and split[1]["additive_kv"].layer_s == pytest.approx(SPLIT.layer_s, rel=1e-6)
    assert plain[0]["models"]["additive_kv"]["weight_GBps"] == pytest.approx(14155776 / 1.6e-3 / 1e9, rel=1e-6)
    assert plain[0]["models"]["additive_kv"]["errors"]["median_abs"] < 1e-6
    assert set(split[0]["models"]["roofline"]["errors_by_kind"]) == {
        "decode B=1 C=128", "decode B=4 C=1024", "decode B=4 C=1024 mixed", "prefill 128"}
    preds = fit_roofline.predictions(data, groups, {name: f[1] for name, f in fits.items()})
    assert len(preds) == len(data["summary"])
    for p in preds:
        assert p["additive_kv"]["step"] == pytest.approx(p["measured"]["step"], rel=1e-6)
    k15 = next(p for p in preds if p["system"] == "15" and p["batch"] == 4)
    rows, kv = layer_loads([15] * 4, [1] * 4, [1024] * 4, L)
    rows0, kv0 = layer_loads([0] * 4, [1] * 4, [1024] * 4, L)
    assert k15["additive_kv"]["same_cost"] == pytest.approx(PLAIN.predict(rows, kv)[0] / PLAIN.predict(rows0, kv0)[0])


def test_main_writes_the_json_and_its_plot(tmp_path, monkeypatch):
    src = _report(tmp_path)
    out = tmp_path / "fit.json"
    monkeypatch.setattr("sys.argv", ["fit_roofline", "--rows", str(report.rows_path(src)), "--out", str(out)])
    fit_roofline.main()
    data = json.loads(out.read_text())
    assert set(data["runs"]) == {"bench_server_step_x"} and out.with_suffix(".png").stat().st_size > 0
    assert {r["model"] for r in data["summary"]} == {"additive", "additive_kv", "roofline", "roofline_kv"}
    assert data["bytes"]["layer_weights"] == 14155776 and data["bytes"]["embedding_lm_head"] == 113246208
