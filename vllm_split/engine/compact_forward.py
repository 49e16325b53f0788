"""The compute-saving split forward: layer ``l`` runs only on rows that have entered.

The runner sorts the batch by split layer (ordinary requests count as ``k = 0``), so the
rows active at layer ``l`` (requests with ``k_r <= l``) are a prefix ``[0, T_l)`` of the
flattened batch and requests entering at ``l`` append the next rows. Each layer then runs
on ``h[:T_l]`` only, attention included: the runner has put, for every attention layer, the
metadata and slot mapping of the matching request prefix into the forward context. Rows
of a request never pass through the layers below its ``k`` (no compute, no KV writes).

**Pipeline stages.** A stage holds layers ``[start, end)`` (``inner.start_layer``,
``inner.end_layer``) and runs only those (:func:`run_stage`). The rows of requests with
``k < start`` are active when it begins: a stage after the first takes them, as the prefix
``[0, T_start)``, from the tensors the previous stage sent (whose other rows it ignores);
requests with ``k`` in ``[start, end)`` enter at ``k``; requests with ``k >= end`` do not run
here. Every stage sorts the batch alike (same scheduler output, same sort), so the prefix a
stage sends is the prefix the next one takes. Only the last stage lets rows at ``k = L``
enter and applies the final norm (:func:`compact_forward`).
"""
from __future__ import annotations

import bisect
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


RunLayers = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]
"""``run_layers(start, end, positions, h, residual)``: decoder layers ``[start, end)`` on the rows
``h`` (no rows enter inside the span); returns ``(h, residual)``."""


def eager_layers(inner: torch.nn.Module, **layer_kwargs: Any) -> RunLayers:
    """The span runner that calls the layer modules themselves, one after the other."""

    def run_layers(start: int, end: int, positions: torch.Tensor, h: torch.Tensor,
                   residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        for idx in range(start, end):
            h, residual = inner.layers[idx](positions, h, residual, **layer_kwargs)
        return h, residual

    return run_layers


def spans(start: int, end: int, boundaries: Any) -> list[tuple[int, int]]:
    """``[start, end)`` cut at every layer of ``boundaries`` inside it: the spans ``[a, b)``."""
    cuts = sorted({start, end, *(b for b in boundaries if start < b < end)})
    return list(zip(cuts, cuts[1:]))


def run_stage(
    inner: torch.nn.Module,
    *,
    entries: list[Entry],
    input_ids: torch.Tensor | None,
    positions: torch.Tensor,
    inputs_embeds: torch.Tensor | None = None,
    run_layers: RunLayers | None = None,
    received: tuple[torch.Tensor, torch.Tensor] | None = None,
    **extra_layer_kwargs: Any,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """This stage's layers ``[inner.start_layer, inner.end_layer)`` on the active rows; returns
    ``(h, residual)`` of the rows active after its last layer (``(None, None)``: none).

    ``received``: the previous stage's ``(hidden_states, residual)`` (a stage after the first),
    whose first rows are those of the requests with ``k < inner.start_layer``.
    ``run_layers`` runs a span of layers in which no rows enter (:data:`RunLayers`; default:
    the layer modules themselves, eager, with ``extra_layer_kwargs``; the runner passes the
    compiled bodies of ``compiled_layers``). Rows entering at layer ``l`` are appended
    before ``l`` runs, so the spans end where rows enter.
    """
    start, end = inner.start_layer, inner.end_layer
    run_layers = run_layers or eager_layers(inner, **extra_layer_kwargs)
    by_layer: dict[int, list[Entry]] = {}
    for e in entries:
        by_layer.setdefault(e.split_layer, []).append(e)
    h: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    if num_carried := carried_rows(entries, start):
        assert received is not None, f"{num_carried} rows entered below layer {start}, but no stage sent them"
        h, residual = received[0][:num_carried], received[1][:num_carried]
    for first, stop in spans(start, end, by_layer):
        for e in by_layer.get(first, ()):
            h, residual = append_entry(inner, h, residual, e, input_ids, inputs_embeds)
        if h is not None:
            h, residual = run_layers(first, stop, positions[: h.shape[0]], h, residual)
    return h, residual


def compact_forward(inner: torch.nn.Module, *, entries: list[Entry], input_ids: torch.Tensor | None,
                    inputs_embeds: torch.Tensor | None = None, **stage_kwargs: Any) -> torch.Tensor:
    """The last (or only) stage: :func:`run_stage` (``stage_kwargs``: its ``positions``,
    ``run_layers``, ``received`` and layer keyword arguments), then the rows at ``k = L`` enter
    before the final norm; returns the normed rows of every request (the sorted batch, unpadded)."""
    h, residual = run_stage(inner, entries=entries, input_ids=input_ids, inputs_embeds=inputs_embeds,
                            **stage_kwargs)
    for e in entries:
        if e.split_layer == len(inner.layers):
            h, residual = append_entry(inner, h, residual, e, input_ids, inputs_embeds)
    assert h is not None
    return final_norm(inner, h, residual)


def final_norm(inner: torch.nn.Module, h: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """The model's final norm of the hidden state ``h + residual`` (``h`` where residual is None)."""
    return inner.norm(h) if residual is None else inner.norm(h, residual)[0]


def carried_rows(entries: list[Entry], layer: int) -> int:
    """Rows of the sorted batch active when ``layer`` begins, before any enter there: those of
    the requests with ``k < layer``."""
    return max((e.end for e in entries if e.split_layer < layer), default=0)


def stage_prefixes(split_layers: list[int], start: int, end: int) -> list[int]:
    """The request counts ``R`` (``0 < R < len(split_layers)``) whose prefix of the sorted batch
    is the active set at some layer in ``[start, end)``: the prefixes whose attention metadata a
    stage holding those layers needs (the whole batch uses the step's own)."""
    counts = {bisect.bisect_right(split_layers, layer) for layer in range(start, end)}
    return sorted(c for c in counts if 0 < c < len(split_layers))


def append_entry(inner: torch.nn.Module, h: torch.Tensor | None, residual: torch.Tensor | None, e: Entry,
                 input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None):
    """``(h, residual)`` with ``e``'s rows entering after the active ones."""
    assert (0 if h is None else h.shape[0]) == e.begin, f"rows must be sorted by split layer: {e}"
    return append_rows(h, residual, entry_rows(inner, e, input_ids, inputs_embeds))


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
