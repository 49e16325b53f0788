"""KV cache capacity (tokens) of plain vLLM vs vllm-split with and without min_layer.

    python -m benchmarks.bench_kv_capacity [--min-layer 15] [--kv-space-gib 1]

Starts each server in turn at the same memory setting (``VLLM_CPU_KVCACHE_SPACE``), reads
the engine's own start-up report ("KV cache size: N tokens") and writes JSON + a bar plot.
With ``min_layer = N`` the server keeps no KV for layers [0, N): expect ``L / (L - N)``.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from benchmarks import report


def main() -> None:
    p = report.parser("bench_kv_capacity", __doc__, plot=True)
    p.add_argument("--min-layer", type=int, default=15)
    p.add_argument("--kv-space-gib", default="1")
    args = report.parse_args(p, draw)
    from harness.model_prep import prepare
    from harness.server_process import VLLMServer, kv_capacity_tokens

    model = prepare()
    num_layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    systems = {"plain": (False, ()), "split": (True, ()),
               f"split min_layer={args.min_layer}": (True, ("--split-min-layer", str(args.min_layer)))}
    tmp = Path(tempfile.mkdtemp(prefix="bench-kv-"))
    capacity = {}
    for i, (name, (split, extra)) in enumerate(systems.items()):
        log = tmp / f"{i}.log"
        server = VLLMServer(model, split=split, log_path=log, extra_args=extra,
                            env={"VLLM_CPU_KVCACHE_SPACE": args.kv_space_gib})
        try:
            server.wait_ready()
        finally:
            server.stop()
        capacity[name] = kv_capacity_tokens(log)
        print(f"{name}: {capacity[name]} tokens", flush=True)
    data = {"arguments": report.arguments(args), "environment": report.environment(num_layers=num_layers),
            "kv_capacity_tokens": capacity,
            "summary": {"min_layer_gain": capacity[f"split min_layer={args.min_layer}"] / capacity["plain"],
                        "expected_gain": num_layers / (num_layers - args.min_layer)}}
    report.write(args.out, data, draw=draw)
    print(f"gain {data['summary']['min_layer_gain']:.2f}x (expected {data['summary']['expected_gain']:.2f}x); wrote {args.out}")


def draw(data: dict):
    capacity = data["kv_capacity_tokens"]
    fig, ax = report.subplots(figsize=(6, 3.5))
    ax.bar(list(capacity), list(capacity.values()), color=["#888", "#4a8", "#27c"])
    ax.set_ylabel("KV cache capacity (tokens)")
    ax.set_title(f"Same memory ({data['arguments']['kv_space_gib']} GiB): "
                 f"{data['summary']['min_layer_gain']:.2f}x with min_layer")
    return fig


if __name__ == "__main__":
    main()
