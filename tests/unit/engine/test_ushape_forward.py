"""ushape_forward: a U row runs layers [k, m) only, returns its exact layer-m state, and the
rows of the other requests in the same batch stay exact."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from tests.unit.engine.test_compact_forward import _Recorder, _SpanRecorder  # noqa: E402
from tests.unit.engine.test_exact_forward import L, TinyInner, _batch, _reference  # noqa: E402
from vllm_split.engine.compact_forward import Entry  # noqa: E402
from vllm_split.engine.ushape_forward import active_sets, ushape_forward  # noqa: E402


@pytest.fixture
def inner():
    torch.manual_seed(0)
    return TinyInner().eval()


def _entries(lengths, ks, ms, entering, client_mask):
    bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
    return [Entry(split_layer=k, begin=bounds[i], end=bounds[i + 1],
                  hidden=entering[k][bounds[i]:bounds[i + 1]].clone() if client_mask[i] else None, return_layer=m)
            for i, (k, m) in enumerate(zip(ks, ms))]


@torch.no_grad()
def test_u_rows_return_their_layer_m_state_and_leave_the_active_set(inner):
    lengths = [3, 2, 5, 4, 1, 2]
    ks = [0, 0, 1, 2, 3, L]  # ordinary, U [0, 2), U [1, 6)=L, prefix k=2, U [3, 5), prefix k=L
    ms = [None, 2, L, None, 5, None]
    client = [False, True, True, True, True, True]
    ids, positions = _batch(lengths, seed=5)
    ref, entering = _reference(inner, ids, positions)
    rec = _Recorder(inner)
    out, returned = ushape_forward(inner, entries=_entries(lengths, ks, ms, entering, client), input_ids=ids,
                                   positions=positions)
    bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
    for i, m in enumerate(ms):
        rows = slice(bounds[i], bounds[i + 1])
        if m is None:
            assert torch.equal(out[rows], ref[rows]), f"request {i}"
            assert i not in returned
        else:
            assert torch.allclose(returned[i], entering[m][rows], atol=1e-6), f"request {i}"
            assert not out[rows].any()  # no final norm for a U row
    expected = [sum(n for n, k, m in zip(lengths, ks, ms) if k <= layer < (L + 1 if m is None else m))
                for layer in range(L)]
    assert rec.rows == expected == [5, 10, 12, 13, 13, 12]  # the U row [0, 2) ran 2 layers only


@torch.no_grad()
def test_spans_end_where_rows_enter_or_leave_and_stay_exact(inner):
    lengths = [3, 2, 5, 4, 1, 2]
    ks, ms = [0, 0, 1, 2, 3, L], [None, 2, L, None, 5, None]
    client = [False, True, True, True, True, True]
    ids, positions = _batch(lengths, seed=5)
    ref, entering = _reference(inner, ids, positions)
    entries = _entries(lengths, ks, ms, entering, client)
    plain_out, plain_returned = ushape_forward(inner, entries=entries, input_ids=ids, positions=positions)
    rec = _SpanRecorder(inner)
    out, returned = ushape_forward(inner, entries=entries, input_ids=ids, positions=positions, run_layers=rec)
    assert rec.asked == [(0, 1, 5), (1, 2, 10), (2, 3, 12), (3, 5, 13), (5, L, 12)]
    assert torch.equal(out, plain_out)
    assert plain_returned.keys() == returned.keys()
    assert all(torch.equal(returned[i], plain_returned[i]) for i in returned)
    bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
    assert torch.equal(out[bounds[3]:bounds[4]], ref[bounds[3]:bounds[4]])


def test_active_sets_have_holes_where_u_rows_left():
    entries = [Entry(0, 0, 1, None), Entry(0, 1, 2, None, return_layer=2), Entry(3, 2, 3, None)]
    assert active_sets(entries, 5) == [(0, 1), (0, 1), (0,), (0, 2), (0, 2)]


@torch.no_grad()
def test_only_u_rows_in_the_batch(inner):
    lengths = [4]
    ids, positions = _batch(lengths)
    ref, entering = _reference(inner, ids, positions)
    out, returned = ushape_forward(inner, entries=_entries(lengths, [1], [4], entering, [True]), input_ids=ids,
                                   positions=positions)
    assert torch.allclose(returned[0], entering[4], atol=1e-6)
    assert out.shape == (4, ref.shape[1]) and not out.any()
