"""Profile the real model's per-layer costs on the server (vLLM engine) and a client.

    python -m benchmarks.profile_costs [--quick] [--out results/profile_smollm2_cpu.json]

Writes a planner profile (schema ``vllm-split-profile/1``) with two devices: ``server``
(vLLM 0.32.0 CPU build, eager, this machine) and ``client`` (the client library on this
machine's CPU). ``peak_flops`` / ``mem_bandwidth`` are this machine's estimated spec figures
(stated below); the planner calibrates its efficiency against the measurements.
"""
from __future__ import annotations

import json
import os

from benchmarks import report

# This machine: Intel Xeon (AVX-512, 2 FMA units) at 2.6 GHz, 2 vCPUs:
# 2 x 2.6e9 x 2 FMA x 16 fp32 lanes x 2 FLOP = 333 GFLOP/s peak (an upper bound: the vCPUs
# may share one physical core). Memory bandwidth: 20 GB/s assumed for a 2-vCPU VM share.
CPU_PEAK_FLOPS = 333e9
CPU_MEM_BW = 20e9


def main() -> None:
    p = report.parser("profile_costs", __doc__, out="profile_smollm2_cpu", quick="tiny shapes (CI smoke run)")
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
        "arguments": report.arguments(args),
        "environment": report.environment(quick=args.quick),
    }
    report.write(args.out, profile)
    for dev in profile["devices"]:
        for m in dev["measurements"]:
            print(f"  {dev['role']:6s} {m['node']:5s} {m['phase']:7s} tokens={m['tokens']:4d} "
                  f"context={m['context']:4d} batch={m['batch']:2d}  {m['seconds'] * 1e3:8.3f} ms")
    print(f"[profile] wrote {args.out}")


if __name__ == "__main__":
    main()
