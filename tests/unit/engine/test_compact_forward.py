"""compact_forward: layer l runs only on the rows of requests with k <= l, and stays exact."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from tests.unit.engine.test_exact_forward import L, TinyInner, _batch, _reference  # noqa: E402
from vllm_split.engine.compact_forward import (Entry, carried_rows, compact_forward, eager_layers,  # noqa: E402
                                               run_stage, spans, stage_prefixes)


class _Recorder:
    """Wraps each layer to record how many rows it ran on."""

    def __init__(self, inner: TinyInner) -> None:
        self.rows: list[int] = [0] * len(inner.layers)
        for i, layer in enumerate(inner.layers):
            layer.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def hook(module, args, out):
            self.rows[i] += args[1].shape[0]

        return hook


@pytest.fixture
def inner():
    torch.manual_seed(0)
    return TinyInner().eval()


def _entries(lengths, ks, entering, client_mask):
    bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
    out = []
    for i, k in enumerate(ks):
        b, e = bounds[i], bounds[i + 1]
        hidden = entering[k][b:e].clone() if client_mask[i] else None
        out.append(Entry(split_layer=k, begin=b, end=e, hidden=hidden))
    return out


@torch.no_grad()
def test_mixed_batch_active_rows_per_layer_match_the_plan_and_output_is_exact(inner):
    lengths = [3, 2, 5, 4, 1, 6]
    ks = [0, 0, 2, 2, 4, L]  # request 0 ordinary, request 1 a client at k=0 (sends embeddings)
    client = [False, True, True, True, True, True]
    ids, positions = _batch(lengths, seed=3)
    ref, entering = _reference(inner, ids, positions)
    rec = _Recorder(inner)
    garbage = torch.where(torch.tensor(sum(([c] * n for c, n in zip(client, lengths)), [])), 0, ids)
    out = compact_forward(inner, entries=_entries(lengths, ks, entering, client), input_ids=garbage,
                          positions=positions)
    assert torch.equal(out, ref)
    expected_rows = [sum(n for n, k in zip(lengths, ks) if k <= layer) for layer in range(L)]
    assert rec.rows == expected_rows  # e.g. layers 0-1 see 5 rows, 2-3 see 14, 4-5 see 15
    assert expected_rows[0] < expected_rows[2] < expected_rows[4] < sum(lengths)


@torch.no_grad()
def test_layers_below_every_split_layer_do_not_run(inner):
    lengths = [4, 3]
    ids, positions = _batch(lengths)
    ref, entering = _reference(inner, ids, positions)
    rec = _Recorder(inner)
    out = compact_forward(inner, entries=_entries(lengths, [3, 3], entering, [True, True]), input_ids=ids,
                          positions=positions)
    assert torch.equal(out, ref)
    assert rec.rows == [0, 0, 0, 7, 7, 7]


@torch.no_grad()
def test_unsorted_entries_are_an_internal_error(inner):
    lengths = [2, 2]
    ids, positions = _batch(lengths)
    _, entering = _reference(inner, ids, positions)
    with pytest.raises(AssertionError, match="sorted by split layer"):
        compact_forward(inner, entries=_entries(lengths, [3, 1], entering, [True, True]), input_ids=ids,
                        positions=positions)


class _SpanRecorder:
    """A span runner (the eager one) that records the spans it was asked for, with their rows."""

    def __init__(self, inner: TinyInner) -> None:
        self.asked: list[tuple[int, int, int]] = []
        self._eager = eager_layers(inner)

    def __call__(self, start, end, positions, h, residual):
        assert positions.shape[0] == h.shape[0]
        self.asked.append((start, end, h.shape[0]))
        return self._eager(start, end, positions, h, residual)


@torch.no_grad()
@pytest.mark.parametrize("ks,expected", [
    ([0, 0, 2, 2, 4, L], [(0, 2, 5), (2, 4, 14), (4, L, 15)]),
    ([0, 0, 1, 3, 3, 5], [(0, 1, 5), (1, 3, 10), (3, 5, 15), (5, L, 21)]),
    ([0, 0, 0, 0, 0, 0], [(0, L, 21)]),
    ([3, 3, 3, 3, 3, L], [(3, L, 15)]),
    ([L - 1, L - 1, L, L, L, L], [(L - 1, L, 5)]),
])
def test_spans_end_where_rows_enter_and_equal_the_layer_loop_bit_for_bit(inner, ks, expected):
    """The compact forward asks the layer runner for spans in which no rows enter: a span ends
    at every layer where rows enter (they are appended before it runs), and the output equals
    the plain layer-by-layer run exactly."""
    lengths = [3, 2, 5, 4, 1, 6]
    client = [False, True, True, True, True, True] if ks[0] == 0 else [True] * 6
    ids, positions = _batch(lengths, seed=7)
    ref, entering = _reference(inner, ids, positions)
    rec, layers = _SpanRecorder(inner), _Recorder(inner)
    out = compact_forward(inner, entries=_entries(lengths, ks, entering, client), input_ids=ids,
                          positions=positions, run_layers=rec)
    assert torch.equal(out, ref)
    assert rec.asked == expected
    assert layers.rows == [sum(n for n, k in zip(lengths, ks) if k <= layer) for layer in range(L)]


@torch.no_grad()
def test_a_later_stage_starts_a_span_at_its_first_layer_with_the_carried_rows(inner):
    lengths = [3, 2, 5, 4]
    ks = [0, 1, 4, 5]
    ids, positions = _batch(lengths, seed=2)
    ref, entering = _reference(inner, ids, positions)
    entries = _entries(lengths, ks, entering, [False, True, True, True])
    h, residual = run_stage(_stage(inner, 0, 3), entries=entries, input_ids=ids, positions=positions)
    rec = _SpanRecorder(inner)
    out = compact_forward(_stage(inner, 3, L), entries=entries, input_ids=None, positions=positions,
                          received=(h, residual), run_layers=rec)
    # Close, not always bit-equal: on some CPUs a matmul's rows depend on how many rows it
    # runs on (AMD EPYC here: nn.Linear on 5 of 14 rows differs from the 14-row result in the
    # last bit, 1e-7; on 4 or 8 it does not), and this stage's row counts (5, 10, 14) are such
    # a case. A plumbing error (a wrong row, residual or position) differs by O(1).
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert rec.asked == [(3, 4, 5), (4, 5, 10), (5, L, 14)]


@pytest.mark.parametrize("start,end,cuts,expected", [
    (0, L, [0, 2, 2, 4, L], [(0, 2), (2, 4), (4, L)]),
    (2, 4, [0, 1, 5], [(2, 4)]),
    (2, 4, [3], [(2, 3), (3, 4)]),
    (0, 1, [], [(0, 1)]),
])
def test_spans_cut_the_stage_at_the_boundaries_inside_it(start, end, cuts, expected):
    assert spans(start, end, cuts) == expected


# ---------------------------------------------------------------- pipeline stages
def _stage(inner: TinyInner, start: int, end: int) -> TinyInner:
    inner.start_layer, inner.end_layer = start, end
    return inner


@torch.no_grad()
@pytest.mark.parametrize("boundary", [1, 3, 4])
def test_two_stages_compose_to_the_single_stage_result_running_only_entered_rows(inner, boundary):
    """Stage 0 holds [0, b), stage 1 [b, L): stage 1 takes the rows with k < b from stage 0's
    tensors (their other rows are garbage it must ignore), the rest enter at k; no stage runs a
    row below its k."""
    lengths = [3, 2, 5, 4, 1, 6]
    ks = [0, 0, 2, 3, 4, L]
    client = [False, True, True, True, True, True]
    ids, positions = _batch(lengths, seed=5)
    ref, entering = _reference(inner, ids, positions)
    entries = _entries(lengths, ks, entering, client)
    rec = _Recorder(inner)
    h, residual = run_stage(_stage(inner, 0, boundary), entries=entries, input_ids=ids, positions=positions)
    sent = carried_rows(entries, boundary)
    assert h.shape[0] == residual.shape[0] == sent == sum(n for n, k in zip(lengths, ks) if k < boundary)
    garbage = torch.randn(sum(lengths) - sent, h.shape[1])  # rows of requests not active yet
    received = (torch.cat([h, garbage]), torch.cat([residual, garbage]))
    out = compact_forward(_stage(inner, boundary, L), entries=entries, input_ids=None, positions=positions,
                          received=received)
    assert torch.equal(out, ref)
    assert rec.rows == [sum(n for n, k in zip(lengths, ks) if k <= layer) for layer in range(L)]


@torch.no_grad()
def test_a_stage_below_every_split_layer_runs_nothing_and_the_next_enters_them(inner):
    lengths = [4, 3]
    ids, positions = _batch(lengths)
    ref, entering = _reference(inner, ids, positions)
    entries = _entries(lengths, [4, L], entering, [True, True])
    rec = _Recorder(inner)
    assert run_stage(_stage(inner, 0, 3), entries=entries, input_ids=ids, positions=positions) == (None, None)
    out = compact_forward(_stage(inner, 3, L), entries=entries, input_ids=None, positions=positions,
                          received=(torch.zeros(7, 16), torch.zeros(7, 16)))  # what stage 0 sends: zeros
    assert torch.equal(out, ref)
    assert rec.rows == [0, 0, 0, 0, 4, 4]


def test_rows_below_a_later_stage_without_received_tensors_are_an_internal_error(inner):
    lengths = [2, 2]
    ids, positions = _batch(lengths)
    _, entering = _reference(inner, ids, positions)
    with pytest.raises(AssertionError, match="2 rows entered below layer 3, but no stage sent them"):
        run_stage(_stage(inner, 3, L), entries=_entries(lengths, [1, 4], entering, [True, True]), input_ids=ids,
                  positions=positions)


@pytest.mark.parametrize("ks", [[0, 0, 2, 3, 4, L], [5, 5], [0], [L, L], [1, 2, 3, 4, 5, L], []])
@pytest.mark.parametrize("start,end", [(0, L), (0, 3), (3, L), (2, 4)])
def test_stage_prefixes_are_the_partial_active_sets_of_the_stage_layers(ks, start, end):
    brute = {sum(1 for k in ks if k <= layer) for layer in range(start, end)}
    assert stage_prefixes(ks, start, end) == sorted(c for c in brute if 0 < c < len(ks))
