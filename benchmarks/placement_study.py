"""Placement study: server workload saved by splitting, per model, shape, device, network, SLA.

For every request of a seeded request mix and every (device, network, SLA) scenario it
plans each placement shape with the DP and the baselines (server-only, greedy,
client-max) and reports the server-workload reduction against server-only and of the DP
against greedy, beside the SplitLLM paper's figures. The mix, devices, networks and SLAs
come from a JSON file (default benchmarks/study_config.json). Writes a JSON (arguments,
environment, git sha, raw per-request rows, summary) and a plot made from that JSON.

    python -m benchmarks.placement_study                  # full study -> results/
    python -m benchmarks.placement_study --quick          # CI smoke run (< 20 s)
    python -m benchmarks.placement_study --profile benchmarks/profiles/smollm2_example.json

The raw rows (one per request, scenario and shape; fields in ``row_fields``) go to the
compressed sidecar ``NAME.rows.json.gz`` (``benchmarks/report.py``).
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from pathlib import Path

from benchmarks import report
from vllm_split.planner import (
    KNOWN_MODELS,
    SLA,
    DeviceSpec,
    NetworkSpec,
    RequestShape,
    Shape,
    build_graph,
    client_max,
    devices_from_profile,
    greedy,
    parse_profile,
    plan,
    server_only,
)

METHODS = ("server_only", "greedy", "dp", "client_max")
ROW_FIELDS = ("model", "device", "network", "sla", "shape", "request", "kind", "prompt_len", "output_len",
              *(f"work_{m}" for m in METHODS), *(f"feasible_{m}" for m in METHODS),
              "dp_client_nodes", "dp_ms")


def device_spec(entry: dict) -> DeviceSpec:
    return DeviceSpec(entry["name"], float(entry["peak_flops"]), float(entry["mem_bandwidth"]),
                      float(entry.get("efficiency", 1.0)), float(entry.get("node_overhead_s", 0.0)))


def draw_requests(mix: list[dict], count: int, seed: int) -> list[tuple[str, int, int]]:
    rng = random.Random(seed)
    kinds = rng.choices(mix, weights=[k["weight"] for k in mix], k=count)
    return [(k["name"], rng.randint(*k["prompt_len"]), rng.randint(*k["output_len"])) for k in kinds]


def run_study(cfg: dict, args) -> dict:
    requests = draw_requests(cfg["request_mix"], args.requests or cfg["num_requests"], cfg["seed"])
    servers = {key: device_spec(v) for key, v in cfg["servers"].items()}
    devices = {key: device_spec(v) for key, v in cfg["devices"].items()}
    networks = {key: NetworkSpec(v["uplink_mbps"] * 1e6, v["downlink_mbps"] * 1e6, v["rtt_ms"] / 1e3)
                for key, v in cfg["networks"].items()}
    slas = {key: SLA(**v) for key, v in cfg["slas"].items()}
    shapes = [(Shape(s["shape"]), s["granularity"]) for s in cfg["shapes"]]
    models = [(KNOWN_MODELS[m["name"]], servers[m["server"]], dict(devices)) for m in cfg["models"]]
    if args.profile:
        profile = parse_profile(json.loads(Path(args.profile).read_text()))
        p_model, p_server, p_client = devices_from_profile(profile)
        tag = "profile-example" if profile.example else "profile"
        models = [(m, p_server if m.name == p_model.name else s, {**d, f"{tag}:{p_client.name}": p_client}
                   if m.name == p_model.name else d) for m, s, d in models]
    if args.quick:
        models = [(m, s, dict(list(d.items())[:2])) for m, s, d in models[:1]]
        networks = dict(list(networks.items())[:2])
    rows = []
    tick = cfg["tick_s"]
    for model, server, model_devices in models:
        for dev_key, device in model_devices.items():
            for shape, granularity in shapes:
                for req_id, (kind, prompt_len, output_len) in enumerate(requests):
                    request = RequestShape(prompt_len, output_len, cfg["server_batch"])
                    graph = build_graph(model, request, client=device, server=server, granularity=granularity)
                    for net_key, network in networks.items():
                        for sla_key, sla in slas.items():
                            base = server_only(graph, network, sla)
                            t0 = time.perf_counter()
                            dp = plan(graph, network, sla, shape=shape, tick_s=tick)
                            dp_ms = (time.perf_counter() - t0) * 1e3
                            results = {"server_only": base, "dp": dp,
                                       "greedy": greedy(graph, network, sla, shape=shape, tick_s=tick),
                                       "client_max": client_max(graph, network, sla, shape=shape, tick_s=tick)}
                            # an infeasible plan is served server-only (the system's fallback)
                            works = [r.server_work if r.feasible else base.server_work
                                     for r in (results[m] for m in METHODS)]
                            rows.append([model.name, dev_key, net_key, sla_key, shape.value, req_id, kind,
                                         prompt_len, output_len, *works,
                                         *(results[m].feasible for m in METHODS),
                                         dp.placement.num_client_nodes, round(dp_ms, 4)])
    return {"rows": rows, "summary": summarise(rows, cfg["paper"])}


def _reduction(new: float, old: float) -> float:
    return 1.0 - new / old if old > 0 else 0.0


def summarise(rows: list[list], paper: dict) -> dict:
    idx = {name: i for i, name in enumerate(ROW_FIELDS)}
    groups: dict[tuple, list] = defaultdict(list)
    for row in rows:
        groups[tuple(row[idx[k]] for k in ("model", "shape", "device", "network", "sla"))].append(row)
    scenarios = []
    for key, members in groups.items():
        total = {m: sum(r[idx[f"work_{m}"]] for r in members) for m in METHODS}
        scenarios.append({
            **dict(zip(("model", "shape", "device", "network", "sla"), key)),
            "num_requests": len(members),
            **{f"reduction_{m}": _reduction(total[m], total["server_only"]) for m in METHODS[1:]},
            "dp_vs_greedy": _reduction(total["dp"], total["greedy"]),
            **{f"infeasible_{m}": sum(not r[idx[f"feasible_{m}"]] for r in members) for m in METHODS},
        })
    by_model_shape: dict[tuple, list] = defaultdict(list)
    for sc in scenarios:
        by_model_shape[(sc["model"], sc["shape"])].append(sc)
        by_model_shape[("all", sc["shape"])].append(sc)
    table = []
    for (model, shape), scs in by_model_shape.items():
        mean = {k: sum(s[k] for s in scs) / len(scs)
                for k in ("reduction_greedy", "reduction_dp", "reduction_client_max", "dp_vs_greedy")}
        gains = [s["reduction_dp"] / s["reduction_greedy"] - 1 for s in scs if s["reduction_greedy"] > 0]
        table.append({"model": model, "shape": shape, "num_scenarios": len(scs), **{f"mean_{k}": v for k, v in mean.items()},
                      "mean_relative_gain_dp_over_greedy": sum(gains) / len(gains) if gains else None})
    table.sort(key=lambda r: r["model"] == "all")  # models in config order, then all
    return {"scenarios": scenarios, "table": table, "paper": paper}


def print_table(summary: dict) -> None:
    print(f"{'model':24s} {'shape':8s} {'n':>3s} {'greedy':>8s} {'dp':>8s} {'clientmax':>9s} {'dp-vs-gr':>8s} {'dp/gr-1':>8s}")
    for r in summary["table"]:
        gain = r["mean_relative_gain_dp_over_greedy"]
        print(f"{r['model']:24s} {r['shape']:8s} {r['num_scenarios']:3d} {r['mean_reduction_greedy']:8.1%} "
              f"{r['mean_reduction_dp']:8.1%} {r['mean_reduction_client_max']:9.1%} {r['mean_dp_vs_greedy']:8.1%} "
              f"{'-' if gain is None else f'{gain:.1%}':>8s}")
    paper = summary["paper"]
    print(f"paper: server workload -{paper['server_workload_reduction']:.0%}, "
          f"DP {paper['dp_better_than_greedy']:.0%} better than greedy")


def draw(data: dict):
    summary = data["summary"]
    table = summary["table"]
    models = list(dict.fromkeys(r["model"] for r in table))
    shapes = list(dict.fromkeys(r["shape"] for r in table))
    fig, axes = report.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / (2 * len(shapes))
    for s, shape in enumerate(shapes):
        for k, (key, label) in enumerate((("mean_reduction_greedy", "greedy"), ("mean_reduction_dp", "DP"))):
            vals = [next((r[key] for r in table if r["model"] == m and r["shape"] == shape), 0) for m in models]
            pos = [i + (2 * s + k - len(shapes)) * width + width / 2 for i in range(len(models))]
            axes[0].bar(pos, [100 * v for v in vals], width, label=f"{label} ({shape})", alpha=0.55 + 0.45 * k)
        vals = [next((r["mean_dp_vs_greedy"] for r in table if r["model"] == m and r["shape"] == shape), 0) for m in models]
        axes[1].bar([i + (s - len(shapes) / 2 + 0.5) * 0.8 / len(shapes) for i in range(len(models))],
                    [100 * v for v in vals], 0.8 / len(shapes), label=shape)
    paper = summary["paper"]
    axes[0].axhline(100 * paper["server_workload_reduction"], color="k", ls="--", lw=1, label="paper (~1/3)")
    axes[1].axhline(100 * paper["dp_better_than_greedy"], color="k", ls="--", lw=1, label="paper (19%)")
    for ax, title in ((axes[0], "server-workload reduction vs server-only (%)"),
                      (axes[1], "DP's extra server-work reduction vs greedy (%)")):
        ax.set_xticks(range(len(models)), models, rotation=15)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("placement study (mean over device x network x SLA scenarios)", fontsize=11)
    return fig


def main() -> None:
    ap = report.parser("placement_study", __doc__, quick="tiny smoke run: 1 model, 2 devices, 2 networks", plot=True)
    ap.add_argument("--config", type=Path, default=report.ROOT / "benchmarks" / "study_config.json")
    ap.add_argument("--profile", type=Path, help="measured profile JSON (vllm-split-profile/1) for SmolLM2")
    ap.add_argument("--requests", type=int, help="override num_requests of the config")
    ap.add_argument("--plot", type=Path, help="PNG path (default: the JSON path with .png)")
    args = report.parse_args(ap, draw)
    if args.quick and args.requests is None:
        args.requests = 4
    cfg = json.loads(args.config.read_text())
    t0 = time.perf_counter()
    study = run_study(cfg, args)
    out = {"arguments": report.arguments(args), "environment": report.environment(), "config": cfg,
           "wall_s": round(time.perf_counter() - t0, 2), "row_fields": list(ROW_FIELDS), "summary": study["summary"]}
    report.write(args.out, out, rows={"rows": study["rows"]}, indent=None)
    print_table(study["summary"])
    png = report.plot(args.out, draw, args.plot)
    print(f"wrote {args.out}, {report.rows_path(args.out).name} and {png} in {out['wall_s']} s")


if __name__ == "__main__":
    main()
