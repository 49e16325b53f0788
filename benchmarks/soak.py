"""Soak: many concurrent split sessions at mixed split layers, with random disconnects,
reconnects and abandoned sessions, for minutes, against one real server.

Each of ``--sessions`` concurrent clients runs generation after generation until the time
is up, through the real client library's resuming generation
(``client_lib.resume.ResumableGeneration``) fed by scripted layers (activations computed
beforehand, ``harness/replay.py``, so that 64 clients do not compete with the server
for the CPU). Per token a client may drop its connection (it reconnects and resumes), and
some clients vanish mid-generation for good. Every completed generation must equal its
reference (an undisturbed session of the same prompt on the same server, which the
engine tests hold equal to plain vLLM); at the end no request may be left and the KV
block usage must be back at its idle level.

    flock /tmp/vllm-engine.lock python -m benchmarks.soak --seconds 300    # results/soak.json
    python -m benchmarks.soak --quick --url http://127.0.0.1:8000          # CI smoke, < 1 min
"""
from __future__ import annotations

import asyncio
import random
import sys
import time
from collections import Counter

from benchmarks.live_server import health, parser, run_report, wait_idle

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child.",
           "def fibonacci(n):", "The three most important inventions of the 20th century are",
           "List three colours of the rainbow.", "Why is the sky blue?", "Translate 'good morning' into Spanish."]


class ScriptedLayers:
    """A ``LocalLayers`` stand-in that returns a script's precomputed rows."""

    def __init__(self, script, fingerprint: str) -> None:
        self.script, self.fingerprint, self.split_layer = script, fingerprint, script.split_layer
        self.num_rows = 0
        self.mismatch = False

    def reset(self) -> None:
        self.num_rows = 0

    def forward(self, token_ids: list[int]):
        n = self.script.prompt_rows.shape[0]
        if self.num_rows == 0:
            self.num_rows = n
            return self.script.prompt_rows
        j = self.num_rows - n
        if j >= self.script.decode_rows.shape[0] or token_ids != [self.script.expected[j]]:
            self.mismatch = True  # a wrong token: the rows we have belong to the expected one
            j = min(j, self.script.decode_rows.shape[0] - 1)
        self.num_rows += 1
        return self.script.decode_rows[j : j + 1]


class Stats:
    def __init__(self) -> None:
        self.c: Counter = Counter()
        self.by_k: Counter = Counter()
        self.wrong: list[dict] = []
        self.errors: list[str] = []


async def client(url: str, scripts: list, fingerprint: str, *, deadline: float, rng: random.Random, args, stats: Stats) -> None:
    from client_lib import SamplingOptions
    from client_lib.resume import ReconnectPolicy, ResumableGeneration

    policy = ReconnectPolicy(initial_delay_s=0.1, max_delay_s=2.0, give_up_after_s=60, max_reconnects=100)
    while time.monotonic() < deadline:
        script = rng.choice(scripts)
        layers = ScriptedLayers(script, fingerprint)
        gen = ResumableGeneration(url, layers, sampling=SamplingOptions(max_tokens=len(script.expected), ignore_eos=True),
                                  policy=policy)
        abandon_at = rng.randrange(len(script.expected)) if rng.random() < args.abandon_prob else None
        stats.c["sessions_started"] += 1
        tokens = []
        events = gen.generate([0] * script.prompt_rows.shape[0])
        try:
            async for event in events:
                tokens.append(event.token_id)
                if event.index == abandon_at:
                    break  # vanish: the generator closes its connection, nobody resumes
                if event.finish_reason is None and rng.random() < args.drop_prob:
                    stats.c["drops"] += 1
                    await gen.disconnect()
            await events.aclose()
        except Exception as exc:  # noqa: BLE001 - recorded, the soak goes on
            stats.c["failed"] += 1
            stats.errors.append(f"{type(exc).__name__}: {exc}"[:300])
            continue
        stats.c["reconnects"] += gen.num_reconnects
        if abandon_at is not None:
            stats.c["abandoned"] += 1
            continue
        stats.c["completed"] += 1
        stats.c["tokens"] += len(tokens)
        stats.by_k[script.split_layer] += 1
        if tokens != script.expected or layers.mismatch:
            stats.c["wrong_outputs"] += 1
            stats.wrong.append({"split_layer": script.split_layer, "got": tokens, "expected": script.expected})


async def build_scripts(url: str, args) -> tuple[list, str, list]:
    import torch
    from transformers import AutoTokenizer

    from harness.replay import make_script
    from client_lib import LocalLayers, SamplingOptions, SplitSession
    from harness.model_prep import prepare

    torch.set_num_threads(1)
    model_dir = prepare()
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS[: args.prompts]]
    ref_layers = LocalLayers(model_dir, split_layer=15)
    references = []
    for ids in prompt_ids:  # undisturbed, one at a time
        async with await SplitSession.create(url, ref_layers, sampling=SamplingOptions(max_tokens=args.tokens, ignore_eos=True)) as s:
            references.append([e.token_id async for e in s.generate(ids)])
    scripts = []
    for k in args.ks:
        layers = LocalLayers(model_dir, split_layer=k)
        scripts += [make_script(layers, ids, ref) for ids, ref in zip(prompt_ids, references)]
    return scripts, ref_layers.fingerprint, references


async def run(args, url: str, server) -> dict:
    from harness.server_process import metrics

    scripts, fingerprint, references = await build_scripts(url, args)
    idle_before = await wait_idle(url)
    preempt_before = metrics(url).get("vllm:num_preemptions_total", 0)
    stats = Stats()
    t0 = time.monotonic()
    deadline = t0 + args.seconds
    await asyncio.gather(*(client(url, scripts, fingerprint, deadline=deadline, rng=random.Random(args.seed * 1000 + i),
                                  args=args, stats=stats) for i in range(args.sessions)))
    seconds = time.monotonic() - t0
    idle_after = await wait_idle(url)
    alive = health(url) and (server is None or server.proc.poll() is None)
    return {
        "seconds": round(seconds, 1),
        "concurrent_sessions": args.sessions,
        "sessions": stats.c["sessions_started"],
        "completed": stats.c["completed"],
        "wrong_outputs": stats.c["wrong_outputs"],
        "abandoned": stats.c["abandoned"],
        "failed": stats.c["failed"],
        "drops": stats.c["drops"],
        "reconnects": stats.c["reconnects"],
        "tokens": stats.c["tokens"],
        "completed_by_split_layer": {str(k): v for k, v in sorted(stats.by_k.items())},
        "preemptions": metrics(url).get("vllm:num_preemptions_total", 0) - preempt_before if alive else None,
        "idle_before": idle_before,
        "idle_after": idle_after,
        "leaked_kv_blocks": idle_after["kv_blocks_in_use"] - idle_before["kv_blocks_in_use"],
        "requests_left": idle_after["requests_running"] + idle_after["requests_waiting"],
        "engine_alive": alive,
        "reference": "an undisturbed session per prompt at split layer 15 on the same server, before the soak",
        "references": references,
        "wrong": stats.wrong[:10],
        "errors": stats.errors[:20],
    }


def main() -> None:
    p = parser("soak", __doc__, quick="CI smoke: 20 s, 8 sessions")
    p.add_argument("--seconds", type=float, default=300)
    p.add_argument("--sessions", type=int, default=64, help="concurrent clients")
    p.add_argument("--ks", type=int, nargs="+", default=[0, 7, 15, 22, 29])
    p.add_argument("--prompts", type=int, default=len(PROMPTS))
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--drop-prob", type=float, default=0.02, help="per token: drop the connection, then resume")
    p.add_argument("--abandon-prob", type=float, default=0.1, help="per session: vanish mid-generation for good")
    args = p.parse_args()
    if args.quick:
        args.seconds, args.sessions, args.prompts, args.ks, args.tokens = 20, 8, 3, [0, 15, 29], 12
        args.drop_prob = 0.1
    report = run_report("soak", args, run, extra_args=("--max-num-seqs", str(max(16, args.sessions))))
    print(f"[soak] {report['sessions']} sessions in {report['seconds']} s: completed {report['completed']}, wrong "
          f"{report['wrong_outputs']}, abandoned {report['abandoned']}, failed {report['failed']}, reconnects "
          f"{report['reconnects']}, leaked KV blocks {report['leaked_kv_blocks']}; wrote {args.out}")
    good = (report["engine_alive"] and report["wrong_outputs"] == 0 and report["failed"] == 0
            and report["leaked_kv_blocks"] == 0 and report["requests_left"] == 0 and report["completed"] > 0)
    sys.exit(0 if good else 1)


if __name__ == "__main__":
    main()
