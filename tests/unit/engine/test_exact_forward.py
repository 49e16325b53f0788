"""exact_forward resumes the decoder loop at each row's split layer, exactly (no engine).

A tiny pure-torch model follows vLLM's decoder-layer contract: ``layer(positions, h,
residual) -> (h, residual)`` with the true hidden state between layers being
``h + residual``, and ``norm(h)`` / ``norm(h, residual) -> (norm(h + residual), h + residual)``.
Its layers mix tokens causally within each request (a request starts where positions
restart at 0), like attention, so a wrong injection would leak into later tokens.
"""
from __future__ import annotations

import types

import pytest
import torch
from torch import nn

pytest.importorskip("vllm")

import vllm_split.engine.exact_forward as sf  # noqa: E402
from vllm_split.engine.exact_forward import SplitRows, UnsupportedModelError, check_supported, exact_forward  # noqa: E402

VOCAB, H, L = 50, 16, 6


class TinyNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(H))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self._norm(h)
        total = h + residual
        return self._norm(total), total


def _request_causal_mean(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Mean of x over the same request's tokens up to this one (a stand-in for attention)."""
    out = torch.empty_like(x)
    starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
    for begin, end in zip(starts, starts[1:]):
        seg = x[begin:end]
        count = torch.arange(1, end - begin + 1, dtype=x.dtype).unsqueeze(1)
        out[begin:end] = seg.cumsum(0) / count
    return out


class TinyLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_norm = TinyNorm()
        self.mix = nn.Linear(H, H)
        self.mlp = nn.Sequential(nn.Linear(H, 2 * H), nn.Tanh(), nn.Linear(2 * H, H))
        self.pos = nn.Parameter(0.01 * torch.randn(H))

    def forward(self, positions, h, residual, **kwargs):
        assert not kwargs or set(kwargs) == {"extra"}
        if residual is None:
            residual = h
            h = self.input_norm(h)
        else:
            residual = h + residual
            h = self.input_norm(residual)
        h = h + self.mix(_request_causal_mean(h, positions)) + positions.unsqueeze(1).to(h.dtype) * self.pos
        return self.mlp(h), residual


class TinyInner(nn.Module):
    """The attributes exact_forward uses on a vLLM inner model (LlamaModel and relatives)."""

    def __init__(self, num_layers: int = L) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, H)
        self.layers = nn.ModuleList(TinyLayer() for _ in range(num_layers))
        self.norm = TinyNorm()
        self.start_layer, self.end_layer = 0, num_layers

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


def _pp(first: bool = True, last: bool = True):
    return types.SimpleNamespace(is_first_rank=first, is_last_rank=last)


@pytest.fixture(autouse=True)
def single_rank(monkeypatch):
    monkeypatch.setattr(sf, "get_pp_group", lambda: _pp())


@pytest.fixture
def inner():
    torch.manual_seed(0)
    return TinyInner().eval()


def _batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened batch of requests: (input_ids, positions restarting at 0 per request)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (sum(lengths),), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths])
    return ids, positions


@torch.no_grad()
def _reference(inner: TinyInner, ids: torch.Tensor, positions: torch.Tensor):
    """Plain full run: final output and the true hidden state entering each layer 0..L."""
    h, residual = inner.embed_input_ids(ids), None
    entering = []
    for layer in inner.layers:
        entering.append(h if residual is None else h + residual)
        h, residual = layer(positions, h, residual)
    entering.append(h + residual)  # entering the final norm (k = L)
    out, _ = inner.norm(h, residual)
    return out, entering


@torch.no_grad()
def _split(inner, groups, ids, positions, **kw):
    return exact_forward(inner, groups=groups, input_ids=ids, positions=positions, intermediate_tensors=None, **kw)


def _rows(k: int, index: list[int], entering) -> SplitRows:
    index_t = torch.tensor(index, dtype=torch.long)
    return SplitRows(split_layer=k, index=index_t, hidden=entering[k][index_t].clone())


def test_no_groups_is_the_plain_loop(inner):
    ids, positions = _batch([5, 3])
    ref, _ = _reference(inner, ids, positions)
    assert torch.equal(_split(inner, [], ids, positions), ref)


@pytest.mark.parametrize("k", [0, 1, L // 2, L - 1, L], ids=lambda k: f"k={k}")
def test_injected_request_gives_the_full_run_output(inner, k):
    """A client request (tokens 4..9) enters at layer k; the server never sees its token ids."""
    lengths = [4, 6, 3]
    ids, positions = _batch(lengths)
    ref, entering = _reference(inner, ids, positions)
    client = list(range(4, 10))
    garbage_ids = ids.clone()
    garbage_ids[client] = 0  # layers below k run on these and must not matter
    out = _split(inner, [_rows(k, client, entering)], garbage_ids, positions)
    # exact in float32: x = h + residual enters as h = x, residual = 0
    assert torch.equal(out[client], ref[client])
    others = [i for i in range(len(ids)) if i not in client]
    assert torch.equal(out[others], ref[others])  # requests not in any group are unaffected


def test_garbage_below_the_split_layer_really_differs(inner):
    """Guards the test above: without injection, the placeholder ids change the output."""
    ids, positions = _batch([4, 6, 3])
    ref, _ = _reference(inner, ids, positions)
    garbage_ids = ids.clone()
    garbage_ids[4:10] = 0
    out = _split(inner, [], garbage_ids, positions)
    assert not torch.allclose(out[4:10], ref[4:10], atol=1e-3)
    assert torch.equal(out[:4], ref[:4]) and torch.equal(out[10:], ref[10:])


def test_injection_replaces_the_residual_too(inner):
    """Rows injected with a wrong hidden state give a different result: the residual is not kept."""
    ids, positions = _batch([5])
    ref, entering = _reference(inner, ids, positions)
    rows = _rows(3, list(range(5)), entering)
    rows.hidden = rows.hidden + 0.5
    assert not torch.allclose(_split(inner, [rows], ids, positions), ref, atol=1e-3)


def test_mixed_batch_with_a_different_layer_per_request(inner):
    lengths = [3, 5, 2, 4, 6]  # request 0 is an ordinary (unsplit) request
    ids, positions = _batch(lengths, seed=7)
    ref, entering = _reference(inner, ids, positions)
    bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
    req = [list(range(bounds[i], bounds[i + 1])) for i in range(len(lengths))]
    # requests 1 and 4 share a split layer, so they form one group, given out of order
    groups = [
        _rows(L, req[3], entering),
        SplitRows(split_layer=2, index=torch.tensor(req[4] + req[1]),
                  hidden=torch.cat([entering[2][req[4]], entering[2][req[1]]])),
        _rows(0, req[2], entering),
    ]
    garbage_ids = torch.zeros_like(ids)
    garbage_ids[req[0]] = ids[req[0]]
    out = _split(inner, groups, garbage_ids, positions)
    for r in req:
        assert torch.equal(out[r], ref[r]), r


def test_two_groups_at_the_same_layer(inner):
    ids, positions = _batch([3, 4, 2])
    ref, entering = _reference(inner, ids, positions)
    groups = [_rows(4, [0, 1, 2], entering), _rows(4, [7, 8], entering)]
    out = _split(inner, groups, torch.zeros_like(ids), positions)
    assert torch.equal(out[[0, 1, 2, 7, 8]], ref[[0, 1, 2, 7, 8]])


def test_float64_model_with_float32_rows_is_close(inner):
    """Rows arrive in the wire dtype and are cast to the model's."""
    inner = inner.double()
    ids, positions = _batch([6])
    ref, entering = _reference(inner, ids, positions)
    rows = _rows(2, list(range(6)), entering)
    rows.hidden = rows.hidden.float()
    out = _split(inner, [rows], torch.zeros_like(ids), positions)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_extra_layer_kwargs_reach_the_layers(inner):
    seen = []
    for layer in inner.layers:
        layer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    ids, positions = _batch([3])
    _split(inner, [], ids, positions, extra=1)
    assert seen == [{"extra": 1}] * L


def test_inputs_embeds_replace_the_embedding(inner):
    ids, positions = _batch([4])
    ref, entering = _reference(inner, ids, positions)
    out = _split(inner, [], None, positions, inputs_embeds=entering[0])
    assert torch.equal(out, ref)


def test_pipeline_ranks_compose_to_the_single_rank_result(inner, monkeypatch):
    """First rank returns IntermediateTensors; the next rank injects its rows into them."""
    ids, positions = _batch([4, 5])
    ref, entering = _reference(inner, ids, positions)
    groups = [_rows(1, [0, 1, 2, 3], entering), _rows(4, [4, 5, 6, 7, 8], entering)]  # one per rank
    garbage_ids = torch.zeros_like(ids)

    monkeypatch.setattr(sf, "get_pp_group", lambda: _pp(first=True, last=False))
    inner.start_layer, inner.end_layer = 0, 3
    mid = _split(inner, groups, garbage_ids, positions)
    assert set(mid.tensors) == {"hidden_states", "residual"}

    monkeypatch.setattr(sf, "get_pp_group", lambda: _pp(first=False, last=True))
    inner.start_layer, inner.end_layer = 3, L
    with torch.no_grad():
        out = exact_forward(inner, groups=groups, input_ids=None, positions=positions, intermediate_tensors=mid)
    assert torch.equal(out, ref)


# ---------------------------------------------------------------- check_supported
class CustomLoopModel(nn.Module):
    """An inner model with its own forward (not one of the standard loops)."""

    def forward(self, *args):
        raise NotImplementedError


class CausalLM(nn.Module):
    def __init__(self, inner: nn.Module | None) -> None:
        super().__init__()
        if inner is not None:
            self.model = inner


def test_check_supported_rejects_a_non_standard_loop_naming_the_classes():
    with pytest.raises(UnsupportedModelError,
                       match=r"vllm-split cannot resume CausalLM \(inner model CustomLoopModel\): "
                             r"its decoder loop is not one of the supported standard loops "
                             r"\['LlamaModel', 'Qwen2Model'\].*without the vllm-split plugin"):
        check_supported(CausalLM(CustomLoopModel()))


def test_check_supported_rejects_our_tiny_model_too(inner):
    """Duck typing is not enough: only the known forward functions are trusted."""
    with pytest.raises(UnsupportedModelError, match=r"inner model TinyInner"):
        check_supported(CausalLM(inner))


def test_check_supported_rejects_a_model_without_inner_model():
    with pytest.raises(UnsupportedModelError, match=r"vllm-split cannot resume CausalLM: its decoder loop"):
        check_supported(CausalLM(None))


def _bare(cls):
    """An instance of a vLLM model class without its __init__ (no vLLM config needed)."""
    obj = cls.__new__(cls)
    nn.Module.__init__(obj)
    return obj


def _standard(cls):
    obj = _bare(cls)
    obj.layers = nn.ModuleList()
    obj.norm = nn.Identity()
    obj.start_layer, obj.end_layer = 0, 0
    return obj


@pytest.mark.parametrize("module, name", [("llama", "LlamaModel"), ("qwen2", "Qwen2Model"), ("qwen3", "Qwen3Model")])
def test_check_supported_accepts_the_standard_loops(module, name):
    cls = getattr(__import__(f"vllm.model_executor.models.{module}", fromlist=[name]), name)
    inner = _standard(cls)
    assert check_supported(CausalLM(inner)) is inner


def test_check_supported_rejects_a_subclass_that_overrides_forward():
    from vllm.model_executor.models.llama import LlamaModel

    custom = type("MyLlamaVariant", (LlamaModel,), {"forward": lambda self, *a, **k: None})
    with pytest.raises(UnsupportedModelError, match=r"inner model MyLlamaVariant"):
        check_supported(CausalLM(_standard(custom)))


def test_check_supported_names_a_missing_attribute():
    from vllm.model_executor.models.llama import LlamaModel

    inner = _standard(LlamaModel)
    del inner.norm
    with pytest.raises(UnsupportedModelError, match=r"vllm-split: LlamaModel has no attribute 'norm'"):
        check_supported(CausalLM(inner))


def test_check_supported_refuses_mistral_with_a_clear_message():
    # vLLM's MistralModel has its own forward (extra t_cond norm): not the standard loop.
    from vllm.model_executor.models.mistral import MistralModel

    inner = _standard(MistralModel)
    with pytest.raises(UnsupportedModelError, match=r"inner model MistralModel.*not one of the supported standard loops"):
        check_supported(CausalLM(inner))
