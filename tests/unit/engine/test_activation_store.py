"""ActivationStore: a session's client activations, kept in position order until released."""
from __future__ import annotations

import pytest
import torch

from vllm_split.engine.activations import ActivationStore, DeliveryError

H = 4


def _rows(start: int, count: int, dtype=torch.float32) -> torch.Tensor:
    """Row i holds the value i in every column, so slices are easy to check."""
    return torch.arange(start, start + count, dtype=dtype).unsqueeze(1).expand(count, H).clone()


def test_rows_are_appended_in_order_and_sliced_exactly():
    store = ActivationStore(hidden_size=H, dtype=torch.float32)
    store.append("s", start=0, rows=_rows(0, 5))
    store.append("s", start=5, rows=_rows(5, 1))
    store.append("s", start=6, rows=_rows(6, 3))
    assert store.num_rows("s") == 9 and "s" in store and len(store) == 1
    assert torch.equal(store.rows("s", start=0, count=9), _rows(0, 9))
    assert torch.equal(store.rows("s", start=4, count=3), _rows(4, 3))
    assert torch.equal(store.rows("s", start=8, count=1), _rows(8, 1))


def test_growth_beyond_initial_capacity_keeps_earlier_rows():
    store = ActivationStore(hidden_size=H, dtype=torch.float32, initial_rows=2)
    for i in range(20):  # one row at a time, like decode steps: several regrowths
        store.append("s", start=i, rows=_rows(i, 1))
    store.append("s", start=20, rows=_rows(20, 50))  # one append larger than double the capacity
    assert store.num_rows("s") == 70
    assert torch.equal(store.rows("s", start=0, count=70), _rows(0, 70))


def test_returned_rows_are_a_copy():
    store = ActivationStore(hidden_size=H, dtype=torch.float32)
    store.append("s", start=0, rows=_rows(0, 3))
    got = store.rows("s", start=0, count=3)
    got.fill_(-1.0)
    assert torch.equal(store.rows("s", start=0, count=3), _rows(0, 3))


def test_sessions_are_independent():
    store = ActivationStore(hidden_size=H, dtype=torch.float32)
    store.append("a", start=0, rows=_rows(0, 2))
    store.append("b", start=0, rows=_rows(100, 3))
    store.append("a", start=2, rows=_rows(2, 1))
    assert (store.num_rows("a"), store.num_rows("b"), store.num_rows("nobody")) == (3, 3, 0)
    assert torch.equal(store.rows("a", start=0, count=3), _rows(0, 3))
    assert torch.equal(store.rows("b", start=0, count=3), _rows(100, 3))


@pytest.mark.parametrize("start", [3, 7, 0])
def test_out_of_order_start_raises_with_both_positions(start):
    store = ActivationStore(hidden_size=H, dtype=torch.float32)
    store.append("s1", start=0, rows=_rows(0, 5))
    with pytest.raises(DeliveryError, match=rf"session s1: activation starts at position {start}, expected 5"):
        store.append("s1", start=start, rows=_rows(start, 1))
    assert store.num_rows("s1") == 5  # the rejected delivery changed nothing
    assert torch.equal(store.rows("s1", start=0, count=5), _rows(0, 5))


def test_first_delivery_must_start_at_zero():
    store = ActivationStore(hidden_size=H, dtype=torch.float32)
    with pytest.raises(DeliveryError, match=r"session new: activation starts at position 2, expected 0"):
        store.append("new", start=2, rows=_rows(0, 1))
    assert "new" not in store


@pytest.mark.parametrize("rows", [torch.zeros(2, H + 1), torch.zeros(H), torch.zeros(1, 2, H)],
                         ids=["wide", "1-D", "3-D"])
def test_wrong_shape_raises_with_the_shapes(rows):
    store = ActivationStore(hidden_size=H, dtype=torch.float32)
    shape = str(list(rows.shape)).replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(DeliveryError, match=rf"session s: rows of shape {shape}, expected \[n, {H}\]"):
        store.append("s", start=0, rows=rows)
    assert store.num_rows("s") == 0


def test_release_frees_and_is_idempotent():
    store = ActivationStore(hidden_size=H, dtype=torch.float32)
    store.append("s", start=0, rows=_rows(0, 3))
    store.append("t", start=0, rows=_rows(0, 1))
    assert store.release("s") is True
    assert "s" not in store and store.num_rows("s") == 0 and len(store) == 1
    assert store.release("s") is False
    assert store.release("never-seen") is False
    # a released session id starts again from position 0
    store.append("s", start=0, rows=_rows(10, 2))
    assert torch.equal(store.rows("s", start=0, count=2), _rows(10, 2))


@pytest.mark.parametrize("store_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rows_are_cast_to_the_store_dtype(store_dtype, in_dtype):
    store = ActivationStore(hidden_size=H, dtype=store_dtype)
    rows = torch.randn(3, H, generator=torch.Generator().manual_seed(1)).to(in_dtype)
    store.append("s", start=0, rows=rows)
    got = store.rows("s", start=0, count=3)
    assert got.dtype == store_dtype
    assert torch.equal(got, rows.to(store_dtype))


def test_truncate_drops_rejected_draft_rows_so_the_next_delivery_continues_there():
    store = ActivationStore(hidden_size=H, dtype=torch.float32)
    store.append("s", start=0, rows=_rows(0, 5))
    store.append("s", start=5, rows=_rows(50, 4))  # the last token's row and 3 drafts
    store.truncate("s", 7)  # one draft accepted: positions 7 and 8 are stale
    assert store.num_rows("s") == 7
    with pytest.raises(DeliveryError, match=r"activation starts at position 9, expected 7"):
        store.append("s", start=9, rows=_rows(9, 1))
    store.append("s", start=7, rows=_rows(70, 2))
    assert torch.equal(store.rows("s", start=5, count=4), torch.cat([_rows(50, 2), _rows(70, 2)]))
    store.truncate("s", 20)  # never grows
    store.truncate("unknown", 3)  # nothing to cut
    assert store.num_rows("s") == 9 and "unknown" not in store
    with pytest.raises(ValueError, match=r"cannot keep -1 rows"):
        store.truncate("s", -1)
