"""Emulated clients hold at most ``profile.max_layers`` layers, like real ones: a benchmark
whose server ignored the bound fails instead of replaying rows the client could not hold."""
import pytest
import torch

from harness.emulation import ReplayLayers
from vllm_split.wire import protocol as wire

N = 6
TIMES = dict(layer_prefill_s_per_token=1e-6, layer_decode_s=1e-6)


def replay(profile: wire.ClientProfile, split_layer="auto") -> ReplayLayers:
    states = torch.arange((N + 1) * 4 * 2, dtype=torch.float32).reshape(N + 1, 4, 2)
    return ReplayLayers(states, [1, 2, 3, 4], profile=profile, fingerprint="fp", split_layer=split_layer)


def test_replay_refuses_split_layers_above_the_profiles_bound():
    layers = replay(wire.ClientProfile(**TIMES, max_layers=3))
    assert (layers.split_layer, layers.max_layers) == (3, 3)
    with pytest.raises(ValueError, match=r"split layer 4 \(chosen by the server\) is above this client's memory "
                                         r"bound: it holds at most 3 decoder layers"):
        layers.use_split_layer(4)
    layers.use_split_layer(3)
    with pytest.raises(ValueError, match=r"split layer 5 \(fixed\) is above"):
        replay(wire.ClientProfile(**TIMES, max_layers=3), split_layer=5)
    assert replay(wire.ClientProfile(**TIMES)).split_layer == N  # no bound: every layer


async def test_a_client_holding_no_layer_replays_the_embeddings():
    layers = replay(wire.ClientProfile(max_layers=0))
    assert layers.split_layer == 0
    assert torch.equal(await layers.aforward([1, 2]), layers.states[0, 0:2])
