"""KV cache capacity (tokens) of plain vLLM vs vllm-split with and without min_layer, and the
split sessions held at once at the same KV memory with and without KV per layer range.

    python -m benchmarks.bench_kv_capacity [--parts capacity held step] [--min-layer 15]
        [--kv-space-gib 1] [--kv-ranges 6] [--held-k 15 22] [--held-blocks 24]
        [--step-ranges 1 6 10] [--step-rounds 3]

Part 1 starts each server in turn at the same memory setting (``VLLM_CPU_KVCACHE_SPACE``),
reads the engine's own start-up report ("KV cache size: N tokens") and writes JSON + a bar
plot. With ``min_layer = N`` the server keeps no KV for layers [0, N): expect ``L / (L - N)``.
With ``kv_ranges = G`` an ordinary request's KV is unchanged: expect the plain capacity.

Part 2 (``--held-k``): two split servers with the same KV bytes (``--held-blocks`` blocks of
32 tokens for all layers: ``kv_ranges`` 1, vLLM's allocation, vs G with G times as many
blocks of one range each) hold as many sessions at split layer k as they can, each after its
first token (``harness/held_sessions.py``), until one waits for KV or the engine preempts.
Expected gain: ``1 / held_fraction(ranges, k)`` (2x at k = 15, 3x at k = 22 for G = 6).

Part 3 (``step``): ordinary requests' decode step time with ``kv_ranges`` G against G = 1, in
rounds of one server per G (``benchmarks/kv_step_time.py``): 8 concurrent greedy completions,
the worker's step log, median step and fixed part per server, ratios per round.
"""
from __future__ import annotations

import asyncio
import json
import random
import tempfile
from pathlib import Path

from benchmarks import report

HELD_BLOCK_SIZE = 32
HELD_PROMPT_TOKENS = 96  # 3 blocks per range
PARTS = ("capacity", "held", "step")
STEP_BATCH, STEP_TOKENS, STEP_PROMPT_TOKENS = 8, 64, 64


def main() -> None:
    p = report.parser("bench_kv_capacity", __doc__, plot=True)
    p.add_argument("--min-layer", type=int, default=15)
    p.add_argument("--kv-space-gib", default="1")
    p.add_argument("--kv-ranges", type=int, default=6)
    p.add_argument("--held-k", type=int, nargs="*", default=[15, 22])
    p.add_argument("--held-blocks", type=int, default=24, help="KV memory of part 2, in 32-token blocks of all layers")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts to run (default: all)")
    p.add_argument("--step-ranges", type=int, nargs="+", default=[1, 6, 10], help="part 3: the G values (1 first)")
    p.add_argument("--step-rounds", type=int, default=3, help="part 3: rounds of one server per G")
    p.add_argument("--step-repeats", type=int, default=3, help="part 3: batches of 8 completions per server")
    args = report.parse_args(p, draw)
    from harness.model_prep import prepare
    from harness.server_process import VLLMServer, kv_capacity_tokens

    model = prepare()
    num_layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    ranges_name = f"split kv_ranges={args.kv_ranges}"
    systems = {"plain": (False, ()), "split": (True, ()),
               f"split min_layer={args.min_layer}": (True, ("--split-min-layer", str(args.min_layer))),
               ranges_name: (True, ("--split-kv-ranges", str(args.kv_ranges)))}
    tmp = Path(tempfile.mkdtemp(prefix="bench-kv-"))
    capacity = {}
    for i, (name, (split, extra)) in enumerate(systems.items() if "capacity" in args.parts else ()):
        log = tmp / f"{i}.log"
        server = VLLMServer(model, split=split, log_path=log, extra_args=extra,
                            env={"VLLM_CPU_KVCACHE_SPACE": args.kv_space_gib})
        try:
            server.wait_ready()
        finally:
            server.stop()
        capacity[name] = kv_capacity_tokens(log)
        print(f"{name}: {capacity[name]} tokens", flush=True)
    held = _held(model, num_layers, args, tmp) if "held" in args.parts else {}
    step = _step(model, args, tmp) if "step" in args.parts else {}
    data = {"arguments": report.arguments(args), "environment": report.environment(num_layers=num_layers),
            "kv_capacity_tokens": capacity, "held_sessions": held, "ordinary_step_time": step,
            "summary": {"held_gain": {k: v["gain"] for k, v in held.items()}}}
    if step:
        data["summary"]["ordinary_step_ratio"] = {g: r.get("step_s_ratio_median")
                                                  for g, r in step["by_kv_ranges"].items()}
        data["summary"]["step_tokens_identical"] = step["tokens_identical"]
    if capacity:
        data["summary"].update(min_layer_gain=capacity[f"split min_layer={args.min_layer}"] / capacity["plain"],
                               expected_gain=num_layers / (num_layers - args.min_layer),
                               kv_ranges_ordinary_capacity_ratio=capacity[ranges_name] / capacity["plain"])
    report.write(args.out, data, draw=draw)
    print(f"summary {data['summary']}; wrote {args.out}")


def _held(model: Path, num_layers: int, args, tmp: Path) -> dict:
    """Part 2: sessions held at each k, kv_ranges 1 vs G at the same KV bytes."""
    from client_lib import LocalLayers
    from harness.held_sessions import count_held_sessions
    from harness.server_process import VLLMServer
    from vllm_split.engine.kv_ranges import held_fraction, layer_ranges

    prompt = list(range(1000, 1000 + HELD_PROMPT_TOKENS))
    rows = {k: LocalLayers(model, split_layer=k).forward(prompt) for k in args.held_k}
    fingerprint = LocalLayers(model, split_layer=args.held_k[0]).fingerprint
    ranges = layer_ranges(list(range(num_layers)), args.kv_ranges)
    per_session = -(-HELD_PROMPT_TOKENS // HELD_BLOCK_SIZE) * num_layers  # block-layers of a full request
    limit = 4 * args.held_blocks * num_layers // per_session + 4
    counts: dict[int, dict[int, dict]] = {}
    for g in (1, args.kv_ranges):
        extra = ("--block-size", str(HELD_BLOCK_SIZE), "--max-model-len", "512", "--max-num-seqs", str(limit + 8),
                 "--num-gpu-blocks-override", str(args.held_blocks * g), "--split-kv-ranges", str(g),
                 "--split-idle-timeout-s", "0")  # held sessions must not be aborted while counting
        server = VLLMServer(model, split=True, log_path=tmp / f"held-{g}.log", extra_args=extra)
        try:
            server.wait_ready()
            for k in args.held_k:
                r = asyncio.run(count_held_sessions(server.url, fingerprint=fingerprint, split_layer=k,
                                                    prompt_rows=rows[k], max_sessions=limit))
                counts.setdefault(k, {})[g] = {"held": r.held, "stopped_by": r.stopped_by,
                                               "preemptions": r.preemptions}
                print(f"kv_ranges={g} k={k}: {r.held} sessions held (stopped by {r.stopped_by})", flush=True)
        finally:
            server.stop()
    return {str(k): {"kv_ranges_1": c[1], f"kv_ranges_{args.kv_ranges}": c[args.kv_ranges],
                     "gain": c[args.kv_ranges]["held"] / max(c[1]["held"], 1),
                     "expected_gain": 1 / held_fraction(ranges, k)} for k, c in counts.items()}


def _step(model: Path, args, tmp: Path) -> dict:
    """Part 3: ordinary decode step time, kv_ranges G vs 1, in rounds of one server per G."""
    from benchmarks import kv_step_time

    if args.step_ranges[0] != 1:
        raise SystemExit("--step-ranges must start with 1 (the baseline)")
    rng = random.Random(0)  # the same prompts for every server
    prompts = [[rng.randrange(3, 49000) for _ in range(STEP_PROMPT_TOKENS)] for _ in range(STEP_BATCH)]
    servers = kv_step_time.run(model, tmp, ranges=args.step_ranges, rounds=args.step_rounds, batch=STEP_BATCH,
                               repeats=args.step_repeats, max_tokens=STEP_TOKENS, prompts=prompts)
    summary = kv_step_time.summarize(servers)
    summary["design"] = (f"{args.step_rounds} rounds of one split server per kv_ranges in {args.step_ranges} "
                         f"(order reversed every other round); per server {args.step_repeats} x {STEP_BATCH} "
                         f"concurrent greedy completions of {STEP_TOKENS} tokens after a warm-up")
    return summary


def draw(data: dict):
    capacity = data["kv_capacity_tokens"]
    held = data.get("held_sessions") or {}
    step = (data.get("ordinary_step_time") or {}).get("by_kv_ranges") or {}
    panels = [p for p, shown in (("capacity", capacity), ("held", held), ("step", step)) if shown]
    fig, axes = report.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.5), squeeze=False)
    axes = dict(zip(panels, axes[0]))
    ax = axes.get("capacity")
    if ax is not None:
        ax.bar(list(capacity), list(capacity.values()), color=["#888", "#4a8", "#27c", "#c72"][: len(capacity)])
        ax.set_ylabel("KV cache capacity (tokens)")
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"Same memory ({data['arguments']['kv_space_gib']} GiB): "
                     f"{data['summary']['min_layer_gain']:.2f}x with min_layer", fontsize=9)
    if held:
        ax = axes["held"]
        ks = list(held)
        g = data["arguments"]["kv_ranges"]
        x = range(len(ks))
        ax.bar([i - 0.2 for i in x], [held[k]["kv_ranges_1"]["held"] for k in ks], 0.4, label="kv_ranges 1", color="#888")
        ax.bar([i + 0.2 for i in x], [held[k][f"kv_ranges_{g}"]["held"] for k in ks], 0.4, label=f"kv_ranges {g}",
               color="#c72")
        ax.set_xticks(list(x), [f"k = {k}\n{held[k]['gain']:.2f}x" for k in ks])
        ax.set_ylabel("sessions held without preemption")
        ax.set_title("Same KV bytes", fontsize=9)
        ax.legend(fontsize=8)
    if step:
        _draw_step(axes["step"], step)
    return fig


def _step_label(step: dict, g: str) -> str:
    """The G's tick: its median fixed part and per-group preparation against G = 1's."""
    label = f"kv_ranges {g}"
    for field, name in (("fixed_s", "fixed"), ("prep_s", "per-group prep")):
        key = f"{field}_pooled_median_ms"
        if step[g].get(key) is not None and step["1"].get(key) is not None:
            label += f"\n{name} {step[g][key]:.2f} ms (G=1: {step['1'][key]:.2f})"
    return label


def _draw_step(ax, step: dict) -> None:
    """Part 3: each round's step-time ratio to G = 1 (dots), their median and interval (bar)."""
    gs = [g for g in step if g != "1"]
    for i, g in enumerate(gs):
        row = step[g]
        ax.scatter([i] * len(row["step_s_ratios"]), row["step_s_ratios"], color="#c72", s=14, zorder=3)
        if "step_s_ratio_median" in row:
            lo, hi = row["step_s_ratio_ci95"]
            med = row["step_s_ratio_median"]
            ax.errorbar([i], [med], yerr=[[med - lo], [hi - med]], fmt="_", color="k", capsize=6, markersize=16)
    ax.axhline(1.0, color="#888", lw=0.8)
    ax.axhspan(0.95, 1.05, color="#4a8", alpha=0.15, label="within 5%")
    ax.set_xticks(range(len(gs)), [_step_label(step, g) for g in gs], fontsize=7)
    ax.set_ylabel("ordinary decode step time / kv_ranges 1")
    ax.set_title("Ordinary steps, batch 8 (dots: rounds)", fontsize=9)
    ax.legend(fontsize=8)


if __name__ == "__main__":
    main()
