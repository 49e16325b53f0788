"""compiled_layers: the compiled bodies equal the eager layer, one graph per body (pre, post and
the fused post_pre) serves every layer, pair of layers and row count (no recompilation after
warm-up), and spans of fused bodies equal the bodies called layer by layer, bit for bit. A stand-in layer with the attribute
structure of vLLM's LlamaDecoderLayer (fused residual norm, tuple-returning projections)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from vllm_split.engine.compact_forward import Entry, run_stage  # noqa: E402
from vllm_split.engine.compiled_layers import CompiledLayers, compiled_graphs, unsupported_reason  # noqa: E402

H, HEADS, KV_HEADS, HEAD_DIM, INTER = 32, 4, 2, 8, 48


class Norm(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(H))

    def forward(self, x, residual=None):
        if residual is not None:
            x = x + residual
            residual = x
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight
        return out if residual is None else (out, residual)


class Linear(torch.nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.input_size = n_in
        self.weight = torch.nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)

    def forward(self, x):
        return x @ self.weight.t(), None


class Rotary(torch.nn.Module):
    def forward(self, positions, q, k):
        angle = positions.to(q.dtype)[:, None] * 0.01
        return q * torch.cos(angle) + torch.sin(angle), k * torch.cos(angle) - torch.sin(angle)


class Attn(torch.nn.Module):
    """Stands in for vLLM's attention op (which reads the forward context): any q,k,v -> out."""

    def forward(self, q, k, v):
        kv = torch.cat([k, v], dim=-1)
        return torch.tanh(q + kv[:, : q.shape[1]])


class SelfAttn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_size, self.kv_size = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
        self.num_heads, self.num_kv_heads, self.head_dim = HEADS, KV_HEADS, HEAD_DIM
        self.qkv_proj = Linear(H, self.q_size + 2 * self.kv_size)
        self.rotary_emb, self.attn, self.o_proj = Rotary(), Attn(), Linear(self.q_size, H)

    def forward(self, positions, hidden_states):
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = Linear(H, INTER), Linear(INTER, H)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x)[0]))[0]


class Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = Norm(), Norm()
        self.self_attn, self.mlp = SelfAttn(), Mlp()

    def forward(self, positions, hidden_states, residual):  # LlamaDecoderLayer.forward
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class Inner(torch.nn.Module):
    def __init__(self, num_layers: int = 3) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(Layer() for _ in range(num_layers))
        self.start_layer, self.end_layer = 0, num_layers


@pytest.mark.parametrize("skip_guards", [True, False])
def test_compiled_bodies_equal_the_layer_and_never_recompile(skip_guards):
    torch._dynamo.reset()  # dynamo caches the bodies per code object: compile with these guards
    torch.manual_seed(0)
    inner = Inner(num_layers=4)  # the pair (1, 2) is first seen after warm-up
    compiled = CompiledLayers(inner, skip_guards=skip_guards)
    compiled.warm_up(dtype=torch.float32, device=torch.device("cpu"), max_rows=64)
    # without guards the captured bytecode is called directly (no dynamo frame evaluation)
    assert (compiled.direct, compiled.direct_why) == ((True, None) if skip_guards else (False, "guards kept"))
    assert (compiled.fused, compiled.fused_why) == (True, None)
    graphs = compiled_graphs()
    for rows in (1, 2, 7, 40):
        positions, h0, res0 = torch.arange(rows), torch.randn(rows, H), torch.randn(rows, H)  # client rows: not
        with torch.inference_mode():                                                         # inference tensors
            for residual in (None, res0):
                h_ref, r_ref = h0, residual
                h, r = h0, residual
                for idx in range(len(inner.layers)):
                    h_ref, r_ref = inner.layers[idx](positions, h_ref, r_ref)
                    h, r = compiled(idx, idx + 1, positions, h, r)
                    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
                    torch.testing.assert_close(r, r_ref, rtol=1e-5, atol=1e-5)
                h_span, r_span = compiled(0, len(inner.layers), positions, h0, residual)
                assert torch.equal(h_span, h) and torch.equal(r_span, r), "a span differs from its layers one by one"
    assert compiled_graphs() == graphs, "a layer or a row count recompiled after warm-up"


def test_the_fused_body_is_one_graph_for_every_layer_pair_and_row_count():
    """Warm-up compiles pre, post and the fused post_pre once each (three graphs); spans of
    1..N rows over every pair of layers then run without another compilation."""
    torch._dynamo.reset()  # dynamo caches the bodies per code object: count this warm-up's graphs only
    torch.manual_seed(1)
    inner = Inner(num_layers=5)
    compiled = CompiledLayers(inner)
    before = compiled_graphs()
    compiled.warm_up(dtype=torch.float32, device=torch.device("cpu"), max_rows=64)
    assert compiled_graphs() - before == 3
    assert compiled.direct and compiled.fused, (compiled.direct_why, compiled.fused_why)
    graphs = compiled_graphs()
    with torch.inference_mode():
        for rows in (*range(1, 10), 33, 64):
            positions, h0, res0 = torch.arange(rows), torch.randn(rows, H), torch.randn(rows, H)
            for start, end in ((0, 5), (1, 3), (3, 5), (4, 5)):
                compiled(start, end, positions, h0, res0)
    assert compiled_graphs() == graphs, "a pair of layers or a row count recompiled after warm-up"


def _unfused(compiled: CompiledLayers):
    """The same compiled bodies, spans of one layer each: post and pre called one after the other."""

    def run_layers(start, end, positions, h, residual):
        for idx in range(start, end):
            h, residual = compiled(idx, idx + 1, positions, h, residual)
        return h, residual

    return run_layers


@pytest.mark.parametrize("ks", [[0, 0, 0], [0, 1, 4], [2, 2, 5], [1, 3, 6], [0, 5, 6], [4, 6, 6]])
def test_compact_spans_with_rows_entering_equal_the_compiled_layers_one_by_one_bit_for_bit(ks):
    """The compact forward with rows entering at various layers: fused spans give the same bits
    as the per-layer bodies (and as the eager layers within rounding); one-row prefixes included."""
    torch.manual_seed(2)
    num_layers = 6
    inner = Inner(num_layers=num_layers)
    compiled = CompiledLayers(inner)
    compiled.warm_up(dtype=torch.float32, device=torch.device("cpu"), max_rows=64)
    assert compiled.fused, compiled.fused_why
    lengths = [1, 3, 5]
    bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
    positions = torch.cat([torch.arange(n) for n in lengths])
    entries = [Entry(split_layer=k, begin=bounds[i], end=bounds[i + 1], hidden=torch.randn(n, H))
               for i, (k, n) in enumerate(zip(ks, lengths))]
    graphs = compiled_graphs()
    with torch.inference_mode():
        run = dict(entries=entries, input_ids=None, positions=positions)
        h, r = run_stage(inner, run_layers=compiled, **run)
        h_one, r_one = run_stage(inner, run_layers=_unfused(compiled), **run)
        h_eager, r_eager = run_stage(inner, **run)
    assert torch.equal(h, h_one) and torch.equal(r, r_one)
    torch.testing.assert_close(h, h_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r, r_eager, rtol=1e-5, atol=1e-5)
    assert compiled_graphs() == graphs


def test_a_fused_body_that_differs_is_not_used():
    compiled = CompiledLayers(Inner())
    compiled.warm_up(dtype=torch.float32, device=torch.device("cpu"), max_rows=16)
    post_pre = compiled._post_pre
    compiled._post_pre = lambda *args: tuple(t + 1 for t in post_pre(*args))
    compiled._use_fused(compiled._test_cases(dtype=torch.float32, device=torch.device("cpu")), have_pair=True)
    assert not compiled.fused and "other values" in compiled.fused_why


def test_a_single_layer_stage_runs_unfused():
    inner = Inner(num_layers=3)
    inner.start_layer, inner.end_layer = 1, 2
    compiled = CompiledLayers(inner)
    compiled.warm_up(dtype=torch.float32, device=torch.device("cpu"), max_rows=16)
    assert (compiled.fused, compiled.fused_why) == (False, "a single layer on this stage")
    _assert_layer_equals_eager(inner, compiled, 1, rows=4)


def _assert_layer_equals_eager(inner: Inner, compiled: CompiledLayers, idx: int, *, rows: int) -> None:
    """Layer ``idx`` alone (a span of one, no residual yet) through the compiled bodies equals the layer."""
    positions, h0 = torch.arange(rows), torch.randn(rows, H)
    with torch.inference_mode():
        h_ref, r_ref = inner.layers[idx](positions, h0, None)
        h, r = compiled(idx, idx + 1, positions, h0, None)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r, r_ref, rtol=1e-5, atol=1e-5)


def test_unknown_layer_classes_stay_eager_with_a_reason():
    why = unsupported_reason([Layer()])
    assert why is not None and "Layer with SelfAttn" in why and "Llama" in why


class RowParallelLinear(Linear):
    """Like vLLM's RowParallelLinear on one of ``tp_size`` ranks: this rank's weight takes
    ``n_in`` columns, but ``input_size`` reports the width over all ranks."""

    def __init__(self, n_in: int, n_out: int, *, tp_size: int) -> None:
        super().__init__(n_in, n_out)
        self.input_size, self.input_size_per_partition = n_in * tp_size, n_in


def test_warm_up_feeds_a_tensor_parallel_rank_its_own_attention_width():
    """Under --tensor-parallel-size 2 each rank's o_proj takes half the heads: warm-up rows of
    the unsharded width corrupted the heap in vLLM's CPU matmul (here: a shape error)."""
    torch._dynamo.reset()  # dynamo caches the bodies per code object: no graph of the tests above
    torch.manual_seed(0)
    inner = Inner()
    for layer in inner.layers:
        layer.self_attn.o_proj = RowParallelLinear(layer.self_attn.q_size, H, tp_size=2)
    compiled = CompiledLayers(inner)
    compiled.warm_up(dtype=torch.float32, device=torch.device("cpu"), max_rows=16)
    assert compiled.direct, compiled.direct_why
    _assert_layer_equals_eager(inner, compiled, 1, rows=5)


def test_warm_up_positions_exist_in_every_model():
    """Warm-up compiles for max_num_batched_tokens rows (on CPU 2048 x the TP size by default):
    positions 0..rows-1 ran past a 2048-position rotary table at --tensor-parallel-size 2.
    (The bit-exactness checks after the compiles use positions 0..4.)"""
    compiled = CompiledLayers(Inner())
    pre, post_pre, seen = compiled._pre, compiled._post_pre, []

    def spy(layer, positions, *rest):
        seen.append((positions.shape[0], int(positions.max())))
        return pre(layer, positions, *rest)

    def spy_pair(*args):
        seen.append((args[-1].shape[0], int(args[-1].max())))
        return post_pre(*args)

    compiled._pre, compiled._post_pre = spy, spy_pair
    compiled.warm_up(dtype=torch.float32, device=torch.device("cpu"), max_rows=64)
    assert seen.count((64, 0)) == 2 and max(m for _, m in seen) <= 4
