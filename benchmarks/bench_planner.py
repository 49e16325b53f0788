"""Planner speed: time to plan one request of an 80-layer model at sub-block granularity.

Llama-3-70B split into attention and MLP sub-blocks plus the LM head is a 161-node chain.
Instances are drawn (seeded) from the placement study's request mix, devices, networks and
SLAs; each is planned ``--repeats`` times with ``time.perf_counter`` per call. The target
is a median of at most 1 ms for the general shape. Writes JSON (arguments, environment,
git sha, median, p90; the per-instance samples in the compressed sidecar
``NAME.rows.json.gz``) and prints the median.

    python -m benchmarks.bench_planner            # -> results/bench_planner.json
    python -m benchmarks.bench_planner --quick    # CI smoke run
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

from benchmarks import report
from benchmarks.placement_study import device_spec, draw_requests
from vllm_split.planner import (
    DEFAULT_TICK_S,
    KNOWN_MODELS,
    SLA,
    NetworkSpec,
    RequestShape,
    Shape,
    build_graph,
    plan,
)

TARGET_MS = 1.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = report.parser("bench_planner", __doc__, quick="5 instances x 5 repeats", seed=1)
    ap.add_argument("--config", type=Path, default=report.ROOT / "benchmarks" / "study_config.json")
    ap.add_argument("--model", default="Llama-3-70B")
    ap.add_argument("--server", default="8xh100")
    ap.add_argument("--granularity", default="subblock")
    ap.add_argument("--instances", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--shapes", default="general,prefix,u")
    ap.add_argument("--tick-s", type=float, default=DEFAULT_TICK_S)
    args = ap.parse_args()
    if args.quick:
        args.instances, args.repeats = 5, 5
    cfg = json.loads(args.config.read_text())
    model = KNOWN_MODELS[args.model]
    server = device_spec(cfg["servers"][args.server])
    rng = random.Random(args.seed)
    requests = draw_requests(cfg["request_mix"], args.instances, args.seed)
    instances = []
    for kind, prompt_len, output_len in requests:
        dev_key = rng.choice(sorted(cfg["devices"]))
        net_key = rng.choice(sorted(cfg["networks"]))
        sla_key = rng.choice(sorted(cfg["slas"]))
        net = cfg["networks"][net_key]
        graph = build_graph(model, RequestShape(prompt_len, output_len, cfg["server_batch"]),
                            client=device_spec(cfg["devices"][dev_key]), server=server,
                            granularity=args.granularity)
        instances.append({"kind": kind, "prompt_len": prompt_len, "output_len": output_len,
                          "device": dev_key, "network": net_key, "sla": sla_key, "graph": graph,
                          "net": NetworkSpec(net["uplink_mbps"] * 1e6, net["downlink_mbps"] * 1e6, net["rtt_ms"] / 1e3),
                          "sla_obj": SLA(**cfg["slas"][sla_key])})
    results, rows = {}, {}
    for shape in (Shape(s) for s in args.shapes.split(",")):
        samples, per_instance = [], []
        for inst in instances:
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                res = plan(inst["graph"], inst["net"], inst["sla_obj"], shape=shape, tick_s=args.tick_s)
                times.append((time.perf_counter() - t0) * 1e3)
            samples.extend(times)
            per_instance.append({k: inst[k] for k in ("kind", "prompt_len", "output_len", "device", "network", "sla")}
                                | {"median_ms": statistics.median(times), "feasible": res.feasible,
                                   "client_nodes": res.placement.num_client_nodes, "samples_ms": [round(t, 5) for t in times]})
        medians = [p["median_ms"] for p in per_instance]
        results[shape.value] = {
            "median_ms": statistics.median(samples), "p90_ms": percentile(samples, 0.9),
            "max_instance_median_ms": max(medians), "num_samples": len(samples),
            "fraction_instances_over_target": sum(m > TARGET_MS for m in medians) / len(medians),
        }
        rows[shape.value] = per_instance
        print(f"{shape.value:8s} nodes={instances[0]['graph'].num_nodes} median={results[shape.value]['median_ms']:.3f} ms "
              f"p90={results[shape.value]['p90_ms']:.3f} ms worst-instance-median={max(medians):.3f} ms")
    general = results.get("general")
    out = {"arguments": report.arguments(args), "environment": report.environment(),
           "num_nodes": instances[0]["graph"].num_nodes, "target_ms": TARGET_MS,
           "meets_target": None if general is None else general["median_ms"] <= TARGET_MS, "summary": results}
    report.write(args.out, out, rows={"instances": rows})
    if general is not None:
        print(f"median planning time (general, {out['num_nodes']} nodes): {general['median_ms']:.3f} ms "
              f"-> {'meets' if out['meets_target'] else 'MISSES'} the {TARGET_MS} ms target")


if __name__ == "__main__":
    main()
