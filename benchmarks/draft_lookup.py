"""Prompt-lookup settings, offline: tokens per round trip on the model's own greedy outputs.

    python -m benchmarks.draft_lookup [--quick] [--max-tokens 64] [--out results/draft_lookup.json]

No server: the model (SmolLM2-135M-Instruct, float32, transformers) generates each prompt's
greedy continuation once; each drafter setting then replays the session a split client
would have (the first token from the prompt; per round trip, the drafts proposed from the
prompt and the tokens so far, the longest prefix of them equal to the continuation
accepted, and one token of the server's own), so tokens per round trip and rows per round
trip (1 + drafts sent) are exact for greedy decoding, with no timing in them.

Two prompt sets: ``bench``, ``bench_drafts``' own (5 per type), and ``held_out``, prompts
no setting was chosen on: the other chat prompts and the code prompts of
``benchmarks/workloads/wire_prompts.json``, summaries of standard-library module docstrings,
and renames in other standard-library functions. Settings: ``PromptLookup(min_n, max_n,
k, per_token)``, the old default (2, 4, γ, no cap) against ``client_lib.drafts.NGRAM`` at
γ = 4 and 8.
"""
from __future__ import annotations

import importlib
import inspect
import json
import time
from pathlib import Path

from benchmarks import report
from benchmarks.bench_drafts import PROMPTS, build_prompts, code_edit_prompt, prompt_ids

HELD_OUT_DOCS = ("string", "heapq", "bisect", "shlex", "difflib", "zipfile", "sched", "queue")
HELD_OUT_EDITS = (("shlex", "quote"), ("textwrap", "dedent"), ("string", "capwords"), ("json", "dumps"))
OLD = {"min_n": 2, "max_n": 4, "per_token": None}


def held_out_prompts() -> dict[str, list[str]]:
    shipped = json.loads(Path(PROMPTS).read_text())["prompts"]
    return {"chat": [p["text"] for p in shipped if p["kind"] == "chat"][5:],
            "code": [p["text"] for p in shipped if p["kind"] == "code"],
            "summarisation": [f"Summarise this text in a few sentences.\n\n"
                              f"{inspect.getdoc(importlib.import_module(m))[:900]}" for m in HELD_OUT_DOCS],
            "code_edit": [code_edit_prompt(inspect.getsource(getattr(importlib.import_module(m), n)))[0]
                          for m, n in HELD_OUT_EDITS]}


def replay(prompt: list[int], output: list[int], drafter) -> tuple[int, int, int]:
    """(tokens, round trips, drafts sent) of one greedy session drafting with ``drafter``."""
    i, round_trips, sent = 1, 1, 0  # the first token comes with the prompt's answer
    while i < len(output):
        drafts = drafter.propose(prompt + output[:i], limit=len(output) - i - 1)
        accepted = 0
        while accepted < len(drafts) and output[i + accepted] == drafts[accepted]:
            accepted += 1
        sent += len(drafts)
        i += accepted + 1
        round_trips += 1
    return len(output), round_trips, sent


def settings() -> dict[str, dict]:
    from client_lib.drafts import NGRAM

    return {f"{name} γ={k}": {**s, "k": k} for k in (4, 8) for name, s in (("old", OLD), ("ngram", NGRAM))}


def summarise(sessions: list[dict], setting: dict) -> dict:
    from client_lib.drafts import PromptLookup

    tokens = trips = sent = 0
    for s in sessions:
        n, r, d = replay(s["prompt"], s["output"], PromptLookup(**setting))
        tokens, trips, sent = tokens + n, trips + r, sent + d
    accepted = tokens - trips  # every round trip yields one token of the server's own
    return {"tokens_per_round_trip": tokens / trips, "rows_per_round_trip": (trips - 1 + sent) / trips,
            "acceptance": accepted / sent if sent else None, "sessions": len(sessions)}


def main() -> None:
    p = report.parser("draft_lookup", __doc__, quick="CI smoke: one prompt per type, 16 tokens")
    p.add_argument("--max-tokens", type=int, default=64)
    args = report.parse_args(p)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.model_prep import prepare

    torch.set_num_threads(1)
    model_dir = prepare()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    count, max_tokens = (1, 16) if args.quick else (5, args.max_tokens)
    sets = {"bench": {t: [x["text"] for x in xs] for t, xs in build_prompts(count).items()},
            "held_out": {t: xs[:count] if args.quick else xs for t, xs in held_out_prompts().items()}}
    t0 = time.perf_counter()
    sessions: dict = {}
    for set_name, by_type in sets.items():
        for rtype, texts in by_type.items():
            for text in texts:
                ids = prompt_ids(tok, text)
                with torch.no_grad():
                    out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)
                sessions.setdefault(set_name, {}).setdefault(rtype, []).append(
                    {"prompt": ids, "output": out[0, len(ids):].tolist()})
            print(f"[draft_lookup] {set_name} {rtype}: {len(texts)} generated", flush=True)
    results = {set_name: {rtype: {name: summarise(ss, s) for name, s in settings().items()}
                          for rtype, ss in by_type.items()} for set_name, by_type in sessions.items()}
    for set_name, by_type in results.items():
        for rtype, by_setting in by_type.items():
            print(set_name, rtype, {n: round(v["tokens_per_round_trip"], 2) for n, v in by_setting.items()})
    report.write(args.out, {"arguments": report.arguments(args),
                            "environment": report.environment(wall_s=time.perf_counter() - t0),
                            "settings": {n: {k: v for k, v in s.items()} for n, s in settings().items()},
                            "max_tokens": max_tokens, "results": results})


if __name__ == "__main__":
    main()
