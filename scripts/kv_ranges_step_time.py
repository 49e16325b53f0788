"""Ordinary requests' decode step time (mean inter-token latency) on a split server with
kv_ranges 1 vs 6, same KV memory; ABAB order is not possible (one engine at a time), so each
server runs 4 repeats of 8 concurrent ordinary completions (64 tokens, ignore_eos)."""
import json, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from harness.model_prep import prepare
from harness.server_process import VLLMServer, metrics, kv_capacity_tokens
from tests.support.references import PROMPTS, complete
from transformers import AutoTokenizer

model = prepare()
tok = AutoTokenizer.from_pretrained(model)
ids = [tok(p)["input_ids"] * 4 for p in PROMPTS]
out = {}
tmp = Path(tempfile.mkdtemp(prefix="kv18-step-"))
for g in (1, 6, 1, 6) if "--twice" in sys.argv else (1, 6):
    log = tmp / f"g{g}-{time.time():.0f}.log"
    with VLLMServer(model, split=True, log_path=log, extra_args=("--split-kv-ranges", str(g))) as s:
        run = lambda i: complete(s.url, str(model), ids[i % 5], max_tokens=64, temperature=0, ignore_eos=True)
        with ThreadPoolExecutor(8) as ex:
            list(ex.map(run, range(8)))  # warm-up
            itl = []
            tokens = []
            for rep in range(4):
                m0 = metrics(s.url)
                res = list(ex.map(run, range(8)))
                m1 = metrics(s.url)
                n = m1["vllm:inter_token_latency_seconds_count"] - m0["vllm:inter_token_latency_seconds_count"]
                itl.append((m1["vllm:inter_token_latency_seconds_sum"] - m0["vllm:inter_token_latency_seconds_sum"]) / n)
                tokens.append([r["token_ids"] for r in res])
    out.setdefault(g, []).append({"itl_ms": [1000 * x for x in itl], "capacity": kv_capacity_tokens(log), "tokens": tokens})
    print(g, [round(1000 * x, 1) for x in itl], kv_capacity_tokens(log), flush=True)
same = all(r["tokens"] == out[1][0]["tokens"] for rs in out.values() for r in rs)
print("tokens identical across servers:", same)
json.dump({str(k): [{kk: vv for kk, vv in r.items() if kk != "tokens"} for r in v] for k, v in out.items()},
          open(sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else "/tmp/kv_ranges_step_time.json", "w"), indent=1)
