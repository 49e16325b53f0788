"""Points of ``bench_throughput`` run in several processes, on the same traces and knobs, as one report.

    python -m benchmarks.merge_throughput_runs seed FROM.json OUT.json
    python -m benchmarks.merge_throughput_runs merge BASE.json EXTRA.json [EXTRA.json ...] --out OUT.json

``seed`` writes an unfinished report holding only what fixes an experiment: the workload (its
seed fixes every arrival trace), the knob sweeps and their choice, the server's layer times
and the client profiles of ``FROM``. ``bench_throughput --resume --out OUT.json`` then runs
its systems on exactly those traces, knobs and profiles (``--rates``, ``--traces``), as a
second process on another day or minutes later.

``merge`` appends the points of each ``EXTRA`` (a seeded run of some systems at other rates)
to ``BASE``'s systems, with the raw samples, marks each appended point with its process
(``process``: 2, 3, ... in the order given; the base's points are process 1) and recomputes
the per-trace counts, the maximum rates at 90% with their intervals and the summary
(``bench_throughput.reanalyse``). The runs must share the workload, layer times, client
profiles and each system's knobs (else it stops and says which differs); a point at a rate the
base already holds is one kept by ``--resume`` and is skipped. Use it when a run's crossings lie
outside its rates (the full mode refines its grid itself; a run with ``--refine 0`` does not).

The committed ``results/bench_throughput_knee.json`` (session 15)::

    python -m benchmarks.merge_throughput_runs seed results/bench_throughput_sameday.json knee.json
    python -m benchmarks.bench_throughput --resume --out knee.json --systems plain,split_dp,split_drafts \\
        --rates 0.76,0.95 --traces 5 --refine 0 --no-crossover
    # then, each seeded the same way: plain at 1.135 and at 1.5, plain + split_dp at 0.55,
    # split_drafts at 0.55 (resumed from the 0.55 run's file, so plain's point there is kept)
    python -m benchmarks.merge_throughput_runs merge knee.json plain_1.135.json plain_1.5.json \\
        dp_0.55.json drafts_0.55.json --out results/bench_throughput_knee.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import report
from benchmarks.bench_throughput import reanalyse, sample_key

SEED_KEYS = ("arguments", "environment", "workload", "server_layer_times", "client_profiles", "rate_grid", "sweeps")
SEED_NEEDS = ("workload", "server_layer_times", "client_profiles", "sweeps")  # without sweeps --resume would sweep
SHARED_KEYS = ("workload", "server_layer_times", "client_profiles")


class MergeError(ValueError):
    """Runs that are not the same experiment (the message says what differs)."""


def seeded(source: dict) -> dict:
    """An unfinished report of ``source``'s experiment, without its systems and samples."""
    missing = [k for k in SEED_NEEDS if k not in source]
    if missing:
        raise MergeError(f"cannot seed from a report without {missing}")
    return {**{k: source[k] for k in SEED_KEYS if k in source}, "complete": False, "systems": {}}


def merge(base: dict, extras: list[dict]) -> dict:
    """``base`` (loaded with its samples) with every extra's new points and samples appended."""
    samples = base["samples"]
    appended = []
    for process, extra in enumerate(extras, start=2):
        for key in SHARED_KEYS:
            if extra.get(key) != base.get(key):
                raise MergeError(f"run {process} has another {key} than the base: not the same experiment")
        for system, r in extra["systems"].items():
            mine = base["systems"].get(system)
            if mine is None:
                raise MergeError(f"run {process} holds {system}, which the base does not")
            if r["knobs"] != mine["knobs"]:
                raise MergeError(f"run {process} ran {system} with {r['knobs']}, the base with {mine['knobs']}")
            have = {p["rate"] for p in mine["points"]}
            new = [p for p in r["points"] if p["rate"] not in have]  # the others were kept by --resume
            for p in new:
                key = sample_key(p["rate"], p["speed_scale"])
                mine["points"].append({**p, "process": process})
                samples[system][key] = extra["samples"][system][key]
                appended.append({"system": system, "rate": p["rate"], "process": process})
            mine["points"].sort(key=lambda p: p["rate"])
    base["merged"] = {"points": appended,
                      "how": "the base (process 1) and each later process (2, 3, ... in order) ran on the same "
                             "workload (arrival traces), knobs, layer times and client profiles; each point says "
                             "which process ran it"}
    return base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("seed", help="an unfinished report of FROM's experiment, for bench_throughput --resume")
    s.add_argument("source", type=Path)
    s.add_argument("out", type=Path)
    m = sub.add_parser("merge", help="append the points of later processes to a base run")
    m.add_argument("base", type=Path)
    m.add_argument("extras", type=Path, nargs="+")
    m.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.command == "seed":
        report.write(args.out, seeded(report.load(args.source)), rows={"samples": {}})
        print(f"seeded {args.out} from {args.source}")
        return
    data = merge(report.load(args.base, rows=True), [report.load(e, rows=True) for e in args.extras])
    samples = data.pop("samples")
    data["arguments"] = {**data.get("arguments", {}), "out": args.out.name}
    report.write(args.out, data, rows={"samples": samples})
    summary = reanalyse(args.out)["summary"]
    for system, r in summary.items():
        if isinstance(r, dict) and "how" in r:
            print(f"{system}: max rate at 90% {r['max_rate_at_90pct']} ({r['how']}, 95% {r['ci95']}), "
                  f"vs plain {r['vs_plain']} {r['vs_plain_ci95']}")


if __name__ == "__main__":
    main()
