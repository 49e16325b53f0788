"""Two settings of a split server compared over several ``bench_composition`` runs each.

    python -m benchmarks.compare_composition_runs --a on RUN.json [RUN.json ...] --b off RUN.json [...]
        [--mode gathered] [--out results/gather_weigh.json]

For an option that ``bench_composition`` cannot vary inside one run (``--split-args``), run it
alternately with each setting, back to back (A, B, A, B: this machine drifts over minutes),
then pool here. Per load and setting: the median over the pooled rounds of output tokens/s
(the steady window's), and of the sessions' TPOT per kind (ordinary, split); per load the
ratio A / B of each with a bootstrap 95% interval (rounds resampled for tokens/s, sessions
for TPOT, 4000 resamples, seed 0 each: ``bench_gather.bootstrap_ratio`` of the medians). Every run's rounds go to the compressed sidecar
``NAME.rows.json.gz`` (not their fits and predictions: those stay in the runs' own reports).

The committed ``results/gather_weigh.json``: the gather window weighed against the ordinary
requests (``--split-gather-weigh on``, the default) against the bound alone (``off``)::

    for i in 1 2; do
      python -m benchmarks.bench_composition --modes gathered --loads mostly_ordinary,ordinary_and_split \\
          --rounds 3 --out on_$i.json
      python -m benchmarks.bench_composition --modes gathered --loads mostly_ordinary,ordinary_and_split \\
          --rounds 3 --split-args=--split-gather-weigh=off --out off_$i.json
    done
    python -m benchmarks.compare_composition_runs --a on on_1.json on_2.json --b off off_1.json off_2.json
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from benchmarks import report
from benchmarks.bench_gather import bootstrap_ratio

ROUND_KEYS = ("tokens_per_s", "step_s_per_token", "tpot_ordinary", "tpot_split", "mismatches", "window_s", "tokens")
RESAMPLES = 4000


def ratio_interval(a: list[float], b: list[float], seed: int) -> list[float] | None:
    """Bootstrap 95% interval of median(a) / median(b) (None without samples)."""
    return bootstrap_ratio(a, b, seed=seed, n=RESAMPLES, stat=statistics.median) if a and b else None


def pooled(runs: list[dict], mode: str, load: str) -> dict:
    """Every round of ``load`` under composition ``mode`` in ``runs``, pooled."""
    rounds = [r for run in runs for r in run["results"][mode][load]["rounds"]]
    return {"tokens_per_s": [r["tokens_per_s"] for r in rounds],
            "tpot_ordinary": [t for r in rounds for t in r.get("tpot_ordinary", [])],
            "tpot_split": [t for r in rounds for t in r.get("tpot_split", [])],
            "rounds": len(rounds), "mismatches": sum(r["mismatches"] for r in rounds)}


def compare(a: list[dict], b: list[dict], mode: str, names: tuple[str, str], seed: int = 0) -> dict:
    """Per load present in every run: each setting's medians and A / B with intervals."""
    loads = [name for name in a[0]["results"][mode] if all(name in r["results"][mode] for r in (*a, *b))]
    out = {}
    for load in loads:
        pa, pb = pooled(a, mode, load), pooled(b, mode, load)
        per = {}
        for name, p in zip(names, (pa, pb)):
            per[name] = {"rounds": p["rounds"], "mismatches": p["mismatches"],
                         **{f"{key}_p50": statistics.median(p[key]) if p[key] else None
                            for key in ("tokens_per_s", "tpot_ordinary", "tpot_split")}}
        for key in ("tokens_per_s", "tpot_ordinary", "tpot_split"):
            x, y = per[names[0]][f"{key}_p50"], per[names[1]][f"{key}_p50"]
            per[f"{key}_ratio"] = x / y if x and y else None
            per[f"{key}_ratio_ci95"] = ratio_interval(pa[key], pb[key], seed)
        out[load] = per
    return out


def draw(data: dict):
    names, summary = data["settings"], data["summary"]
    loads = list(summary)
    keys = (("tokens_per_s", "output tokens/s"), ("tpot_ordinary", "ordinary TPOT (s)"), ("tpot_split", "split TPOT (s)"))
    fig, axes = report.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        for j, name in enumerate(names):
            ax.bar([i + (j - 0.5) * 0.38 for i in range(len(loads))],
                   [summary[load][name][f"{key}_p50"] or 0 for load in loads], 0.38, label=name)
        for i, load in enumerate(loads):
            r, ci = summary[load][f"{key}_ratio"], summary[load][f"{key}_ratio_ci95"]
            if r:
                ax.annotate(f"{r:.2f}x [{ci[0]:.2f}, {ci[1]:.2f}]", (i, 0), xytext=(0, 4), textcoords="offset points",
                            ha="center", fontsize=7)
        ax.set_xticks(range(len(loads)), loads, fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"{names[0]} vs {names[1]} ({data['mode']} composition; medians, ratio {names[0]}/{names[1]})")
    return fig


def main() -> None:
    p = report.parser("compare_composition_runs", __doc__, out="gather_weigh", plot=True)
    p.add_argument("--a", nargs="+", required=True, metavar=("NAME", "RUN"), help="setting A's name, then its runs")
    p.add_argument("--b", nargs="+", required=True, metavar=("NAME", "RUN"), help="setting B's name, then its runs")
    p.add_argument("--mode", default="gathered", help="the composition compared (default: gathered)")
    args = report.parse_args(p, draw)
    if len(args.a) < 2 or len(args.b) < 2:
        raise SystemExit("--a and --b: a name, then at least one bench_composition report")
    runs = {side[0]: [json.loads(Path(f).read_text()) for f in side[1:]] for side in (args.a, args.b)}
    names = (args.a[0], args.b[0])
    for side in (args.a, args.b):  # the runs' files as the report names them (no machine paths)
        side[1:] = [report.relative(f) for f in side[1:]]
    data = {"arguments": report.arguments(args), "environment": report.environment(), "settings": list(names),
            "mode": args.mode, "summary": compare(runs[names[0]], runs[names[1]], args.mode, names)}
    kept = {name: [{"arguments": r["arguments"], "git_sha": r["environment"].get("git_sha"),
                    "rounds": {load: [{k: x[k] for k in ROUND_KEYS if k in x} for x in v["rounds"]]
                               for load, v in r["results"][args.mode].items()}} for r in rs]
            for name, rs in runs.items()}
    report.write(args.out, data, rows={"runs": kept}, draw=draw)  # every run's rounds: in the sidecar
    print(json.dumps(data["summary"], indent=1))


if __name__ == "__main__":
    main()
