"""Profile the real model's per-layer costs on the server (vLLM engine) and a client.

    python benchmarks/profile_costs.py [--quick] [--out results/profile_smollm2_cpu.json]

Writes a planner profile (schema ``vllm-split-profile/1``) with two devices: ``server``
(vLLM 0.32.0 CPU build, eager, this machine) and ``client`` (the client library on this
machine's CPU). ``peak_flops`` / ``mem_bandwidth`` are this machine's estimated spec figures
(stated below); the planner calibrates its efficiency against the measurements.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_env import git_sha  # noqa: E402

# This machine: Intel Xeon (AVX-512, 2 FMA units) at 2.6 GHz, 2 vCPUs:
# 2 x 2.6e9 x 2 FMA x 16 fp32 lanes x 2 FLOP = 333 GFLOP/s peak (an upper bound: the vCPUs
# may share one physical core). Memory bandwidth: 20 GB/s assumed for a 2-vCPU VM share.
CPU_PEAK_FLOPS = 333e9
CPU_MEM_BW = 20e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (CI smoke run)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "profile_smollm2_cpu.json")
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with our functions

    from client_lib.profiler import profile_client
    from harness.model_prep import prepare

    model_dir = prepare()
    hf_config = json.loads((model_dir / "config.json").read_text())
    shapes = dict(prefill_tokens=(16, 64), decode_contexts=(64,), repeats=1) if args.quick else {}
    print("[profile] client library (CPU) ...", flush=True)
    client = profile_client(model_dir, **shapes)

    from vllm import LLM

    from harness.server_profile import profile_server

    print("[profile] vLLM engine (CPU) ...", flush=True)
    llm = LLM(str(model_dir), dtype="float32", enforce_eager=True, max_model_len=2048,
              enable_prefix_caching=False, max_num_batched_tokens=4096, seed=0)
    server_shapes = dict(shapes, batches=(1, 4)) if args.quick else {}
    server = profile_server(llm, vocab_size=hf_config["vocab_size"], **server_shapes)
    import vllm

    profile = {
        "schema": "vllm-split-profile/1",
        "example": False,
        "about": "Measured on this machine: server = vLLM engine (eager, float32), client = client library.",
        "model": {"name": "SmolLM2-135M-Instruct", "hf_config": hf_config},
        "devices": [
            {"role": "server", "name": f"vllm-{vllm.__version__}-cpu-2vcpu", "peak_flops": CPU_PEAK_FLOPS,
             "mem_bandwidth": CPU_MEM_BW, "measurements": server},
            {"role": "client", "name": "client_lib-cpu-2vcpu", "peak_flops": CPU_PEAK_FLOPS,
             "mem_bandwidth": CPU_MEM_BW, "measurements": client},
        ],
        "environment": {"python": sys.version.split()[0], "platform": platform.platform(),
                        "vllm": vllm.__version__, "git_sha": git_sha(), "quick": args.quick},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(profile, indent=1))
    for dev in profile["devices"]:
        for m in dev["measurements"]:
            print(f"  {dev['role']:6s} {m['node']:5s} {m['phase']:7s} tokens={m['tokens']:4d} "
                  f"context={m['context']:4d} batch={m['batch']:2d}  {m['seconds'] * 1e3:8.3f} ms")
    print(f"[profile] wrote {args.out}")


if __name__ == "__main__":
    main()
