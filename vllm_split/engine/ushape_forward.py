"""The compact forward with U-shaped rows: rows enter at their split layer ``k`` and a
U-shaped request's rows leave again at its return layer ``m``.

Runs in the worker. As in :func:`vllm_split.engine.compact_forward.compact_forward`, the
batch is sorted by split layer and each layer runs only on the rows active there; here a
request is active at layer ``l`` when ``k <= l < m`` (``m = L`` and no return for the
others). Entering rows are appended (the sort keeps the active rows in batch order);
leaving rows are taken out, and their hidden state at layer ``m`` (the residual stream
``h + residual``, before any norm: what the client's layers ``[m, L)`` continue from) is
returned. The active requests at a layer are then a subset of the batch rather than a
prefix: the runner installs, for every attention layer, the metadata of that layer's subset
(:mod:`vllm_split.engine.subset_metadata`), and :func:`active_sets` says which subsets
occur. Rows of a U request never pass through the layers at or above its ``m`` (no compute,
no KV writes), nor the final norm.
"""
from __future__ import annotations

import torch

from vllm_split.engine.compact_forward import Entry, RunLayers, append_rows, eager_layers, entry_rows, final_norm, spans
from vllm_split.engine.subset_metadata import token_index


def _end(entry: Entry, num_layers: int) -> int:
    return num_layers + 1 if entry.return_layer is None else entry.return_layer


def active_sets(entries: list[Entry], num_layers: int) -> list[tuple[int, ...]]:
    """For every layer ``l < num_layers``: the indices of the entries active there, in batch order."""
    return [tuple(i for i, e in enumerate(entries) if e.split_layer <= layer < _end(e, num_layers))
            for layer in range(num_layers)]


def ushape_forward(
    inner: torch.nn.Module,
    *,
    entries: list[Entry],
    input_ids: torch.Tensor | None,
    positions: torch.Tensor,
    inputs_embeds: torch.Tensor | None = None,
    run_layers: RunLayers | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(the final normed hidden states of every token of the batch, zeros for U rows;
    {entry index: its rows' hidden state at its return layer}) for a single pipeline stage.
    ``run_layers`` runs a span of layers in which no rows enter or leave (default: the layer
    modules, eager)."""
    num_layers = len(inner.layers)
    run_layers = run_layers or eager_layers(inner)
    assert [e.split_layer for e in entries] == sorted(e.split_layer for e in entries), "entries must be sorted by k"
    starts = torch.tensor([0] + [e.end for e in entries])
    for i, e in enumerate(entries):
        assert e.begin == starts[i], f"entries must tile the batch: {e}"
    active: list[int] = []
    h: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    returned: dict[int, torch.Tensor] = {}

    def sizes() -> list[int]:
        return [entries[i].end - entries[i].begin for i in active]

    def leave(layer: int) -> None:
        nonlocal h, residual, active
        if not any(entries[i].return_layer == layer for i in active):
            return
        keep_rows, keep, offset = [], [], 0
        for i, n in zip(active, sizes()):
            if entries[i].return_layer == layer:
                rows = h[offset : offset + n]
                returned[i] = (rows if residual is None else rows + residual[offset : offset + n]).clone()
            else:
                keep.append(i)
                keep_rows.append(torch.arange(offset, offset + n, device=h.device))
            offset += n
        active = keep
        if not keep:
            h = residual = None
            return
        index = torch.cat(keep_rows)
        h = h.index_select(0, index)
        residual = None if residual is None else residual.index_select(0, index)

    def enter(layer: int) -> None:
        nonlocal h, residual
        for i, e in enumerate(entries):
            if e.split_layer == layer:
                active.append(i)
                h, residual = append_rows(h, residual, entry_rows(inner, e, input_ids, inputs_embeds))

    events = [e.split_layer for e in entries] + [e.return_layer for e in entries if e.return_layer is not None]
    for first, stop in spans(0, num_layers, events):
        leave(first)
        enter(first)
        if h is None:
            continue
        pos = positions[token_index(starts, active).to(positions.device)]
        h, residual = run_layers(first, stop, pos, h, residual)
    leave(num_layers)
    enter(num_layers)
    total = int(starts[-1])
    hidden_size = next(iter(returned.values())).shape[1] if h is None else h.shape[1]
    dtype = next(iter(returned.values())).dtype if h is None else h.dtype
    out = torch.zeros((total, hidden_size), dtype=dtype, device=positions.device)
    if h is not None:
        final = final_norm(inner, h, residual)
        out[token_index(starts, active).to(out.device)] = final
    return out, returned
