"""KV per layer range: the layout and the block arithmetic (pure; no vLLM, no torch).

With ``kv_ranges = G > 1`` the server's decoder layers are cut into G contiguous,
half-open ranges ``[start, end)``, each its own vLLM KV cache group (its own block table,
all drawing from one block pool; ``patches/kv_range_groups.py``). A block of a group holds
``block_size`` tokens for the group's layers only, so a request that allocates every
group holds what it held before, and a split request entering at ``split_layer`` skips
the groups it never runs: range ``[start, end)`` is skipped iff ``end <= split_layer``
(``engine/kv_range_manager.py``). A range that ``split_layer`` cuts is held whole: the
request's pages for the layers of that range below ``split_layer`` stay unwritten (the
"range granularity" of the saving).

The pool's block is as large as the largest range (vLLM sizes every group's block alike),
so unequal ranges waste memory in the smaller ones: ``padding_waste`` says how much.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class KVRangeError(ValueError):
    """A KV range layout that cannot be built (the message says why)."""


@dataclass(frozen=True, slots=True)
class LayerRange:
    """Decoder layers ``[start, end)`` sharing one KV cache group."""

    start: int
    end: int

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    def needed_by(self, split_layer: int) -> bool:
        """Whether a request entering at ``split_layer`` runs (and holds KV for) this range."""
        return split_layer < self.end


def layer_index(layer_name: str) -> int:
    """The decoder layer index of an attention layer name (``model.layers.7.self_attn.attn`` -> 7)."""
    m = _LAYER_INDEX.search(layer_name)
    if m is None:
        raise KVRangeError(f"cannot read a decoder layer index from the attention layer name {layer_name!r}")
    return int(m.group(1))


def layer_ranges(layers: list[int], num_ranges: int) -> list[LayerRange]:
    """Cut the sorted, contiguous decoder layers ``layers`` into ``num_ranges`` ranges whose
    sizes differ by at most one (the larger ones first)."""
    if num_ranges < 1:
        raise KVRangeError(f"kv_ranges: expected at least 1 range, got {num_ranges}")
    if not layers:
        raise KVRangeError("kv_ranges: the model has no attention layers to cut into ranges")
    if layers != list(range(layers[0], layers[0] + len(layers))):
        raise KVRangeError(f"kv_ranges: expected contiguous decoder layers, got {layers}")
    if num_ranges > len(layers):
        raise KVRangeError(f"kv_ranges: {num_ranges} ranges for {len(layers)} layers; at most one range per layer")
    base, extra = divmod(len(layers), num_ranges)
    out, start = [], layers[0]
    for i in range(num_ranges):
        end = start + base + (1 if i < extra else 0)
        out.append(LayerRange(start, end))
        start = end
    return out


def padding_waste(ranges: list[LayerRange]) -> float:
    """Share of the pool's bytes that no layer uses: every block is as large as the largest
    range's, and a group of a smaller range uses only its layers' part of it."""
    widest = max(r.num_layers for r in ranges)
    return 1.0 - sum(r.num_layers for r in ranges) / (widest * len(ranges))


def needed_ranges(ranges: list[LayerRange], split_layer: int) -> list[bool]:
    """Per range, whether a request entering at ``split_layer`` holds blocks in it (0: all)."""
    return [r.needed_by(split_layer) for r in ranges]


def blocks_needed(ranges: list[LayerRange], *, split_layer: int, num_tokens: int, block_size: int) -> int:
    """Pool blocks a request of ``num_tokens`` tokens at ``split_layer`` holds."""
    per_range = -(-num_tokens // block_size)
    return per_range * sum(needed_ranges(ranges, split_layer))


def held_fraction(ranges: list[LayerRange], split_layer: int) -> float:
    """A request's KV as a fraction of an ordinary request's: (L - k) / L rounded up to
    whole ranges (what the scheduler and an admission controller should count)."""
    return sum(needed_ranges(ranges, split_layer)) / len(ranges)


def describe(ranges: list[LayerRange]) -> str:
    """The layout for the start-up log, e.g. ``[0, 15) [15, 30)``."""
    return " ".join(f"[{r.start}, {r.end})" for r in ranges)
