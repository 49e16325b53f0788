"""Compiled decoder-layer bodies for split steps: one graph for every layer and row count.

Runs in the worker. A split step cannot use vLLM's compiled model: ``compact_forward``
runs each layer on its own prefix of rows and enters client rows between layers, which the
whole-model graph (traced once, for every row at every layer) cannot express. Eager layers
would leave split steps at eager speed while plain steps run compiled (about 1.2x faster
here). So the parts of a layer between attention calls are compiled on their own:

* ``pre``: fused residual add + input norm, QKV projection, (Qwen: q/k norms), rotary;
* vLLM's own attention op, called eagerly: it reads the metadata and slot mapping the
  runner installed for this layer's row prefix, as in the eager compact path;
* ``post``: output projection, fused residual add + post-attention norm, MLP.

Both are ``torch.compile(dynamic=True, fullgraph=True)`` functions that take the layer as
an argument. Dynamo lifts a module's parameters to graph inputs, so one graph serves all
layers (same class, same shapes), and ``dynamic=True`` makes the row count symbolic. Dynamo
still specialises a row count of 1 (and inductor's CPU reductions guard an upper bound), so
:meth:`CompiledLayers.warm_up` compiles at start-up for 1 row, a few rows and the largest
step, which covers every row count a step can have; ``compiled_graphs()`` lets tests and
benchmarks see a recompilation while serving. (Unbacked row counts would avoid the
specialisation, but vLLM's rotary embedding reshapes with ``view(num_tokens, -1, d)``, which
cannot be traced on an unbacked size.)

The bodies restate ``LlamaDecoderLayer.forward`` / ``LlamaAttention.forward`` and their
Qwen2 twins line for line, so only those classes are accepted (checked by identity of
their ``forward``; ``tests/unit/patches/test_patch_contracts.py`` pins their source).
The first layer's ``residual is None`` case is entered with a zero residual: ``x + 0`` is
``x`` exactly.
"""
from __future__ import annotations

import time
from typing import Any

import torch


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far (ours and vLLM's)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _known_layer_forwards() -> dict[Any, str]:
    from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer
    from vllm.model_executor.models.qwen2 import Qwen2Attention, Qwen2DecoderLayer

    return {(LlamaDecoderLayer.forward, LlamaAttention.forward): "Llama",
            (Qwen2DecoderLayer.forward, Qwen2Attention.forward): "Qwen2"}


def unsupported_reason(layers: list[torch.nn.Module]) -> str | None:
    """Why these decoder layers cannot take the compiled path, or None if they can."""
    known = _known_layer_forwards()
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        key = (getattr(type(layer), "forward", None), getattr(type(attn), "forward", None))
        if key not in known:
            return (f"decoder layer {type(layer).__name__} with {type(attn).__name__} is not one of the "
                    f"compiled split bodies ({sorted(known.values())})")
    return None


def _pre(layer: Any, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor):
    h, residual = layer.input_layernorm(h, residual)
    attn = layer.self_attn
    qkv, _ = attn.qkv_proj(h)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    if getattr(attn, "qk_norm", False):
        n = q.shape[0]
        q = attn.q_norm(q.view(n, attn.num_heads, attn.head_dim)).view(n, attn.q_size)
        k = attn.k_norm(k.view(n, attn.num_kv_heads, attn.head_dim)).view(n, attn.kv_size)
    q, k = attn.rotary_emb(positions, q, k)
    return q, k, v, residual


def _post(layer: Any, attn_output: torch.Tensor, residual: torch.Tensor):
    out, _ = layer.self_attn.o_proj(attn_output)
    h, residual = layer.post_attention_layernorm(out, residual)
    return layer.mlp(h), residual


def _rows(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The graphs' inputs as they were compiled for: inference tensors (the runner's forward
    runs under ``torch.inference_mode``; client rows may arrive as ordinary tensors, which
    would otherwise compile a second graph)."""
    return [t if t.is_inference() else t.clone() for t in tensors]


GUARDED_ABOVE_ROWS = 4096  # inductor's CPU reductions guard this row count: keep guards above it


def _pad_to_two(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """One row repeated to two: the graphs were compiled for a symbolic row count >= 2."""
    return [torch.cat([t, t]) for t in tensors]


class CompiledLayers:
    """Runs decoder layer ``idx`` of ``inner`` on rows through the compiled bodies.

    ``skip_guards`` (what vLLM itself does for its compiled model): dynamo's guards are
    dropped, so a call costs no guard evaluation (about 2 x 30 calls a step); one graph per
    body then serves everything, which is sound because every layer has the same class and
    shapes (:func:`unsupported_reason`) and one-row calls are padded to two rows (the graph
    was compiled for a symbolic row count >= 2). Kept off above ``GUARDED_ABOVE_ROWS`` rows
    a step, where inductor's guard on the row count must select another kernel.
    """

    def __init__(self, inner: torch.nn.Module, *, skip_guards: bool = True,
                 options: dict | None = None) -> None:
        self.inner = inner
        self.skip_guards = skip_guards
        opts = dict(options or {})
        if skip_guards:
            opts["guard_filter_fn"] = torch.compiler.skip_all_guards_unsafe
        self._pre = torch.compile(_pre, dynamic=True, fullgraph=True, options=opts or None)
        self._post = torch.compile(_post, dynamic=True, fullgraph=True, options=opts or None)

    def warm_up(self, *, dtype: torch.dtype, device: torch.device, max_rows: int) -> float:
        """Compile both bodies now (start-up) for every row count up to ``max_rows``; returns the
        seconds taken. The first compile is for a symbolic row count (3 rows)."""
        t0 = time.perf_counter()
        layer = self.inner.layers[self.inner.start_layer]
        hidden = layer.input_layernorm.weight.shape[0]
        for rows in (3, 1, max(3, max_rows)):
            with torch.inference_mode():
                positions = torch.arange(rows, device=device)
                h = torch.zeros(rows, hidden, dtype=dtype, device=device)
                attn_out = torch.zeros(rows, layer.self_attn.o_proj.input_size, dtype=dtype, device=device)
                if rows == 1 and self.skip_guards:
                    positions, h, attn_out = _pad_to_two(positions, h, attn_out)
                _, _, _, residual = self._pre(layer, positions, h, torch.zeros_like(h))
                self._post(layer, attn_out, residual)
        return time.perf_counter() - t0

    def __call__(self, idx: int, positions: torch.Tensor, h: torch.Tensor,
                 residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.inner.layers[idx]
        if residual is None:
            residual = torch.zeros_like(h)
        n = h.shape[0]
        if n == 1 and self.skip_guards:
            positions, h, residual = _pad_to_two(positions, h, residual)
        q, k, v, residual = self._pre(layer, *_rows(positions, h, residual))
        if q.shape[0] != n:
            q, k, v, residual = q[:n], k[:n], v[:n], residual[:n]
        attn_output = layer.self_attn.attn(q, k, v)
        if n == 1 and self.skip_guards:
            attn_output, residual = _pad_to_two(attn_output, residual)
            h, residual = self._post(layer, *_rows(attn_output, residual))
            return h[:1], residual[:1]
        return self._post(layer, *_rows(attn_output, residual))
