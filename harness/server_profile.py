"""Measure the server's per-layer times inside a real vLLM engine.

Runs in the process that owns the ``LLM``; :func:`_install_hooks` and
:func:`_take_records` run in the engine's worker(s) through ``LLM.collective_rpc``. The
layer timer (:class:`~vllm_split.layer_timer.LayerTimer`) goes on every decoder layer and
on the logits processor of the model the worker loaded; then real
requests run through the engine: one prefill pass per prompt length, and decode steps of
``batch`` identical-shape requests at a context length. Results are measurements in the
planner's profile schema: node ``block`` (mean time of one decoder layer in the step) and
node ``head`` (logits: final projection over the vocabulary).
"""
from __future__ import annotations

import statistics
from typing import Any

from vllm_split.layer_timer import LayerSample, LayerTimer

DECODE_STEPS = 8


def _install_hooks(worker: Any) -> int:
    """In the worker: time every decoder layer and the logits processor."""
    model = worker.model_runner.get_model()
    timer = LayerTimer()
    timer.add(model.model.layers, name="block", rows_arg=1)  # layer(positions, hidden_states, residual)
    timer.add([model.logits_processor], name="head", rows_arg=1)  # logits_processor(lm_head, hidden_states)
    worker._vllm_split_profile = timer
    return len(model.model.layers)


def _take_records(worker: Any) -> list[LayerSample]:
    """In the worker: the samples since the last call."""
    return worker._vllm_split_profile.take()


def _take(llm: Any) -> list[LayerSample]:
    """The first worker's samples since the last call (rebuilt: the engine's transport may
    hand them back as plain lists)."""
    return [LayerSample(*r) for r in llm.collective_rpc(_take_records)[0]]


def _per_step(records: list[LayerSample], num_layers: int, tokens: int) -> dict[str, list[float]]:
    """Group records of steps with ``tokens`` rows: mean block time per step, head per step."""
    blocks = [r for r in records if r.name == "block" and r.rows == tokens]
    per_step = [statistics.mean(x.seconds for x in blocks[i : i + num_layers])
                for i in range(0, len(blocks) - num_layers + 1, num_layers)]
    heads = [r.seconds for r in records if r.name == "head"]
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
            steps = _per_step(_take(llm), num_layers, tokens)
            blocks += steps["block"]
            heads += steps["head"]
        out.append(_m("block", "prefill", tokens, 0, 1, statistics.median(blocks)))
        out.append(_m("head", "prefill", tokens, 0, 1, statistics.median(heads)))
    for context in decode_contexts:
        for batch in batches:
            llm.collective_rpc(_take_records)
            params = SamplingParams(max_tokens=DECODE_STEPS + 1, ignore_eos=True)
            llm.generate([prompt(context) for _ in range(batch)], params, use_tqdm=False)
            records = _take(llm)
            steps = _per_step(records, num_layers, batch)
            heads = [r.seconds for r in records if r.name == "head" and r.rows == batch]
            ctx = context + DECODE_STEPS // 2
            out.append(_m("block", "decode", 1, ctx, batch, statistics.median(steps["block"])))
            out.append(_m("head", "decode", 1, ctx, batch, statistics.median(heads)))
    return out


def _m(node: str, phase: str, tokens: int, context: int, batch: int, seconds: float) -> dict:
    return {"node": node, "phase": phase, "tokens": tokens, "context": context, "batch": batch,
            "seconds": seconds}
