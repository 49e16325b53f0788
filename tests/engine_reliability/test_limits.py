"""Every configured limit holds on a real engine, with a clear error, and frees what it held."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from tests.support.sessions import RawSession, local_layers
from tests.engine_reliability.server_config import LIMITS, NUM_KV_BLOCKS
from tests.engine_reliability.helpers import expect_error, opened, wait_idle
from vllm_split.wire import protocol as wire
from harness.server_process import kv_blocks_in_use, metrics

pytestmark = pytest.mark.engine


async def test_max_sessions(box, model_dir):
    layers = local_layers(model_dir, 7)
    limit = LIMITS["max-sessions"]
    raws = [await opened(box.url, layers) for _ in range(limit)]
    try:
        async with await RawSession.connect(box.url) as extra:
            await expect_error(extra, "too_many_sessions", f"server has {limit} open split sessions, the limit is {limit}",
                               fatal=True)
            assert await extra.recv() is None  # closed
        await raws.pop().close()
        await asyncio.sleep(0.5)
        raws.append(await opened(box.url, layers))  # a slot is free again
    finally:
        for raw in raws:
            await raw.close()


async def test_max_prompt_tokens(box, model_dir):
    layers = local_layers(model_dir, 7)
    async with await opened(box.url, layers) as raw:
        limit = LIMITS["max-prompt-tokens"]
        await raw.send(wire.Activation.from_tensor(torch.zeros(limit, 576), start=0))  # exactly at the limit: fine
        await raw.send(wire.Activation.from_tensor(torch.zeros(1, 576), start=limit, end_of_prompt=True))
        await expect_error(raw, "prompt_too_long", f"prompt of {limit + 1} tokens exceeds the limit of {limit} tokens",
                           fatal=True)


async def test_max_tokens_per_session(box, model_dir):
    layers = local_layers(model_dir, 7)
    cap = LIMITS["max-tokens-per-session"]
    async with await RawSession.connect(box.url) as raw:
        await raw.send(wire.Open(model_fingerprint=layers.fingerprint, split_layer=7,
                                 sampling=wire.SamplingOptions(max_tokens=cap + 1)))
        await expect_error(raw, "max_tokens", f"max_tokens {cap + 1} exceeds this server's limit of {cap} tokens per session",
                           fatal=True)


async def test_max_frame_bytes(box, model_dir):
    layers = local_layers(model_dir, 7)
    async with await opened(box.url, layers) as raw:
        frame = wire.encode(wire.Activation.from_tensor(torch.zeros(460, 576), start=0))
        assert len(frame) > LIMITS["max-frame-bytes"]
        await raw.send(frame)
        await expect_error(raw, "protocol", f"frame of {len(frame)} bytes exceeds the limit of {LIMITS['max-frame-bytes']} bytes",
                           fatal=False)


async def test_idle_client_is_aborted_and_its_kv_freed(box, reference, model_dir):
    layers = local_layers(model_dir, 7)
    ids = reference.prompt_ids[0]
    async with await opened(box.url, layers, max_tokens=8, ignore_eos=True) as raw:
        layers.reset()
        await raw.send(wire.Activation.from_tensor(layers.forward(ids), start=0, end_of_prompt=True))
        token = await raw.recv()
        assert isinstance(token, wire.Token) and token.token_id == reference.greedy[0][0]
        held = await asyncio.to_thread(metrics, box.url)
        assert held["num_gpu_blocks"] == NUM_KV_BLOCKS and kv_blocks_in_use(held) > 0  # held while it waits for us
        t0 = time.monotonic()
        await expect_error(raw, "idle_timeout", f"no frame within the idle limit of {LIMITS['idle-timeout-s']} s while the "
                           f"server waited for the activation for position {len(ids)} (token 0 was sent)", fatal=True,
                           timeout=30)
        assert LIMITS["idle-timeout-s"] - 0.5 <= time.monotonic() - t0 <= LIMITS["idle-timeout-s"] + 3
        assert await raw.recv() is None
    await wait_idle(box.url)


async def test_session_lifetime_ends_a_slow_but_live_client(box, reference, model_dir):
    layers = local_layers(model_dir, 15)
    ids = reference.prompt_ids[1]
    lifetime, pace = LIMITS["session-lifetime-s"], LIMITS["idle-timeout-s"] * 0.6
    t0 = time.monotonic()
    tokens = []
    async with await opened(box.url, layers, max_tokens=40, ignore_eos=True) as raw:
        layers.reset()
        await raw.send(wire.Activation.from_tensor(layers.forward(ids), start=0, end_of_prompt=True))
        while True:
            msg = await raw.recv(timeout=30)
            if isinstance(msg, wire.Error):
                break
            assert isinstance(msg, wire.Token), msg
            tokens.append(msg.token_id)
            await asyncio.sleep(pace)  # within the idle limit every time
            await raw.send(wire.Activation.from_tensor(layers.forward([msg.token_id]), start=len(ids) + msg.index))
        assert (msg.code, msg.fatal) == ("session_lifetime", True), msg
        assert f"the session lifetime limit of {lifetime} s was reached after {len(tokens)} tokens" in msg.message
    assert lifetime - 0.5 <= time.monotonic() - t0 <= lifetime + 4
    assert 2 <= len(tokens) < 40 and tokens == reference.greedy[1][: len(tokens)]
    await wait_idle(box.url)


@pytest.mark.parametrize("sampling, match", [
    ({"temperature": 1e6}, "sampling options refused: temperature must be in [0, 2], got 1000000.0"),
    ({"stop_token_ids": (10**9,)}, "sampling options refused: token_id(s) [1000000000] in stop_token_ids contain out-of-vocab"),
])
async def test_sampling_the_engine_would_refuse_is_refused_at_open(box, model_dir, sampling, match):
    """Found by fuzz_live: these used to pass Open and fail after the prompt as 'internal'."""
    layers = local_layers(model_dir, 7)
    async with await RawSession.connect(box.url) as raw:
        await raw.send(wire.Open(model_fingerprint=layers.fingerprint, split_layer=7,
                                 sampling=wire.SamplingOptions(max_tokens=8, **sampling)))
        await expect_error(raw, "sampling", match, fatal=True)
