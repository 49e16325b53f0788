"""The runs of ``benchmarks/bench_server_step.py``: which requests go to which server, and
which of the worker's logged steps belong to them.

Runs in the benchmark's process; starts one server at a time (``harness/server_process.py``),
each with the step log ``VLLM_SPLIT_STEP_LOG`` (``vllm_split/engine/step_timing.py``: one
JSON line per step with ``step_s``, ``model_s``, ``num_reqs``, ``num_tokens``,
``split_layers`` (empty for a step of ordinary requests) and ``compiled_graphs``; vllm-split's
worker logs ordinary steps with the same fields as split ones). A scenario is a decode batch
of ``batch`` requests at ``context`` tokens, or one prefill of ``context`` tokens; its steps
are those of exactly that shape. Two ways to measure:

* interleaved (:func:`run_interleaved`, the default): ONE vllm-split server; per scenario,
  repeat and split layer, a batch of ordinary requests (which run vLLM's own compiled
  whole-model graph) and a batch of split sessions of the same shape, one right after the
  other, the first of the two alternating between repeats: a *pair* (``step_pairs.py``);
* two phases (:func:`run_plain`, then :func:`run_split`): plain vLLM without the plugin for
  every scenario, then a vllm-split server; :func:`run_plain` is also the interleaved mode's
  optional reference phase (plain vLLM at its default, minutes away from the pairs).

Pipeline parallelism (``--pipeline-parallel-size N``, interleaved only): the server runs N
stages, one core each (``VLLM_CPU_OMP_THREADS_BIND``), and every stage's worker logs its own
line per step (``pp_rank``; ``model_s``: that stage's forward, its share of the decoder
layers). Each pair is kept as one pair per stage (:func:`by_stage`), each stage's ratios
against the layers it holds (:func:`stage_layers`, from the server's log;
:func:`layer_fraction` of the stage).

Split sessions are replayed from activations the client library computed beforehand
(``harness/replay.py``), against the greedy continuation the ordinary (or plain) requests
produced; a token that differs counts as a mismatch. A U system (``u{k}-{m}``, from
``--u-shapes``) replays U-shaped sessions: the server runs ``[k, m)`` and returns the rows,
whose tokens the client's tail computes after the batch (outside its steps).
"""
from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.http_load import completions

MAX_BATCHED_TOKENS = 4096
COMMON = ["--no-enable-prefix-caching", "--max-num-seqs", "64",
          "--max-num-batched-tokens", str(MAX_BATCHED_TOKENS)]
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "4"}


def scenarios(args) -> list[dict]:
    out = [{"kind": "decode", "batch": b, "context": c} for c in args.contexts for b in args.batches]
    out += [{"kind": "prefill", "batch": 1, "context": p} for p in args.prefills]
    return out


def systems(args, sc: dict) -> list[str]:
    """The split systems of scenario ``sc``: each split layer, the mixed batch (decode only)
    and each U shape (``u{k}-{m}``: U-shaped sessions running layers ``[k, m)``)."""
    return ([str(k) for k in args.ks] + (["mixed"] if args.mixed and sc["kind"] == "decode" else [])
            + [f"u{k}-{m}" for k, m in u_shapes(args)])


def u_shapes(args) -> list[tuple[int, int]]:
    """``--u-shapes`` (``k:m`` each) as pairs."""
    return [u_shape_of(f"u{s.replace(':', '-')}") for s in getattr(args, "u_shapes", None) or []]


def u_shape_of(system: str) -> tuple[int, int] | None:
    """``(k, m)`` of a U system ``u{k}-{m}``; None for the others."""
    if not system.startswith("u"):
        return None
    try:
        k, m = (int(x) for x in system[1:].split("-"))
    except ValueError:
        raise ValueError(f"U shape {system[1:]!r}: expected k:m with integers k < m") from None
    if not 0 <= k < m:
        raise ValueError(f"U shape {k}:{m}: expected 0 <= k < m")
    return k, m


def mixed_layers(ks: list[int], batch: int) -> list[int]:
    """The mixed batch: requests cycle through the split layers."""
    return [ks[i % len(ks)] for i in range(batch)]


def split_layers_of(system: str, ks: list[int], batch: int) -> list[int]:
    """The split layer of each request of a batch of ``system``."""
    if (u := u_shape_of(system)) is not None:
        return [u[0]] * batch
    return mixed_layers(ks, batch) if system == "mixed" else [int(system)] * batch


def layer_fraction(system: str, ks: list[int], batch: int, num_layers: int,
                   stage: tuple[int, int] | None = None) -> float:
    """The token-weighted share of the decoder layers a batch of ``system`` runs (a U shape
    ``[k, m)``: ``(m - k) / L``); ``stage``: of a pipeline stage's layers ``[start, end)`` only
    (a request at ``k`` runs those at or above ``k``)."""
    if (u := u_shape_of(system)) is not None:
        if stage is not None:
            raise ValueError("U-shaped sessions are single-stage: no layer fraction per pipeline stage")
        return (u[1] - u[0]) / num_layers
    start, end = stage or (0, num_layers)
    layers = split_layers_of(system, ks, batch)
    return sum(max(0, end - max(k, start)) for k in layers) / ((end - start) * len(layers))


def pipeline_server(size: int) -> tuple[tuple[str, ...], dict[str, str]]:
    """The server arguments and environment of ``size`` pipeline stages (none for 1): one core
    per stage (without a bind list per worker the CPU build refuses two workers on 2 cores)."""
    if size == 1:
        return (), {}
    return ("--pipeline-parallel-size", str(size)), {"VLLM_CPU_OMP_THREADS_BIND": "|".join(map(str, range(size)))}


STAGE_LINE = re.compile(r"COMPACT forward on this stage's layers \[(\d+), (\d+)\) \(pipeline stage (\d+) of (\d+)\)")


def stage_layers(server_log: str, size: int) -> dict[int, tuple[int, int]]:
    """Each pipeline stage's layers ``[start, end)``, from the line each stage's worker logs when
    its split steps take the compact forward; every stage must have logged it."""
    found = {int(m[3]): (int(m[1]), int(m[2])) for m in STAGE_LINE.finditer(server_log) if int(m[4]) == size}
    if sorted(found) != list(range(size)):
        raise RuntimeError(f"expected the compact forward on each of {size} stages; the server log names "
                           f"stages {sorted(found)}")
    return found


def by_stage(pair: dict, size: int) -> list[dict]:
    """A pair as one pair per pipeline stage (``stage``: the steps' ``pp_rank``); without
    pipeline parallelism (``size`` 1) the pair itself."""
    if size == 1:
        return [pair]
    return [{**pair, "stage": r, **{w: [s for s in pair[w] if s.get("pp_rank", 0) == r] for w in ("ordinary", "split")}}
            for r in range(size)]


def split_batch(system: str, ks: list[int], batch: int, scripts: dict) -> list:
    """The scripts of a batch of ``system`` (``scripts``: per split layer); a U system's are
    U-shaped (``Script.return_layer``)."""
    u = u_shape_of(system)
    return [replace(scripts[k], return_layer=u[1] if u else None) for k in split_layers_of(system, ks, batch)]


def client_ks(args) -> list[int]:
    """The split layers the clients need layers for: ``--ks`` and the U shapes' ``k``."""
    return sorted(set(args.ks) | {k for k, _ in u_shapes(args)})


def replay_checked(url: str, batch: list, *, fingerprint: str, tails: dict, model: Path) -> int:
    """Replay ``batch`` (U-shaped scripts' tokens checked afterwards through the client's tail,
    ``tails``: per return layer, made on first use); returns the token mismatches."""
    from client_lib.tail_layers import TailLayers
    from harness.replay import check_u_tokens, replay_many

    results = asyncio.run(replay_many(url, batch, fingerprint=fingerprint))
    for m in {s.return_layer for s in batch} - {None} - set(tails):
        tails[m] = TailLayers(model, return_layer=m)
    check_u_tokens(results, batch, tails)
    return sum(not r.exact for r in results)


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


def pick(steps: list[dict], sc: dict, *, split: bool | None = None) -> list[dict]:
    """The steps of scenario ``sc``'s shape; ``split``: only steps of split requests (True) or of
    ordinary requests (False)."""
    if sc["kind"] == "decode":
        shaped = [s for s in steps if s["num_reqs"] == sc["batch"] and s["num_tokens"] == sc["batch"]]
    else:
        shaped = [s for s in steps if s["num_reqs"] == 1 and s["num_tokens"] == sc["context"]]
    if split is None:
        return shaped
    if split:
        return [s for s in shaped if len(s["split_layers"]) == s["num_reqs"]]
    return [s for s in shaped if not s["split_layers"]]


def recompiles(log: Path) -> int:
    """Graphs compiled after the first logged step, summed over the workers (pipeline stages:
    ``pp_rank``; 0: nothing recompiled while serving)."""
    first, last = {}, {}
    for s in read_steps(log, 0, float("inf")):
        first.setdefault(s.get("pp_rank", 0), s["compiled_graphs"])
        last[s.get("pp_rank", 0)] = s["compiled_graphs"]
    return sum(last[r] - first[r] for r in last)


def key(sc: dict, system: str, mode: str) -> str:
    return f"{mode}|{system}|{sc['kind']}|B={sc['batch']}|C={sc['context']}"


def truncated(script, n: int):
    """The script's first n tokens (continuations are computed once, at their longest)."""
    return replace(script, decode_rows=script.decode_rows[: n - 1], expected=script.expected[:n])


def split_server(args, model: Path, log: Path, *, mode: str):
    from harness.server_process import VLLMServer

    pp_args, pp_env = pipeline_server(getattr(args, "pipeline_parallel_size", 1))
    return VLLMServer(model, split=True, log_path=log.with_suffix(".server.log"), eager=mode == "eager",
                      extra_args=(*COMMON, "--split-batch-wait-ms", str(args.batch_wait_ms), *pp_args,
                                  *args.split_args),
                      env={"VLLM_SPLIT_STEP_LOG": str(log), **SERVER_ENV, **pp_env})


def client_layers(args, model: Path) -> dict:
    from client_lib.local_layers import LocalLayers

    return {k: LocalLayers(model, split_layer=k) for k in client_ks(args)}


def run_plain(args, model: Path, prompts: dict, log: Path, *, mode: str) -> tuple[dict, dict]:
    """Plain vLLM without the plugin (a timing hook only: ``harness.timing_worker``), every
    scenario. Returns (steps per scenario, greedy continuation per context length)."""
    from harness.server_process import VLLMServer

    server = VLLMServer(model, split=False, log_path=log.with_suffix(".server.log"), eager=mode == "eager",
                        extra_args=(*COMMON, "--worker-cls", "harness.timing_worker.TimingWorker"),
                        env={"VLLM_SPLIT_STEP_LOG": str(log), **SERVER_ENV})
    samples, continuations = {}, {}
    try:
        server.wait_ready()
        for sc in scenarios(args):
            name = key(sc, "plain", mode)
            for _ in range(args.repeats):
                t0 = time.time()
                outs = asyncio.run(completions(server.url, str(model), [prompts[sc["context"]]] * sc["batch"],
                                               max_tokens=decode_tokens(args, sc)))
                samples.setdefault(name, []).extend(pick(read_steps(log, t0, time.time()), sc))
            if sc["kind"] == "decode" and len(outs[0]) > len(continuations.get(sc["context"], [])):
                continuations[sc["context"]] = outs[0]  # the longest greedy continuation
            print(f"  plain {name}: {len(samples[name])} steps", flush=True)
    finally:
        server.stop()
    return samples, continuations


def run_split(args, model: Path, prompts: dict, continuations: dict, log: Path, *, mode: str) -> tuple[dict, int]:
    """The two-phase mode's second phase: split sessions only. Returns (steps per scenario and
    system, token mismatches against ``continuations``)."""
    from harness.replay import make_script

    layers = client_layers(args, model)
    fingerprint = layers[args.ks[0]].fingerprint
    scripts, tails = {}, {}
    for c, ids in prompts.items():
        cont = continuations.get(c)
        for k in layers:
            if cont is not None:
                scripts[(k, c, "decode")] = make_script(layers[k], ids, cont)
            scripts[(k, c, "prefill")] = make_script(layers[k], ids, cont[:1] if cont else [0])
    server = split_server(args, model, log, mode=mode)
    samples, mismatches = {}, 0
    try:
        server.wait_ready()
        for sc in scenarios(args):
            n = decode_tokens(args, sc)
            for system in systems(args, sc):
                batch = split_batch(system, args.ks, sc["batch"],
                                    {k: truncated(scripts[(k, sc["context"], sc["kind"])], n) for k in layers})
                for _ in range(args.repeats):
                    t0 = time.time()
                    wrong = replay_checked(server.url, batch, fingerprint=fingerprint, tails=tails, model=model)
                    if sc["context"] in continuations:  # else the expected token is unknown
                        mismatches += wrong
                    samples.setdefault(key(sc, system, mode), []).extend(pick(read_steps(log, t0, time.time()), sc))
                print(f"  split {key(sc, system, mode)}: {len(samples[key(sc, system, mode)])} steps", flush=True)
    finally:
        server.stop()
    return samples, mismatches


def run_interleaved(args, model: Path, prompts: dict, log: Path, *, mode: str) -> tuple[list[dict], int]:
    """One vllm-split server; per scenario, repeat and system, an ordinary batch and a split
    batch one right after the other (ordinary first in even repeats). Returns (pairs: the two
    batches' steps of the scenario's shape, one pair per stage under pipeline parallelism,
    token mismatches). The split sessions replay the continuation of the scenario's first
    ordinary batch (same shape, same server)."""
    from harness.replay import make_script

    layers = client_layers(args, model)
    fingerprint = layers[args.ks[0]].fingerprint
    server = split_server(args, model, log, mode=mode)
    pairs, mismatches, tails = [], 0, {}
    try:
        server.wait_ready()
        for sc in scenarios(args):
            ids, n = prompts[sc["context"]], decode_tokens(args, sc)
            scripts: dict[int, object] = {}  # per split layer, made after the first ordinary batch
            for repeat in range(args.repeats):
                for system in systems(args, sc):
                    order = ("ordinary", "split") if repeat % 2 == 0 else ("split", "ordinary")
                    pair = {"mode": mode, **sc, "system": system, "repeat": repeat, "order": "-".join(order)}
                    for which in order:
                        t0 = time.time()
                        if which == "ordinary":
                            outs = asyncio.run(completions(server.url, str(model), [ids] * sc["batch"], max_tokens=n))
                            if not scripts:
                                scripts = {k: make_script(layers[k], ids, outs[0]) for k in layers}
                        else:
                            batch = split_batch(system, args.ks, sc["batch"], scripts)
                            mismatches += replay_checked(server.url, batch, fingerprint=fingerprint, tails=tails,
                                                         model=model)
                        pair[which] = pick(read_steps(log, t0, time.time()), sc, split=which == "split")
                    pairs += by_stage(pair, getattr(args, "pipeline_parallel_size", 1))
            done = [p for p in pairs if p["kind"] == sc["kind"] and p["batch"] == sc["batch"]
                    and p["context"] == sc["context"]]
            print(f"  interleaved {key(sc, '*', mode)}: {len(done)} pairs, "
                  f"{sum(len(p['ordinary']) for p in done)}/{sum(len(p['split']) for p in done)} steps", flush=True)
    finally:
        server.stop()
    return pairs, mismatches
