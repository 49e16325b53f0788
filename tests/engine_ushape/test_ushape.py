"""U-shaped split sessions on a real vLLM engine: the client runs [0, k) and [m, L), the LM
head and sampling; the server runs [k, m) in its continuous batch and returns layer-m rows.
Greedy generation equals the unsplit engine token for token (float32), alone and in batches
with prefix-split and ordinary requests, and no frame the client sends carries a token id."""
from __future__ import annotations

import asyncio

import pytest

from client_lib import SamplingOptions, SplitSession
from tests.engine_ushape.server_config import MAX_TOKENS, PAIRS
from tests.support.references import complete
from tests.support.sessions import RawSession, local_layers, split_generate, tail_layers, u_generate
from vllm_split.wire import protocol as wire

pytestmark = pytest.mark.engine


@pytest.mark.parametrize("k, m", PAIRS)
async def test_greedy_u_shape_equals_unsplit(k, m, u_server, reference, model_dir):
    for ids, expected in zip(reference.prompt_ids, reference.greedy):
        tokens, session = await u_generate(u_server.url, model_dir, k, m, ids, max_tokens=MAX_TOKENS,
                                           ignore_eos=True)
        assert (session.opened.split_layer, session.opened.return_layer) == (k, m)
        assert tokens == expected, f"U ({k}, {m}) diverged"
        assert session.stats.finish_reason == "length" and session.stats.num_output_tokens == MAX_TOKENS


async def test_u_sessions_batched_with_prefix_split_and_ordinary_requests(u_server, reference, model_dir):
    """Two U sessions, a prefix-split session and two ordinary requests at once: every
    request's tokens equal its unsplit reference."""
    ids, greedy = reference.prompt_ids, reference.greedy
    ordinary = [asyncio.to_thread(complete, u_server.url, str(model_dir), ids[i], max_tokens=MAX_TOKENS,
                                  temperature=0, ignore_eos=True) for i in (0, 2)]
    results = await asyncio.gather(
        u_generate(u_server.url, model_dir, 0, 30, ids[0], max_tokens=MAX_TOKENS, ignore_eos=True),
        u_generate(u_server.url, model_dir, 7, 22, ids[1], max_tokens=MAX_TOKENS, ignore_eos=True),
        split_generate(u_server.url, local_layers(model_dir, 15), ids[2], max_tokens=MAX_TOKENS, ignore_eos=True),
        *ordinary)
    assert results[0][0] == greedy[0] and results[1][0] == greedy[1] and results[2][0] == greedy[2]
    assert results[3]["token_ids"] == greedy[0] and results[4]["token_ids"] == greedy[2]


async def test_no_frame_from_the_client_carries_a_token_id(u_server, reference, model_dir, monkeypatch):
    """Every frame the client sends is recorded as encoded: an Open without token ids (its
    sampling is max_tokens alone, though the client stops on its own stop token), the
    layer-k rows and Close; never PromptTokens. The client stops at its stop token itself."""
    sent: list[bytes] = []
    original = SplitSession._send

    async def recording(self, msg):
        sent.append(wire.encode(msg))
        await original(self, msg)

    monkeypatch.setattr(SplitSession, "_send", recording)
    greedy = reference.greedy[1]
    stop = greedy[5]
    tokens, session = await u_generate(u_server.url, model_dir, 0, 30, reference.prompt_ids[1],
                                       max_tokens=MAX_TOKENS, ignore_eos=True, stop_token_ids=(stop,))
    assert tokens == greedy[: greedy.index(stop) + 1] and session.stats.finish_reason == "stop"
    frames = [wire.decode(f) for f in sent]
    assert {type(f) for f in frames} == {wire.Open, wire.Activation, wire.Close}
    open_ = frames[0]
    assert open_.u_shape and open_.sampling == wire.SamplingOptions(max_tokens=MAX_TOKENS)
    assert all(isinstance(f, wire.Activation) for f in frames[1:-1]) and isinstance(frames[-1], wire.Close)
    # one row per position: the prompt, then one per token but the last (no id anywhere)
    assert sum(f.rows for f in frames[1:-1]) == len(reference.prompt_ids[1]) + len(tokens) - 1


async def test_the_server_enforces_its_max_tokens(u_server, reference, model_dir):
    """The server stops at the Open's max_tokens (its limit): the last rows carry 'length' and
    Finished follows, even when the client would go on (here it ignores its own max)."""
    async with await SplitSession.create(u_server.url, local_layers(model_dir, 7), tail=tail_layers(model_dir, 22),
                                         sampling=SamplingOptions(max_tokens=4, ignore_eos=True)) as session:
        session.sampling = SamplingOptions(max_tokens=100, ignore_eos=True)  # the client's own limit, after Open
        tokens = [e.token_id async for e in session.generate(reference.prompt_ids[0])]
    assert tokens == reference.greedy[0][:4] and session.stats.finish_reason == "length"


@pytest.mark.parametrize("over, match", [
    ({"split_layer": 5, "return_layer": 31}, r"U shape \(split_layer 5, return_layer 31\) out of range: expected "
                                             r"0 <= split_layer < return_layer <= 30"),
    ({"split_layer": 5, "return_layer": 9, "sampling": wire.SamplingOptions(stop_token_ids=(2,))},
     r"sampling.stop_token_ids \[2\]: a U-shaped session samples on the client"),
])
async def test_invalid_u_shapes_are_refused_at_open(u_server, model_dir, over, match):
    import re

    fingerprint = local_layers(model_dir, 0).fingerprint
    async with await RawSession.connect(u_server.url) as raw:
        await raw.send(wire.Open(**{"model_fingerprint": fingerprint, "u_shape": True, **over}))
        err = await raw.recv()
    assert isinstance(err, wire.Error) and err.fatal and err.code == "split_layer", err
    assert re.search(match, err.message), err.message
