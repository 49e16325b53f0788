"""Patch: with ``kv_ranges = G > 1`` a uniform full-attention model gets G KV cache groups,
one per contiguous range of decoder layers, instead of one group for all layers.

Target:  ``vllm.v1.core.kv_cache_utils.get_kv_cache_groups`` (looked up as a module global by
         ``get_kv_cache_configs`` in EngineCore and by ``GPUModelRunner._init_minimal_kv_cache_for_profiling``
         in GPU workers).
Process: every process that enables the plugin (``vllm_split.register``, the general-plugin
         entry point, which EngineCore runs before it sizes the KV cache); it changes nothing
         unless ``--additional-config '{"vllm_split": {"kv_ranges": G}}'`` sets G > 1.
Why:     A split request entering at layer k never reads or writes KV for layers below k.
         vLLM's hybrid allocator already runs several KV cache groups with their own block
         tables over one block pool (groups alias one allocation; a block id belongs to one
         group at a time; the pool's block is the largest group's), so G range groups keep the
         same bytes per token for an ordinary request while a split request can leave the
         groups below k empty (``vllm_split/engine/kv_range_manager.py``).
Why not subclass: the grouping is a module function called from ``get_kv_cache_configs``; the
         only switch vLLM offers (uniform spec -> one group, else the hybrid strided groups)
         has no per-plugin hook, and it runs before any plugin class is built.
How:     calls vLLM's function; when that returns the single group of a uniform
         ``FullAttentionSpec`` model, regroups its layers into G contiguous ranges
         (``engine/kv_ranges.py``) with vLLM's own ``create_kv_cache_group_specs``. Anything
         else (hybrid models, sliding windows, MLA, pipeline parallelism) is refused at start-up.
Upstream: none; "KV cache groups by layer range" (a request-level layer mask in the allocator)
         would make this unnecessary.
Remove when: vLLM can allocate a request's KV for a subset of its layers.
Pinned version: every version in ``vllm_split.version.SUPPORTED_VLLM``; the target's signature is
         recorded in ``tests/unit/patches/test_patch_contracts.py``.
"""
from __future__ import annotations

import functools
from typing import Any

from vllm.logger import init_logger

from vllm_split.config import SplitConfig
from vllm_split.engine.kv_ranges import KVRangeError, describe, layer_index, layer_ranges, padding_waste

logger = init_logger(f"vllm.{__name__}")
_original: Any = None


def _regroup(vllm_config: Any, kv_cache_spec: dict) -> list:
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    groups = _original(vllm_config, kv_cache_spec)
    num_ranges = SplitConfig.from_additional_config(getattr(vllm_config, "additional_config", None)).kv_ranges
    if num_ranges <= 1:
        return groups
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise KVRangeError(f"kv_ranges {num_ranges} with pipeline parallel size "
                           f"{vllm_config.parallel_config.pipeline_parallel_size} is not supported")
    if len(groups) != 1 or type(groups[0].kv_cache_spec) is not FullAttentionSpec:
        kinds = sorted({type(g.kv_cache_spec).__name__ for g in groups})
        raise KVRangeError(f"kv_ranges {num_ranges}: expected one group of plain full attention (FullAttentionSpec), "
                           f"got {len(groups)} group(s) of {kinds}")
    names = sorted(groups[0].layer_names, key=layer_index)
    indices = [layer_index(n) for n in names]
    ranges = layer_ranges(indices, num_ranges)
    by_range = [[n for n, i in zip(names, indices) if r.start <= i < r.end] for r in ranges]
    waste = padding_waste(ranges)
    logger.info("vllm-split: KV per layer range: %d KV cache groups over layers %s, one block pool "
                "(padding waste %.1f%% of the pool%s)", num_ranges, describe(ranges), 100 * waste,
                "" if waste == 0 else "; choose a number of ranges that divides the layers to avoid it")
    return kv_cache_utils.create_kv_cache_group_specs(kv_cache_spec, by_range)


def apply() -> None:
    """Idempotent; harmless where the option is off (the wrapper returns vLLM's groups)."""
    global _original
    from vllm.v1.core import kv_cache_utils

    if _original is None:
        _original = kv_cache_utils.get_kv_cache_groups
        # wraps: keeps vLLM's name, docstring and signature (the contract test reads it)
        kv_cache_utils.get_kv_cache_groups = functools.wraps(_original)(_regroup)
