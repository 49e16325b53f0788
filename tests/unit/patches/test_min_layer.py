"""patches/min_layer.py: the layer range each pipeline stage builds above ``min_layer``."""
from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import vllm.distributed.utils as dist_utils  # noqa: E402

from vllm_split.patches import min_layer  # noqa: E402


@pytest.fixture(autouse=True)
def restore(monkeypatch):
    monkeypatch.setattr(dist_utils, "get_pp_indices", min_layer._original)
    monkeypatch.setattr(min_layer, "_min_layer", 0)


@pytest.mark.parametrize("pp_size,m,ranges", [
    (1, 4, [(4, 30)]),
    (2, 4, [(4, 15), (15, 30)]),
    (2, 14, [(14, 15), (15, 30)]),
    (3, 9, [(9, 10), (10, 20), (20, 30)]),
    (3, 12, None),  # stage 0 holds [0, 10)
    (2, 15, None),  # stage 0 holds [0, 15)
])
def test_each_stage_drops_its_layers_below_min_layer_or_start_up_fails(pp_size, m, ranges):
    if ranges is None:
        with pytest.raises(RuntimeError, match=f"min_layer {m} with pipeline parallel size {pp_size}: stage 0 "
                                               f"holds layers \\[0, {30 // pp_size}\\), none at or above {m}"):
            min_layer.apply(m, num_hidden_layers=30, pp_size=pp_size)
        return
    min_layer.apply(m, num_hidden_layers=30, pp_size=pp_size)
    assert [dist_utils.get_pp_indices(30, r, pp_size) for r in range(pp_size)] == ranges


def test_a_stage_without_a_layer_at_or_above_min_layer_is_refused_naming_it():
    with pytest.raises(RuntimeError, match=r"stage 0 holds layers \[0, 15\), none at or above 20"):
        min_layer.apply(20, num_hidden_layers=30, pp_size=2)
    assert dist_utils.get_pp_indices is min_layer._original  # nothing applied


def test_min_layer_must_be_below_the_layer_count():
    with pytest.raises(RuntimeError, match="min_layer 30 must be below the model's 30 layers"):
        min_layer.apply(30, num_hidden_layers=30, pp_size=1)
