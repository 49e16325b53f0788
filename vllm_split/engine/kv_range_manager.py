"""Scheduler side of KV per layer range: a split request holds no blocks in the ranges below it.

Runs in the EngineCore process. With ``kv_ranges = G > 1`` vLLM's KV cache manager has one
single-type manager per range group (``patches/kv_range_groups.py``), all
``FullAttentionManager`` over one ``BlockPool``. ``install`` turns each into a
``RangeAttentionManager`` (same state, three methods changed) that asks the split scheduler
for a request's split layer: for a request whose split layer is at or above the range's end,

* ``get_num_blocks_to_allocate`` counts 0 blocks, so the scheduler's allocation, its
  full-sequence admission gate and preemption all see the request's real memory;
* ``allocate_new_blocks`` pads the request's block list with the pool's null block (id 0,
  never handed out, the placeholder vLLM uses for blocks outside a sliding window), so the
  worker's block table for that group holds 0s: a slot mapping computed for those rows
  points into the null block, never into another request's block;
* ``cache_blocks`` does nothing (vLLM's ``cache_full_blocks`` skips null blocks anyway).

Freeing needs no change: ``BlockPool.free_blocks`` never returns the null block to the free
queue. Ordinary requests (split layer 0) take vLLM's path unchanged in every group.

Prefix caching: the coordinator (vLLM's ``HybridKVCacheCoordinator``: the G groups share one
spec, so it looks them up together) counts a hit only where every group has the block. A
split request never caches blocks below its range, and its hashes are salted per session
(``cache_salt``), so it neither hits nor is hit; ordinary requests cache every group and
hit as before. A split request with a split layer inside the first range allocates every
group (like an ordinary one).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from vllm.logger import init_logger
from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

from vllm_split.engine.kv_ranges import LayerRange, describe, layer_index

logger = init_logger(f"vllm.{__name__}")


class RangeAttentionManager(FullAttentionManager):
    """A ``FullAttentionManager`` for the layers ``[range_start, range_end)`` that leaves split
    requests entering at or above ``range_end`` without blocks."""

    range_start: int = 0
    range_end: int = 0
    split_layer_of: Callable[[str], int] = staticmethod(lambda request_id: 0)

    def skips(self, request_id: str) -> bool:
        return self.split_layer_of(request_id) >= self.range_end

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int,
                                   new_computed_blocks: Sequence[Any], *args: Any, **kwargs: Any) -> int:
        if self.skips(request_id):
            assert not new_computed_blocks, f"{request_id}: a prefix-cache hit in range {self.range_end} it skips"
            return 0
        return super().get_num_blocks_to_allocate(request_id, num_tokens, new_computed_blocks, *args, **kwargs)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int) -> list:
        if not self.skips(request_id):
            return super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)
        req_blocks = self.req_to_blocks[request_id]
        num_new = cdiv(num_tokens, self.block_size) - len(req_blocks)
        if num_new <= 0:
            return []
        pad = [self._null_block] * num_new
        req_blocks.extend(pad)
        return pad

    def cache_blocks(self, request: Any, num_tokens: int, *args: Any, **kwargs: Any) -> None:
        if self.skips(request.request_id):
            return
        super().cache_blocks(request, num_tokens, *args, **kwargs)


def group_ranges(kv_cache_config: Any) -> list[LayerRange]:
    """The layer range of each KV cache group (its layers must be contiguous)."""
    out = []
    for gid, group in enumerate(kv_cache_config.kv_cache_groups):
        idx = sorted(layer_index(n) for n in group.layer_names)
        if idx != list(range(idx[0], idx[0] + len(idx))):
            raise RuntimeError(f"vllm-split: KV cache group {gid} holds non-contiguous layers {idx}")
        out.append(LayerRange(idx[0], idx[-1] + 1))
    return out


def install(kv_cache_manager: Any, split_layer_of: Callable[[str], int], *, num_ranges: int) -> list[LayerRange]:
    """Make every single-type manager of ``kv_cache_manager`` (vLLM's ``KVCacheManager``, built
    by the scheduler, before any allocation) a ``RangeAttentionManager``; returns the ranges."""
    coordinator = kv_cache_manager.coordinator
    ranges = group_ranges(kv_cache_manager.kv_cache_config)
    if len(ranges) != num_ranges:
        raise RuntimeError(f"vllm-split: kv_ranges {num_ranges} but the engine has {len(ranges)} KV cache group(s) "
                           f"{describe(ranges)}: was the plugin's grouping patch applied (VLLM_PLUGINS names vllm_split)?")
    managers = coordinator.single_type_managers
    if len(managers) != len(ranges):
        raise RuntimeError(f"vllm-split: {len(managers)} KV managers for {len(ranges)} KV cache groups")
    for manager, r in zip(managers, ranges):
        if type(manager) is not FullAttentionManager and type(manager) is not RangeAttentionManager:
            raise RuntimeError(f"vllm-split: kv_ranges needs full-attention KV managers, got {type(manager).__name__}")
        if any(manager.req_to_blocks.values()):
            raise RuntimeError("vllm-split: kv_ranges must be installed before any KV block is allocated")
        # Same state, three methods changed: vLLM built the manager (its constructor's
        # arguments are the coordinator's business); we only change how it counts.
        manager.__class__ = RangeAttentionManager
        manager.range_start, manager.range_end = r.start, r.end
        manager.split_layer_of = split_layer_of
    logger.info("vllm-split: KV per layer range: %d groups %s, %d blocks of %d tokens in one pool (%s); a split "
                "request holds no blocks in the ranges that end at or below its split layer",
                len(ranges), describe(ranges), kv_cache_manager.block_pool.num_gpu_blocks,
                managers[0].block_size, type(coordinator).__name__)
    return ranges
