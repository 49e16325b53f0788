"""The requests of the throughput experiment: the workload, its client population, the
arrival traces and one emulated client per request (plain over HTTP, split over a session).

Used by :mod:`benchmarks.bench_throughput`, which owns the servers and the rate grid.

The client population: a device class's per-layer time is a *multiple* of the server's
per-layer time (measured at start-up on the plain engine, :func:`server_layer_times`), the
multiple being the ratio of the modelled server's peak memory bandwidth (decode) or FLOP/s
(prefill) to the device's, both sourced in the workload file; a device class states how
many decoder layers it can hold (``max_layers``, sent in the client's profile and honoured
by the planner). ``speed_scale`` multiplies every multiple (the crossover sweep).
"""
from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

from benchmarks.throughput_stats import wilson

SYSTEMS = {
    "plain": {"split": False, "args": (), "k": None},
    # every client at k = 0 sending an activation per token (server decoding declined): the
    # split protocol's own per-token cost, nothing offloaded
    "split_server_only": {"split": True, "args": (), "k": 0, "server_decode": False},
    "split_greedy": {"split": True, "args": ("--split-placement", "greedy"), "k": "auto"},
    "split_dp": {"split": True, "args": (), "k": "auto"},
    # the DP with client drafts (issue 14): prompt-lookup drafts, 4 per activation, verified
    # by the engine's speculative decoding (``--split-drafts 4``); each client states its
    # request type, so admission plans it with its type's measured tokens per round trip
    "split_drafts": {"split": True, "args": ("--split-drafts", "4"), "k": "auto", "draft": "ngram"},
}


# ---------------------------------------------------------------- workload and population
def load_workload(path: Path) -> dict:
    w = json.loads(path.read_text())
    for key in ("request_types", "device_classes", "networks", "server_reference", "rates"):
        if key not in w:
            raise SystemExit(f"{path}: missing {key!r}")
    for d in w["device_classes"]:
        for key in ("decode_multiple", "prefill_multiple", "max_layers"):
            if key not in d:
                raise SystemExit(f"{path}: device class {d.get('name')!r} lacks {key!r}")
    return w


def device_profiles(w: dict, server: dict, speed_scale: float = 1.0) -> dict[str, dict]:
    """Per device class: the emulated client's per-layer times (s) and memory bound, from
    the multiples of the server's measured per-layer times ``server`` ({decode_s,
    prefill_s_per_token})."""
    return {d["name"]: {"layer_decode_s": d["decode_multiple"] * speed_scale * server["decode_s"],
                        "layer_prefill_s_per_token": d["prefill_multiple"] * speed_scale * server["prefill_s_per_token"],
                        "max_layers": d["max_layers"]}
            for d in w["device_classes"]}


def trace_seed(w: dict, rate: float, index: int) -> int:
    """The seed of arrival trace ``index`` at ``rate``: the same for every system."""
    return int(w.get("seed", 0)) * 1_000_003 + int(round(rate * 1000)) * 101 + index


def arrivals(w: dict, rate: float, duration: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pick = lambda items: rng.choices(items, weights=[i["weight"] for i in items])[0]  # noqa: E731
    t, out = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        out.append({"t": t, "type": pick(w["request_types"])["name"], "device": pick(w["device_classes"])["name"],
                    "network": pick(w["networks"])["name"]})


def trace_duration(w: dict, rate: float) -> float:
    """Seconds of arrivals per trace: about ``requests_per_trace`` requests, clamped."""
    t = w.get("trace", {})
    return min(max(t.get("requests_per_trace", 50) / rate, t.get("min_s", 15.0)), t.get("max_s", 60.0))


def prompt_ids(tokenizer, text: str, n: int) -> list[int]:
    ids = tokenizer(text)["input_ids"]
    while len(ids) < n:
        ids += tokenizer(" " + text)["input_ids"]
    return ids[:n]


# ---------------------------------------------------------------- one request
async def run_plain(url: str, model: str, ids: list[int], n_out: int, link, http) -> tuple[list[float], list[int]]:
    await link.uplink(4 * len(ids))
    body = {"model": model, "prompt": ids, "max_tokens": n_out, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    times, tokens = [], []
    async with http.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
        async for line in r.content:
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            choice = json.loads(line[5:])["choices"][0]
            got = choice.get("token_ids") or []
            if got or choice.get("text"):
                times.append(time.perf_counter() + link.rtt_s / 2)  # the chunk still has to reach the client
                tokens += got
    return times, tokens


def refusal_reason(code: str, message: str) -> str:
    """A refusal's reason: the error code, with ``server_busy`` told apart by its cause."""
    if code == "server_busy":
        return "queue_full" if "queue is full" in message else "queue_timeout" if "waited" in message else code
    return code


async def run_one(system: str, url: str, model: str, req: dict, w: dict, scripts: dict, profiles: dict, http) -> dict:
    from client_lib import ServerError
    from harness.emulation import EmulatedLink, run_emulated
    from vllm_split.wire import protocol as wire

    rtype = next(r for r in w["request_types"] if r["name"] == req["type"])
    net = next(n for n in w["networks"] if n["name"] == req["network"])
    device = profiles[req["device"]]
    link = EmulatedLink(rtt_s=net["rtt_s"], uplink_bps=net["uplink_bps"], downlink_bps=net["downlink_bps"])
    script = scripts[req["type"]]
    n_out = rtype["output_tokens"]
    out = dict(req, ttft_s=None, tpot_s=None, output_tokens=0, exact=None, split_layer=None, refused=None,
               client_s=0.0)
    t0 = time.perf_counter()
    try:
        if SYSTEMS[system]["k"] is None:
            times, tokens = await run_plain(url, model, script.prompt_ids, n_out, link, http)
            out["exact"] = tokens == script.expected[:n_out] if tokens else None
            out["split_layer"] = 0
        else:
            profile = wire.ClientProfile(**device)
            session, tokens, layers = await run_emulated(
                url, script, profile=profile, link=link, sla=wire.RequestSLA(**rtype["sla"]), max_tokens=n_out,
                split_layer=SYSTEMS[system]["k"], server_decode=SYSTEMS[system].get("server_decode", True),
                draft=SYSTEMS[system].get("draft", "none"), request_type=rtype["name"])
            times = session.stats.token_times
            k = session.opened.split_layer
            out["exact"] = tokens == script.expected[:n_out] and layers.mismatch is None
            out["split_layer"] = k
            out["placement"] = session.opened.placement
            out["server_decode"] = session.opened.server_decode
            out["predicted_ttft_s"] = session.opened.predicted_ttft_s
            out["predicted_tpot_s"] = session.opened.predicted_tpot_s
            out["after_open_ttft_s"] = session.stats.time_to_first_token  # from Opened to the first token
            out["round_trips"] = session.stats.round_trips
            out["drafts_sent"], out["drafts_accepted"] = session.stats.drafts_sent, session.stats.drafts_accepted
            out["client_s"] = k * (device["layer_prefill_s_per_token"] * len(script.prompt_ids)
                                   + device["layer_decode_s"] * max(len(times) - 1, 0))
    except ServerError as exc:
        out["refused"] = exc.code
        out["refusal_reason"] = refusal_reason(exc.code, str(exc))
        out["refusal_message"] = str(exc)[:240]
        return out
    except Exception as exc:  # noqa: BLE001: a failed request is a sample, not a crash
        out["error"] = f"{type(exc).__name__}: {exc}"[:200]
        return out
    out["output_tokens"] = len(times)
    if times:
        out["ttft_s"] = times[0] - t0
        out["tpot_s"] = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0
    sla = rtype["sla"]
    out["met"] = bool(times) and len(times) == n_out and out["ttft_s"] <= sla["ttft_s"] and out["tpot_s"] <= sla["tpot_s"]
    return out


async def run_trace(system: str, url: str, model: str, w: dict, scripts: dict, profiles: dict, reqs: list[dict],
                    progress, *, probe_at_s: float | None = None) -> tuple[list[dict], str | None]:
    """Every request of one arrival trace at its time; the server's ``/metrics`` text taken
    ``probe_at_s`` into the trace (the load while it runs), if asked."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        start = time.perf_counter()
        done: list[dict] = []

        async def launch(req):
            await asyncio.sleep(max(0.0, start + req["t"] - time.perf_counter()))
            result = await run_one(system, url, model, req, w, scripts, profiles, http)
            done.append(result)
            progress(len(done))
            return result

        async def probe():
            if probe_at_s is None:
                return None
            await asyncio.sleep(probe_at_s)
            try:
                async with http.get(url + "/metrics") as r:
                    return await r.text()
            except aiohttp.ClientError:
                return None

        *results, metrics = await asyncio.gather(*(launch(r) for r in reqs), probe())
        return results, metrics


# ---------------------------------------------------------------- per point
def summarise(samples: list[dict], *, rate: float, arrival_s: float, wall_s: float, cpu_s: float) -> dict:
    """One rate's figures over all its traces: ``arrival_s`` is the traces' summed arrival
    window (the offered rate is the arrivals over it), ``wall_s`` the time they took."""
    n = len(samples)
    met = sum(1 for s in samples if s.get("met"))
    completed = [s for s in samples if s["output_tokens"]]
    ks = [s["split_layer"] for s in completed if s["split_layer"] is not None]
    reasons: dict[str, int] = {}
    for s in samples:
        if s["refused"]:
            reasons[s["refusal_reason"]] = reasons.get(s["refusal_reason"], 0) + 1
    return {"rate": rate, "offered_rate": n / arrival_s if arrival_s else None, "requests": n, "met": met,
            "attainment": met / n if n else None, "attainment_ci95": wilson(met, n),
            "goodput_rps": met / arrival_s if arrival_s else None,
            "output_tokens_per_s": sum(s["output_tokens"] for s in completed) / wall_s,
            "server_cpu_s_per_request": cpu_s / max(len(completed), 1),
            "client_s_per_request": sum(s["client_s"] for s in samples) / max(len(completed), 1),
            "refused": sum(reasons.values()), "refusal_reasons": reasons,
            "errors": sum(1 for s in samples if s.get("error")),
            "wrong_outputs": sum(1 for s in samples if s["exact"] is False),
            "mean_split_layer": statistics.mean(ks) if ks else None,
            "server_decoded": sum(1 for s in completed if s.get("server_decode")),
            # round-trip sessions only (a server-decoded session has one answer per token by construction)
            "tokens_per_round_trip": _ratio(sum(s["output_tokens"] for s in completed if _round_trip(s)),
                                            sum(s["round_trips"] for s in completed if _round_trip(s))),
            "draft_acceptance": _ratio(sum(s.get("drafts_accepted", 0) for s in completed),
                                       sum(s.get("drafts_sent", 0) for s in completed)),
            "ttft_p50_s": pct([s["ttft_s"] for s in completed], 50), "tpot_p50_s": pct([s["tpot_s"] for s in completed], 50),
            "tpot_p90_s": pct([s["tpot_s"] for s in completed], 90)}


def _round_trip(s: dict) -> bool:
    return bool(s.get("round_trips")) and not s.get("server_decode")


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def pct(values, q):
    values = sorted(v for v in values if v is not None)
    return values[min(len(values) - 1, int(len(values) * q / 100))] if values else None


def cpu_breakdown(pid: int) -> dict[str, float]:
    """CPU seconds so far of the server's processes (API server, EngineCore, ...) by name,
    and of this process (the emulated clients)."""
    import psutil

    out: dict[str, float] = {}
    try:
        root = psutil.Process(pid)
        procs = [("api_server", root), *((p.name(), p) for p in root.children(recursive=True))]
    except psutil.Error:
        procs = []
    for name, p in procs:
        try:
            t = p.cpu_times()
            out[name] = out.get(name, 0.0) + t.user + t.system
        except psutil.Error:
            pass
    t = psutil.Process().cpu_times()
    out["bench_clients"] = t.user + t.system
    return out


# ---------------------------------------------------------------- set-up on the plain engine
def _complete(url: str, body: dict) -> dict:
    import urllib.request

    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)


def build_scripts(url, model, tok, w) -> dict:
    """Per request type: prompt ids, the plain engine's greedy continuation, every layer's input."""
    from client_lib import LocalLayers
    from harness.emulation import Script, all_layer_states

    full = LocalLayers(model, split_layer="auto")
    scripts = {}
    for rtype in w["request_types"]:
        ids = prompt_ids(tok, rtype["prompt"], rtype["prompt_tokens"])
        expected = _complete(url, {"model": model, "prompt": ids, "max_tokens": rtype["output_tokens"],
                                   "temperature": 0, "ignore_eos": True, "return_token_ids": True})
        scripts[rtype["name"]] = Script(ids, expected["choices"][0]["token_ids"],
                                        all_layer_states(full, ids + expected["choices"][0]["token_ids"]), full.fingerprint)
    return scripts


def server_layer_times(url: str, model: str, num_layers: int, *, repeats: int = 3) -> dict:
    """The plain engine's time per decoder layer at batch 1 (median of ``repeats``): a
    decode step's time and a 256-token prefill's time per token, divided by the layers.
    Whole-step times: they include the step's fixed part (LM head, sampling, scheduling),
    so the per-layer figure is an upper bound and the clients' times err on the slow side."""
    decode, prefill = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _complete(url, {"model": model, "prompt": [1] * 16, "max_tokens": 1, "temperature": 0})
        short = time.perf_counter() - t0
        t0 = time.perf_counter()
        _complete(url, {"model": model, "prompt": [1] * 16, "max_tokens": 33, "temperature": 0, "ignore_eos": True})
        decode.append((time.perf_counter() - t0 - short) / 32)
        t0 = time.perf_counter()
        _complete(url, {"model": model, "prompt": [1] * 272, "max_tokens": 1, "temperature": 0})
        prefill.append(max(time.perf_counter() - t0 - short, 1e-6) / 256)
    return {"decode_s": statistics.median(decode) / num_layers,
            "prefill_s_per_token": statistics.median(prefill) / num_layers,
            "how": "plain engine, batch 1: (33-token minus 1-token request) / 32 tokens, and (272-token minus "
                   "16-token prompt) / 256 tokens, divided by the decoder layers; whole steps, an upper bound"}


class ProgressBar:
    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.t0 = label, max(total, 1), time.perf_counter()
        self.update(0)

    def update(self, n: int) -> None:
        filled = int(30 * n / self.total)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {n}/{self.total} "
                         f"{time.perf_counter() - self.t0:5.0f} s")
        sys.stderr.flush()

    def close(self, note: str) -> None:
        sys.stderr.write(f"  {note}\n")
        sys.stderr.flush()
