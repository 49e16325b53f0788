"""Patch: with ``kv_ranges = G > 1`` the CPU attention metadata is built once per step and
shared by the G range groups, each with its own block table and slot mapping.

Target:  instances of ``vllm.v1.attention.backends.cpu_attn.CPUAttentionMetadataBuilder``
         (their ``supports_update_block_table`` flag and ``update_block_table`` method), as
         read by ``GPUModelRunner._build_attention_metadata`` (the ``cached_attn_metadata``
         shortcut, keyed by ``(kv_cache_spec, type(builder))``).
Process: worker(s), applied by ``SplitRunnerMixin.initialize_metadata_builders`` right after
         vLLM creates the builders, only when the split scheduler's ``kv_ranges`` is above 1
         (the range groups of ``patches/kv_range_groups.py``); no class is changed.
Why:     The G range groups of one uniform model have equal specs and builders that differ
         only in their layers. vLLM already builds the metadata once per step and copies it
         for every further group when the builder says ``supports_update_block_table``
         (FlashAttention does: ``flash_attn.py`` ``update_block_table`` swaps the block
         table and the slot mapping). The CPU builder does not say so, so every group paid a
         full ``build()`` (a C++ ``cpu_attn_get_scheduler_metadata`` call) per step, and the
         split runner's request prefixes paid it again per group. The CPU scheduler metadata
         depends on the request counts, query start locations, sequence lengths, head counts,
         window, ISA and dtypes, never on the block table or slot mapping, so the copy is
         exact for groups whose builders agree on all of those (checked before enabling).
Why not subclass: vLLM creates the builders itself (``AttentionGroup.create_metadata_builders``
         from the backend's ``get_builder_cls``); the backend class is chosen by the platform.
         Setting two instance attributes on builders that exist touches nothing else.
How:     for every builder of every group: refuse (log, leave vLLM's behaviour) unless all are
         ``CPUAttentionMetadataBuilder`` of decoder self-attention with equal
         ``(num_heads, num_kv_heads, head_dim, window_size, block_size, isa, dtype,
         kv_cache_dtype)``; else set ``supports_update_block_table = True`` and an
         ``update_block_table`` that copies the metadata and swaps ``block_table`` and
         ``slot_mapping``, FlashAttention's four lines.
Upstream: "CPU attention: support update_block_table" (the CPU builder's metadata is
         block-table independent); would make this unnecessary.
Remove when: ``CPUAttentionMetadataBuilder.supports_update_block_table`` is True in vLLM.
Pinned version: every version in ``vllm_split.version.SUPPORTED_VLLM``; the builder's fields
         and the runner's shortcut are recorded in ``tests/unit/patches/test_patch_contracts.py``.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

from vllm.logger import init_logger

logger = init_logger(f"vllm.{__name__}")

# what a CPU builder's metadata (beyond block table and slot mapping) is computed from
_SHAPE_FIELDS = ("num_heads", "num_kv_heads", "head_dim", "window_size", "block_size", "isa", "dtype",
                 "kv_cache_dtype")


def update_block_table(metadata: Any, blk_table: Any, slot_mapping: Any) -> Any:
    """``metadata`` with another group's block table and slot mapping (shallow copy)."""
    new = copy.copy(metadata)
    new.block_table = blk_table
    new.slot_mapping = slot_mapping
    return new


def why_not_shared(builders: list[Any]) -> str | None:
    """Why one metadata build cannot serve all these builders, or None."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadataBuilder

    if len(builders) < 2:
        return "a single attention metadata builder"
    for b in builders:
        if type(b) is not CPUAttentionMetadataBuilder:
            return f"builder {type(b).__name__} is not the CPU attention builder"
        if b.is_cross_attention or b.is_encoder_only_attention:
            return "cross or encoder-only attention"
    shapes = {tuple(getattr(b, f) for f in _SHAPE_FIELDS) for b in builders}
    if len(shapes) != 1:
        return f"builders differ in {_SHAPE_FIELDS}: {sorted(map(str, shapes))}"
    return None


def apply(attn_groups: Iterable[Iterable[Any]]) -> int:
    """Let the builders of ``attn_groups`` (per KV cache group, vLLM's ``runner.attn_groups``)
    share one build per step; returns how many builders now do (0: left as vLLM made them)."""
    builders = [b for groups in attn_groups for group in groups for b in group.metadata_builders]
    why = why_not_shared(builders)
    if why is not None:
        logger.info("vllm-split: KV ranges: attention metadata built per group (%s)", why)
        return 0
    for b in builders:
        b.supports_update_block_table = True
        b.update_block_table = update_block_table
    logger.info("vllm-split: KV ranges: one CPU attention metadata build per step shared by %d groups "
                "(each with its own block table and slot mapping)", len(builders))
    return len(builders)
