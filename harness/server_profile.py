"""Measure the server's per-layer times inside a real vLLM engine.

Timing hooks go on every decoder layer and on the logits processor of the model the
engine's worker(s) loaded (installed and read back with ``LLM.collective_rpc``); then real
requests run through the engine: one prefill pass per prompt length, and decode steps of
``batch`` identical-shape requests at a context length. Results are measurements in the
planner's profile schema: node ``block`` (mean time of one decoder layer in the step) and
node ``head`` (logits: final projection over the vocabulary).
"""
from __future__ import annotations

import statistics
import time
from typing import Any

DECODE_STEPS = 8


def _install_hooks(worker: Any) -> int:
    model = worker.model_runner.get_model()
    records: list[tuple[str, int, float]] = []
    worker._vllm_split_profile = records

    def timed(module: Any, name: str, tokens_arg: int) -> None:
        state = {}

        def pre(mod, args):
            state["t0"] = time.perf_counter()

        def post(mod, args, out):
            records.append((name, int(args[tokens_arg].shape[0]), time.perf_counter() - state["t0"]))

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    for layer in model.model.layers:
        timed(layer, "block", 1)  # layer(positions, hidden_states, residual)
    timed(model.logits_processor, "head", 1)  # logits_processor(lm_head, hidden_states)
    return len(model.model.layers)


def _take_records(worker: Any) -> list[tuple[str, int, float]]:
    records = worker._vllm_split_profile
    out = list(records)
    records.clear()
    return out


def _per_step(records: list[tuple[str, int, float]], num_layers: int, tokens: int) -> dict[str, list[float]]:
    """Group records of steps with ``tokens`` rows: mean block time per step, head per step."""
    blocks = [r for r in records if r[0] == "block" and r[1] == tokens]
    per_step = [statistics.mean(x[2] for x in blocks[i : i + num_layers])
                for i in range(0, len(blocks) - num_layers + 1, num_layers)]
    heads = [r[2] for r in records if r[0] == "head"]
    return {"block": per_step, "head": heads}


def profile_server(llm: Any, *, prefill_tokens=(16, 128, 512), decode_contexts=(128, 512),
                   batches=(1, 4, 16), repeats: int = 3, vocab_size: int, seed: int = 0) -> list[dict]:
    """Measurements of the engine behind ``llm`` (an ``LLM`` built with eager execution)."""
    import random

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    rng = random.Random(seed)
    num_layers = llm.collective_rpc(_install_hooks)[0]

    def prompt(n: int) -> TokensPrompt:
        return TokensPrompt(prompt_token_ids=[rng.randrange(3, vocab_size) for _ in range(n)])

    out: list[dict] = []
    for tokens in prefill_tokens:
        blocks, heads = [], []
        for _ in range(repeats):
            llm.collective_rpc(_take_records)
            llm.generate([prompt(tokens)], SamplingParams(max_tokens=1), use_tqdm=False)
            steps = _per_step(llm.collective_rpc(_take_records)[0], num_layers, tokens)
            blocks += steps["block"]
            heads += steps["head"]
        out.append(_m("block", "prefill", tokens, 0, 1, statistics.median(blocks)))
        out.append(_m("head", "prefill", tokens, 0, 1, statistics.median(heads)))
    for context in decode_contexts:
        for batch in batches:
            llm.collective_rpc(_take_records)
            params = SamplingParams(max_tokens=DECODE_STEPS + 1, ignore_eos=True)
            llm.generate([prompt(context) for _ in range(batch)], params, use_tqdm=False)
            records = llm.collective_rpc(_take_records)[0]
            steps = _per_step(records, num_layers, batch)
            heads = [r[2] for r in records if r[0] == "head" and r[1] == batch]
            ctx = context + DECODE_STEPS // 2
            out.append(_m("block", "decode", 1, ctx, batch, statistics.median(steps["block"])))
            out.append(_m("head", "decode", 1, ctx, batch, statistics.median(heads)))
    return out


def _m(node: str, phase: str, tokens: int, context: int, batch: int, seconds: float) -> dict:
    return {"node": node, "phase": phase, "tokens": tokens, "context": context, "batch": batch,
            "seconds": seconds}
