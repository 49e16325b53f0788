"""KV per layer range: the layout and block arithmetic (pure, against brute force)."""
from __future__ import annotations

import pytest

from vllm_split.engine.kv_ranges import (KVRangeError, LayerRange, blocks_needed, describe, held_fraction,
                                         layer_index, layer_ranges, needed_ranges, padding_waste)


@pytest.mark.parametrize("num_layers", [1, 2, 7, 30, 32])
def test_ranges_cover_the_layers_contiguously(num_layers):
    for g in range(1, num_layers + 1):
        ranges = layer_ranges(list(range(num_layers)), g)
        assert len(ranges) == g
        assert [l for r in ranges for l in range(r.start, r.end)] == list(range(num_layers))
        sizes = [r.num_layers for r in ranges]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_ranges_start_at_the_servers_first_layer():  # min_layer: the server holds [15, 30)
    assert layer_ranges(list(range(15, 30)), 3) == [LayerRange(15, 20), LayerRange(20, 25), LayerRange(25, 30)]


def test_bad_layouts_are_refused():
    with pytest.raises(KVRangeError, match="at most one range per layer"):
        layer_ranges([0, 1], 3)
    with pytest.raises(KVRangeError, match="contiguous"):
        layer_ranges([0, 1, 3], 2)
    with pytest.raises(KVRangeError, match="at least 1"):
        layer_ranges([0], 0)


def test_a_range_is_needed_unless_it_ends_at_or_below_the_split_layer():
    ranges = layer_ranges(list(range(30)), 6)  # [0,5) [5,10) ... [25,30)
    for k in range(31):
        brute = [any(layer >= k for layer in range(r.start, r.end)) for r in ranges]
        assert needed_ranges(ranges, k) == brute, k
    assert needed_ranges(ranges, 0) == [True] * 6  # ordinary requests hold every range
    assert held_fraction(ranges, 15) == 0.5 and held_fraction(ranges, 22) == 2 / 6  # cut range held whole


@pytest.mark.parametrize("g, k, expected", [(2, 15, 1 / 2), (6, 15, 3 / 6), (6, 22, 2 / 6), (10, 22, 3 / 10),
                                            (1, 29, 1.0), (30, 29, 1 / 30)])
def test_held_fraction_is_the_range_rounded_share_of_layers(g, k, expected):
    assert held_fraction(layer_ranges(list(range(30)), g), k) == pytest.approx(expected)


def test_blocks_needed():
    ranges = layer_ranges(list(range(30)), 2)
    assert blocks_needed(ranges, split_layer=0, num_tokens=100, block_size=16) == 14
    assert blocks_needed(ranges, split_layer=15, num_tokens=100, block_size=16) == 7
    assert blocks_needed(ranges, split_layer=14, num_tokens=100, block_size=16) == 14
    assert blocks_needed(ranges, split_layer=15, num_tokens=0, block_size=16) == 0


def test_padding_waste():
    assert padding_waste(layer_ranges(list(range(30)), 6)) == 0
    # 4 ranges of 30 layers: 8 8 7 7, every block sized for 8 layers: 2 of 32 layer-pages unused
    assert padding_waste(layer_ranges(list(range(30)), 4)) == pytest.approx(2 / 32)


def test_layer_index_and_describe():
    assert layer_index("model.layers.17.self_attn.attn") == 17
    assert layer_index("layers.3.attn") == 3
    with pytest.raises(KVRangeError, match="lm_head"):
        layer_index("lm_head")
    assert describe(layer_ranges(list(range(30)), 2)) == "[0, 15) [15, 30)"
