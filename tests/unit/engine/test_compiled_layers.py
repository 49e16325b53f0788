"""compiled_layers: the compiled bodies equal the eager layer, and one graph pair serves every
layer and row count (no recompilation after warm-up). A stand-in layer with the attribute
structure of vLLM's LlamaDecoderLayer (fused residual norm, tuple-returning projections)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

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
    torch.manual_seed(0)
    inner = Inner()
    compiled = CompiledLayers(inner, skip_guards=skip_guards)
    compiled.warm_up(dtype=torch.float32, device=torch.device("cpu"), max_rows=64)
    # without guards the captured bytecode is called directly (no dynamo frame evaluation)
    assert (compiled.direct, compiled.direct_why) == ((True, None) if skip_guards else (False, "guards kept"))
    graphs = compiled_graphs()
    for rows in (1, 2, 7, 40):
        positions, h0, res0 = torch.arange(rows), torch.randn(rows, H), torch.randn(rows, H)  # client rows: not
        with torch.inference_mode():                                                         # inference tensors
            for residual in (None, res0):
                h_ref, r_ref = h0, residual
                h, r = h0, residual
                for idx in range(len(inner.layers)):
                    h_ref, r_ref = inner.layers[idx](positions, h_ref, r_ref)
                    h, r = compiled(idx, positions, h, r)
                    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
                    torch.testing.assert_close(r, r_ref, rtol=1e-5, atol=1e-5)
    assert compiled_graphs() == graphs, "a layer or a row count recompiled after warm-up"


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
    positions, h0 = torch.arange(5), torch.randn(5, H)
    with torch.inference_mode():
        h_ref, r_ref = inner.layers[1](positions, h0, None)
        h, r = compiled(1, positions, h0, None)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r, r_ref, rtol=1e-5, atol=1e-5)


def test_warm_up_positions_exist_in_every_model():
    """Warm-up compiles for max_num_batched_tokens rows (on CPU 2048 x the TP size by default):
    positions 0..rows-1 ran past a 2048-position rotary table at --tensor-parallel-size 2."""
    compiled = CompiledLayers(Inner())
    pre, seen = compiled._pre, []

    def spy(layer, positions, *rest):
        seen.append(int(positions.max()))
        return pre(layer, positions, *rest)

    compiled._pre = spy
    compiled.warm_up(dtype=torch.float32, device=torch.device("cpu"), max_rows=64)
    assert seen and max(seen) == 0
