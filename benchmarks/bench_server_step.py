"""The server's time per engine step with the split layer k, against plain vLLM.

    python -m benchmarks.bench_server_step [--quick] [--out results/bench_server_step.json]

Runs, one engine at a time on this machine, per mode (``--modes``: ``compiled``, vLLM's
default, and optionally ``eager``, both servers with ``--enforce-eager``): (A) plain vLLM
without the plugin (only a timing hook added: ``harness.timing_worker.TimingWorker``), then
(B) ``vllm-split serve`` in the same mode (compiled: its split steps run the compiled layer
bodies of ``vllm_split/engine/compiled_layers.py``). float32, prefix caching off, the same
requests: decode batches of B requests at context C, and prefills of P tokens. On B the
requests are split sessions at each k (and a mixed batch) replayed from activations
computed beforehand by the client library (``harness/replay.py``). The worker logs every
step (step time, time inside the model forward: embedding, decoder layers, final norm; and
the process's compiled-graph count); the summary gives medians and ratios against plain
vLLM of the same mode, and the limit ``fixed + (L - k) / L * loop`` from plain vLLM's own
split of its step. ``recompiles`` counts graphs compiled while the benchmark's requests
ran (after start-up): it must be 0. The steps
themselves go to the compressed sidecar ``NAME.rows.json.gz``; the plot is made from the
JSON alone (``--plot-only``).
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

MAX_BATCHED_TOKENS = 4096
COMMON = ["--no-enable-prefix-caching", "--max-num-seqs", "64",
          "--max-num-batched-tokens", str(MAX_BATCHED_TOKENS)]


def scenarios(args) -> list[dict]:
    out = [{"kind": "decode", "batch": b, "context": c} for c in args.contexts for b in args.batches]
    out += [{"kind": "prefill", "batch": 1, "context": p} for p in args.prefills]
    return out


def mixed_layers(ks: list[int], batch: int) -> list[int]:
    """The mixed batch: requests cycle through the split layers."""
    return [ks[i % len(ks)] for i in range(batch)]


def decode_tokens(args, sc: dict) -> int:
    """Tokens per request: enough that all B requests decode together for several steps
    after the last one's chunked prefill (B * C / max_num_batched_tokens steps)."""
    if sc["kind"] == "prefill":
        return 1
    return args.decode_tokens + sc["batch"] * sc["context"] // MAX_BATCHED_TOKENS


def read_steps(log: Path, t0: float, t1: float) -> list[dict]:
    if not log.exists():
        return []
    return [s for s in map(json.loads, log.read_text().splitlines()) if t0 <= s["t"] <= t1]


def pick(steps: list[dict], sc: dict) -> list[dict]:
    if sc["kind"] == "decode":
        return [s for s in steps if s["num_reqs"] == sc["batch"] and s["num_tokens"] == sc["batch"]]
    return [s for s in steps if s["num_reqs"] == 1 and s["num_tokens"] == sc["context"]]


def recompiles(log: Path) -> int:
    """Graphs compiled after the first logged step (0: nothing recompiled while serving)."""
    counts = [s["compiled_graphs"] for s in read_steps(log, 0, float("inf"))]
    return counts[-1] - counts[0] if counts else 0


def run_plain(args, model, prompts, log: Path, *, mode: str) -> tuple[dict, dict]:
    """Returns (samples per scenario, greedy continuation per context length)."""
    from harness.server_process import VLLMServer
    from benchmarks.http_load import completions

    server = VLLMServer(model, split=False, log_path=log.with_suffix(".server.log"), eager=mode == "eager",
                        extra_args=(*COMMON, "--worker-cls", "harness.timing_worker.TimingWorker"),
                        env={"VLLM_SPLIT_STEP_LOG": str(log), "VLLM_CPU_KVCACHE_SPACE": "4"})
    samples, continuations = {}, {}
    try:
        server.wait_ready()
        for sc in scenarios(args):
            ids = prompts[sc["context"]]
            n = decode_tokens(args, sc)
            for _ in range(args.repeats):
                t0 = time.time()
                outs = asyncio.run(completions(server.url, str(model), [ids] * sc["batch"], max_tokens=n))
                samples.setdefault(key(sc, "plain", mode), []).extend(pick(read_steps(log, t0, time.time()), sc))
            if sc["kind"] == "decode" and len(outs[0]) > len(continuations.get(sc["context"], [])):
                continuations[sc["context"]] = outs[0]  # the longest greedy continuation
            print(f"  plain {key(sc, 'plain', mode)}: {len(samples[key(sc, 'plain', mode)])} steps", flush=True)
    finally:
        server.stop()
    return samples, continuations


def key(sc: dict, system: str, mode: str) -> str:
    return f"{mode}|{system}|{sc['kind']}|B={sc['batch']}|C={sc['context']}"


def truncated(script, n: int):
    """The script's first n tokens (continuations are computed once, at their longest)."""
    from dataclasses import replace

    return replace(script, decode_rows=script.decode_rows[: n - 1], expected=script.expected[:n])


def run_split(args, model, prompts, continuations, log: Path, *, mode: str) -> tuple[dict, int]:
    from harness.replay import make_script, replay_many
    from client_lib.local_layers import LocalLayers
    from harness.server_process import VLLMServer

    systems = [str(k) for k in args.ks] + ["mixed"]
    layers = {k: LocalLayers(model, split_layer=k) for k in args.ks}
    fingerprint = layers[args.ks[0]].fingerprint
    scripts = {}
    for c, ids in prompts.items():
        cont = continuations.get(c)
        for k in args.ks:
            if cont is not None:
                scripts[(k, c, "decode")] = make_script(layers[k], ids, cont)
            scripts[(k, c, "prefill")] = make_script(layers[k], ids, cont[:1] if cont else [0])
    server = VLLMServer(model, split=True, log_path=log.with_suffix(".server.log"), eager=mode == "eager",
                        extra_args=(*COMMON, "--split-batch-wait-ms", str(args.batch_wait_ms), *args.split_args),
                        env={"VLLM_SPLIT_STEP_LOG": str(log), "VLLM_CPU_KVCACHE_SPACE": "4"})
    samples, mismatches = {}, 0
    try:
        server.wait_ready()
        for sc in scenarios(args):
            for system in systems:
                if sc["kind"] == "prefill" and system == "mixed":
                    continue
                ks = mixed_layers(args.ks, sc["batch"]) if system == "mixed" else [int(system)] * sc["batch"]
                n = decode_tokens(args, sc)
                batch = [truncated(scripts[(k, sc["context"], sc["kind"])], n) for k in ks]
                for _ in range(args.repeats):
                    t0 = time.time()
                    results = asyncio.run(replay_many(server.url, batch, fingerprint=fingerprint))
                    if (sc["context"] in continuations):  # else the expected token is unknown
                        mismatches += sum(not r.exact for r in results)
                    samples.setdefault(key(sc, system, mode), []).extend(pick(read_steps(log, t0, time.time()), sc))
                print(f"  split {key(sc, system, mode)}: {len(samples[key(sc, system, mode)])} steps", flush=True)
    finally:
        server.stop()
    return samples, mismatches


def summarize(samples: dict, args, num_layers: int) -> list[dict]:
    rows = []
    for mode, sc in ((m, sc) for m in args.modes for sc in scenarios(args)):
        base = samples.get(key(sc, "plain", mode), [])
        if not base:
            continue
        p_step = statistics.median(s["step_s"] for s in base)
        p_layers = statistics.median(s["model_s"] for s in base)
        p_fixed = p_step - p_layers
        for system in [str(k) for k in args.ks] + ["mixed"]:
            got = samples.get(key(sc, system, mode), [])
            if not got:
                continue
            ks = mixed_layers(args.ks, sc["batch"]) if system == "mixed" else [int(system)]
            frac = statistics.mean((num_layers - k) / num_layers for k in ks)  # token-weighted
            step = statistics.median(s["step_s"] for s in got)
            layers = statistics.median(s["model_s"] for s in got)
            limit = (p_fixed + frac * p_layers) / p_step
            rows.append({**sc, "mode": mode, "system": system, "layer_fraction": frac, "steps": len(got),
                         "plain_step_s": p_step, "plain_layers_s": p_layers, "plain_fixed_s": p_fixed,
                         "step_s": step, "layers_s": layers, "step_ratio": step / p_step,
                         "layers_ratio": layers / p_layers, "step_limit_ratio": limit,
                         "step_minus_limit": step / p_step - limit})
    return rows


def draw(data: dict):
    rows = data["summary"]
    labels = [f"{r.get('mode', 'eager')[0]} {r['kind'][0]} B{r['batch']} C{r['context']} k={r['system']}" for r in rows]
    x = range(len(rows))
    fig, ax = report.subplots(figsize=(max(8, len(rows) * 0.35), 4.5))
    ax.bar([i - 0.2 for i in x], [r["layers_ratio"] for r in rows], 0.4, label="model forward / plain (same mode)")
    ax.bar([i + 0.2 for i in x], [r["step_ratio"] for r in rows], 0.4, label="whole step / plain")
    ax.scatter(list(x), [r["layer_fraction"] for r in rows], marker="_", s=200, c="k", label="(L-k)/L")
    ax.scatter(list(x), [r["step_limit_ratio"] for r in rows], marker="x", c="r", label="step limit")
    ax.set_xticks(list(x), labels, rotation=90, fontsize=7)
    ax.set_ylabel("ratio to plain vLLM")
    ax.set_title(f"Server time per step vs split layer ({data['environment']['vllm']} CPU, SmolLM2-135M)")
    ax.legend(fontsize=7)
    return fig


def main() -> None:
    p = report.parser("bench_server_step", __doc__, quick="tiny sizes (CI smoke run)", plot=True)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--prefills", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--ks", type=int, nargs="+", default=[0, 7, 15, 22])
    p.add_argument("--decode-tokens", type=int, default=10)
    p.add_argument("--split-args", nargs="*", default=[], help="extra vllm-split serve arguments")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-wait-ms", type=int, default=200, help="split server gather window")
    p.add_argument("--modes", nargs="+", choices=["compiled", "eager"], default=["compiled"],
                   help="compiled: vLLM's default (plain at its best); eager: both with --enforce-eager")
    args = report.parse_args(p, draw)
    if args.quick:
        args.batches, args.contexts, args.prefills, args.ks = [1, 4], [64], [64], [0, 15]
        args.decode_tokens, args.repeats = 6, 1
    import torch

    torch.set_num_threads(1)  # the clients' precompute must not fight the server for cores
    from harness.model_prep import prepare
    from harness.server_process import kv_capacity_tokens

    model = prepare()
    num_layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    rng = random.Random(0)
    prompts = {c: [rng.randrange(3, 49000) for _ in range(c)] for c in sorted(set(args.contexts) | set(args.prefills))}
    tmp = Path(tempfile.mkdtemp(prefix="bench-step-"))
    samples, mismatches, recompiled = {}, {}, {}
    for mode in args.modes:
        print(f"[bench] {mode}: plain vLLM (logs in {tmp})", flush=True)
        plain, continuations = run_plain(args, model, prompts, tmp / f"plain-{mode}.jsonl", mode=mode)
        print(f"[bench] {mode}: vllm-split", flush=True)
        split, mismatches[mode] = run_split(args, model, prompts, continuations, tmp / f"split-{mode}.jsonl", mode=mode)
        samples.update(plain)
        samples.update(split)
        recompiled[mode] = {s: recompiles(tmp / f"{s}-{mode}.jsonl") for s in ("plain", "split")}
    first = args.modes[0]
    data = {
        "arguments": report.arguments(args),
        "environment": report.environment(model=model.name, num_layers=num_layers),
        # split tokens against plain vLLM's greedy continuation of the same mode
        "token_mismatches": sum(mismatches.values()),
        "token_mismatches_by_mode": mismatches,
        "recompiles_while_serving": recompiled,
        "kv_capacity_tokens": {"plain": kv_capacity_tokens(tmp / f"plain-{first}.server.log"),
                               "split": kv_capacity_tokens(tmp / f"split-{first}.server.log")},
        "summary": summarize(samples, args, num_layers),
    }
    report.write(args.out, data, rows={"samples": samples}, draw=draw)
    for r in data["summary"]:
        print(f"{r['mode']:8s} {r['kind']:7s} B={r['batch']:2d} C={r['context']:4d} k={r['system']:>5s}: loop {r['layers_ratio']:.3f} "
              f"(target {r['layer_fraction']:.3f}), step {r['step_ratio']:.3f} (limit {r['step_limit_ratio']:.3f}), "
              f"{r['steps']} steps")
    print(f"[bench] token mismatches: {mismatches}; recompiles while serving: {recompiled}; wrote {args.out}")


if __name__ == "__main__":
    main()
