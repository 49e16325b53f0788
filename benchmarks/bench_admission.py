"""Admission controller: predicted vs measured time per output token on the real engine.

    python -m benchmarks.bench_admission [--quick] [--out results/bench_admission.json]

For each load (``B`` sessions in the batch) and split layer ``k``: ``B - 1`` emulated
sessions at ``k`` keep the engine busy; once the controller has seen that load, one more
session at ``k`` opens with its client profile (so the server probes its network and
predicts), and its measured TPOT (mean gap between tokens, client side) is compared with
the prediction the server gave in ``Opened``. Clients are emulated (harness.emulation):
their compute is a wait from the profile, their activations are exact. Writes JSON with
every sample and a plot of predicted against measured.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import report

PROMPT = "Explain how a lighthouse works, step by step, for a curious child."
PROFILE = {"layer_prefill_s_per_token": 5e-5, "layer_decode_s": 1e-3}  # a laptop-class client
LINK = {"rtt_s": 0.004, "uplink_bps": 1e9, "downlink_bps": 1e9}


async def measure_point(url, script, *, k: int, load: int, tokens: int, settle_s: float):
    from harness.emulation import EmulatedLink, run_emulated
    from vllm_split.wire import protocol as wire

    profile, link = wire.ClientProfile(**PROFILE), EmulatedLink(**LINK)
    stop = asyncio.Event()

    async def background():
        while not stop.is_set():
            await run_emulated(url, script, profile=profile, link=link, sla=None, max_tokens=4 * tokens, split_layer=k)

    tasks = [asyncio.create_task(background()) for _ in range(load - 1)]
    try:
        await asyncio.sleep(settle_s)  # load 1: the previous point's steps leave the 2 s window
        session, got, layers = await run_emulated(url, script, profile=profile, link=link,
                                                  sla=wire.RequestSLA(tpot_s=10.0), max_tokens=tokens, split_layer=k)
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"k": k, "load": load, "predicted_tpot_s": session.opened.predicted_tpot_s,
            "measured_tpot_s": session.stats.time_per_output_token,
            "predicted_ttft_s": session.opened.predicted_ttft_s, "measured_ttft_s": session.stats.time_to_first_token,
            "exact": got == script.expected[:tokens] and layers.mismatch is None}


def main() -> None:
    p = report.parser("bench_admission", __doc__, quick="two points, few tokens, an eager server (CI smoke)", plot=True)
    args = report.parse_args(p, draw)
    import torch

    torch.set_num_threads(1)  # the emulated clients share the machine with the server
    from transformers import AutoTokenizer

    from harness.emulation import make_script
    from harness.model_prep import prepare
    from harness.server_process import VLLMServer

    model = prepare()
    ks, loads, tokens, settle = ((0, 20), (4,), 12, 3.0) if args.quick else ((0, 10, 20, 30), (1, 4, 8), 48, 4.0)
    server = VLLMServer(model, split=True, log_path=Path(tempfile.mkdtemp(prefix="bench-adm-")) / "server.log",
                        eager=args.quick)  # a smoke run: an eager server starts in half the time
    samples = []
    try:
        server.wait_ready()
        prompt_ids = AutoTokenizer.from_pretrained(model)(PROMPT)["input_ids"]
        script = asyncio.run(make_script(server.url, model, prompt_ids, 4 * tokens))
        points = [(k, b) for b in loads for k in ks]
        for i, (k, b) in enumerate(points):
            t0 = time.perf_counter()
            s = asyncio.run(measure_point(server.url, script, k=k, load=b, tokens=tokens, settle_s=settle))
            s["error"] = s["measured_tpot_s"] / s["predicted_tpot_s"] - 1
            samples.append(s)
            print(f"[{i + 1}/{len(points)}] k={k:2d} load={b}: predicted {s['predicted_tpot_s'] * 1e3:6.1f} ms, "
                  f"measured {s['measured_tpot_s'] * 1e3:6.1f} ms ({s['error']:+.0%}) "
                  f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    finally:
        server.stop()
    errors = [abs(s["error"]) for s in samples]
    data = {"arguments": report.arguments(args), "environment": report.environment(),
            "client_profile": PROFILE, "link": LINK, "samples": samples,  # a dozen points: the plot's data
            "summary": {"points": len(samples), "max_abs_tpot_error": max(errors),
                        "median_abs_tpot_error": statistics.median(errors),
                        "within_25pct": sum(e <= 0.25 for e in errors), "all_exact": all(s["exact"] for s in samples)}}
    report.write(args.out, data, draw=draw)
    print(json.dumps(data["summary"]))


def draw(data: dict):
    samples = data["samples"]
    fig, ax = report.subplots(figsize=(5.5, 5))
    for b in sorted({s["load"] for s in samples}):
        pts = [s for s in samples if s["load"] == b]
        ax.scatter([s["predicted_tpot_s"] * 1e3 for s in pts], [s["measured_tpot_s"] * 1e3 for s in pts], label=f"load {b}")
        for s in pts:
            ax.annotate(f"k={s['k']}", (s["predicted_tpot_s"] * 1e3, s["measured_tpot_s"] * 1e3), fontsize=7)
    top = max(max(s["predicted_tpot_s"], s["measured_tpot_s"]) for s in samples) * 1e3 * 1.1
    ax.plot([0, top], [0, top], "k-", lw=0.8, label="exact")
    ax.fill_between([0, top], [0, top * 0.75], [0, top * 1.25], color="grey", alpha=0.15, label="±25%")
    ax.set_xlabel("predicted TPOT (ms)")
    ax.set_ylabel("measured TPOT (ms)")
    ax.set_title("Admission controller: TPOT prediction")
    ax.legend()
    return fig


if __name__ == "__main__":
    main()
