"""The client's U-shape tail: layers [m, L) + norm + LM head on TailLayers, fed the hidden
states at layer m, give the full model's logits, prefill and decode (a tiny random Llama
written by the test, no engine); the client's sampler."""
from __future__ import annotations

import pytest
import torch

from client_lib import LocalLayers, TailLayers
from client_lib.ushape import ClientSampler, check_u_layers
from tests.unit.client_lib.conftest import NUM_LAYERS
from vllm_split.wire import protocol as wire


@pytest.fixture(scope="module")
def full(tiny_chat_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float32).eval()


@pytest.mark.parametrize("m", [1, 2, NUM_LAYERS])
@torch.no_grad()
def test_tail_of_the_layer_m_rows_gives_the_full_models_logits(tiny_chat_model, full, m):
    """The rows the server returns are the hidden states entering layer m: here computed by
    a LocalLayers at split layer m (its own KV cache), prompt first, then one row per token."""
    at_m, tail = LocalLayers(tiny_chat_model, split_layer=m), TailLayers(tiny_chat_model, return_layer=m)
    ids = [5, 17, 42, 7, 99, 3]
    logits = tail.forward(at_m.forward(ids))
    assert torch.allclose(logits, full(torch.tensor([ids])).logits[0, -1], atol=1e-4)
    for token in [11, 23, 4]:
        row = at_m.forward([token])
        ids.append(token)
        assert torch.allclose(tail.forward(row), full(torch.tensor([ids])).logits[0, -1], atol=1e-4)
    assert tail.num_positions == len(ids)


def test_auto_tail_takes_the_servers_return_layer(tiny_chat_model):
    auto = TailLayers(tiny_chat_model)
    assert auto.auto and len(auto.model.layers) == 0  # until the server answers: m = L
    auto.use_return_layer(1)
    assert auto.return_layer == 1 and len(auto.model.layers) == NUM_LAYERS - 1
    assert [layer.self_attn.layer_idx for layer in auto.model.layers] == list(range(NUM_LAYERS - 1))


def test_bad_layers_are_refused_before_connecting(tiny_chat_model):
    with pytest.raises(ValueError, match="out of range"):
        TailLayers(tiny_chat_model, return_layer=0)
    with pytest.raises(ValueError, match="must be above split_layer 2"):
        check_u_layers(LocalLayers(tiny_chat_model, split_layer=2), TailLayers(tiny_chat_model, return_layer=2))
    with pytest.raises(ValueError, match="both split_layer and return_layer or neither"):
        check_u_layers(LocalLayers(tiny_chat_model), TailLayers(tiny_chat_model, return_layer=2))


def test_client_sampler_greedy_stops_and_seeded_sampling():
    logits = torch.tensor([0.1, 2.0, 0.3, 1.9])
    greedy = ClientSampler(wire.SamplingOptions(max_tokens=3, stop_token_ids=(1,)), eos_token_ids=(3,))
    assert greedy.sample(logits) == 1 and greedy.finish_reason(1, 1) == "stop"
    assert greedy.finish_reason(3, 1) == "stop" and greedy.finish_reason(2, 3) == "length"
    assert ClientSampler(wire.SamplingOptions(ignore_eos=True), (3,)).finish_reason(3, 1) is None
    options = wire.SamplingOptions(temperature=1.0, top_k=2, seed=7)
    a = [ClientSampler(options, ()).sample(logits) for _ in range(3)]
    assert set(a) <= {1, 3} and a == [ClientSampler(options, ()).sample(logits) for _ in range(3)]
