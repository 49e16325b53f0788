"""Gather window: N concurrent split sessions at k = 0 against plain vLLM at the same concurrency.

    python -m benchmarks.bench_gather [--quick] [--sessions 8] [--repeats 3]
        [--out results/bench_gather.json]

Every client is on loopback at k = 0 (its work: one embedding lookup, precomputed), so the
split server and plain vLLM run the same model work for the same requests; what differs is
the round trip of every token through the client, and whether the engine starts its next
step before the clients' activations are back (they then wait a whole step). Three
systems, one server at a time, the same prompts (distinct random token ids, prefix caching
off) and max_tokens:

* ``plain``: vLLM without the plugin, in its default compiled mode (``--plain-eager`` for
  eager), streaming completions with token ids at the same concurrency;
* ``split_adaptive``: ``vllm-split serve`` with the adaptive gather window (the default);
* ``split_off``: the same with ``--split-gather off``.

Plain vLLM runs first: its warm-up round (``benchmarks/http_load.py`` ``completions``, full
length) gives the greedy continuations; the split sessions then replay activations the
client library computes for them (``harness/replay.py``), and every split token is checked
against them (``mismatches``; both servers run vLLM's default compiled mode unless
``--plain-eager`` / ``--split-eager``). Each system runs a warm-up round, then
``--repeats`` rounds of N sessions started at once. Per round: aggregate output tokens/s
(all tokens / time from the start to the last token), engine steps (vLLM's
``iteration_tokens_total`` count) and tokens per step; per session TTFT and TPOT ((last -
first token) / (n - 1)). The summary gives each split system's tokens/s over plain's with a
bootstrap interval over the rounds, and the adaptive window's counters (holds, time held,
activations caught and late, probes) read from the server log, where the scheduler writes
its totals when the last split request of a burst ends.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import report

SYSTEMS = ("plain", "split_adaptive", "split_off")
COMMON = ("--no-enable-prefix-caching",)
GATHER_LINE = re.compile(r"vllm-split gather totals: holds=(\d+) held_s=([\d.]+) caught=(\d+) late=(\d+) probes=(\d+)")


# ---------------------------------------------------------------- one session, timed
async def plain_session(url: str, model: str, ids: list[int], max_tokens: int, http) -> dict:
    body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    times, tokens = [], []
    async with http.post(url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.content:
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            got = json.loads(line[5:])["choices"][0].get("token_ids") or []
            times += [time.perf_counter()] * len(got)
            tokens += got
    return {"times": times, "tokens": tokens}


async def split_session(url: str, script, *, fingerprint: str, http) -> dict:
    """One replayed split session (``harness.replay.replay``) with a time stamp per token."""
    from harness.replay import replay

    result = await replay(url, script, fingerprint=fingerprint, http=http)
    return {"times": result.times, "tokens": result.tokens}


async def run_round(system: str, url: str, model: str, work: list, fingerprint: str) -> tuple[float, list[dict]]:
    """N sessions started at once; (start time, per-session results)."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as http:
        t0 = time.perf_counter()
        if system == "plain":
            runs = [plain_session(url, model, ids, n, http) for ids, n in work]
        else:
            runs = [split_session(url, script, fingerprint=fingerprint, http=http) for script in work]
        return t0, await asyncio.gather(*runs)


def round_summary(t0: float, results: list[dict], expected: list[list[int]]) -> tuple[dict, list[dict]]:
    sessions = []
    for r, exp in zip(results, expected):
        times = r["times"]
        sessions.append({"tokens": len(times), "exact": r["tokens"] == exp, "ttft_s": times[0] - t0 if times else None,
                         "tpot_s": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None})
    end = max((r["times"][-1] for r in results if r["times"]), default=t0)
    total = sum(s["tokens"] for s in sessions)
    return {"output_tokens": total, "wall_s": end - t0, "tokens_per_s": total / (end - t0) if end > t0 else 0.0,
            "mismatches": sum(not s["exact"] for s in sessions)}, sessions


# ---------------------------------------------------------------- one server
def gather_totals(log: Path) -> dict | None:
    """The adaptive window's last logged totals (None: not logged, e.g. it never held)."""
    found = GATHER_LINE.findall(log.read_text(errors="replace")) if log.exists() else []
    if not found:
        return None
    holds, held_s, caught, late, probes = found[-1]
    return {"num_holds": int(holds), "held_s": float(held_s), "num_caught": int(caught), "num_late": int(late),
            "num_probes": int(probes)}


def minus(after: dict | None, before: dict | None) -> dict | None:
    if after is None:
        return None
    return {k: v - (before or {}).get(k, 0) for k, v in after.items()}


def server_args(system: str, args) -> list[str]:
    extra = [*COMMON, "--max-num-seqs", str(max(16, args.sessions))]
    if system == "split_adaptive" and args.gather_max_ms is not None:
        extra += ["--split-gather-max-ms", str(args.gather_max_ms)]
    if system == "split_off":
        extra += ["--split-gather", "off"]
    return extra + (args.split_args if system != "plain" else [])


def engine_steps(url: str) -> float | None:
    from harness.server_process import metrics

    return metrics(url).get("vllm:iteration_tokens_total_count")


def measure(system: str, server, log: Path, args, model: Path, work: list, expected: list, fingerprint: str) -> dict:
    """``--repeats`` rounds on a warmed-up server."""
    rounds, sessions = [], []
    for i in range(args.repeats):
        time.sleep(1.0)  # the previous round's last log line lands (the handler flushes per line)
        before, steps0 = gather_totals(log), engine_steps(server.url)
        t0, results = asyncio.run(run_round(system, server.url, str(model), work, fingerprint))
        summary, per_session = round_summary(t0, results, expected)
        time.sleep(1.0)
        steps1 = engine_steps(server.url)
        summary["steps"] = steps1 - steps0 if steps0 is not None and steps1 is not None else None
        summary["tokens_per_step"] = summary["output_tokens"] / summary["steps"] if summary["steps"] else None
        summary["gather"] = minus(gather_totals(log), before) if system == "split_adaptive" else None
        rounds.append(summary)
        sessions += [dict(s, system=system, round=i) for s in per_session]
        print(f"  {system} round {i + 1}/{args.repeats}: {summary['tokens_per_s']:.1f} tok/s, "
              f"{summary['tokens_per_step'] or float('nan'):.2f} tok/step, mismatches {summary['mismatches']}, "
              f"gather {summary['gather']}", flush=True)
    return {"rounds": rounds, "sessions": sessions}


# ---------------------------------------------------------------- summary
def percentile(values: list[float], q: float) -> float | None:
    values = sorted(v for v in values if v is not None)
    return values[min(len(values) - 1, int(len(values) * q / 100))] if values else None


def bootstrap_ratio(num: list[float], den: list[float], *, seed: int, n: int = 2000,
                    stat=statistics.mean) -> list[float]:
    """95% percentile interval of stat(num) / stat(den) (the mean by default), resampling each
    list's values."""
    rng = random.Random(seed)
    ratios = sorted(stat(rng.choices(num, k=len(num))) / stat(rng.choices(den, k=len(den))) for _ in range(n))
    return [ratios[int(0.025 * n)], ratios[int(0.975 * n) - 1]]


def summarize(systems: dict, seed: int) -> dict:
    out = {}
    for name, s in systems.items():
        tps = [r["tokens_per_s"] for r in s["rounds"]]
        tpots = [x["tpot_s"] for x in s["sessions"]]
        out[name] = {"tokens_per_s_mean": statistics.mean(tps), "tokens_per_s": tps,
                     "tpot_p50_s": percentile(tpots, 50), "tpot_p90_s": percentile(tpots, 90),
                     "ttft_p50_s": percentile([x["ttft_s"] for x in s["sessions"]], 50),
                     "mismatches": sum(r["mismatches"] for r in s["rounds"])}
    plain = out["plain"]["tokens_per_s"]
    for name in SYSTEMS[1:]:
        if name in out:
            tps = out[name]["tokens_per_s"]
            out[name]["ratio_to_plain"] = statistics.mean(tps) / statistics.mean(plain)
            out[name]["ratio_to_plain_ci95"] = bootstrap_ratio(tps, plain, seed=seed)
    rounds = systems.get("split_adaptive", {}).get("rounds", [])
    counts = [r["gather"] for r in rounds if r.get("gather")]
    out["gather"] = {k: sum(c[k] for c in counts) for k in counts[0]} if counts else None
    return out


def draw(data: dict):
    s = data["summary"]
    names = [n for n in SYSTEMS if n in s]
    fig, (a1, a2) = report.subplots(1, 2, figsize=(10, 4))
    a1.bar(names, [s[n]["tokens_per_s_mean"] for n in names], color="lightgrey")
    for i, n in enumerate(names):
        a1.scatter([i] * len(s[n]["tokens_per_s"]), s[n]["tokens_per_s"], c="k", s=12, zorder=3)
        if "ratio_to_plain" in s[n]:
            lo, hi = s[n]["ratio_to_plain_ci95"]
            a1.annotate(f"{s[n]['ratio_to_plain']:.2f}x [{lo:.2f}, {hi:.2f}]", (i, s[n]["tokens_per_s_mean"]),
                        ha="center", va="bottom", fontsize=8)
    a1.set_ylabel("aggregate output tokens/s (rounds as dots)")
    x = range(len(names))
    a2.bar([i - 0.2 for i in x], [s[n]["tpot_p50_s"] * 1e3 for n in names], 0.4, label="TPOT p50")
    a2.bar([i + 0.2 for i in x], [s[n]["tpot_p90_s"] * 1e3 for n in names], 0.4, label="TPOT p90")
    a2.set_xticks(list(x), names)
    a2.set_ylabel("ms")
    a2.legend()
    args = data["arguments"]
    fig.suptitle(f"{args['sessions']} concurrent sessions at k = 0 on loopback, {args['max_tokens']} tokens each")
    return fig


def main() -> None:
    p = report.parser("bench_gather", __doc__, quick="2 sessions, 8 tokens, 1 round (CI smoke)", seed=0, plot=True)
    p.add_argument("--sessions", type=int, default=8, help="concurrent sessions (default: %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="measured rounds per system (default: %(default)s)")
    p.add_argument("--gather-max-ms", type=int, default=None, help="--split-gather-max-ms of split_adaptive "
                   "(default: the server's)")
    p.add_argument("--split-eager", action=argparse.BooleanOptionalAction, default=False,
                   help="run the split servers eager instead of the plugin's default compiled mode")
    p.add_argument("--plain-eager", action=argparse.BooleanOptionalAction, default=False,
                   help="run plain vLLM eager instead of its default compiled mode")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset (plain always runs)")
    p.add_argument("--split-args", nargs="*", default=[], help="extra vllm-split serve arguments")
    args = report.parse_args(p, draw)
    if args.quick:
        args.sessions, args.prompt_tokens, args.max_tokens, args.repeats = 2, 16, 8, 1
    systems = ["plain", *(s for s in SYSTEMS[1:] if s in args.systems.split(","))]
    import torch

    torch.set_num_threads(1)  # the script precompute must not fight the server for cores
    from benchmarks.http_load import completions
    from client_lib.local_layers import LocalLayers
    from harness.model_prep import prepare
    from harness.replay import make_script
    from harness.server_process import VLLMServer

    model = prepare()
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(3, 49000) for _ in range(args.prompt_tokens)] for _ in range(args.sessions)]
    tmp = Path(tempfile.mkdtemp(prefix="bench-gather-"))
    print(f"[bench] logs in {tmp}", flush=True)
    results = {}

    def start(system: str) -> VLLMServer:
        print(f"[bench] {system}", flush=True)
        split = system != "plain"
        eager = args.split_eager if split else args.plain_eager
        results[system] = {"eager": eager, "server_args": server_args(system, args)}
        return VLLMServer(model, split=split, log_path=tmp / f"{system}.log",
                          extra_args=tuple(server_args(system, args)), eager=eager)

    with start("plain") as server:  # warm-up and the references: the greedy continuations
        expected = asyncio.run(completions(server.url, str(model), prompts, max_tokens=args.max_tokens))
        work = [(ids, args.max_tokens) for ids in prompts]
        results["plain"].update(measure("plain", server, tmp / "plain.log", args, model, work, expected, ""))
    layers = LocalLayers(model, split_layer=0)
    scripts = [make_script(layers, ids, cont) for ids, cont in zip(prompts, expected)]
    warmup = [make_script(layers, ids, cont[:4]) for ids, cont in zip(prompts, expected)]
    for system in systems[1:]:
        with start(system) as server:
            asyncio.run(run_round(system, server.url, str(model), warmup, layers.fingerprint))
            results[system].update(measure(system, server, tmp / f"{system}.log", args, model, scripts, expected,
                                           layers.fingerprint))
    summary = summarize(results, args.seed)
    data = {"arguments": report.arguments(args),
            "environment": report.environment(model=model.name),
            "systems": {n: {k: v for k, v in s.items() if k != "sessions"} for n, s in results.items()},
            "summary": summary}
    report.write(args.out, data, rows={"sessions": {n: s["sessions"] for n, s in results.items()}}, draw=draw)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
