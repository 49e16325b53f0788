"""KV memory in admission: does a newcomer's whole sequence fit beside what is promised? (pure)

Process: the API server (the admission policy, :mod:`vllm_split.control.policy`). The
engine's scheduler reports its block pool with its step records
(``SplitSchedulerMixin.split_step_stats``: block size, usable and free blocks, and the end
layer of each KV range, ``docs/kv_ranges.md``); :class:`KVState` is that report.

vLLM admits a request when its prompt fits and preempts a running one when a decode step
finds no free block; the outputs still to come are nobody's reservation. A session the
controller admits is promised its SLA, so the controller reserves its whole sequence
(prompt plus expected output) and lets a newcomer wait while the blocks free now, less the
growth still to come of the sessions already admitted, cannot hold the newcomer's whole
sequence (:func:`kv_wait`). A session at split layer ``k`` holds blocks only in the KV
ranges that end above ``k`` (with ``--split-kv-ranges G``; with one range, every session
holds all of it), so it counts ``held_fraction = ranges held / G`` of an ordinary one, at
range granularity: :meth:`KVState.blocks_for`. What is free comes from the engine (ordinary
requests included); what is promised is this controller's (one API server's) sessions.

Admitted sessions are assumed to hold their prompt and nothing of their output yet (their
growth to come is the output's blocks); one admitted after the last report is not in the
engine's count yet and is reserved whole. Both err on the safe side.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from vllm_split.engine.kv_ranges import LayerRange, blocks_needed, needed_ranges  # pure: no vLLM, no torch


@dataclass(frozen=True, slots=True)
class KVState:
    """The engine's block pool as last reported."""

    block_size: int  # tokens per block (per range with several ranges)
    total_blocks: int  # usable blocks of the pool (vLLM's null block excluded)
    free_blocks: int
    range_ends: tuple[int, ...]  # end layer of each KV range, ascending (one range: (num_layers,))
    measured_at: float = 0.0  # time.monotonic() in the API server when it was reported

    @classmethod
    def from_stats(cls, stats: dict | None, *, now: float) -> "KVState | None":
        """From the scheduler's ``split_step_stats()["kv"]`` (None: not reported)."""
        if not stats:
            return None
        return cls(block_size=int(stats["block_size"]), total_blocks=int(stats["total_blocks"]),
                   free_blocks=int(stats["free_blocks"]), range_ends=tuple(int(e) for e in stats["range_ends"]),
                   measured_at=now)

    @property
    def ranges(self) -> list[LayerRange]:
        """The KV ranges as the range manager cuts them (contiguous; a request's need of one
        depends on its end only, so the first range is taken to start at layer 0)."""
        return [LayerRange(start, end) for start, end in zip((0, *self.range_ends[:-1]), self.range_ends)]

    def ranges_held(self, split_layer: int) -> int:
        """How many KV ranges a request entering at ``split_layer`` holds blocks in."""
        return sum(needed_ranges(self.ranges, split_layer))

    def blocks_for(self, num_tokens: int, split_layer: int) -> int:
        """Blocks ``num_tokens`` tokens of a request at ``split_layer`` take (the range manager's
        count, ``engine/kv_ranges.py:blocks_needed``)."""
        return blocks_needed(self.ranges, split_layer=split_layer, num_tokens=num_tokens, block_size=self.block_size)


@dataclass(frozen=True, slots=True)
class Promise:
    """An admitted session's KV, as the budget counts it."""

    prompt_tokens: int
    total_tokens: int  # prompt plus expected output
    split_layer: int
    admitted_at: float  # time.monotonic()


def growth_to_come(kv: KVState, promises: Iterable[Promise]) -> int:
    """Blocks the admitted sessions may still take: each its output's (its prompt's too when
    admitted after ``kv`` was measured)."""
    total = 0
    for p in promises:
        whole = kv.blocks_for(p.total_tokens, p.split_layer)
        total += whole if p.admitted_at >= kv.measured_at else whole - kv.blocks_for(p.prompt_tokens, p.split_layer)
    return total


def kv_wait(kv: KVState | None, *, total_tokens: int, split_layer: int, promises: Iterable[Promise]) -> str | None:
    """Why a newcomer of ``total_tokens`` at ``split_layer`` must wait for KV memory, or None
    (it fits, or nothing is known of the pool)."""
    if kv is None:
        return None
    need = kv.blocks_for(total_tokens, split_layer)
    if need > kv.total_blocks:
        return None  # it can never fit whole: vLLM's own limits (max_model_len) decide, not a wait
    room = kv.free_blocks - growth_to_come(kv, promises)
    if need <= room:
        return None
    held = kv.ranges_held(split_layer)
    share = "" if len(kv.range_ends) == 1 else f" ({held} of {len(kv.range_ends)} KV ranges at k = {split_layer})"
    return (f"the KV cache cannot hold its {total_tokens} tokens yet: {need} blocks{share} needed, {max(room, 0)} "
            f"free beyond what admitted sessions will take")
