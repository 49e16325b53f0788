"""Where a decode step's time goes, op by op: vLLM's compiled whole-model graph (ordinary
requests) against vllm-split's compiled split bodies, on one split server.

    python -m benchmarks.profile_split_step [--quick] [--out results/profile_split_step.json]

One ``vllm-split serve`` in vLLM's default compiled mode, with the profile worker
(``harness/profile_worker.py``) and inductor's kernel profiling on
(``TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE=1``: its generated C++ kernels appear by name).
Per batch B (``--batches``) at context C (``--context``), in ``--repeats`` rounds (each
system once per round, the order rotating, so the machine's drift spreads over all), for
ordinary requests (the whole-model graph) and for split sessions at each k (``--ks``;
replayed from activations computed beforehand, ``harness/replay.py``), a batch runs
unprofiled (the step log gives its decode steps' time without the profiler), then the same
batch again with its decode steps profiled (torch.profiler, CPU activity, one profiler per
step). Each profiled step's self
CPU time is summed by op category (``benchmarks/op_categories.py``: matmuls, attention,
inductor's fused kernels, eager elementwise ops, copies and allocations, views, Python under
annotations, unaccounted) in the model forward and outside it; per decoder layer, the
forward's categories over the layers run (30 for ordinary requests and k = 0, 30 - k for
split sessions at k; the forward also holds the embedding and final norm, which k = 15
skips). The JSON has per scenario the per-step and per-layer milliseconds by category, the
top ops, the per-layer total of each round, the profiler's inflation (profiled over
unprofiled step), and per split system
the per-layer difference to ordinary requests at the same batch; the raw per-step chains go
to the sidecar; the plot stacks the per-layer milliseconds by category.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import report
from benchmarks.op_categories import CATEGORIES, difference, scenario_breakdown
from benchmarks.server_step_runs import COMMON, MAX_BATCHED_TOKENS, SERVER_ENV, read_steps

WINDOW_S = 3600.0  # a window stays open until the benchmark closes it
STEP_LOG = "step_log.jsonl"  # the worker's step timings (unprofiled steps included)


def set_window(directory: Path, tag: str, *, num_tokens: int | None, open_: bool) -> None:
    """Open (now, for up to WINDOW_S) or close the worker's profiling window, atomically."""
    now = time.time()
    tmp = directory / "window.json.tmp"
    tmp.write_text(json.dumps({"tag": tag, "start": now, "end": now + WINDOW_S if open_ else now - 1,
                               "num_tokens": num_tokens}))
    os.replace(tmp, directory / "window.json")


def rounded_chains(step: dict) -> dict:
    """A profiled step for the sidecar: its op chains' microseconds to 0.1 us (the profiler's
    resolution; the float noise digits would double the compressed size)."""
    return {**step, "chains": {name: [round(v[0], 1), *v[1:]] for name, v in step["chains"].items()}}


def read_profiled(directory: Path, tag: str) -> list[dict]:
    path = directory / "steps.jsonl"
    if not path.exists():
        return []
    return [s for s in map(json.loads, path.read_text().splitlines()) if s["tag"] == tag]


def decode_steps(steps: list[dict], batch: int, split: bool) -> list[dict]:
    """Decode steps of the whole batch, of ordinary (``split`` False) or split requests."""
    return [s for s in steps if s["num_reqs"] == batch and s["num_tokens"] == batch
            and (len(s["split_layers"]) == batch if split else not s["split_layers"])]


def system_name(k: int | None) -> str:
    return "ordinary" if k is None else f"k={k}"


class Runner:
    """The server, its log and profile directory, and one batch of each system."""

    def __init__(self, server, model: Path, tmp: Path, layers: dict, fingerprint: str) -> None:
        self.server, self.model, self.tmp, self.layers, self.fingerprint = server, model, tmp, layers, fingerprint
        self.scripts: dict[tuple[int, int, int], dict] = {}  # (batch, tokens, prompt length): script per k
        self.mismatches = 0

    def batch(self, k: int | None, ids: list[int], batch: int, n: int) -> None:
        from benchmarks.http_load import completions
        from harness.replay import make_script, replay_many

        key = (batch, n, len(ids))
        if k is None:
            outs = asyncio.run(completions(self.server.url, str(self.model), [ids] * batch, max_tokens=n))
            if key not in self.scripts:  # the split sessions replay this greedy continuation
                self.scripts[key] = {kk: make_script(layer, ids, outs[0]) for kk, layer in self.layers.items()}
            return
        results = asyncio.run(replay_many(self.server.url, [self.scripts[key][k]] * batch,
                                          fingerprint=self.fingerprint))
        self.mismatches += sum(not r.exact for r in results)

    def measure(self, k: int | None, ids: list[int], batch: int, n: int, *, tag: str) -> tuple[list, list]:
        """One unprofiled and one profiled batch of system ``k`` (None: ordinary requests): their
        decode steps (the step log's, the profile worker's)."""
        split = k is not None
        t0 = time.time()
        self.batch(k, ids, batch, n)
        unprofiled = decode_steps(read_steps(self.tmp / STEP_LOG, t0, time.time()), batch, split)
        set_window(self.tmp, tag, num_tokens=batch, open_=True)
        try:
            self.batch(k, ids, batch, n)
        finally:
            set_window(self.tmp, tag, num_tokens=batch, open_=False)
        profiled = decode_steps(read_profiled(self.tmp, tag), batch, split)
        print(f"  {tag}: {len(unprofiled)} unprofiled, {len(profiled)} profiled decode steps", flush=True)
        return unprofiled, profiled


def scenario_row(batch: int, k: int | None, unprofiled: list[dict], profiled: list[dict], *,
                 num_layers: int) -> dict:
    """One batch size and system over all repeats: the profiled breakdown and the unprofiled
    step times (``profiled``'s steps carry their repeat's tag)."""
    median_ms = lambda steps, field: statistics.median(s[field] for s in steps) * 1e3 if steps else None  # noqa: E731
    row = {"batch": batch, "system": system_name(k), "split_layer": k,
           "unprofiled": {"steps": len(unprofiled), "step_ms_median": median_ms(unprofiled, "step_s"),
                          "model_ms_median": median_ms(unprofiled, "model_s")}}
    if profiled:
        layers_run = num_layers - (k or 0)
        row["profiled"] = scenario_breakdown(profiled, layers_run=layers_run)
        tags = sorted({s["tag"] for s in profiled})
        row["per_layer_total_ms_by_repeat"] = [
            scenario_breakdown([s for s in profiled if s["tag"] == t], layers_run=layers_run)["per_layer_total_ms"]
            for t in tags]
        if unprofiled:
            row["profiler_inflation"] = row["profiled"]["step_ms_median"] / row["unprofiled"]["step_ms_median"]
    return row


def compare_rows(rows: list[dict]) -> list[dict]:
    """Per batch and split system: per-layer ms of ordinary requests and of the split path, and
    their difference per category."""
    out = []
    for r in rows:
        base = next((b for b in rows if b["batch"] == r["batch"] and b["split_layer"] is None), None)
        if r["split_layer"] is None or base is None or "profiled" not in r or "profiled" not in base:
            continue
        out.append({"batch": r["batch"], "system": r["system"],
                    "ordinary_per_layer_ms": base["profiled"]["per_layer_ms"],
                    "split_per_layer_ms": r["profiled"]["per_layer_ms"],
                    "split_minus_ordinary_per_layer_ms": difference(r["profiled"], base["profiled"])})
    return out


def draw(data: dict):
    batches = sorted({r["batch"] for r in data["scenarios"]})
    fig, axes = report.subplots(1, len(batches), figsize=(5 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        rows = [r for r in data["scenarios"] if r["batch"] == batch and "profiled" in r]
        x = list(range(len(rows)))
        bottom = [0.0] * len(rows)
        for cat in CATEGORIES:
            h = [r["profiled"]["per_layer_ms"][cat] for r in rows]
            ax.bar(x, h, 0.6, bottom=bottom, label=cat)
            bottom = [b + v for b, v in zip(bottom, h)]
        ax.set_xticks(x, [r["system"] for r in rows])
        ax.set_title(f"decode B={batch}, C={data['arguments']['context']}")
        ax.set_ylabel("ms per decoder layer (profiled)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"Self CPU time per decoder layer by op category ({data['environment']['vllm']} CPU, compiled)")
    return fig


def main() -> None:
    p = report.parser("profile_split_step", __doc__, quick="tiny sizes (CI smoke run)", seed=0, plot=True)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--ks", type=int, nargs="+", default=[0, 15])
    p.add_argument("--steps", type=int, default=12, help="decode steps per batch")
    p.add_argument("--repeats", type=int, default=2,
                   help="rounds per batch size, each system once per round, the order rotating")
    args = report.parse_args(p, draw)
    if args.quick:
        args.batches, args.context, args.ks, args.steps, args.repeats = [2], 64, [0, 15], 3, 1
    import torch

    torch.set_num_threads(1)  # the clients' precompute must not fight the server for cores
    from client_lib.local_layers import LocalLayers
    from harness.model_prep import prepare
    from harness.server_process import VLLMServer

    model = prepare()
    num_layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    ids = [random.Random(args.seed).randrange(3, 49000) for _ in range(args.context)]
    layers = {k: LocalLayers(model, split_layer=k) for k in args.ks}
    tmp = Path(tempfile.mkdtemp(prefix="profile-step-"))
    env = {"VLLM_SPLIT_STEP_LOG": str(tmp / STEP_LOG), "VLLM_SPLIT_PROFILE_DIR": str(tmp),
           "TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE": "1", **SERVER_ENV}
    server = VLLMServer(model, split=True, log_path=tmp / "server.log", eager=False, env=env,
                        extra_args=(*COMMON, "--worker-cls", "harness.profile_worker.ProfileWorker",
                                    "--split-batch-wait-ms", "200"))
    rows, raw = [], {}
    try:
        server.wait_ready()
        runner = Runner(server, model, tmp, layers, layers[args.ks[0]].fingerprint)
        print(f"[profile] server ready (logs in {tmp}); warm-up", flush=True)
        runner.measure(None, ids[:16], 1, 3, tag="warm-up")  # the profiler's first start is slow
        for batch in args.batches:
            n = args.steps + 2 + batch * args.context // MAX_BATCHED_TOKENS
            systems = [None, *args.ks]  # ordinary first: the split sessions replay its continuation
            steps: dict = {k: ([], []) for k in systems}
            for repeat in range(args.repeats):
                for k in systems[repeat % len(systems):] + systems[:repeat % len(systems)]:
                    unprofiled, profiled = runner.measure(k, ids, batch, n, tag=f"{system_name(k)}|B={batch}|r={repeat}")
                    steps[k][0].extend(unprofiled)
                    steps[k][1].extend(profiled)
            rows += [scenario_row(batch, k, *steps[k], num_layers=num_layers) for k in systems]
            raw.update({f"{system_name(k)}|B={batch}": [rounded_chains(s) for s in steps[k][1]] for k in systems})
    finally:
        server.stop()
    data = {"arguments": report.arguments(args),
            "environment": report.environment(model=model.name, num_layers=num_layers),
            "token_mismatches": runner.mismatches,
            # inductor's kernels recorded by name (else their time is "python" or "unaccounted")
            "kernel_names_seen": any(r["profiled"]["forward_ms"]["fused"] > 0 for r in rows if "profiled" in r),
            "categories": list(CATEGORIES), "scenarios": rows, "comparison": compare_rows(rows)}
    report.write(args.out, data, rows={"steps": raw}, draw=draw)
    for r in rows:
        if "profiled" in r:
            per = r["profiled"]["per_layer_ms"]
            print(f"B={r['batch']:2d} {r['system']:>8s}: {r['profiled']['per_layer_total_ms']:.2f} ms/layer = "
                  + ", ".join(f"{c} {per[c]:.2f}" for c in CATEGORIES)
                  + f"; step {r['profiled']['step_ms']:.1f} ms profiled, {r['unprofiled']['step_ms_median']} unprofiled")
    print(f"[profile] token mismatches: {runner.mismatches}; wrote {args.out}")


if __name__ == "__main__":
    main()
