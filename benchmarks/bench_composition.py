"""Step composition: mixed, gathered, grouped and auto on two decode loads, each measured
beside the roofline model's prediction.

    python -m benchmarks.bench_composition [--quick] [--rounds 2] [--tokens 48] [--modes gathered,...]
        [--loads ordinary_and_split,split_high] [--split-args=--split-OPTION=VALUE]
        [--out results/bench_composition.json]

One split server per composition (``--split-composition``, vLLM's default compiled mode,
prefix caching off), the same requests on each:

* ``ordinary_and_split``: 4 ordinary streaming completions beside 8 split sessions at
  ``k`` 0, 7, 15, 22 (two each) whose emulated clients take 20 ms from a token to the next
  activation (a Wi-Fi-class client: its layers and its network);
* ``split_high``: 12 split sessions only, 4 at ``k`` 15 and 8 at 22, 25 ms turnaround (just
  beyond the gather window's 25 ms cap once the API server's trip is added: they miss
  alternate steps, the case grouping is for);
* ``mostly_ordinary`` (only with ``--loads``): 8 ordinary completions beside 2 split sessions at
  ``k = 0`` with a 20 ms turnaround, the split servers of the throughput runs: what the gather
  window's holds cost the ordinary requests (run it with and without
  ``--split-args=--split-gather-weigh=off``). Each round's TPOT is also given per kind.

Split clients replay activations the client library computed beforehand
(``harness/replay.py``; every token is checked against the engine's greedy continuation,
``mismatches``) and sleep their turnaround before each activation; they state a TPOT bound
of 0.3 s. Each load runs a warm-up round, then ``--rounds`` rounds of all its sessions
started at once. Measured in the *steady window* of a round (from the last session's first
token to the first session's last): output tokens per second, the worker's step time per
output token (``VLLM_SPLIT_STEP_LOG``: the server's work, holds excluded) and each
session's TPOT. Predicted by ``vllm_split/engine/composition.py`` for the same rows (context:
prompt + half the output; turnaround: the client's plus an assumed 3 ms loopback trip through
the API server): the composition ``auto`` and ``grouped`` choose for that batch, tokens per
second (sum of 1 / TPOT), step time per token and TPOT. Two sets of predictions: with the
step model the servers use (``RooflineCost``'s defaults, fitted by ``fit_roofline`` on the
step benchmark), and with the step model fitted here (least squares over every decode
step of the four servers: fixed, per layer call, per layer-row; plus the engine loop's
median gap between back-to-back steps, which a step's period adds). The summary gives, per
load, the best fixed composition and how far ``auto``'s measured throughput is from it.
``--reanalyse`` recomputes fits, predictions and summary from the report and its step logs.
"""
from __future__ import annotations

import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import report

MODES = ("gathered", "mixed", "grouped", "auto")
LOADS = {
    "ordinary_and_split": {"ordinary": 4, "split": (0, 7, 15, 22, 0, 7, 15, 22), "turnaround_s": 0.020},
    "split_high": {"ordinary": 0, "split": (15,) * 4 + (22,) * 8, "turnaround_s": 0.025},
    # mostly server-decoded work with a few round trips (the throughput runs' split servers):
    # what the gather window's holds cost the ordinary requests (``--split-gather-weigh``)
    "mostly_ordinary": {"ordinary": 8, "split": (0, 0), "turnaround_s": 0.020},
}
DEFAULT_LOADS = ("ordinary_and_split", "split_high")
TPOT_BOUND_S = 0.3
API_TRIP_S = 0.003  # assumed: a loopback activation's trip through the API server
COMMON = ("--no-enable-prefix-caching", "--max-num-seqs", "32")


def read_steps(log: Path, t0: float, t1: float) -> list[dict]:
    if not log.exists():
        return []
    return [s for s in map(json.loads, log.read_text().splitlines()) if t0 <= s["t"] <= t1]


async def one_round(url: str, model: str, load: dict, ordinary: list, scripts: list, fingerprint: str) -> list[dict]:
    """All sessions of ``load`` at once: per session (kind, k, token times, tokens, expected)."""
    import aiohttp

    from benchmarks.bench_gather import plain_session
    from harness.replay import replay
    from vllm_split.wire.protocol import RequestSLA

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as http:
        async def plain(i: int) -> dict:
            ids, expected = ordinary[i]
            r = await plain_session(url, model, ids, len(expected), http)
            return {"kind": "ordinary", "k": 0, "times": r["times"], "exact": r["tokens"] == expected}

        async def split(script) -> dict:
            r = await replay(url, script, fingerprint=fingerprint, http=http, turnaround_s=load["turnaround_s"],
                             sla=RequestSLA(ttft_s=30.0, tpot_s=TPOT_BOUND_S))
            return {"kind": "split", "k": script.split_layer, "times": r.times, "exact": r.exact}

        jobs = [plain(i) for i in range(load["ordinary"])] + [split(s) for s in scripts]
        return await asyncio.gather(*jobs)


def steady(sessions: list[dict], log: Path) -> dict:
    """The round's steady window: throughput, step time per token, TPOT per session."""
    starts = [s["times"][0] for s in sessions if s["times"]]
    ends = [s["times"][-1] for s in sessions if s["times"]]
    a, b = max(starts), min(ends)
    tokens = sum(1 for s in sessions for t in s["times"] if a <= t <= b)
    # the step log stamps wall time (time.time()); the token times are perf_counter: shift
    shift = time.time() - time.perf_counter()
    steps = read_steps(log, a + shift, b + shift)
    timed = [(s["kind"], (s["times"][-1] - s["times"][0]) / (len(s["times"]) - 1)) for s in sessions
             if len(s["times"]) > 1]
    tpot = [t for _, t in timed]
    k_min = [0 if s["num_reqs"] > len(s["split_layers"]) else min(s["split_layers"]) for s in steps]
    by_kind = {kind: [t for k, t in timed if k == kind] for kind in ("ordinary", "split")}
    return {"window_s": b - a, "tokens": tokens, "tokens_per_s": tokens / (b - a) if b > a else None,
            "tpot_ordinary": by_kind["ordinary"], "tpot_split": by_kind["split"],
            "step_s_per_token": sum(s["step_s"] for s in steps) / tokens if tokens else None,
            "steps": len(steps), "steps_by_lowest_layer": {str(k): k_min.count(k) for k in sorted(set(k_min))},
            "tpot_by_session": tpot, "mismatches": sum(not s["exact"] for s in sessions)}


def fit_cost(logs: list[Path], num_layers: int) -> dict:
    """The step model from every decode step in ``logs`` (fixed, per layer call, per
    layer-row, by least squares) and the loop's median gap between back-to-back steps."""
    import numpy as np

    x, y, gaps = [], [], []
    for log in logs:
        steps = read_steps(log, 0.0, float("inf"))
        gaps += [b["t"] - a["t"] - b["step_s"] for a, b in zip(steps, steps[1:])]
        for st in steps:
            if st["num_tokens"] != st["num_reqs"]:
                continue  # a prefill in the step
            ks = [0] * (st["num_reqs"] - len(st["split_layers"])) + st["split_layers"]
            x.append([1.0, num_layers - min(ks), sum(num_layers - k for k in ks)])
            y.append(st["step_s"])
    coef, *_ = np.linalg.lstsq(np.array(x), np.array(y), rcond=None)
    fixed, layer, row = (max(0.0, float(c)) for c in coef)
    pred = np.array(x) @ np.array([fixed, layer, row])
    err = np.abs(pred - np.array(y)) / np.array(y)
    back_to_back = [g for g in gaps if 0 <= g < 0.02]
    return {"fixed_s": fixed, "layer_s": layer, "row_s": row, "steps": len(y),
            "median_error": float(np.median(err)), "p90_error": float(np.quantile(err, 0.9)),
            "loop_gap_s": statistics.median(back_to_back) if back_to_back else 0.0}


def prediction(load: dict, mode: str, num_layers: int, context: int, fit: dict | None = None) -> dict:
    """What the model predicts for ``load`` under ``mode``: with the servers' step model, or
    with ``fit`` (its loop gap added to a step's period for TPOT and throughput)."""
    from vllm_split.engine.composition import RooflineCost, Row, choose

    rows = ([Row(0, context)] * load["ordinary"]
            + [Row(k, context, load["turnaround_s"] + API_TRIP_S, TPOT_BOUND_S) for k in load["split"]])
    work = period = RooflineCost()
    if fit is not None:
        work = RooflineCost(fixed_s=fit["fixed_s"], layer_s=fit["layer_s"], row_s=fit["row_s"], kv_s=0.0)
        period = RooflineCost(fixed_s=fit["fixed_s"] + fit["loop_gap_s"], layer_s=fit["layer_s"], row_s=fit["row_s"],
                              kv_s=0.0)
    p = choose(rows, mode, num_layers, period)
    steps = choose(rows, mode, num_layers, work)
    return {"choice": {"mode": p.choice.mode, "threshold": p.choice.threshold},
            "tokens_per_s": sum(1.0 / t for t in p.tpot_s), "step_s_per_token": steps.step_s_per_token,
            "tpot_by_session": list(p.tpot_s), "engine_tokens_per_s": p.tokens_per_s}


def summarize(results: dict, loads: dict) -> dict:
    out = {}
    for load in loads:
        per = {}
        for mode in MODES:
            r = results.get(mode, {}).get(load)
            if not r:
                continue
            rounds = r["rounds"]
            tps = statistics.median(x["tokens_per_s"] for x in rounds)
            spt = statistics.median(x["step_s_per_token"] for x in rounds)
            tpot = statistics.median(t for x in rounds for t in x["tpot_by_session"])
            kinds = {f"tpot_{kind}_p50_s": statistics.median(ts) if (ts := [t for x in rounds
                                                                                for t in x.get(f"tpot_{kind}", [])])
                     else None for kind in ("ordinary", "split")}
            per[mode] = {"tokens_per_s": tps, "step_s_per_token": spt, "tpot_p50_s": tpot, **kinds,
                         "choice": r["predicted"]["choice"], "mismatches": sum(x["mismatches"] for x in rounds)}
            for tag, pred in (("", r["predicted"]), ("fitted_", r.get("predicted_fitted"))):
                if pred is None:
                    continue
                ptpot = statistics.median(pred["tpot_by_session"])
                per[mode].update({f"{tag}predicted_tokens_per_s": pred["tokens_per_s"],
                                  f"{tag}predicted_step_s_per_token": pred["step_s_per_token"],
                                  f"{tag}predicted_tpot_p50_s": ptpot,
                                  f"{tag}error_tokens_per_s": pred["tokens_per_s"] / tps - 1,
                                  f"{tag}error_step_s_per_token": pred["step_s_per_token"] / spt - 1,
                                  f"{tag}error_tpot": ptpot / tpot - 1})
        fixed = {m: v for m, v in per.items() if m != "auto"}
        best = max(fixed, key=lambda m: fixed[m]["tokens_per_s"]) if fixed else None
        out[load] = {"modes": per, "best_fixed": best,
                     "auto_vs_best_fixed": (per["auto"]["tokens_per_s"] / fixed[best]["tokens_per_s"] - 1)
                     if best and "auto" in per else None}
    return out


def draw(data: dict):
    loads = list(data["loads"])
    fig, axes = report.subplots(1, len(loads), figsize=(5.5 * len(loads), 4), squeeze=False)
    for ax, load in zip(axes[0], loads):
        per = data["summary"][load]["modes"]
        modes = [m for m in MODES if m in per]
        x = range(len(modes))
        ax.bar([i - 0.27 for i in x], [per[m]["tokens_per_s"] for m in modes], 0.27, label="measured")
        ax.bar(list(x), [per[m]["predicted_tokens_per_s"] for m in modes], 0.27, label="model, servers' step costs")
        ax.bar([i + 0.27 for i in x], [per[m].get("fitted_predicted_tokens_per_s", 0) for m in modes], 0.27,
               label="model, step costs fitted here")
        labels = [m if m != "auto" else f"auto ({per[m]['choice']['mode']})" for m in modes]
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.set_ylabel("output tokens/s (steady window)")
        ax.set_title(load)
        ax.legend(fontsize=8)
    fig.suptitle("Step composition: measured beside the model's prediction")
    return fig


def reanalyse(data: dict, log_dir: Path) -> dict:
    """Fit the step model on the report's step logs, predict every (composition, load)
    with it and with the servers' model, and summarise."""
    loads, args = data["loads"], data["arguments"]
    num_layers = data["num_layers"]
    fit = fit_cost([log_dir / f"{m}.steps.jsonl" for m in data["results"]], num_layers)
    context = args["prompt_tokens"] + args["tokens"] // 2
    for mode, per in data["results"].items():
        for name, r in per.items():
            r["predicted"] = prediction(loads[name], mode, num_layers, context)
            r["predicted_fitted"] = prediction(loads[name], mode, num_layers, context, fit)
    data["step_model_fitted"] = fit
    data["summary"] = summarize(data["results"], loads)
    return data


def main() -> None:
    p = report.parser("bench_composition", __doc__, quick="one load, 8 tokens, 1 round, gathered and auto, eager servers (CI smoke)",
                      seed=0, plot=True)
    p.add_argument("--rounds", type=int, default=2, help="measured rounds per load and composition")
    p.add_argument("--tokens", type=int, default=48, help="output tokens per session")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--loads", default=",".join(DEFAULT_LOADS), help=f"of {sorted(LOADS)}")
    p.add_argument("--split-args", action="append", default=[],
                   help="extra options for every split server (e.g. --split-args=--split-gather-weigh=off)")
    p.add_argument("--reanalyse", action="store_true", help="recompute fits, predictions and summary of --out")
    p.add_argument("--log-dir", type=Path, default=None, help="--reanalyse: the folder of the run's step logs "
                   "(printed at its start)")
    args = report.parse_args(p, draw)
    if args.reanalyse:
        if args.log_dir is None:
            raise SystemExit("--reanalyse needs --log-dir: the folder of the run's step logs")
        data = reanalyse(json.loads(args.out.read_text()), args.log_dir)
        report.write(args.out, data, draw=draw)
        print(json.dumps(data["summary"], indent=1))
        return
    modes = [m for m in MODES if m in args.modes.split(",")]
    unknown = set(args.loads.split(",")) - set(LOADS)
    if unknown:
        raise SystemExit(f"unknown load(s) {sorted(unknown)}; known: {sorted(LOADS)}")
    loads = {name: LOADS[name] for name in args.loads.split(",")}
    if args.quick:
        args.rounds, args.tokens, args.prompt_tokens = 1, 8, 16
        modes, loads = ["gathered", "auto"], {"split_high": LOADS["split_high"]}
    import torch

    torch.set_num_threads(1)
    from benchmarks.http_load import completions
    from client_lib.local_layers import LocalLayers
    from harness.model_prep import prepare
    from harness.replay import make_script
    from harness.server_process import VLLMServer

    model = prepare()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="bench-composition-"))
    print(f"[bench] logs in {tmp}", flush=True)
    prompts = {name: [[rng.randrange(3, 49000) for _ in range(args.prompt_tokens)]
                      for _ in range(load["ordinary"] + len(load["split"]))] for name, load in loads.items()}
    work: dict = {}
    results: dict = {}
    num_layers = fingerprint = None
    for mode in modes:
        log = tmp / f"{mode}.steps.jsonl"
        server = VLLMServer(model, split=True, log_path=tmp / f"{mode}.log", eager=args.quick,
                            extra_args=(*COMMON, "--split-composition", mode, *args.split_args),
                            env={"VLLM_SPLIT_STEP_LOG": str(log)})
        with server:
            if not work:  # the greedy continuations (this engine's), then the clients' scripts
                for name, load in loads.items():
                    cont = asyncio.run(completions(server.url, str(model), prompts[name], max_tokens=args.tokens))
                    n_plain = load["ordinary"]
                    scripts = [make_script(LocalLayers(model, split_layer=k), ids, c)
                               for k, ids, c in zip(load["split"], prompts[name][n_plain:], cont[n_plain:])]
                    work[name] = (list(zip(prompts[name][:n_plain], cont[:n_plain])), scripts)
                fingerprint = LocalLayers(model, split_layer=0).fingerprint
                num_layers = json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"]
            results[mode] = {}
            for name, load in loads.items():
                plain, scripts = work[name]
                asyncio.run(one_round(server.url, str(model), load, plain, scripts, fingerprint))  # warm-up
                rounds = []
                for i in range(args.rounds):
                    time.sleep(0.5)
                    sessions = asyncio.run(one_round(server.url, str(model), load, plain, scripts, fingerprint))
                    time.sleep(0.5)  # the step log's last lines land
                    rounds.append(steady(sessions, log))
                    print(f"[bench] {mode} {name} round {i + 1}: {rounds[-1]['tokens_per_s']:.1f} tokens/s, "
                          f"{rounds[-1]['mismatches']} mismatches", flush=True)
                results[mode][name] = {"rounds": rounds}
    data = {"arguments": report.arguments(args), "environment": report.environment(model=model.name),
            "loads": loads, "num_layers": num_layers, "results": results}
    data = reanalyse(data, tmp)
    report.write(args.out, data, draw=draw)
    print(json.dumps(data["summary"], indent=1))


if __name__ == "__main__":
    main()
