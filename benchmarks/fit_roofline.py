"""Fit models of a step's time to the step benchmark's samples: the live cost model's additive
form and a roofline (per layer call the longer of its weight read and its rows' compute).

    python -m benchmarks.fit_roofline [--rows results/bench_server_step_compiled_v2.rows.json.gz ...]
                                      [--out results/fit_roofline.json]

Reads the per-step samples that ``benchmarks/bench_server_step.py`` wrote (each step: its
requests' split layers, tokens, step and model-forward time; the cell's kind, batch and
context from its key) and fits, per run, mode (compiled, eager) and system (plain vLLM,
vllm-split), the four models of ``benchmarks/step_models.py``. A decode row reads the cell's
context from the KV cache (the prompt; the few tokens decoded during the cell are left out),
a prefill row reads none. Where a group's steps all run every layer (plain vLLM), ``fixed``
and the per-layer term are not separable: ``fixed`` is pinned to the group's median time
outside the model forward, which the benchmark measured. Reports per model the parameters
(weight read per layer in ms and the bandwidth it implies for the layer's float32 weights),
the relative errors per batch kind, and the benchmark's ratios to plain vLLM as each model
predicts them beside the measured ones. Reads files only; writes the JSON and its plot.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks import report
from benchmarks.step_models import KINDS, error_stats, fit, layer_loads, relative_errors
from vllm_split.planner.cost_model import node_cost
from vllm_split.planner.model_configs import SMOLLM2_135M

ROWS = ["bench_server_step_compiled_v2", "bench_server_step_compiled", "bench_server_step"]
MODEL = dataclasses.replace(SMOLLM2_135M, dtype_bytes=4)  # the benchmarks ran float32
LAYER_BYTES = node_cost(MODEL, "block", phase="decode", tokens=1, context=0).weight_bytes
KV_BYTES_PER_TOKEN = 2 * MODEL.kv_dim * MODEL.dtype_bytes  # K and V of one cached token, one layer
HEAD_BYTES = MODEL.vocab_size * MODEL.hidden_size * MODEL.dtype_bytes  # tied embedding / LM head
ROW_FLOPS = 2 * LAYER_BYTES / MODEL.dtype_bytes  # one row through one layer's matmuls (attention left out)


def parse_key(key: str) -> dict:
    """``mode|system|kind|B=..|C=..`` (the first benchmark ran eager only and has no mode)."""
    parts = key.split("|")
    if len(parts) == 4:
        parts = ["eager", *parts]
    mode, system, kind, b, c = parts
    return {"mode": mode, "system": system, "kind": kind, "batch": int(b.removeprefix("B=")),
            "context": int(c.removeprefix("C="))}


def batch_kind(cell: dict, split_layers: list[int]) -> str:
    label = f"{cell['kind']} B={cell['batch']} C={cell['context']}" if cell["kind"] == "decode" \
        else f"prefill {cell['context']}"
    return label + (" mixed" if len(set(split_layers)) > 1 else "")


def step_loads(sample: dict, cell: dict, num_layers: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and cached tokens read per layer of one logged step (plain vLLM: every request at 0)."""
    n = sample["num_reqs"]
    ks = sample["split_layers"] or [0] * n
    tokens = [sample["num_tokens"] // n] * n
    tokens[0] += sample["num_tokens"] - sum(tokens)
    context = cell["context"] if cell["kind"] == "decode" else 0
    return layer_loads(ks, tokens, [context] * n, num_layers)


@dataclass(frozen=True, slots=True)
class StepGroup:
    """The logged steps of one mode and system of a run, one entry (row) per step."""

    rows: np.ndarray  # (steps, layers): rows each layer ran
    kv: np.ndarray  # (steps, layers): cached tokens each layer's rows read
    step_s: np.ndarray  # the worker's whole step
    model_s: np.ndarray  # inside the model forward (embedding, decoder layers, final norm)
    kind: np.ndarray  # batch kind label (``batch_kind``)
    cell: list[str]  # the benchmark's key of the step's cell

    def of_cell(self, key: str) -> list[int]:
        return [i for i, c in enumerate(self.cell) if c == key]


def read_groups(path: Path) -> tuple[str, dict, dict[str, StepGroup]]:
    """(run name, report, groups): the steps of report ``path`` per ``mode|plain`` and ``mode|split``."""
    data = report.load(path, rows=True)
    num_layers = data["environment"]["num_layers"]
    cols: dict[str, dict[str, list]] = {}
    for key, samples in data["samples"].items():
        cell = parse_key(key)
        name = f"{cell['mode']}|{'plain' if cell['system'] == 'plain' else 'split'}"
        g = cols.setdefault(name, {f.name: [] for f in dataclasses.fields(StepGroup)})
        for s in samples:
            rows, kv = step_loads(s, cell, num_layers)
            for field, value in (("rows", rows), ("kv", kv), ("step_s", s["step_s"]),
                                 ("model_s", s.get("model_s", s.get("layers_s"))),  # the first run's name
                                 ("kind", batch_kind(cell, s["split_layers"])), ("cell", key)):
                g[field].append(value)
    groups = {name: StepGroup(rows=np.array(g["rows"]), kv=np.array(g["kv"]), step_s=np.array(g["step_s"], float),
                              model_s=np.array(g["model_s"], float), kind=np.array(g["kind"]), cell=g["cell"])
              for name, g in cols.items()}
    return path.name.removesuffix(".json"), data, groups


def implied(model) -> dict:
    """What the terms imply if ``layer_s`` reads the layer's float32 weights, ``kv_s`` one cached
    token's K and V, and ``row_s`` runs one row through the layer's matmuls."""
    return {"weight_GBps": LAYER_BYTES / model.layer_s / 1e9 if model.layer_s > 0 else None,
            "kv_GBps": KV_BYTES_PER_TOKEN / model.kv_s / 1e9 if model.kv_s > 0 else None,
            "row_GFLOPs": ROW_FLOPS / model.row_s / 1e9 if model.row_s > 0 else None,
            "crossover_rows": model.crossover_rows() if model.kind.startswith("roofline") else None}


def fit_group(g: StepGroup) -> tuple[dict, dict]:
    """(report, models): every model fitted to one group, with its errors overall, per batch
    kind and per cell."""
    outside = g.step_s - g.model_s
    calls = set((g.rows > 0).sum(axis=1).tolist())
    fixed = float(np.median(outside)) if len(calls) < 2 else None
    out = {"steps": len(g.step_s), "layer_calls": sorted(calls),
           "measured_outside_forward_ms": float(np.median(outside)) * 1e3, "models": {}}
    models = {}
    for kind in KINDS:
        m = models[kind] = fit(kind, g.rows, g.kv, g.step_s, fixed_s=fixed)
        err = relative_errors(m, g.rows, g.kv, g.step_s)
        pred = m.predict(g.rows, g.kv)
        cells = {}
        for c in dict.fromkeys(g.cell):  # the cells in the order they ran
            idx = g.of_cell(c)
            cells[c] = {"measured_ms": round(float(np.median(g.step_s[idx])) * 1e3, 3),
                        "predicted_ms": round(float(np.median(pred[idx])) * 1e3, 3)}
        out["models"][kind] = {**m.as_dict(), **implied(m), "errors": error_stats(err),
                               "errors_by_kind": {k: error_stats(err[g.kind == k]) for k in sorted(set(g.kind))},
                               "cells": cells}
    return out, models


def predictions(data: dict, groups: dict, models: dict) -> list[dict]:
    """The benchmark's summary rows with each model's ratios to plain beside the measured ones.
    ``step``/``loop``: split's model over plain's; ``same_cost``: plain's model on the split
    batch over plain's batch (the ratio if split layers cost what plain's do: the model's limit)."""
    out = []
    for row in data["summary"]:
        mode = row.get("mode", "eager")
        cell = {k: row[k] for k in ("kind", "batch", "context")}
        split_key = _key(data, mode, row["system"], cell)
        plain_key = _key(data, mode, "plain", cell)
        if f"{mode}|plain" not in models or split_key is None or plain_key is None:
            continue
        g_split, g_plain = groups[f"{mode}|split"], groups[f"{mode}|plain"]
        s_idx, p_idx = g_split.of_cell(split_key), g_plain.of_cell(plain_key)
        entry = {"mode": mode, **cell, "system": row["system"], "measured": {
            "step": row["step_ratio"], "loop": row["layers_ratio"], "linear_limit": row["step_limit_ratio"]}}
        for kind in KINDS:
            ms, mp = models[f"{mode}|split"][kind], models[f"{mode}|plain"][kind]
            split = np.median(ms.predict(g_split.rows[s_idx], g_split.kv[s_idx]))
            plain = np.median(mp.predict(g_plain.rows[p_idx], g_plain.kv[p_idx]))
            same = np.median(mp.predict(g_split.rows[s_idx], g_split.kv[s_idx]))
            entry[kind] = {"step": float(split / plain), "loop": float((split - ms.fixed_s) / (plain - mp.fixed_s)),
                           "same_cost": float(same / plain)}
        out.append(entry)
    return out


def _key(data: dict, mode: str, system: str, cell: dict) -> str | None:
    for prefix in (f"{mode}|", ""):
        key = f"{prefix}{system}|{cell['kind']}|B={cell['batch']}|C={cell['context']}"
        if key in data["samples"]:
            return key
    return None


def draw(data: dict):
    runs = [(run, name, g) for run, r in data["runs"].items() for name, g in r["groups"].items()]
    cols = 2
    nrows = (len(runs) + cols - 1) // cols
    fig, axes = report.subplots(nrows, cols, figsize=(9, 2.3 * nrows), squeeze=False)
    markers = dict(zip(KINDS, "osD^"))
    for ax, (run, name, g) in zip(axes.flat, runs):
        for kind in KINDS:
            cells = g["models"][kind]["cells"].values()
            ax.scatter([c["measured_ms"] for c in cells], [c["predicted_ms"] / c["measured_ms"] for c in cells],
                       marker=markers[kind], s=14, linewidths=0,
                       label=f"{kind} (median |err| {g['models'][kind]['errors']['median_abs']:.1%})")
        ax.axhline(1.0, c="k", lw=0.6)
        ax.set_xscale("log")
        ax.set_title(f"{run}: {name}", fontsize=9)
        ax.set_xlabel("measured step, median per cell (ms)", fontsize=8)
        ax.set_ylabel("predicted / measured", fontsize=8)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    return fig


def main() -> None:
    p = report.parser("fit_roofline", __doc__)
    p.add_argument("--rows", type=Path, nargs="+", default=[report.RESULTS / f"{r}{report.ROWS_SUFFIX}" for r in ROWS],
                   help="step benchmark sidecars (NAME.rows.json.gz, the report NAME.json beside it)")
    args = p.parse_args()
    runs = {}
    for rows_file in args.rows:
        run, data, groups = read_groups(rows_file.with_name(rows_file.name.removesuffix(report.ROWS_SUFFIX) + ".json"))
        fits = {name: fit_group(g) for name, g in sorted(groups.items())}
        runs[run] = {"git_sha": data["environment"].get("git_sha"),
                     "groups": {name: f[0] for name, f in fits.items()},
                     "predictions": predictions(data, groups, {name: f[1] for name, f in fits.items()})}
    out = {"arguments": report.arguments(args), "environment": report.environment(),
           "bytes": {"layer_weights": LAYER_BYTES, "kv_per_token_per_layer": KV_BYTES_PER_TOKEN,
                     "embedding_lm_head": HEAD_BYTES, "model": MODEL.name, "dtype_bytes": MODEL.dtype_bytes},
           "runs": runs, "summary": summary(runs)}
    report.write(args.out, _rounded(out), draw=draw, indent=None)
    for r in out["summary"]:
        print(f"{r['run']:30s} {r['group']:14s} {r['model']:11s} fixed {r['fixed_ms']:6.2f} ms, layer {r['layer_ms']:6.3f} ms "
              f"({r['weight_GBps'] or 0:5.2f} GB/s), row {r['row_ms']:6.4f} ms, kv {r['kv_us_per_1k_tokens']:6.1f} us/1k "
              f"({r['kv_GBps'] or 0:5.2f} GB/s); |err| median {r['median_abs_err']:.3f} p90 {r['p90_abs_err']:.3f}")
    print(f"[fit_roofline] wrote {report.relative(args.out)}")


def _rounded(obj):
    """``obj`` with its floats to 5 significant digits (the fits are not more precise)."""
    if isinstance(obj, float):
        return float(f"{obj:.5g}")
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


def summary(runs: dict) -> list[dict]:
    """One row per run, group and model: the parameters and the relative errors over all steps."""
    keys = ("fixed_ms", "layer_ms", "row_ms", "kv_us_per_1k_tokens", "weight_GBps", "kv_GBps", "row_GFLOPs")
    return [{"run": run, "group": name, "model": kind, **{k: m[k] for k in keys},
             "median_abs_err": m["errors"]["median_abs"], "p90_abs_err": m["errors"]["p90_abs"]}
            for run, r in runs.items() for name, g in r["groups"].items() for kind, m in g["models"].items()]


if __name__ == "__main__":
    main()
