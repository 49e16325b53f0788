"""Server decoding at k = 0: the client sends token ids once, no activation per token, and the
tokens equal the unsplit engine's; beside split sessions; bad frames refused, session usable."""
from __future__ import annotations

import asyncio

import pytest

from client_lib import SamplingOptions, SplitSession
from tests.engine.server_config import MAX_TOKENS
from tests.support.references import complete
from harness.server_process import split_metrics
from tests.support.sessions import RawSession, local_layers, split_generate
from vllm_split.wire import protocol as wire

pytestmark = pytest.mark.engine


async def _decoded(url: str, layers, ids: list[int], max_tokens: int) -> tuple[list[int], SplitSession, list[str]]:
    """A k = 0 session with the library's default offer; the kinds of every frame it sent."""
    sent: list[str] = []
    tokens = []
    async with await SplitSession.create(url, layers, sampling=SamplingOptions(max_tokens=max_tokens, ignore_eos=True)) as s:
        send = s._send

        async def counting(msg):
            sent.append(type(msg).__name__)
            await send(msg)

        s._send = counting
        async for event in s.generate(ids):
            tokens.append(event.token_id)
    return tokens, s, sent


async def test_server_decoded_session_equals_unsplit_without_activations(split_server, reference, model_dir):
    layers = local_layers(model_dir, 0)
    before = split_metrics(split_server.url).get("vllm_split:sessions_server_decoded_total", 0.0)
    for ids, expected in zip(reference.prompt_ids, reference.greedy):
        tokens, session, sent = await _decoded(split_server.url, layers, ids, MAX_TOKENS)
        assert session.opened.server_decode and session.opened.split_layer == 0
        assert tokens == expected
        assert sent == ["PromptTokens"]  # Open went before the counter was attached; no Activation at all
        assert session.stats.num_prompt_tokens == len(ids) and session.stats.num_output_tokens == MAX_TOKENS
    after = split_metrics(split_server.url)["vllm_split:sessions_server_decoded_total"]
    assert after - before == len(reference.prompt_ids)


async def test_server_decoded_beside_split_and_ordinary_requests(split_server, reference, model_dir):
    decoded = _decoded(split_server.url, local_layers(model_dir, 0), reference.prompt_ids[0], MAX_TOKENS)
    split = [split_generate(split_server.url, local_layers(model_dir, k), reference.prompt_ids[i],
                            max_tokens=MAX_TOKENS, ignore_eos=True) for i, k in ((1, 7), (2, 15))]
    ordinary = asyncio.to_thread(complete, split_server.url, str(model_dir), reference.prompt_ids[3],
                                 max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    (tokens, session, _), (t7, _), (t15, _), plain = await asyncio.gather(decoded, *split, ordinary)
    assert session.opened.server_decode
    assert tokens == reference.greedy[0] and t7 == reference.greedy[1] and t15 == reference.greedy[2]
    assert plain["token_ids"] == reference.greedy[3]


async def test_the_offer_is_declined_above_k0(split_server, reference, model_dir):
    layers = local_layers(model_dir, 7)
    async with await SplitSession.create(split_server.url, layers, sampling=SamplingOptions(max_tokens=4, ignore_eos=True)) as s:
        tokens = [e.token_id async for e in s.generate(reference.prompt_ids[0])]
    assert not s.opened.server_decode and tokens == reference.greedy[0][:4]


async def test_bad_frames_of_a_server_decoded_session_are_refused(split_server, reference, model_dir):
    layers = local_layers(model_dir, 0)
    ids, expected = reference.prompt_ids[1], reference.greedy[1][:6]
    async with await RawSession.connect(split_server.url) as raw:
        await raw.send(wire.Open(model_fingerprint=layers.fingerprint, split_layer=0, server_decode=True,
                                 sampling=wire.SamplingOptions(max_tokens=6, ignore_eos=True)))
        opened = await raw.recv()
        assert isinstance(opened, wire.Opened) and opened.server_decode
        layers.reset()
        await raw.send(wire.Activation.from_tensor(layers.forward(ids), start=0, end_of_prompt=True))
        msg = await raw.recv()
        assert isinstance(msg, wire.Error) and msg.code == "out_of_turn" and not msg.fatal
        assert "expected the prompt as PromptTokens" in msg.message
        await raw.send(wire.PromptTokens.from_ids([1, 2, 10**6]))
        msg = await raw.recv()
        assert isinstance(msg, wire.Error) and msg.code == "protocol" and not msg.fatal
        assert "token id 1000000 is out of the model's vocabulary" in msg.message
        await raw.send(wire.PromptTokens.from_ids(ids))
        got, refused = [], None
        while True:
            msg = await raw.recv()
            if isinstance(msg, wire.Finished):
                break
            if isinstance(msg, wire.Error):
                refused = msg
                continue
            assert isinstance(msg, wire.Token), msg
            got.append(msg.token_id)
            if msg.index == 0:  # an activation nobody asked for: refused, the session goes on
                await raw.send(wire.Activation.from_tensor(layers.forward([msg.token_id]), start=len(ids)))
        assert got == expected
        assert refused is not None and refused.code == "out_of_turn" and not refused.fatal


async def test_declining_the_offer_keeps_activations_at_k0(split_server, reference, model_dir):
    tokens, session = await split_generate(split_server.url, local_layers(model_dir, 0), reference.prompt_ids[2],
                                           max_tokens=8, ignore_eos=True)
    assert not session.opened.server_decode and tokens == reference.greedy[2][:8]
