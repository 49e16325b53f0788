"""The server's time per engine step with the split layer k, against plain vLLM.

    python -m benchmarks.bench_server_step [--quick] [--two-phase] [--plain-reference] [--u-shapes K:M ...]
        [--pipeline-parallel-size N] [--out results/bench_server_step.json]

Interleaved (the default): ONE ``vllm-split serve`` per mode (``--modes``: ``compiled``,
vLLM's default, and optionally ``eager``, ``--enforce-eager``) serves both ordinary requests,
which run vLLM's own compiled whole-model graph, and split sessions, whose split steps run the
compiled layer bodies of ``vllm_split/engine/compiled_layers.py``. Per scenario (decode
batches of B requests at context C, prefills of P tokens), repeat and split layer k (and a
mixed batch, and U shapes ``--u-shapes k:m``: U-shaped sessions whose rows run ``[k, m)``
only, target ``(m - k) / L``), an ordinary batch and a batch of split sessions of the same shape run one
right after the other, the first of the two alternating: each ratio is a pair measured
seconds apart, so this machine's drift over minutes (1.3-1.7x) cancels. The summary gives
each scenario's pooled medians and ratios (the fields of the two-phase mode) and the pairs'
ratios with their median and a 95% bootstrap interval (``benchmarks/step_pairs.py``).
``--plain-reference`` first runs plain vLLM without the plugin (only a timing hook:
``harness.timing_worker.TimingWorker``) on the same scenarios: plain vLLM at its default,
against which the split server's ordinary steps are compared (minutes apart, so only
indicative).

``--two-phase``: the earlier design: (A) plain vLLM without the plugin for every scenario,
then (B) the split server's sessions; ratios of the two phases' medians.

float32, prefix caching off. Split sessions are replayed from activations computed
beforehand by the client library (``harness/replay.py``) against the greedy continuation of
the ordinary (two-phase: plain) requests; ``token_mismatches`` counts tokens that differ. The
worker logs every step (``benchmarks/server_step_runs.py``); "loop" is the model forward
(embedding, decoder layers, final norm), the limit ``fixed + (L - k) / L * loop`` from the
baseline's own split of its step. ``recompiles`` counts graphs compiled while the
benchmark's requests ran (after start-up): it must be 0. The steps go to the compressed
sidecar ``NAME.rows.json.gz``; the plot is made from the JSON alone (``--plot-only``).

``--pipeline-parallel-size N`` (interleaved, no U shapes): the server runs N pipeline
stages, one core each; every stage logs its own steps (``pp_rank``), and each summary row is
one stage's (``stage``): its forward ("loop": the stage's decoder layers, plus the embedding
on the first and the final norm on the last) and its whole step, split over ordinary, with
the target ``layer_fraction`` the share of the stage's own layers the split rows run (at
``k = L/2`` with 2 stages: 0 on stage 0, 1 on stage 1).
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from benchmarks import report
from benchmarks.server_step_runs import (key, layer_fraction, recompiles, run_interleaved, run_plain, run_split,
                                         scenarios, stage_layers, systems)
from benchmarks.step_pairs import compare, summarize_pairs


def summarize(samples: dict, args, num_layers: int, *, baseline: str = "plain",
              compared: list[str] | None = None) -> list[dict]:
    """Pooled ratios of each scenario's steps of the ``compared`` systems (default: the split
    systems) against ``baseline``'s steps of that scenario."""
    rows = []
    for mode, sc in ((m, sc) for m in args.modes for sc in scenarios(args)):
        base = samples.get(key(sc, baseline, mode), [])
        for system in compared or systems(args, sc):
            got = samples.get(key(sc, system, mode), [])
            if base and got:
                frac = 1.0 if system == "ordinary" else layer_fraction(system, args.ks, sc["batch"], num_layers)
                rows.append({**sc, "mode": mode, "system": system, "baseline": baseline,
                             **compare(base, got, layer_fraction=frac)})
    return rows


def pooled_samples(pairs: list[dict]) -> dict:
    """The pairs' steps by the two-phase mode's keys (system ``ordinary``: the ordinary batches,
    one per pair)."""
    out: dict[str, list[dict]] = {}
    for p in pairs:
        out.setdefault(key(p, "ordinary", p["mode"]), []).extend(p["ordinary"])
        out.setdefault(key(p, p["system"], p["mode"]), []).extend(p["split"])
    return out


def draw(data: dict):
    rows = data["summary"]
    labels = [f"{r.get('mode', 'eager')[0]} {r['kind'][0]} B{r['batch']} C{r['context']} k={r['system']}"
              + (f" stage {r['stage']}" if "stage" in r else "") for r in rows]
    x = list(range(len(rows)))
    fig, ax = report.subplots(figsize=(max(8, len(rows) * 0.35), 4.5))
    paired = all("step_ratio_median" in r for r in rows)
    for dx, field, label in ((-0.2, "layers_ratio", "model forward"), (0.2, "step_ratio", "whole step")):
        if paired:  # the pairs' median with its 95% interval
            mid = [r[f"{field}_median"] for r in rows]
            err = [[m - r[f"{field}_ci95"][0] for m, r in zip(mid, rows)],
                   [r[f"{field}_ci95"][1] - m for m, r in zip(mid, rows)]]
            ax.bar([i + dx for i in x], mid, 0.4, yerr=err, capsize=2, label=f"{label} / ordinary (pairs' median, 95% CI)")
        else:
            ax.bar([i + dx for i in x], [r[field] for r in rows], 0.4, label=f"{label} / plain (same mode)")
    staged = any("stage" in r for r in rows)
    ax.scatter(x, [r["layer_fraction"] for r in rows], marker="_", s=200, c="k",
               label="layers run / the stage's layers" if staged else "layers run / L ((L-k)/L; U: (m-k)/L)")
    ax.scatter(x, [r["step_limit_ratio"] for r in rows], marker="x", c="r", label="step limit")
    ax.set_xticks(x, labels, rotation=90, fontsize=7)
    ax.set_ylabel("ratio to ordinary requests, same server" if paired else "ratio to plain vLLM")
    how = "interleaved pairs" if paired else "two phases"
    if stages := data.get("pipeline", {}).get("size"):
        how += f";\n{stages} pipeline stages, each stage's steps against its own steps of ordinary requests"
    ax.set_title(f"Server time per step vs split layer ({data['environment']['vllm']} CPU, SmolLM2-135M; {how})")
    ax.legend(fontsize=7)
    return fig


def parse_args() -> argparse.Namespace:
    p = report.parser("bench_server_step", __doc__, quick="tiny sizes (CI smoke run)", seed=0, plot=True)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--prefills", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--ks", type=int, nargs="+", default=[0, 7, 15, 22])
    p.add_argument("--mixed", action=argparse.BooleanOptionalAction, default=True,
                   help="also a decode batch whose requests cycle through --ks")
    p.add_argument("--u-shapes", nargs="*", default=[], metavar="K:M",
                   help="also U-shaped sessions running layers [K, M) (their target: (M - K) / L of the loop)")
    p.add_argument("--decode-tokens", type=int, default=10)
    p.add_argument("--split-args", nargs="*", default=[], help="extra vllm-split serve arguments")
    p.add_argument("--repeats", type=int, default=2, help="batches per scenario and system (interleaved: pairs)")
    p.add_argument("--batch-wait-ms", type=int, default=200, help="split server gather window")
    p.add_argument("--modes", nargs="+", choices=["compiled", "eager"], default=["compiled"],
                   help="compiled: vLLM's default (plain at its best); eager: both with --enforce-eager")
    p.add_argument("--two-phase", action="store_true",
                   help="plain vLLM's server for every scenario, then the split server's (not interleaved)")
    p.add_argument("--plain-reference", action="store_true",
                   help="interleaved: first run plain vLLM without the plugin on the same scenarios")
    p.add_argument("--pipeline-parallel-size", type=int, default=1,
                   help="pipeline stages of the split server, one core each; a summary row per stage")
    args = report.parse_args(p, draw)
    if args.pipeline_parallel_size > 1 and (args.two_phase or args.plain_reference or args.u_shapes):
        p.error("--pipeline-parallel-size: interleaved pairs only, without --u-shapes (single-stage)")
    if args.quick:
        args.batches, args.contexts, args.prefills, args.ks = [1, 4], [64], [64], [0, 15]
        args.u_shapes = args.u_shapes or ["7:22"]
        args.decode_tokens, args.repeats = 6, 1 if args.two_phase else 2
    return args


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(1)  # the clients' precompute must not fight the server for cores
    from harness.model_prep import prepare
    from harness.server_process import kv_capacity_tokens

    model = prepare()
    num_layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    rng = random.Random(args.seed)
    prompts = {c: [rng.randrange(3, 49000) for _ in range(c)] for c in sorted(set(args.contexts) | set(args.prefills))}
    tmp = Path(tempfile.mkdtemp(prefix="bench-step-"))
    samples, mismatches, recompiled, pairs, reference, stages = {}, {}, {}, [], [], {}
    for mode in args.modes:
        plain_log, split_log = tmp / f"plain-{mode}.jsonl", tmp / f"split-{mode}.jsonl"
        if args.two_phase or args.plain_reference:
            print(f"[bench] {mode}: plain vLLM (logs in {tmp})", flush=True)
            plain, continuations = run_plain(args, model, prompts, plain_log, mode=mode)
            samples.update(plain)
        print(f"[bench] {mode}: vllm-split{'' if args.two_phase else ', interleaved with ordinary requests'}", flush=True)
        if args.two_phase:
            split, mismatches[mode] = run_split(args, model, prompts, continuations, split_log, mode=mode)
        else:
            got, mismatches[mode] = run_interleaved(args, model, prompts, split_log, mode=mode)
            pairs += got
            split = pooled_samples(got) if args.pipeline_parallel_size == 1 else {}  # the pairs hold each stage's
            if args.pipeline_parallel_size > 1:
                stages[mode] = stage_layers(split_log.with_suffix(".server.log").read_text(errors="replace"),
                                            args.pipeline_parallel_size)
        samples.update(split)
        recompiled[mode] = {s: recompiles(log) for s, log in (("plain", plain_log), ("split", split_log)) if log.exists()}
    if args.two_phase:
        summary = summarize(samples, args, num_layers)
    else:
        summary = summarize_pairs(pairs, seed=args.seed, layer_fraction=lambda system, batch, stage=None: layer_fraction(
            system, args.ks, batch, num_layers, None if stage is None else stages[args.modes[0]][stage]))
        # the split server's ordinary steps against plain vLLM without the plugin (--plain-reference)
        reference = summarize(samples, args, num_layers, compared=["ordinary"])
    first = args.modes[0]
    logs = {s: tmp / f"{s}-{first}.server.log" for s in ("plain", "split")}
    data = {
        "arguments": report.arguments(args),
        "environment": report.environment(model=model.name, num_layers=num_layers),
        "design": "two phases" if args.two_phase else "interleaved pairs on one split server",
        # split tokens against the greedy continuation of the ordinary (two-phase: plain) requests
        "token_mismatches": sum(mismatches.values()),
        "token_mismatches_by_mode": mismatches,
        "recompiles_while_serving": recompiled,
        "kv_capacity_tokens": {s: kv_capacity_tokens(log) if log.exists() else None for s, log in logs.items()},
        "summary": summary,
    }
    if reference:
        data["ordinary_vs_plain_reference"] = reference
    if stages:  # each stage's layers [start, end), as its worker logged them
        data["pipeline"] = {"size": args.pipeline_parallel_size, "stage_layers": stages[first]}
    report.write(args.out, data, rows={"samples": samples, "pairs": pairs}, draw=draw)
    for r in summary:
        pair = (f"; pairs {r['pairs']}: step {r['step_ratio_median']:.3f} [{r['step_ratio_ci95'][0]:.3f}, "
                f"{r['step_ratio_ci95'][1]:.3f}], loop {r['layers_ratio_median']:.3f} "
                f"[{r['layers_ratio_ci95'][0]:.3f}, {r['layers_ratio_ci95'][1]:.3f}]") if "pairs" in r else ""
        where = f" stage {r['stage']}" if "stage" in r else ""
        print(f"{r['mode']:8s} {r['kind']:7s} B={r['batch']:2d} C={r['context']:4d} k={r['system']:>5s}{where}: loop "
              f"{r['layers_ratio']:.3f} (target {r['layer_fraction']:.3f}), step {r['step_ratio']:.3f} (limit "
              f"{r['step_limit_ratio']:.3f}), {r['steps']} steps{pair}")
    print(f"[bench] token mismatches: {mismatches}; recompiles while serving: {recompiled}; wrote {args.out}")


if __name__ == "__main__":
    main()
