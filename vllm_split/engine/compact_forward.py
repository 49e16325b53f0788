"""The compute-saving split forward: layer ``l`` runs only on rows that have entered.

The runner sorts the batch by split layer (ordinary requests count as ``k = 0``), so the
rows active at layer ``l`` (requests with ``k_r <= l``) are a prefix ``[0, T_l)`` of the
flattened batch and requests entering at ``l`` append the next rows. Each layer then runs
on ``h[:T_l]`` only, attention included: the runner has put, for every attention layer, the
metadata and slot mapping of the matching request prefix into the forward context. Rows
of a request never pass through the layers below its ``k`` (no compute, no KV writes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True, slots=True)
class Entry:
    """Rows ``[begin, end)`` of the sorted batch enter at ``split_layer`` with ``hidden``
    (and, U-shaped, leave after layer ``return_layer - 1``: :mod:`vllm_split.engine.ushape_forward`)."""

    split_layer: int
    begin: int
    end: int
    hidden: torch.Tensor | None  # None: ordinary rows, embedded from their token ids (k = 0)
    return_layer: int | None = None  # U-shaped: the layer whose input goes back to the client; None: not U


def compact_forward(
    inner: torch.nn.Module,
    *,
    entries: list[Entry],
    input_ids: torch.Tensor | None,
    positions: torch.Tensor,
    inputs_embeds: torch.Tensor | None = None,
    run_layer: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
    **extra_layer_kwargs: Any,
) -> torch.Tensor:
    """Single pipeline stage: embed k=0 rows, grow the active prefix at each entry layer.

    ``run_layer(idx, positions, h, residual)`` runs one decoder layer (default: the layer
    module itself, eager; the runner passes the compiled bodies of ``compiled_layers``).
    """
    num_layers = len(inner.layers)
    by_layer: dict[int, list[Entry]] = {}
    for e in entries:
        by_layer.setdefault(e.split_layer, []).append(e)
    h: torch.Tensor | None = None
    residual: torch.Tensor | None = None

    def enter(layer: int) -> None:
        nonlocal h, residual
        for e in by_layer.get(layer, ()):
            assert h is None or e.begin == h.shape[0], f"rows must be sorted by split layer: {e}"
            h, residual = append_rows(h, residual, entry_rows(inner, e, input_ids, inputs_embeds))

    for idx in range(num_layers):
        enter(idx)
        if h is None:
            continue
        n = h.shape[0]
        if run_layer is None:
            h, residual = inner.layers[idx](positions[:n], h, residual, **extra_layer_kwargs)
        else:
            h, residual = run_layer(idx, positions[:n], h, residual)
    enter(num_layers)
    assert h is not None
    if residual is None:
        return inner.norm(h)
    out, _ = inner.norm(h, residual)
    return out


def entry_rows(inner: torch.nn.Module, e: Entry, input_ids: torch.Tensor | None,
               inputs_embeds: torch.Tensor | None) -> torch.Tensor:
    """The rows ``e`` enters with: the client's, or (ordinary rows) their embeddings."""
    if e.hidden is not None:
        return e.hidden
    if inputs_embeds is not None:
        return inputs_embeds[e.begin : e.end]
    return inner.embed_input_ids(input_ids[e.begin : e.end])


def append_rows(h: torch.Tensor | None, residual: torch.Tensor | None,
                rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(h, residual)`` with ``rows`` entering after the active ones (``h = x``, ``residual = 0``)."""
    if h is None:
        return rows, residual
    h = torch.cat([h, rows.to(h.dtype)])
    return h, None if residual is None else torch.cat([residual, residual.new_zeros(rows.shape)])
