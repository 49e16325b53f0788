"""Measure the client's per-layer times with the client library itself.

Runs in the client's process: the real :class:`~client_lib.local_layers.LocalLayers`
(all layers local) with the layer timer (:class:`~vllm_split.layer_timer.LayerTimer`) on
every decoder layer, for prefill passes of several prompt lengths and for decode steps at
several context lengths, and returns measurements in the planner's profile schema
(``vllm-split-profile/1``, node ``block``: mean time of one decoder layer).
"""
from __future__ import annotations

import statistics
from pathlib import Path

import torch

from client_lib.local_layers import LocalLayers
from vllm_split.layer_timer import LayerTimer

DECODE_STEPS = 8


def profile_client(model_dir: str | Path, *, prefill_tokens=(16, 128, 512), decode_contexts=(128, 512),
                   repeats: int = 3, device: str = "cpu", seed: int = 0) -> list[dict]:
    """Measurements (schema dicts) of one decoder layer on this device, medians of ``repeats``."""
    from transformers import AutoConfig

    num_layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    layers = LocalLayers(model_dir, split_layer=num_layers, device=device)
    vocab = layers.model.embed_tokens.num_embeddings
    gen = torch.Generator().manual_seed(seed)
    out: list[dict] = []
    with LayerTimer() as timer:
        timer.add(layers.model.layers)
        layers.reset()
        layers.forward(torch.randint(0, vocab, (8,), generator=gen).tolist())  # warm-up
        for tokens in prefill_tokens:
            per_run = []
            for _ in range(repeats):
                layers.reset()
                timer.take()
                layers.forward(torch.randint(0, vocab, (tokens,), generator=gen).tolist())
                per_run.append(statistics.mean(s.seconds for s in timer.take()))
            out.append(_measurement("prefill", tokens=tokens, context=0, seconds=statistics.median(per_run)))
        for context in decode_contexts:
            layers.reset()
            layers.forward(torch.randint(0, vocab, (context,), generator=gen).tolist())
            timer.take()
            steps = []
            for _ in range(DECODE_STEPS):
                layers.forward(torch.randint(0, vocab, (1,), generator=gen).tolist())
                steps.append(statistics.mean(s.seconds for s in timer.take()))
            out.append(_measurement("decode", tokens=1, context=context + DECODE_STEPS // 2,
                                    seconds=statistics.median(steps)))
    return out


def _measurement(phase: str, *, tokens: int, context: int, seconds: float, batch: int = 1) -> dict:
    return {"node": "block", "phase": phase, "tokens": tokens, "context": context, "batch": batch,
            "seconds": seconds}
