"""Throughput at the same SLA: plain vLLM vs split (server-only, greedy, DP, DP with drafts) on identical arrivals.

    python -m benchmarks.bench_throughput [--workload benchmarks/workloads/default.json]
        [--quick] [--systems plain,split_dp] [--no-sweep] [--out results/bench_throughput.json]

One experiment, every system, the same arrival traces: a mix of request types arrives as a
Poisson process; at each rate every system replays the same traces (``trace_seed``: one
seed per rate and trace index, whatever the system), several traces per rate. Every
request has an SLA and a client of a device class on a network (the workload file).

* ``plain``: vLLM without the plugin, the client sends token ids over HTTP (streaming);
  vLLM's default compiled mode, and the best of a small sweep of its own knobs.
* ``split_server_only``: the plugin, every client at ``k = 0`` (the plugin's overhead).
* ``split_greedy``: the admission controller with the greedy placement rule.
* ``split_dp``: the admission controller with the DP (the product's default); the best of
  a small sweep of the split server's knobs (greedy and server-only get the same settings).
* ``split_drafts``: split DP with client drafts (issue 14): the emulated client drafts by
  prompt lookup over the prompt and the tokens so far, 4 per activation, on a server started
  with ``--split-drafts 4`` (the split settings chosen for the DP).

Clients are emulated (``harness.emulation``): exact replayed activations, the waits their
device class and network would take; a device class's per-layer time is a sourced multiple
of this server's measured per-layer time, and it holds at most ``max_layers`` layers
(``benchmarks.throughput_requests``). Every split token is checked against the plain
engine's.

Per system: the offered rate measured from the arrivals, SLA attainment with a Wilson
interval, goodput, refusals by reason, client seconds per request, ``k`` per device class;
the maximum rate at 90% attainment on an isotonic fit, refined around the crossing, with a
bootstrap interval (``benchmarks.throughput_stats``); the DP's split limit at the run's
measured occupancy; a crossover over the clients' speed; the placement ceiling of the
client population (``benchmarks.throughput_ceiling``: the most any placement could raise the
server's rate on the step model, every client at the deepest layer its SLA and memory allow).
Plots; raw samples in the sidecar.
"""
from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

from benchmarks import report
from benchmarks.throughput_requests import (SYSTEMS, ProgressBar, arrivals, build_scripts, cpu_breakdown,
                                            device_profiles, load_workload, run_trace, server_layer_times, summarise,
                                            trace_duration, trace_seed)
from benchmarks.throughput_ceiling import placement_ceiling
from benchmarks.throughput_stats import (TARGET, max_rate_interval, max_rate_interval_by_trace, next_rate,
                                         ratio_interval)

# Every server alike: no prefix caching (the emulated requests of a type share a prompt).
COMMON_ARGS = ("--no-enable-prefix-caching",)
# The knobs swept per system (the first is the default; vLLM's CPU defaults are 128 sequences
# and 2048 batched tokens for the API server).
PLAIN_SWEEP = (("--max-num-seqs", "128"), ("--max-num-seqs", "32"),
               ("--max-num-seqs", "128", "--max-num-batched-tokens", "512"))
# Split: 512-token chunks won an earlier run's sweep (53 of 92 against 46 for 2048-token
# chunks); here the slots (split requests hold theirs while the client computes), a gather
# window that waits for Wi-Fi clients, and the DP at any load (offload threshold 0).
# Screened at the workload's ``screen_rates``, around the knee, where the settings differ.
SPLIT_SWEEP = (("--max-num-seqs", "128", "--max-num-batched-tokens", "512"),
               ("--max-num-seqs", "256", "--max-num-batched-tokens", "512"),
               ("--max-num-seqs", "128", "--max-num-batched-tokens", "512", "--split-gather-max-ms", "60"),
               ("--max-num-seqs", "128", "--max-num-batched-tokens", "512", "--split-offload-above-pct", "0"))
# The order the systems run in: DP, the product, right after plain (whose maximum rate sets
# the crossover's), so a run cut short still has the headline.
RUN_ORDER = ("plain", "split_dp", "split_greedy", "split_server_only", "split_drafts")
CROSSOVER_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)


# ---------------------------------------------------------------- split limit
def split_limit(metrics_text: str | None, num_layers: int) -> dict:
    """Best rate ratio any split could reach from the live cost model and offload at the
    occupancy in ``metrics_text``: a step's fixed share f stays on the server; the layers'
    share shrinks by the mean offloaded fraction o, so a request costs at least
    f + (1 - f)(1 - o) of its plain cost. ``{"unavailable": why}`` where the text (None: the
    probe got no answer) lacks what it needs."""
    if metrics_text is None:
        return {"unavailable": "no answer from /metrics"}
    from harness.server_process import parse_split_metrics

    m = parse_split_metrics(metrics_text.splitlines())  # summed over engines (this benchmark's servers: one)
    names = {"fixed": 'vllm_split:server_step_cost_seconds{term="fixed"}',
             "layer": 'vllm_split:server_step_cost_seconds{term="layer"}',
             "row": 'vllm_split:server_step_cost_seconds{term="row"}', "occupancy": "vllm_split:server_occupancy",
             "sum": "vllm_split:layers_offloaded_fraction_sum", "count": "vllm_split:layers_offloaded_fraction_count"}
    vals = {key: m[name] for key, name in names.items() if name in m}
    missing = sorted(names[key] for key in ("fixed", "layer", "row", "sum", "count") if key not in vals)
    if missing or not vals["count"]:
        return {"unavailable": f"missing {missing}" if missing else "no session placed yet"}
    b = max(vals.get("occupancy", 1.0), 1.0)
    step = vals["fixed"] + num_layers * (vals["layer"] + b * vals["row"])
    f = vals["fixed"] / step
    o = vals["sum"] / vals["count"]
    return {"fixed_share_of_step": f, "mean_offloaded_fraction": o, "occupancy": b,
            "best_rate_ratio": 1 / (f + (1 - f) * (1 - o)),
            "note": "per-step fixed cost (embedding, final norm, LM head, sampling, scheduling) at the occupancy "
                    "measured mid-trace, from the controller's live cost model; the per-layer-call cost is counted "
                    "as offloadable, which holds only when whole layers leave the batch"}


def model_shape(model_dir: Path) -> tuple[int, int]:
    """(decoder layers, bytes of one float32 row on the wire: the sessions' dtype) of the model."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return config["num_hidden_layers"], 4 * config["hidden_size"]


# ---------------------------------------------------------------- one server, many points
class Bench:
    """The run's shared state: workload, model, scripts, the clients' profiles."""

    def __init__(self, args, w: dict) -> None:
        from transformers import AutoTokenizer

        from harness.model_prep import prepare

        self.args, self.w = args, w
        self.model = prepare()
        self.tok = AutoTokenizer.from_pretrained(self.model)
        self.num_layers, self.row_bytes = model_shape(self.model)
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-tp-"))
        self.scripts: dict = {}
        self.server_layer: dict | None = None
        self.samples: dict = {}
        self.rate_grid: dict = {"rates": None, "scale": None}
        self.n_server = 0

    def profiles(self, scale: float = 1.0) -> dict:
        assert self.server_layer is not None
        return device_profiles(self.w, self.server_layer, scale)

    def restore(self, prior: dict) -> None:
        """Continue an interrupted run (``--resume``): its layer times, grid and samples."""
        self.server_layer = prior["server_layer_times"]
        self.rate_grid = prior.get("rate_grid") or self.rate_grid
        self.samples = prior.get("samples") or {}

    def server(self, system: str, knobs: tuple[str, ...]):
        from harness.server_process import VLLMServer

        spec = SYSTEMS[system]
        if spec["split"] and not self.scripts:  # resumed after plain: the references come from a plain engine
            self.server("plain", ()).stop()
        self.n_server += 1
        extra = (*COMMON_ARGS, *knobs, *spec["args"], *(self.args.split_args.split() if spec["split"] else ()))
        server = VLLMServer(self.model, split=spec["split"], log_path=self.tmp / f"{self.n_server}-{system}.log",
                            extra_args=extra, eager=self.args.eager)
        server.wait_ready()
        if not spec["split"] and not self.scripts:  # references and the server's layer times: plain engine
            if self.server_layer is None:
                self.server_layer = server_layer_times(server.url, str(self.model), self.num_layers,
                                                       repeats=1 if self.args.quick else 3)
            self.scripts = build_scripts(server.url, str(self.model), self.tok, self.w)
        return server

    def point(self, server, system: str, rate: float, traces: int, label: str, *, scale: float = 1.0,
              duration: float | None = None, key: str = "") -> dict:
        """One rate: ``traces`` arrival traces (the same for every system), pooled."""
        got, arrival_s, probes = [], 0.0, []
        cpu0, t0 = cpu_breakdown(server.proc.pid), time.perf_counter()
        profiles = self.profiles(scale)
        for i in range(traces):
            d = duration or trace_duration(self.w, rate)
            reqs = arrivals(self.w, rate, d, trace_seed(self.w, rate, i))
            bar = ProgressBar(f"{label} rate {rate:.3g}/s trace {i + 1}/{traces}", len(reqs))
            res, metrics = asyncio.run(run_trace(system, server.url, str(self.model), self.w, self.scripts, profiles,
                                                 reqs, bar.update, probe_at_s=d / 2 if SYSTEMS[system]["split"] else None))
            for r in res:
                r["trace"] = i
            got += res
            arrival_s += d
            if SYSTEMS[system]["split"]:
                probes.append(split_limit(metrics, self.num_layers))
            met = sum(1 for r in res if r.get("met"))
            bar.close(f"{met}/{len(res)} met")
            time.sleep(2.5)  # let the engine drain and the controller's load window empty
        wall = time.perf_counter() - t0
        cpu = {k: v - cpu0.get(k, 0.0) for k, v in cpu_breakdown(server.proc.pid).items()}
        p = summarise(got, rate=rate, arrival_s=arrival_s, wall_s=wall,
                      cpu_s=sum(v for k, v in cpu.items() if k != "bench_clients"))
        p.update(traces=traces, speed_scale=scale, cpu_s_by_process=cpu, wall_s=wall,
                 split_limit=probes or None, trace_counts=trace_counts(got))
        self.samples.setdefault(system + key, {})[sample_key(rate, scale)] = got
        return p

    def rate_scale(self) -> float:
        """This machine's measured speed against the workload's reference: its rates were set
        around the knee at ``screen_reference_decode_s`` per layer, and the knee moves with the
        per-layer time (this machine's varies by 1.3-1.7x between runs)."""
        assert self.server_layer is not None
        ref = self.w.get("screen_reference_decode_s")
        return ref / self.server_layer["decode_s"] if ref else 1.0

    def screen_rates(self) -> tuple[list[float], float]:
        """The workload's screening rates scaled to this machine's measured speed, and the scale."""
        scale = self.rate_scale()
        return [round(float(r) * scale, 2) for r in self.w["screen_rates"]], scale

    def grid(self, rates: list[float] | None) -> list[float]:
        """The full runs' starting rates: ``--rates`` as given, else the workload's scaled like
        the screens' (recorded in the report's ``rate_grid``)."""
        scale = None
        if rates is None:
            scale = self.rate_scale()
            rates = [round(float(r) * scale, 2) for r in self.w["rates"]]
        self.rate_grid = {"rates": rates, "scale": scale}
        return rates

    def screen(self, system: str, sweep: tuple) -> dict:
        """Each knob setting at the screening rates, one trace each; the most requests met wins."""
        rows, rates, scale = [], None, None
        for j, knobs in enumerate(sweep):
            server = self.server(system, knobs)
            if rates is None:  # the first server measured the layer times
                rates, scale = self.screen_rates()
            try:
                pts = [self.point(server, system, r, 1, f"[screen {system} {j + 1}/{len(sweep)}]", key="_screen")
                       for r in rates]
            finally:
                server.stop()
            rows.append({"knobs": list(knobs), "met": sum(p["met"] for p in pts), "requests": sum(p["requests"] for p in pts),
                         "points": pts})
        best = max(range(len(rows)), key=lambda j: (rows[j]["met"], -j))
        return {"rates": rates, "rate_scale": scale, "settings": rows, "chosen": rows[best]["knobs"]}

    def full(self, system: str, knobs: tuple[str, ...], rates: list[float] | None, traces: int, refine: int,
             extra_rates: tuple[float, ...] = ()) -> tuple[list[dict], object]:
        """The system's points on the grid, refined around its crossing; the server is
        returned running (the caller stops it)."""
        server = self.server(system, knobs)
        label = f"[{system}]"
        points = [self.point(server, system, r, traces, label) for r in self.grid(rates)]
        for _ in range(refine):
            r = next_rate(points)
            if r is None:
                break
            points.append(self.point(server, system, round(r, 3), traces, label + " refine"))
        for r in extra_rates:
            if all(abs(p["rate"] - r) > 1e-9 for p in points):
                points.append(self.point(server, system, r, traces, label))
        points.sort(key=lambda p: p["rate"])
        return points, server


def sample_key(rate: float, speed_scale: float) -> str:
    """The key of one point's raw samples in ``samples[system]``."""
    return f"{rate:.4g}@{speed_scale:g}"


def empty_crossover() -> dict:
    """The crossover record of a run that has not measured it (yet)."""
    return {"rate": None, "plain": None, "split_dp": []}


def resume_from(out: Path) -> dict:
    """The interrupted run in report ``out`` (with its samples), and what is kept of it."""
    if not out.exists():
        raise SystemExit(f"--resume: {out} does not exist")
    data = report.load(out, rows=True)
    if data.get("complete"):
        raise SystemExit(f"--resume: {out} is a complete run")
    kept = sorted((data.get("systems") or {}).keys())
    data["resumed"] = {"kept_systems": kept, "kept_sweeps": sorted((data.get("sweeps") or {}).keys()),
                       "interrupted_run_wall_s": (data.get("environment") or {}).get("wall_s"),
                       "how": "the systems kept ran in the interrupted process on the same traces; the others "
                              "in this one, minutes later, on the same machine and code"}
    print(f"[resume] keeping {kept} and the sweeps of {data['resumed']['kept_sweeps']}", flush=True)
    return data


def trace_counts(rows: list[dict]) -> list[list[int]]:
    """``[[met, requests], ...]`` per arrival trace of one point."""
    out: dict[int, list[int]] = {}
    for r in rows:
        c = out.setdefault(r["trace"], [0, 0])
        c[0] += bool(r.get("met"))
        c[1] += 1
    return [out[i] for i in sorted(out)]


def intervals(points: list[dict]) -> tuple[dict, dict]:
    """The 90% rate with its interval over traces (the headline) and over requests."""
    return max_rate_interval_by_trace(points), max_rate_interval(points)


def reanalyse(out: Path) -> dict:
    """Recompute every point's per-trace counts, the intervals and the summary of report
    ``out`` from its raw samples (after a change of the statistics; the measurements stay),
    and the placement ceiling from its workload and layer times."""
    from harness.model_prep import prepare

    data = report.load(out, rows=True)
    samples = data.pop("samples")
    for system, r in data["systems"].items():
        for p in r["points"]:
            p["trace_counts"] = trace_counts(samples[system][sample_key(p["rate"], p["speed_scale"])])
        r["max_rate_at_90pct"], r["max_rate_at_90pct_by_request"] = intervals(r["points"])
    data["summary"] = summary(data["systems"], data.get("crossover") or {})
    if data.get("workload") and data.get("server_layer_times"):
        data["placement_ceiling"] = placement_ceiling(data["workload"], data["server_layer_times"],
                                                      *model_shape(prepare()))
    report.write(out, data, rows={"samples": samples}, draw=draw)
    return data


def k_by_device(samples: dict, system: str) -> dict:
    """Histogram of the chosen split layer per device class, over every point of ``system``."""
    out: dict = {}
    for rows in samples.get(system, {}).values():
        for s in rows:
            if s["split_layer"] is not None and s["output_tokens"]:
                h = out.setdefault(s["device"], {})
                h[str(s["split_layer"])] = h.get(str(s["split_layer"]), 0) + 1
    return out


# ---------------------------------------------------------------- main
def main() -> None:
    p = report.parser("bench_throughput", __doc__, quick="CI smoke: plain and split_dp, one short rate", plot=True)
    p.add_argument("--workload", type=Path, default=report.ROOT / "benchmarks" / "workloads" / "default.json")
    p.add_argument("--systems", default=None, help=f"comma-separated, of {', '.join(SYSTEMS)} (default: all; "
                   "--quick: plain,split_dp)")
    p.add_argument("--eager", action="store_true", help="run every server with --enforce-eager (labelled eager)")
    p.add_argument("--rates", default=None, help="comma-separated starting rates instead of the workload's (which are scaled by the measured speed)")
    p.add_argument("--traces", type=int, default=3, help="arrival traces (seeds) per rate (default: %(default)s)")
    p.add_argument("--refine", type=int, default=3, help="rates added around each crossing (default: %(default)s)")
    p.add_argument("--no-sweep", action="store_true", help="skip the knob sweeps: the first setting of each")
    p.add_argument("--no-crossover", action="store_true", help="skip the client-speed sweep")
    p.add_argument("--split-args", default="", help="extra options for the split servers, e.g. '--split-gather off'")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run written to --out: keep its "
                   "sweeps, layer times and the systems it completed (with their samples), run the others")
    p.add_argument("--reanalyse", action="store_true", help="recompute the intervals and summary of --out from its "
                   "raw samples, then exit")
    args = report.parse_args(p, draw)
    if args.reanalyse:
        print(json.dumps(reanalyse(args.out)["summary"], indent=1))
        return
    import torch

    torch.set_num_threads(1)  # emulated clients share the machine with the server
    w = load_workload(args.workload)
    chosen_systems = args.systems or ("plain,split_dp" if args.quick else ",".join(SYSTEMS))
    systems = [s.strip() for s in chosen_systems.split(",")]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        raise SystemExit(f"unknown system(s) {unknown}; known: {list(SYSTEMS)}")
    if "plain" not in systems:
        systems = ["plain", *systems]  # the references and the server's layer times come from plain
    systems.sort(key=RUN_ORDER.index)
    # Without --rates the full runs' grid is the workload's, scaled by the measured speed once
    # the first server has measured it (Bench.grid).
    rates = [float(r) for r in args.rates.split(",")] if args.rates else None
    if args.quick:  # a smoke run: eager servers start in half the time (labelled in the arguments)
        rates = rates or [float(r) for r in w["rates"]]
        rates, args.traces, args.refine, args.no_sweep, args.no_crossover = rates[:1], 1, 0, True, True
        args.eager = True
    bench = Bench(args, w)
    prior = resume_from(args.out) if args.resume else None
    if prior:
        bench.restore(prior)
    duration = 6.0 if args.quick else None
    t_all = time.perf_counter()
    screens: dict = dict(prior.get("sweeps") or {}) if prior else {}
    if not args.no_sweep and not screens:
        screens["plain"] = bench.screen("plain", PLAIN_SWEEP)
        if "split_dp" in systems:
            screens["split_dp"] = bench.screen("split_dp", SPLIT_SWEEP)
    if screens and not prior:  # the screening's samples on disk before the long part (a resumed
        # run's file keeps what it had: this write would drop its kept systems until the next one ends)
        report.write(args.out, {"arguments": report.arguments(args), "sweeps": screens, "complete": False,
                                "server_layer_times": bench.server_layer, "client_profiles": bench.profiles()},
                     rows={"samples": bench.samples})
    chosen = {"plain": tuple(screens["plain"]["chosen"]) if "plain" in screens else PLAIN_SWEEP[0]}
    split_knobs = tuple(screens["split_dp"]["chosen"]) if "split_dp" in screens else SPLIT_SWEEP[0]
    results: dict = dict(prior["systems"]) if prior else {}
    crossover: dict = (prior.get("crossover") if prior else None) or empty_crossover()
    for system in systems:
        if system in results:
            print(f"{system}: kept from the interrupted run", flush=True)
            continue
        knobs = chosen["plain"] if system == "plain" else split_knobs
        if args.quick:
            server = bench.server(system, knobs)
            points = [bench.point(server, system, bench.grid(rates)[0], 1, f"[{system}]", duration=duration)]
        else:
            points, server = bench.full(system, knobs, rates, args.traces, args.refine)
        try:
            interval, by_request = intervals(points)
            if system == "plain" and not args.no_crossover:  # the crossover's rate: where plain misses its SLA
                crossover["rate"] = round(1.25 * (interval["rate"] or bench.rate_grid["rates"][0]), 3)
                crossover["plain"] = bench.point(server, system, crossover["rate"], 2, "[crossover plain]")
            if system == "split_dp" and crossover["rate"]:
                for scale in CROSSOVER_SCALES:
                    pt = bench.point(server, system, crossover["rate"], 2, f"[crossover x{scale:g}]", scale=scale,
                                     key="_crossover")
                    crossover["split_dp"].append(pt)
        finally:
            server.stop()
        results[system] = {"knobs": list(knobs), "points": points, "max_rate_at_90pct": interval,
                           "max_rate_at_90pct_by_request": by_request}
        print(f"{system}: max rate at 90% {interval}", flush=True)
        data = {"arguments": report.arguments(args),
                "environment": report.environment(num_layers=bench.num_layers, wall_s=time.perf_counter() - t_all),
                "workload": w, "server_layer_times": bench.server_layer, "client_profiles": bench.profiles(),
                "rate_grid": bench.rate_grid,
                "sweeps": screens, "systems": results, "crossover": crossover,
                "k_by_device": {s: k_by_device(bench.samples, s) for s in ("split_dp", "split_greedy", "split_drafts")
                                if s in results},
                "summary": summary(results, crossover),
                "placement_ceiling": placement_ceiling(w, bench.server_layer, bench.num_layers, bench.row_bytes),
                "complete": system == systems[-1],
                "resumed": prior["resumed"] if prior else None}
        report.write(args.out, data, rows={"samples": bench.samples}, draw=draw)  # after each system: a crash loses one
    print(json.dumps(data["summary"], indent=1))


def summary(results: dict, crossover: dict) -> dict:
    out: dict = {}
    base = results.get("plain", {}).get("max_rate_at_90pct", {})
    for s, r in results.items():
        m = r["max_rate_at_90pct"]
        ratio = m["rate"] / base["rate"] if base.get("rate") and m["rate"] else None
        out[s] = {"knobs": r["knobs"], "max_rate_at_90pct": m["rate"], "how": m["how"], "ci95": m["ci95"],
                  "ci95_by_request": (r.get("max_rate_at_90pct_by_request") or {}).get("ci95"),
                  "vs_plain": ratio, "vs_plain_ci95": ratio_interval(m, base) if s != "plain" else None,
                  "requests": sum(p["requests"] for p in r["points"]),
                  "client_s_per_request": _mean([p["client_s_per_request"] for p in r["points"]])}
    dp, greedy = (results.get(s, {}).get("max_rate_at_90pct", {}).get("rate") for s in ("split_dp", "split_greedy"))
    out["dp_over_greedy"] = dp / greedy - 1 if dp and greedy else None
    probes = [x for p in results.get("split_dp", {}).get("points", []) for x in (p.get("split_limit") or []) if x]
    limits = sorted((x for x in probes if "best_rate_ratio" in x), key=lambda x: x["best_rate_ratio"])
    out["split_limit_at_measured_occupancy"] = (limits[len(limits) // 2] if limits else
                                                ({"unavailable": sorted({x["unavailable"] for x in probes})}
                                                 if probes else None))
    out["crossover_rate"] = crossover.get("rate")
    out["wrong_outputs"] = sum(p["wrong_outputs"] for r in results.values() for p in r["points"])
    out["paper"] = {"server_work_saved": "about 1/3", "dp_over_greedy": "+19%"}
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _error_bars(points: list[dict]) -> tuple[list[float], list[float]]:
    """Attainment's distances to its interval's ends (never negative: reports written before
    the Wilson fix have ends a rounding error inside the proportion at 0 and 1)."""
    return ([max(0.0, p["attainment"] - p["attainment_ci95"][0]) for p in points],
            [max(0.0, p["attainment_ci95"][1] - p["attainment"]) for p in points])


def draw(data: dict):
    fig, ((a1, a2), (a3, a4)) = report.subplots(2, 2, figsize=(12, 8.5))
    for system, r in data["systems"].items():
        pts = r["points"]
        x = [p["offered_rate"] for p in pts]
        att = [p["attainment"] for p in pts]
        lo, hi = _error_bars(pts)
        line = a1.errorbar(x, att, yerr=[lo, hi], fmt="o-", capsize=3, label=system)
        m = r["max_rate_at_90pct"]
        if m["rate"] and m["ci95"]:
            a1.errorbar([m["rate"]], [TARGET], xerr=[[m["rate"] - m["ci95"][0]], [m["ci95"][1] - m["rate"]]],
                        fmt="D", color=line[0].get_color(), capsize=4)
        a2.plot(x, [p["goodput_rps"] for p in pts], "o-", label=system)
    a1.axhline(TARGET, color="grey", ls="--", lw=0.8)
    a1.set(xlabel="offered rate (arrivals/s, measured)", ylabel="SLA attainment (95% Wilson)", ylim=(0, 1.05),
           title="attainment; diamonds: max rate at 90% (95%, bootstrap over traces)")
    a2.set(xlabel="offered rate (arrivals/s, measured)", ylabel="goodput (requests/s meeting the SLA)")
    cross = data.get("crossover") or {}
    if cross.get("split_dp"):
        scales = [p["speed_scale"] for p in cross["split_dp"]]
        a3.errorbar(scales, [p["attainment"] for p in cross["split_dp"]], yerr=list(_error_bars(cross["split_dp"])),
                    fmt="o-", capsize=3, color="C3", label="split_dp")
        if cross.get("plain"):
            a3.axhline(cross["plain"]["attainment"], color="C0", ls=":", label="plain")
        a3.set_xscale("log", base=2)
    title = f"crossover at {cross['rate']} req/s" if cross.get("rate") else "crossover: not run in this report"
    a3.set(xlabel="client speed multiple (x the workload's per-layer times; larger = slower clients)",
           ylabel="SLA attainment", ylim=(0, 1.05), title=title)
    for i, (system, hist) in enumerate((data.get("k_by_device") or {}).items()):
        for j, (device, h) in enumerate(sorted(hist.items())):
            ks = sorted(h, key=int)
            total = sum(h.values())
            a4.scatter([j + 0.3 * i] * len(ks), [int(k) for k in ks], s=[400 * h[k] / total for k in ks],
                       alpha=0.6, color=f"C{i + 2}", label=system if j == 0 else None)
        a4.set_xticks(range(len(hist)), sorted(hist))
    a4.set(ylabel="split layer k (marker area: share)", title="k per device class")
    for a in (a1, a2, a3, a4):
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:  # an empty panel (no crossover run) gets no legend
            a.legend(fontsize=8)
    fig.suptitle("Throughput at the same SLA: plain vLLM vs vllm-split, identical arrivals")
    return fig


if __name__ == "__main__":
    main()
