"""Attention metadata for any subset of a step's requests (U-shaped rows leave the batch).

Runs in the worker, for the model runner (:mod:`vllm_split.engine.runner`). The compact
forward's active rows at a layer are a *prefix* of the batch sorted by split layer, which
the runner builds through vLLM's own ``_build_attention_metadata(num_reqs=R)``. A U-shaped
request leaves the active rows after its return layer ``m``, so with U rows in the batch
the active requests at a layer are a subset with holes, which no sort can always turn into
a prefix. :func:`subset_attention_metadata` builds the ``CommonAttentionMetadata`` of the
chosen requests (in batch order) from the runner's per-step buffers, as vLLM's
``GPUModelRunner._build_attention_metadata`` builds the whole batch's (query start
locations rebased, sequence lengths, block-table rows, slot mappings and positions of the
chosen tokens), and runs every attention group's builder on it. The CPU builder computes its
scheduler metadata from these fields, so the result is what the builder would produce for a
batch of only these requests. Single KV-cache-group models of the compact path only (the
runner checks it); no cascade attention, no encoder or multi-modal fields.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import torch
from vllm.forward_context import get_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def token_index(query_start_loc: torch.Tensor, req_idx: list[int]) -> torch.Tensor:
    """The flattened-batch rows of requests ``req_idx`` (in that order), from the batch's
    query start locations (CPU, ``num_reqs + 1`` entries)."""
    starts = query_start_loc.tolist()
    parts = [torch.arange(starts[i], starts[i + 1], dtype=torch.long) for i in req_idx]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def subset_attention_metadata(runner: Any, *, num_reqs: int, req_idx: list[int],
                              slot_mappings: dict[int, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """(token rows, {attention layer name: metadata}) for requests ``req_idx`` of a step of
    ``num_reqs`` requests."""
    device = runner.device
    qsl_cpu = runner.query_start_loc.cpu[: num_reqs + 1]
    tokens = token_index(qsl_cpu, req_idx)
    idx = torch.tensor(req_idx, dtype=torch.long)
    lens = (qsl_cpu[1:] - qsl_cpu[:-1])[idx]
    qsl = torch.zeros(len(req_idx) + 1, dtype=qsl_cpu.dtype)
    qsl[1:] = torch.cumsum(lens, 0)
    seq_cpu = runner.optimistic_seq_lens_cpu[:num_reqs][idx]
    computed = runner.input_batch.num_computed_tokens_cpu_tensor[:num_reqs][idx]
    prompt = runner.input_batch.num_prompt_tokens_cpu_tensor[:num_reqs][idx]
    tokens_dev, idx_dev = tokens.to(device), idx.to(device)
    out: dict[str, Any] = {}
    for gid, _group in enumerate(runner.kv_cache_config.kv_cache_groups):
        table = runner.input_batch.block_table[gid].get_device_tensor(num_reqs)
        common = CommonAttentionMetadata(
            query_start_loc=qsl.to(device), query_start_loc_cpu=qsl,
            seq_lens=runner.seq_lens[:num_reqs][idx_dev], seq_lens_cpu_upper_bound=seq_cpu,
            num_reqs=len(req_idx), num_actual_tokens=int(tokens.numel()),
            max_query_len=int(lens.max()), max_seq_len=int(seq_cpu.max()),
            block_table_tensor=table[idx_dev], slot_mapping=slot_mappings[gid][tokens_dev],
            causal=True, is_prefilling=computed < prompt, positions=runner.positions[tokens_dev],
        )
        for attn_group in runner.attn_groups[gid]:
            md = attn_group.build_metadata(common, 0)
            for name in attn_group.layer_names:
                out[name] = md
    return tokens, out


def install_per_layer(pick: Callable[[int], tuple[dict, Any] | None]) -> tuple[Any, Any]:
    """In the forward context, give every attention layer ``l`` for which ``pick(l)`` is
    ``(metadata by layer name, rows)`` that metadata and those rows of its slot mapping (a
    slice or an index tensor); returns the (metadata, slot mapping) to restore after the
    forward. Layers ``pick`` answers None for keep the whole batch's."""
    fc = get_forward_context()
    saved = (fc.attn_metadata, fc.slot_mapping)
    attn, slots = dict(fc.attn_metadata), dict(fc.slot_mapping)
    for name in fc.attn_metadata:
        m = _LAYER_INDEX.search(name)
        chosen = pick(int(m.group(1))) if m is not None else None
        if chosen is None:
            continue
        md, rows = chosen
        attn[name] = md[name]
        if name in slots:
            slots[name] = slots[name][rows]
    fc.attn_metadata, fc.slot_mapping = attn, slots
    return saved
