"""Ordinary requests' decode step time on split servers with ``kv_ranges`` G against G = 1
(part 3 of ``bench_kv_capacity``; issue 18's "step time unchanged within 5%").

G is a start-up setting, so steps cannot be interleaved on one server: each round starts one
server per G in turn (the order reversed every other round, so that a drift of the machine
over minutes does not favour one G), runs the same batches of concurrent ordinary greedy
completions on it and keeps the worker's step log (``VLLM_SPLIT_STEP_LOG``). A server's
figure is the median over its pure-decode steps at the full batch; a round's ratio for G is
that median over the median of the G = 1 server of the same round (minutes apart, not
seconds). Also reported: the fixed part of a step (``step_s - model_s``: input preparation,
attention metadata, LM head, sampling), and within it ``prep_s``, the runner's input
preparation that runs once per KV cache group (block tables, slot mappings, attention
metadata), where the per-group work of G groups lands; and whether every server produced
the same tokens. The model forward cannot depend on G beyond its attention kernels (the
same bytes read through another group's block table), so a difference in ``model_s``
between servers is the machine's, which the rounds are there to average.

The analysis (:func:`summarize`) is pure; :func:`run` starts the servers.
"""
from __future__ import annotations

import asyncio
import json
import statistics
from pathlib import Path

from benchmarks.step_pairs import median_interval

STEP_FIELDS = ("step_s", "fixed_s", "prep_s")


def decode_steps(lines: list[dict], batch: int) -> list[dict]:
    """The step-log lines of pure decode steps of ``batch`` ordinary requests, with ``fixed_s``."""
    return [{**s, "fixed_s": s["step_s"] - s["model_s"]} for s in lines
            if s["num_reqs"] == batch and s["num_tokens"] == batch and not s.get("split_layers")]


def round_orders(ranges: list[int], rounds: int) -> list[list[int]]:
    """The order of the servers in each round: as given, then reversed, alternately."""
    return [list(ranges) if r % 2 == 0 else list(reversed(ranges)) for r in range(rounds)]


def summarize(servers: list[dict], *, baseline: int = 1) -> dict:
    """``servers``: one dict per server run (``round``, ``kv_ranges``, ``steps`` from
    :func:`decode_steps`, ``tokens``). Per G: the medians per server, the ratios to the same
    round's baseline server, their median and 95% interval, and the pooled medians."""
    by_round = {(s["round"], s["kv_ranges"]): s for s in servers}
    out: dict[str, dict] = {}
    for g in sorted({s["kv_ranges"] for s in servers}):
        runs = [s for s in servers if s["kv_ranges"] == g]
        row: dict = {"servers": len(runs), "steps": [len(s["steps"]) for s in runs]}
        for field in STEP_FIELDS:
            if not all(field in x for s in runs for x in s["steps"]):
                continue  # a log from before the field existed
            medians = [statistics.median(x[field] for x in s["steps"]) for s in runs if s["steps"]]
            row[f"{field}_medians_ms"] = [1000 * m for m in medians]
            pooled = [x[field] for s in runs for x in s["steps"]]
            row[f"{field}_pooled_median_ms"] = 1000 * statistics.median(pooled) if pooled else None
            ratios = []
            for s in runs:
                base = by_round.get((s["round"], baseline))
                if base is None or not base["steps"] or not s["steps"]:
                    continue
                ratios.append(statistics.median(x[field] for x in s["steps"])
                              / statistics.median(x[field] for x in base["steps"]))
            row[f"{field}_ratios"] = ratios
            if ratios:
                row[f"{field}_ratio_median"] = statistics.median(ratios)
                row[f"{field}_ratio_ci95"] = median_interval(ratios)
        out[str(g)] = row
    tokens = [s["tokens"] for s in servers]
    return {"by_kv_ranges": out, "tokens_identical": all(t == tokens[0] for t in tokens),
            "ci_method": "95% percentile bootstrap of the median over rounds (each round's ratio: "
                         "median step of the G server over the same round's G = 1 server)"}


def run(model: Path, tmp: Path, *, ranges: list[int], rounds: int, batch: int, repeats: int,
        max_tokens: int, prompts: list[list[int]]) -> list[dict]:
    """Start each server of each round in turn; returns the server runs for :func:`summarize`."""
    from benchmarks.http_load import completions
    from harness.server_process import VLLMServer

    prompts = [prompts[i % len(prompts)] for i in range(batch)]
    servers = []
    for r, order in enumerate(round_orders(ranges, rounds)):
        for g in order:
            step_log = tmp / f"steps-r{r}-g{g}.jsonl"
            with VLLMServer(model, split=True, log_path=tmp / f"step-r{r}-g{g}.log",
                            extra_args=("--split-kv-ranges", str(g)),
                            env={"VLLM_SPLIT_STEP_LOG": str(step_log)}) as server:
                asyncio.run(completions(server.url, str(model), prompts, max_tokens=8))  # warm-up
                warm = len(step_log.read_text().splitlines())
                tokens = [asyncio.run(completions(server.url, str(model), prompts, max_tokens=max_tokens))
                          for _ in range(repeats)]
            lines = [json.loads(x) for x in step_log.read_text().splitlines()[warm:] if x.strip()]
            steps = decode_steps(lines, batch)
            servers.append({"round": r, "kv_ranges": g, "steps": steps, "tokens": tokens})
            ms = 1000 * statistics.median(s["step_s"] for s in steps) if steps else float("nan")
            print(f"round {r} kv_ranges={g}: {len(steps)} decode steps of {batch}, median {ms:.1f} ms", flush=True)
    return servers
