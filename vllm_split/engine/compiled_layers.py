"""Compiled decoder-layer bodies for split steps: one graph for every layer and row count.

Runs in the worker. A split step cannot use vLLM's compiled model: ``compact_forward``
runs each layer on its own prefix of rows and enters client rows between layers, which the
whole-model graph (traced once, for every row at every layer) cannot express. Eager layers
would leave split steps at eager speed while plain steps run compiled (about 1.2x faster
here). So the parts of a layer between attention calls are compiled on their own:

* ``pre``: fused residual add + input norm, QKV projection, (Qwen: q/k norms), rotary;
* vLLM's own attention op, called eagerly: it reads the metadata and slot mapping the
  runner installed for this layer's row prefix, as in the eager compact path;
* ``post``: output projection, fused residual add + post-attention norm, MLP;
* ``post_pre``: ``post`` of one layer then ``pre`` of the next, in one graph.

All three are ``torch.compile(dynamic=True, fullgraph=True)`` functions that take the
layers as arguments. Dynamo lifts a module's parameters to graph inputs, so one graph serves
all layers, and one ``post_pre`` graph all pairs (same class, same shapes), and
``dynamic=True`` makes the row count symbolic. Dynamo still specialises a row count of 1
(and inductor's CPU reductions guard an upper bound), so :meth:`CompiledLayers.warm_up`
compiles at start-up for a few rows, one row (padded to two, below) and the largest step,
which covers every row count a step can have; ``compiled_graphs()`` lets tests and
benchmarks see a recompilation while serving. (Unbacked row counts would avoid the
specialisation, but vLLM's rotary embedding reshapes with ``view(num_tokens, -1, d)``, which
cannot be traced on an unbacked size.)

**Spans.** The compact forward asks for a span of layers ``[start, end)`` on which no rows
enter (:func:`vllm_split.engine.compact_forward.run_stage`), so the rows are the same at
every layer of it. A span runs ``pre`` of its first layer, then per layer attention and
``post_pre`` into the next (``post`` after the last): one compiled call per layer between
attention calls, as vLLM's piecewise graphs split at attention, instead of two. The per-call
work around the bodies (padding one row to two, the inference-tensor check, the zero
residual of rows that enter) is done once per span. Warm-up checks that ``post_pre`` returns
what ``post`` then ``pre`` return, bit for bit, else spans call those two.

**Direct calls.** Entering a ``torch.compile`` function goes through dynamo's frame
evaluation (its cache lookup and, kept or not, the guards): measured at 6.6% of a split
step here (60 entries a step). With guards skipped there is one compiled entry per body
and nothing to look up, so, as vLLM does for its own model (``VLLM_USE_BYTECODE_HOOK``:
``TorchCompileWithNoGuardsWrapper``), the transformed bytecode dynamo made for each body is
captured with a bytecode hook during warm-up and then called as an ordinary function:
dynamo guarantees it takes the same arguments as the original, and it calls the same
compiled graph. Warm-up checks that the direct call returns what the compiled function
returns, bit for bit, else (or with guards kept) calls go through dynamo as before.

The bodies restate ``LlamaDecoderLayer.forward`` / ``LlamaAttention.forward`` and their
Qwen2 twins line for line, so only those classes are accepted (checked by identity of
their ``forward``; ``tests/unit/patches/test_patch_contracts.py`` pins their source).
The first layer's ``residual is None`` case is entered with a zero residual: ``x + 0`` is
``x`` exactly.
"""
from __future__ import annotations

import logging
import time
import types
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)


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


def _post_pre(layer: Any, next_layer: Any, attn_output: torch.Tensor, residual: torch.Tensor,
              positions: torch.Tensor):
    """``layer``'s post then ``next_layer``'s pre: one graph between two attention calls, as in
    vLLM's piecewise graphs (which split at attention)."""
    h, residual = _post(layer, attn_output, residual)
    return _pre(next_layer, positions, h, residual)


_BODIES = (_pre, _post, _post_pre)


def _attn_width(layer: Any) -> int:
    """Columns of this rank's attention output (the input of ``o_proj``): its heads x head size.
    Not ``o_proj.input_size``, the width over all tensor-parallel ranks: the CPU build's oneDNN
    matmul reads a row that wide as ``tp_size`` rows and writes them past its output buffer
    (heap corruption at start-up under ``--tensor-parallel-size 2``)."""
    return layer.self_attn.q_size


def _rows(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The graphs' inputs as they were compiled for: inference tensors (the runner's forward
    runs under ``torch.inference_mode``; client rows may arrive as ordinary tensors, which
    would otherwise compile a second graph)."""
    return [t if t.is_inference() else t.clone() for t in tensors]


GUARDED_ABOVE_ROWS = 4096  # inductor's CPU reductions guard this row count: keep guards above it


def _pad_to_two(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """One row repeated to two: the graphs were compiled for a symbolic row count >= 2."""
    return [torch.cat([t, t]) for t in tensors]


def _function_of(code: types.CodeType, original: Callable) -> Callable:
    """``original`` with dynamo's transformed ``code``: same arguments, same globals (where
    dynamo put the compiled graph it calls)."""
    return types.FunctionType(code, original.__globals__, original.__name__, original.__defaults__,
                              original.__closure__)


class CompiledLayers:
    """Runs spans of decoder layers ``[start, end)`` of ``inner`` on rows through the compiled bodies.

    ``skip_guards`` (what vLLM itself does for its compiled model): dynamo's guards are
    dropped, so a call costs no guard evaluation; one graph per body then serves everything,
    which is sound because every layer has the same class and shapes
    (:func:`unsupported_reason`) and one-row spans are padded to two rows (the graphs were
    compiled for a symbolic row count >= 2). Kept off above ``GUARDED_ABOVE_ROWS`` rows a
    step, where inductor's guard on the row count must select another kernel.

    A span runs ``pre`` of its first layer, then per layer attention and ``post_pre`` into the
    next layer (``post`` alone after the last): one compiled call per layer, as in vLLM's
    piecewise graphs. Warm-up checks the fused body against ``post`` then ``pre`` bit for bit,
    else (``fused_why``) the span calls them one after the other.
    """

    def __init__(self, inner: torch.nn.Module, *, skip_guards: bool = True,
                 options: dict | None = None) -> None:
        self.inner = inner
        self.skip_guards = skip_guards
        opts = dict(options or {})
        if skip_guards:
            opts["guard_filter_fn"] = torch.compiler.skip_all_guards_unsafe
        self._pre, self._post, self._post_pre = (
            torch.compile(body, dynamic=True, fullgraph=True, options=opts or None) for body in _BODIES)
        self._layers = list(inner.layers)
        self._attns = [getattr(getattr(layer, "self_attn", None), "attn", None) for layer in self._layers]
        self.direct = False  # the bodies are called as their captured bytecode (see the module docstring)
        self.direct_why: str | None = "not warmed up"  # why not, when not
        self.fused = False  # spans call post_pre between attention calls
        self.fused_why: str | None = "not warmed up"  # why not, when not

    def warm_up(self, *, dtype: torch.dtype, device: torch.device, max_rows: int) -> float:
        """Compile the bodies now (start-up) for every row count up to ``max_rows``; returns the
        seconds taken. The first compile is for a symbolic row count (3 rows). With guards
        skipped, the bodies are then called directly (:meth:`_use_direct_calls`)."""
        t0 = time.perf_counter()
        start, end = self.inner.start_layer, self.inner.end_layer
        layer = self._layers[start]
        # two distinct layers: dynamo lifts a module seen twice once, and the graph would then
        # read both layers' parameters from the first argument
        pair = (layer, self._layers[start + 1]) if end - start >= 2 else None
        bodies = _BODIES if pair is not None else _BODIES[:2]
        codes: dict[types.CodeType, list[types.CodeType]] = {f.__code__: [] for f in bodies}

        def capture(old: types.CodeType, new: types.CodeType) -> None:
            if old in codes:
                codes[old].append(new)

        from torch._dynamo.convert_frame import register_bytecode_hook

        hook = register_bytecode_hook(capture)
        try:
            for rows in (3, 1, max(3, max_rows)):
                if rows == 1 and self.skip_guards:
                    rows = 2  # what a one-row span runs on (:meth:`__call__`)
                with torch.inference_mode():
                    # position 0 for every row: max_rows (2048 x TP size on CPU by default) may
                    # exceed the model's rotary table; the graphs do not depend on the values
                    positions = torch.zeros(rows, dtype=torch.long, device=device)
                    h = torch.zeros(rows, layer.input_layernorm.weight.shape[0], dtype=dtype, device=device)
                    attn_out = torch.zeros(rows, _attn_width(layer), dtype=dtype, device=device)
                    _, _, _, residual = self._pre(layer, positions, h, torch.zeros_like(h))
                    self._post(layer, attn_out, residual)
                    if pair is not None:
                        self._post_pre(*pair, attn_out, residual, positions)
        finally:
            hook.remove()
        cases = self._test_cases(dtype=dtype, device=device)
        self._use_direct_calls(codes, cases)
        self._use_fused(cases, have_pair=pair is not None)
        return time.perf_counter() - t0

    def _test_cases(self, *, dtype: torch.dtype, device: torch.device) -> dict[Callable, tuple]:
        """Random arguments of each body on 5 rows, with layers other than warm-up's where the
        stage has them (a graph that read the warm-up layers' parameters would show)."""
        start, end = self.inner.start_layer, self.inner.end_layer
        a, b = self._layers[max(start, end - 2)], self._layers[end - 1]
        hidden = a.input_layernorm.weight.shape[0]
        gen = torch.Generator(device="cpu").manual_seed(0)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

        with torch.inference_mode():
            rows = 5
            positions = torch.arange(rows, device=device)
            h, residual, attn_out = randn(rows, hidden), randn(rows, hidden), randn(rows, _attn_width(a))
        return {_pre: (b, positions, h, residual), _post: (b, attn_out, residual),
                _post_pre: (a, b, attn_out, residual, positions)}

    def _bodies(self) -> dict[Callable, Callable]:
        return {_pre: self._pre, _post: self._post, _post_pre: self._post_pre}

    def _use_direct_calls(self, codes: dict, cases: dict[Callable, tuple]) -> None:
        """Call each body's captured bytecode from now on, if there is exactly one per body and
        it returns what the compiled function does on a test input; else keep dynamo's entry."""
        self.direct, self.direct_why = False, None
        if not self.skip_guards:
            self.direct_why = "guards kept"
        elif any(len(c) != 1 for c in codes.values()):
            self.direct_why = f"expected one compiled entry per body, got {[len(c) for c in codes.values()]}"
        if self.direct_why is not None:
            logger.info("vllm-split: compiled split bodies called through dynamo (%s)", self.direct_why)
            return
        compiled = self._bodies()
        direct = {f: _function_of(codes[f.__code__][0], f) for f in _BODIES if f.__code__ in codes}
        with torch.inference_mode():
            same = all(_equal(call(*cases[f]), compiled[f](*cases[f])) for f, call in direct.items())
        if not same:
            self.direct_why = "the captured bytecode returned other values than the compiled function"
            logger.warning("vllm-split: compiled split bodies called through dynamo (%s)", self.direct_why)
            return
        self._pre, self._post = direct[_pre], direct[_post]
        self._post_pre = direct.get(_post_pre, self._post_pre)
        self.direct = True

    def _use_fused(self, cases: dict[Callable, tuple], *, have_pair: bool) -> None:
        """Spans call the fused body if it returns, bit for bit, what ``post`` then ``pre`` do."""
        self.fused, self.fused_why = False, None
        if not have_pair:
            self.fused_why = "a single layer on this stage"
            return
        a, b, attn_out, residual, positions = cases[_post_pre]
        with torch.inference_mode():
            h, r = self._post(a, attn_out, residual)
            same = _equal(self._post_pre(a, b, attn_out, residual, positions), self._pre(b, positions, h, r))
        if not same:
            self.fused_why = "the fused body returned other values than post then pre"
            logger.warning("vllm-split: compiled split bodies not fused (%s)", self.fused_why)
            return
        self.fused = True

    def __call__(self, start: int, end: int, positions: torch.Tensor, h: torch.Tensor,
                 residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder layers ``[start, end)`` on the rows ``h`` (the same rows at every layer)."""
        n = h.shape[0]
        if residual is None:
            residual = torch.zeros_like(h)
        pad = n == 1 and self.skip_guards
        if pad:  # once per span; attention still sees the one row
            positions, h, residual = _pad_to_two(positions, h, residual)
        positions, h, residual = _rows(positions, h, residual)
        layers, attns, post, post_pre, pre = self._layers, self._attns, self._post, self._post_pre, self._pre
        q, k, v, residual = pre(layers[start], positions, h, residual)
        last = end - 1
        for idx in range(start, end):
            if pad:
                attn_output = attns[idx](q[:1], k[:1], v[:1])
                attn_output = torch.cat([attn_output, attn_output])
            else:
                attn_output = attns[idx](q, k, v)
            if idx == last:
                h, residual = post(layers[idx], attn_output, residual)
            elif self.fused:
                q, k, v, residual = post_pre(layers[idx], layers[idx + 1], attn_output, residual, positions)
            else:
                h, residual = post(layers[idx], attn_output, residual)
                q, k, v, residual = pre(layers[idx + 1], positions, h, residual)
        return (h[:1], residual[:1]) if pad else (h, residual)


def _equal(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
