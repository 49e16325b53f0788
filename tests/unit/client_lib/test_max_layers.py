"""The client's memory bound: ``LocalLayers(max_layers=M)`` loads only M layers, refuses a
split layer above them, and the session sends the bound in ``Open.client`` (a tiny random
Llama checkpoint written by the test; a fake server, no engine)."""
from __future__ import annotations

import pytest
import torch
from aiohttp import web

from client_lib import LocalLayers, LocalLayersError, SamplingOptions, SplitSession
from client_lib.client_profile import client_profile, with_bound
from tests.unit.client_lib.test_resume import _serve
from vllm_split.wire import protocol as wire

NUM_LAYERS, HIDDEN = 4, 16


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=NUM_LAYERS,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(autouse=True)
def profile_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_SPLIT_CACHE", str(tmp_path))


def test_auto_with_a_bound_loads_only_that_many_layers_and_computes_the_same_rows(tiny_model):
    full = LocalLayers(tiny_model)
    bounded = LocalLayers(tiny_model, max_layers=2)
    assert (full.split_layer, len(full.model.layers), full.max_layers) == (NUM_LAYERS, NUM_LAYERS, None)
    assert (bounded.split_layer, len(bounded.model.layers), bounded.max_layers) == (2, 2, 2)
    assert bounded.auto and bounded.num_layers == NUM_LAYERS
    full.use_split_layer(2)
    assert torch.equal(bounded.forward([1, 2, 3]), full.forward([1, 2, 3]))
    assert LocalLayers(tiny_model, max_layers=99).split_layer == NUM_LAYERS  # a bound above the model binds nothing


def test_split_layers_above_the_bound_are_refused(tiny_model):
    layers = LocalLayers(tiny_model, max_layers=2)
    with pytest.raises(LocalLayersError, match=r"split layer 3 needs layers this client did not load "
                                               r"\(it has 2, max_layers 2\)"):
        layers.use_split_layer(3)
    layers.use_split_layer(1)
    assert len(layers.model.layers) == 1
    with pytest.raises(LocalLayersError, match=r"split_layer 3 out of range: .*0 <= split_layer <= 2 \(max_layers 2\)"):
        LocalLayers(tiny_model, split_layer=3, max_layers=2)
    with pytest.raises(LocalLayersError, match=r"max_layers -1: expected None \(no bound\) or an int >= 0"):
        LocalLayers(tiny_model, max_layers=-1)
    none = LocalLayers(tiny_model, max_layers=0)
    assert none.split_layer == 0 and none.forward([1, 2]).shape == (2, HIDDEN)


def test_the_profile_carries_the_bound(tiny_model):
    assert client_profile(LocalLayers(tiny_model)).max_layers is None
    measured = client_profile(LocalLayers(tiny_model, max_layers=3))
    assert measured.max_layers == 3 and measured.layer_decode_s > 0
    assert client_profile(LocalLayers(tiny_model, max_layers=0)) == wire.ClientProfile(max_layers=0)
    declared = wire.ClientProfile(flops_per_s=1e12, max_layers=1)
    assert with_bound(declared, 3) == declared and with_bound(declared, None) == declared
    assert with_bound(wire.ClientProfile(flops_per_s=1e12), 3).max_layers == 3


class OneTokenServer:
    """Records the Open, answers it at ``split_layer``, then one token per prompt."""

    def __init__(self, split_layer: int) -> None:
        self.split_layer = split_layer
        self.opens: list[wire.Open] = []

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.opens.append(wire.decode((await ws.receive()).data))
        await ws.send_bytes(wire.encode(wire.Opened(session_id="s", split_layer=self.split_layer,
                                                    num_layers=NUM_LAYERS, hidden_size=HIDDEN, dtype="float32",
                                                    max_frame_bytes=1 << 20)))
        msg = await ws.receive()
        if msg.type == web.WSMsgType.BINARY:
            await ws.send_bytes(wire.encode(wire.Token(index=0, token_id=5, finish_reason="length")))
            await ws.send_bytes(wire.encode(wire.Finished(finish_reason="length", num_prompt_tokens=3,
                                                          num_output_tokens=1)))
        await ws.close()
        return ws


async def _run(server: OneTokenServer, layers, profile=None) -> list[int]:
    runner, url = await _serve(server)
    try:
        async with await SplitSession.create(url, layers, profile=profile,
                                             sampling=SamplingOptions(max_tokens=1)) as session:
            return [e.token_id async for e in session.generate([1, 2, 3])]
    finally:
        await runner.cleanup()


async def test_the_session_sends_the_bound_and_refuses_a_server_that_ignores_it(tiny_model):
    server = OneTokenServer(split_layer=2)
    assert await _run(server, LocalLayers(tiny_model, max_layers=2)) == [5]
    assert server.opens[0].split_layer is None and server.opens[0].client.max_layers == 2
    explicit = wire.ClientProfile(layer_prefill_s_per_token=1e-4, layer_decode_s=1e-3)
    await _run(server, LocalLayers(tiny_model, max_layers=2), profile=explicit)
    assert server.opens[1].client == wire.ClientProfile(layer_prefill_s_per_token=1e-4, layer_decode_s=1e-3,
                                                        max_layers=2)
    with pytest.raises(LocalLayersError, match=r"split layer 3 needs layers this client did not load"):
        await _run(OneTokenServer(split_layer=3), LocalLayers(tiny_model, max_layers=2))
    unbounded = OneTokenServer(split_layer=3)
    await _run(unbounded, LocalLayers(tiny_model))  # no bound given: nothing changes
    assert unbounded.opens[0].client.max_layers is None
