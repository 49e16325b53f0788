"""TTFT of the summarisation request over an emulated 4G uplink: float16 against 8-bit frames.

    python -m benchmarks.bench_wire_ttft [--quick] [--repeats 5] [--split-layer 7]
        [--dtypes float32,float16,int8_mixed,int8_row] [--out results/bench_wire_ttft.json]

One split server (vLLM's default compiled mode, prefix caching off) and the default
workload's summarisation request (``benchmarks/workloads/default.json``: its prompt, its
prompt length) from an emulated client at a fixed split layer (``--split-layer``): its rows
at that layer computed beforehand (``harness/emulation.py``) and its own compute left out,
so what differs between the wire dtypes is what the uplink carries. The link is the
workload's 4G one (each frame waits ``rtt/2 + 8 * bytes / bandwidth`` in its direction).
Per wire dtype, ``--repeats`` sessions one after another: TTFT from the request's start
(connection, Open, the prompt's upload, the server's prefill, the first token's trip back),
the prompt's bytes on the wire, and whether the first token is the float32 session's.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import report

DTYPES = ("float32", "float16", "int8_mixed", "int8_row")
WORKLOAD = Path(__file__).parent / "workloads" / "default.json"


async def one_session(url: str, script, *, split_layer: int, link, dtype: str) -> dict:
    from client_lib.session import SplitSession
    from vllm_split.wire import protocol as wire

    layers = script.layers(wire.ClientProfile(layer_prefill_s_per_token=0.0, layer_decode_s=0.0), split_layer)
    t0 = time.perf_counter()
    async with await SplitSession.create(url, layers, sampling=wire.SamplingOptions(max_tokens=2, ignore_eos=True),
                                         link=link, server_decode=False, wire_dtype=dtype) as session:
        tokens = [e.token_id async for e in session.generate(script.prompt_ids)]
    hidden = script.states.shape[-1]
    return {"ttft_s": session.stats.token_times[0] - t0, "first_token": tokens[0],
            "wire_dtype": session.opened.wire_dtype,
            "prompt_bytes": len(script.prompt_ids) * wire.row_bytes(session.opened.wire_dtype, hidden)}


def summarize(runs: dict, reference_token: int) -> dict:
    out = {}
    for dtype, samples in runs.items():
        ttft = [s["ttft_s"] for s in samples]
        out[dtype] = {"ttft_p50_s": statistics.median(ttft), "ttft_min_s": min(ttft), "ttft_max_s": max(ttft),
                      "prompt_bytes": samples[0]["prompt_bytes"],
                      "first_token_matches_float32": all(s["first_token"] == reference_token for s in samples)}
    if "float16" in out:
        for dtype, s in out.items():
            s["ttft_saved_vs_float16_s"] = out["float16"]["ttft_p50_s"] - s["ttft_p50_s"]
    return out


def draw(data: dict):
    s = data["summary"]
    names = list(s)
    fig, (a1, a2) = report.subplots(1, 2, figsize=(10, 4))
    a1.bar(names, [s[n]["ttft_p50_s"] for n in names], color="lightgrey")
    for i, n in enumerate(names):
        a1.scatter([i] * len(data["runs"][n]), [r["ttft_s"] for r in data["runs"][n]], c="k", s=12, zorder=3)
    a1.set_ylabel("TTFT (s), sessions as dots")
    a2.bar(names, [s[n]["prompt_bytes"] / 1e3 for n in names], color="tab:blue")
    a2.set_ylabel("prompt upload (kB)")
    link = data["link"]
    fig.suptitle(f"summarisation ({data['prompt_tokens']} prompt tokens) at k = {data['arguments']['split_layer']} "
                 f"over 4G ({link['uplink_bps'] / 1e6:g} Mbit/s up, {link['rtt_s'] * 1e3:g} ms RTT)")
    return fig


def main() -> None:
    p = report.parser("bench_wire_ttft", __doc__, quick="float16 and int8_mixed, one session each, eager server",
                      plot=True)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--split-layer", type=int, default=7)
    p.add_argument("--dtypes", default=",".join(DTYPES))
    args = report.parse_args(p, draw)
    dtypes = [d for d in args.dtypes.split(",") if d]
    if args.quick:
        args.repeats, dtypes = 1, ["float16", "int8_mixed"]
    import torch

    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from benchmarks.throughput_requests import build_scripts, load_workload
    from harness.emulation import EmulatedLink
    from harness.model_prep import prepare
    from harness.server_process import VLLMServer

    model = prepare()
    w = load_workload(WORKLOAD)
    w["request_types"] = [r for r in w["request_types"] if r["name"] == "summarisation"]
    net = next(n for n in w["networks"] if n["name"] == "4g")
    link = EmulatedLink(rtt_s=net["rtt_s"], uplink_bps=net["uplink_bps"], downlink_bps=net["downlink_bps"])
    tmp = Path(tempfile.mkdtemp(prefix="bench-wire-ttft-"))
    runs: dict = {}
    with VLLMServer(model, split=True, log_path=tmp / "server.log", extra_args=("--no-enable-prefix-caching",),
                    eager=args.quick) as server:
        script = build_scripts(server.url, str(model), AutoTokenizer.from_pretrained(model), w)["summarisation"]
        reference = asyncio.run(one_session(server.url, script, split_layer=args.split_layer, link=link,
                                            dtype="float32"))  # warm-up, and the first token to match
        for dtype in dtypes:
            runs[dtype] = [asyncio.run(one_session(server.url, script, split_layer=args.split_layer, link=link,
                                                   dtype=dtype)) for _ in range(args.repeats)]
            print(f"[bench] {dtype}: TTFT {statistics.median(r['ttft_s'] for r in runs[dtype]):.3f} s", flush=True)
    data = {"arguments": report.arguments(args), "environment": report.environment(model=model.name),
            "link": {"rtt_s": link.rtt_s, "uplink_bps": link.uplink_bps, "downlink_bps": link.downlink_bps},
            "prompt_tokens": len(script.prompt_ids), "runs": runs,
            "summary": summarize(runs, reference["first_token"])}
    report.write(args.out, data, draw=draw)
    print(json.dumps(data["summary"], indent=1))


if __name__ == "__main__":
    main()
