"""Resume a decoder-only model's forward pass at each request's own split layer.

The standard vLLM decoder loop (``LlamaModel.forward`` and its relatives) is::

    h = embed(input_ids); residual = None
    for layer in layers[start:end]: h, residual = layer(positions, h, residual)
    h, _ = norm(h, residual)

with the true hidden state between layers being ``h + residual``. A token whose client
sent the hidden state ``x`` at layer ``k`` enters by setting, just before layer ``k``,
``h = x`` and ``residual = 0`` (or leaving ``residual`` None before the first layer, which
then takes ``h`` as the residual): exact in float32. Rows entering at ``k = L`` are set
just before the final norm. Layers below a row's ``k`` still run on it here and their
output is overwritten: this is the exact fallback for configurations the compute-saving
``compact_forward`` does not cover yet (GPU attention backends; a step whose batch is not
sorted by split layer).

Only models whose inner model runs exactly that loop are accepted: the inner model's
``forward`` must be one of the known standard-loop functions, checked at start-up.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from vllm.distributed import get_pp_group
from vllm.sequence import IntermediateTensors

from vllm_split.engine.compact_forward import final_norm


class UnsupportedModelError(RuntimeError):
    """The loaded model does not use a decoder loop vllm-split can resume."""


def _standard_loop_forwards() -> dict[Any, str]:
    from vllm.model_executor.models.llama import LlamaModel
    from vllm.model_executor.models.qwen2 import Qwen2Model

    return {LlamaModel.forward: "LlamaModel", Qwen2Model.forward: "Qwen2Model"}


def check_supported(model: torch.nn.Module) -> torch.nn.Module:
    """Return the inner decoder model, or raise :class:`UnsupportedModelError`."""
    inner = getattr(model, "model", None)
    known = _standard_loop_forwards()
    forward = getattr(type(inner), "forward", None)
    if inner is None or forward not in known:
        raise UnsupportedModelError(
            f"vllm-split cannot resume {type(model).__name__}"
            f"{f' (inner model {type(inner).__name__})' if inner is not None else ''}: "
            f"its decoder loop is not one of the supported standard loops "
            f"{sorted(known.values())} (Llama and Qwen2/Qwen3 families). "
            f"Start vLLM without the vllm-split plugin to serve this model."
        )
    for attr in ("embed_input_ids", "layers", "norm", "start_layer", "end_layer"):
        if not hasattr(inner, attr):
            raise UnsupportedModelError(f"vllm-split: {type(inner).__name__} has no attribute {attr!r}")
    return inner


@dataclass(slots=True)
class SplitRows:
    """Rows of the flattened batch that enter at one layer."""

    split_layer: int
    index: torch.Tensor  # [n] token positions in the batch (int64)
    hidden: torch.Tensor  # [n, hidden_size]


def _inject(h: torch.Tensor, residual: torch.Tensor | None, rows: SplitRows):
    h = h.index_copy(0, rows.index, rows.hidden.to(h.dtype))
    if residual is not None:
        residual = residual.index_fill(0, rows.index, 0.0)
    return h, residual


def exact_forward(
    inner: torch.nn.Module,
    *,
    groups: list[SplitRows],
    input_ids: torch.Tensor | None,
    positions: torch.Tensor,
    intermediate_tensors: IntermediateTensors | None,
    inputs_embeds: torch.Tensor | None = None,
    **extra_layer_kwargs: Any,
) -> torch.Tensor | IntermediateTensors:
    """The standard decoder loop with rows entering at their split layers."""
    by_layer: dict[int, list[SplitRows]] = {}
    for group in groups:
        by_layer.setdefault(group.split_layer, []).append(group)
    pp = get_pp_group()
    if pp.is_first_rank:
        h = inputs_embeds if inputs_embeds is not None else inner.embed_input_ids(input_ids)
        residual = None
    else:
        assert intermediate_tensors is not None
        h = intermediate_tensors["hidden_states"]
        residual = intermediate_tensors["residual"]
    for idx in range(inner.start_layer, inner.end_layer):
        for rows in by_layer.get(idx, ()):
            h, residual = _inject(h, residual, rows)
        h, residual = inner.layers[idx](positions, h, residual, **extra_layer_kwargs)
    if not pp.is_last_rank:
        return IntermediateTensors({"hidden_states": h, "residual": residual})
    for rows in by_layer.get(len(inner.layers), ()):
        h, residual = _inject(h, residual, rows)
    return final_norm(inner, h, residual)
