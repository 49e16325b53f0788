"""End-to-end throughput: plain vLLM vs split (server-only, greedy, DP placement) at the same SLA.

    python -m benchmarks.bench_throughput [--workload benchmarks/workloads/default.json]
        [--quick] [--systems plain,split_dp] [--out results/bench_throughput.json]

A mix of request types arrives as a Poisson process at increasing rates; every request has
an SLA and belongs to a client of a device class on a network (all from the workload
file). Four systems run the same arrivals, one after the other, on this machine:

* ``plain``: vLLM without the plugin; the client sends token ids over HTTP (streaming).
* ``split_server_only``: the plugin, every client at ``k = 0`` (the plugin's overhead).
* ``split_greedy``: the admission controller with the greedy placement rule.
* ``split_dp``: the admission controller with the DP (the product's default).

Clients are emulated (``harness.emulation``) so that the 2-core machine measures the
server: each request's hidden states at every layer are computed beforehand, exactly, by
the client library (greedy decoding: the continuation is the plain engine's, known in
advance), and a client waits what its device class would take for its layers and what its
network would take for every message, over real WebSockets to the real server. Every split
token is checked against the reference. Prefix caching is off on every server (the
emulated requests of a type share a prompt; plain vLLM would otherwise skip their prefill).

Per system and rate: goodput (requests/s meeting their SLA), output tokens/s, SLA
attainment, server CPU seconds per request (the server's process tree), refusals; the
maximum rate at 90% attainment (interpolated); plots. The raw per-request samples go to
the compressed sidecar ``NAME.rows.json.gz`` (``benchmarks/report.py``).
"""
from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import report

SYSTEMS = {
    "plain": {"split": False, "args": (), "k": None},
    "split_server_only": {"split": True, "args": (), "k": 0},
    "split_greedy": {"split": True, "args": ("--split-placement", "greedy"), "k": "auto"},
    "split_dp": {"split": True, "args": (), "k": "auto"},
}
# Every server alike: no prefix caching (the emulated requests of a type share a prompt) and
# 128 request slots. A split request keeps its slot while its client computes, so a split
# server needs more slots than plain vLLM for the same load; VLLMServer's 16 (sized for the
# tests) capped the first full run at 16 running requests (the rest waited: TTFT misses).
COMMON_ARGS = ("--no-enable-prefix-caching", "--max-num-seqs", "128")
ATTAINMENT_TARGET = 0.9


# ---------------------------------------------------------------- workload
def load_workload(path: Path) -> dict:
    w = json.loads(path.read_text())
    for key in ("request_types", "device_classes", "networks", "rates", "duration_s"):
        if key not in w:
            raise SystemExit(f"{path}: missing {key!r}")
    return w


def prompt_ids(tokenizer, text: str, n: int) -> list[int]:
    ids = tokenizer(text)["input_ids"]
    while len(ids) < n:
        ids += tokenizer(" " + text)["input_ids"]
    return ids[:n]


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


async def run_one(system: str, url: str, model: str, req: dict, w: dict, scripts: dict, http) -> dict:
    from client_lib import ServerError
    from harness.emulation import EmulatedLink, run_emulated
    from vllm_split.wire import protocol as wire

    rtype = next(r for r in w["request_types"] if r["name"] == req["type"])
    device = next(d for d in w["device_classes"] if d["name"] == req["device"])
    net = next(n for n in w["networks"] if n["name"] == req["network"])
    link = EmulatedLink(rtt_s=net["rtt_s"], uplink_bps=net["uplink_bps"], downlink_bps=net["downlink_bps"])
    script = scripts[req["type"]]
    n_out = rtype["output_tokens"]
    out = dict(req, ttft_s=None, tpot_s=None, output_tokens=0, exact=None, split_layer=None, refused=None)
    t0 = time.perf_counter()
    try:
        if SYSTEMS[system]["k"] is None:
            times, tokens = await run_plain(url, model, script.prompt_ids, n_out, link, http)
            out["exact"] = tokens == script.expected[:n_out] if tokens else None
            out["split_layer"] = 0
        else:
            profile = wire.ClientProfile(layer_prefill_s_per_token=device["layer_prefill_s_per_token"],
                                         layer_decode_s=device["layer_decode_s"])
            session, tokens, layers = await run_emulated(
                url, script, profile=profile, link=link, sla=wire.RequestSLA(**rtype["sla"]), max_tokens=n_out,
                split_layer=SYSTEMS[system]["k"])
            times = session.stats.token_times
            out["exact"] = tokens == script.expected[:n_out] and layers.mismatch is None
            out["split_layer"] = session.opened.split_layer
            out["placement"] = session.opened.placement
            out["predicted_ttft_s"] = session.opened.predicted_ttft_s
            out["predicted_tpot_s"] = session.opened.predicted_tpot_s
            out["after_open_ttft_s"] = session.stats.time_to_first_token  # from Opened to the first token
    except ServerError as exc:
        out["refused"] = exc.code
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


# ---------------------------------------------------------------- one rate on one server
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


async def run_rate(system: str, url: str, model: str, w: dict, scripts: dict, reqs: list[dict], progress) -> list[dict]:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        start = time.perf_counter()
        done: list[dict] = []

        async def launch(req):
            await asyncio.sleep(max(0.0, start + req["t"] - time.perf_counter()))
            result = await run_one(system, url, model, req, w, scripts, http)
            done.append(result)
            progress(len(done))
            return result

        return await asyncio.gather(*(launch(r) for r in reqs))


def summarise(samples: list[dict], rate: float, duration: float, cpu_s: float, wall_s: float) -> dict:
    n = len(samples)
    met = sum(1 for s in samples if s.get("met"))
    completed = [s for s in samples if s["output_tokens"]]
    ks = [s["split_layer"] for s in completed if s["split_layer"] is not None]
    return {"rate": rate, "requests": n, "met": met, "attainment": met / n if n else None,
            "goodput_rps": met / duration, "output_tokens_per_s": sum(s["output_tokens"] for s in completed) / wall_s,
            "server_cpu_s_per_request": cpu_s / max(len(completed), 1), "refused": sum(1 for s in samples if s["refused"]),
            "errors": sum(1 for s in samples if s.get("error")),
            "wrong_outputs": sum(1 for s in samples if s["exact"] is False),
            "mean_split_layer": statistics.mean(ks) if ks else None,
            "ttft_p50_s": _pct([s["ttft_s"] for s in completed], 50), "tpot_p50_s": _pct([s["tpot_s"] for s in completed], 50),
            "tpot_p90_s": _pct([s["tpot_s"] for s in completed], 90)}


def _pct(values, q):
    values = sorted(v for v in values if v is not None)
    return values[min(len(values) - 1, int(len(values) * q / 100))] if values else None


def max_rate_at(points: list[dict], target: float = ATTAINMENT_TARGET) -> float | None:
    """Largest rate with attainment >= target, interpolated to the first rate below it."""
    best = None
    for a, b in zip(points, points[1:] + [None]):
        if a["attainment"] is None or a["attainment"] < target:
            break
        best = a["rate"]
        if b is not None and b["attainment"] is not None and b["attainment"] < target:
            frac = (a["attainment"] - target) / (a["attainment"] - b["attainment"])
            best = a["rate"] + frac * (b["rate"] - a["rate"])
            break
    return best


def split_limit(metrics_text: str, num_layers: int) -> dict | None:
    """Best rate ratio any split could reach from the DP run's live cost model and offload:
    a step's fixed share f stays on the server; the layers' share shrinks by the mean
    offloaded fraction o, so the server's time per request is at least f + (1 - f)(1 - o)."""
    import re

    vals = {}
    for line in metrics_text.splitlines():
        m = re.match(r'^vllm_split:(server_step_cost_seconds\{term="(\w+)"\}|server_occupancy|'
                     r'layers_offloaded_fraction_(sum|count))\s+([-+0-9.eE]+)$', line)
        if m:
            vals[m.group(2) or m.group(3) or "occupancy"] = float(m.group(4))
    if not {"fixed", "layer", "row", "sum", "count"} <= set(vals) or not vals["count"]:
        return None
    b = max(vals.get("occupancy", 1.0), 1.0)
    step = vals["fixed"] + num_layers * (vals["layer"] + b * vals["row"])
    f = vals["fixed"] / step
    o = vals["sum"] / vals["count"]
    return {"fixed_share_of_step": f, "mean_offloaded_fraction": o, "occupancy": b,
            "best_rate_ratio": 1 / (f + (1 - f) * (1 - o)),
            "note": "per-step fixed cost (embedding, final norm, LM head, sampling, scheduling) at the DP run's "
                    "mean occupancy, from the controller's live cost model; the per-layer-call cost is counted as "
                    "offloadable, which holds only when whole layers leave the batch"}


# ---------------------------------------------------------------- main
def main() -> None:
    p = report.parser("bench_throughput", __doc__, quick="CI smoke: plain and split_dp, one short rate", plot=True)
    p.add_argument("--workload", type=Path, default=report.ROOT / "benchmarks" / "workloads" / "default.json")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--eager", action="store_true", help="run every server with --enforce-eager (labelled eager)")
    p.add_argument("--rates", default=None, help="comma-separated rates instead of the workload's")
    p.add_argument("--duration", type=float, default=None, help="seconds of arrivals per rate")
    p.add_argument("--split-args", default="", help="extra options for the split servers, e.g. "
                   "'--split-batch-wait-ms 30'")
    args = report.parse_args(p, draw)
    import torch

    torch.set_num_threads(1)  # emulated clients share the machine with the server
    from transformers import AutoTokenizer

    from client_lib import LocalLayers
    from harness.emulation import Script, all_layer_states
    from harness.model_prep import prepare
    from harness.server_process import VLLMServer

    w = load_workload(args.workload)
    systems = ["plain", "split_dp"] if args.quick else [s.strip() for s in args.systems.split(",")]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        raise SystemExit(f"unknown system(s) {unknown}; known: {list(SYSTEMS)}")
    rates = [w["rates"][1]] if args.quick else list(w["rates"])
    rates = [float(r) for r in args.rates.split(",")] if args.rates else rates
    duration = args.duration or (6.0 if args.quick else float(w["duration_s"]))
    if "plain" not in systems:
        systems = ["plain", *systems]  # the references come from the plain engine
    model = prepare()
    tok = AutoTokenizer.from_pretrained(model)
    num_layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-tp-"))
    results: dict = {}
    samples: dict = {}
    scripts: dict = {}
    limit = None
    t_all = time.perf_counter()
    for si, system in enumerate(systems):
        spec = SYSTEMS[system]
        extra = (*COMMON_ARGS, *spec["args"], *(args.split_args.split() if spec["split"] else ()))
        # every server in vLLM's default compiled mode: plain at its best, split with compiled bodies
        server = VLLMServer(model, split=spec["split"], log_path=tmp / f"{system}.log", extra_args=extra,
                            eager=args.eager)
        try:
            server.wait_ready()
            if not scripts:
                scripts = build_scripts(server.url, str(model), tok, w, LocalLayers, Script, all_layer_states)
            points = []
            for ri, rate in enumerate(rates):
                reqs = arrivals(w, rate, duration, seed=w.get("seed", 0) * 1000 + ri)
                label = f"[{si + 1}/{len(systems)} {system}] rate {rate:g}/s ({ri + 1}/{len(rates)})"
                bar = ProgressBar(label, len(reqs))
                cpu0, t0 = cpu_breakdown(server.proc.pid), time.perf_counter()
                got = asyncio.run(run_rate(system, server.url, str(model), w, scripts, reqs, bar.update))
                wall = time.perf_counter() - t0
                cpu = {k: v - cpu0.get(k, 0.0) for k, v in cpu_breakdown(server.proc.pid).items()}
                point = summarise(got, rate, duration, sum(v for k, v in cpu.items() if k != "bench_clients"), wall)
                point["cpu_s_by_process"] = cpu
                point["wall_s"] = wall
                bar.close(f"attainment {point['attainment'] if point['attainment'] is not None else float('nan'):.0%}, "
                          f"goodput {point['goodput_rps']:.2f}/s, mean k {point['mean_split_layer']}")
                points.append(point)
                samples.setdefault(system, {})[str(rate)] = got
                time.sleep(2.5)  # let the engine drain and the controller's load window empty
            results[system] = {"points": points, "max_rate_at_90pct": max_rate_at(points)}
            if system == "split_dp":
                import urllib.request

                with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
                    limit = split_limit(r.read().decode(), num_layers)
        finally:
            server.stop()
    summary = {s: {"max_rate_at_90pct": r["max_rate_at_90pct"]} for s, r in results.items()}
    base = results.get("plain", {}).get("max_rate_at_90pct")
    for s, r in results.items():
        summary[s]["vs_plain"] = (r["max_rate_at_90pct"] / base) if base and r["max_rate_at_90pct"] else None
    dp, greedy = (results.get(s, {}).get("max_rate_at_90pct") for s in ("split_dp", "split_greedy"))
    summary["dp_over_greedy"] = dp / greedy - 1 if dp and greedy else None
    summary["paper"] = {"server_work_saved": "about 1/3", "dp_over_greedy": "+19%"}
    summary["split_limit"] = limit
    summary["wrong_outputs"] = sum(p["wrong_outputs"] for r in results.values() for p in r["points"])
    data = {"arguments": report.arguments(args),
            "environment": report.environment(num_layers=num_layers, wall_s=time.perf_counter() - t_all),
            "workload": w, "rates": rates, "duration_s": duration, "systems": results, "summary": summary}
    report.write(args.out, data, rows={"samples": samples}, draw=draw)
    print(json.dumps(summary, indent=1))


def build_scripts(url, model, tok, w, LocalLayers, Script, all_layer_states) -> dict:
    """Per request type: prompt ids, the plain engine's greedy continuation, every layer's input."""
    import urllib.request

    full = LocalLayers(model, split_layer="auto")
    scripts = {}
    for rtype in w["request_types"]:
        ids = prompt_ids(tok, rtype["prompt"], rtype["prompt_tokens"])
        body = {"model": model, "prompt": ids, "max_tokens": rtype["output_tokens"], "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            expected = json.load(r)["choices"][0]["token_ids"]
        scripts[rtype["name"]] = Script(ids, expected, all_layer_states(full, ids + expected), full.fingerprint)
    return scripts


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


def draw(data: dict):
    fig, (a1, a2) = report.subplots(1, 2, figsize=(11, 4.2))
    for system, r in data["systems"].items():
        rates = [p["rate"] for p in r["points"]]
        a1.plot(rates, [p["goodput_rps"] for p in r["points"]], "o-", label=system)
        a2.plot(rates, [p["attainment"] for p in r["points"]], "o-", label=system)
    a1.plot(rates, rates, "k:", lw=0.8, label="offered load")
    a1.set_xlabel("arrival rate (requests/s)")
    a1.set_ylabel("goodput (requests/s meeting the SLA)")
    a2.axhline(ATTAINMENT_TARGET, color="grey", ls="--", lw=0.8)
    a2.set_xlabel("arrival rate (requests/s)")
    a2.set_ylabel("SLA attainment")
    a2.set_ylim(0, 1.05)
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle("Throughput at the same SLA: plain vLLM vs vllm-split placements")
    return fig


if __name__ == "__main__":
    main()
