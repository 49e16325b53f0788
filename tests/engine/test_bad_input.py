"""Bad input gets a clear error, the server keeps serving everyone else, nothing leaks."""
from __future__ import annotations

import asyncio
import json
import struct
import time

import pytest
import torch

from tests.engine.server_config import MAX_TOKENS
from tests.support.sessions import RawSession, answer_tokens, local_layers, metrics, split_generate
from vllm_split.wire import protocol as wire

pytestmark = pytest.mark.engine


async def _opened(url: str, layers, **open_kw) -> RawSession:
    """A session opened at ``layers``' split layer; ``layers``' own KV cache emptied (the
    cached layers are shared by the tests, which run once per composition)."""
    layers.reset()
    raw = await RawSession.connect(url)
    await raw.send(wire.Open(model_fingerprint=layers.fingerprint, split_layer=layers.split_layer, **open_kw))
    assert isinstance(await raw.recv(), wire.Opened)
    return raw


def _frame(kind: int, meta: dict, payload: bytes = b"", version: int = wire.PROTOCOL_VERSION) -> bytes:
    m = json.dumps(meta).encode()
    return struct.pack("<4sBBI", wire.MAGIC, version, kind, len(m)) + m + payload


async def _expect_error(raw: RawSession, code: str, match: str, fatal: bool = False) -> None:
    msg = await raw.recv()
    assert isinstance(msg, wire.Error), msg
    assert msg.code == code and msg.fatal == fatal, msg
    assert match in msg.message, msg.message


async def _finish_good_prompt(raw: RawSession, layers, ids, expected) -> None:
    """The session still works after rejected frames: run it to the end, token-exact."""
    layers.reset()
    await raw.send(wire.Activation.from_tensor(layers.forward(ids), start=0, end_of_prompt=True))
    got, _ = await answer_tokens(raw, layers, len(ids))
    assert got == expected


async def test_rejected_frames_keep_the_session_usable(split_server, reference, model_dir):
    layers = local_layers(model_dir, 7)
    ids, expected = reference.prompt_ids[0], reference.greedy[0][:8]
    async with await _opened(split_server.url, layers, sampling=wire.SamplingOptions(max_tokens=8, ignore_eos=True)) as raw:
        h = layers.forward(ids)
        layers.reset()
        # wrong hidden size
        await raw.send(wire.Activation.from_tensor(torch.zeros(3, 100), start=0, end_of_prompt=True))
        await _expect_error(raw, "hidden_size", "hidden size 100, the model's is 576")
        # wrong dtype (int8 is not a wire dtype of the protocol; int8_row is)
        await raw.send(_frame(3, {"start": 0, "dtype": "int8", "shape": [1, 576], "end_of_prompt": True}, b"\0" * 576))
        await _expect_error(raw, "protocol", "dtype: expected one of ['float32', 'float16', 'bfloat16', 'int8_row', "
                                             "'int8_mixed', 'fp8_e4m3'], got 'int8'")
        # NaN and Inf
        bad = h.clone()
        bad[0, 0], bad[1, 5] = float("nan"), float("inf")
        await raw.send(wire.Activation.from_tensor(bad, start=0, end_of_prompt=True))
        await _expect_error(raw, "non_finite", "2 NaN or Inf value(s)")
        # out of turn: a chunk that skips positions
        await raw.send(wire.Activation.from_tensor(h[:2], start=5))
        await _expect_error(raw, "out_of_turn", "starts at position 5, expected 0")
        # garbage bytes, a text frame, a truncated header, a wrong protocol version, a payload that lies
        await raw.send(b"\x00garbage\xff" * 10)
        await _expect_error(raw, "protocol", "bad magic")
        await raw.ws.send_str("hello")
        await _expect_error(raw, "protocol", "expected a binary frame, got a text frame")
        await raw.send(b"VSPL\x01")
        await _expect_error(raw, "protocol", "shorter than the 10-byte header")
        await raw.send(_frame(7, {}, version=9))
        await _expect_error(raw, "protocol", "protocol version 9 is not supported")
        await raw.send(_frame(3, {"start": 0, "dtype": "float32", "shape": [4, 576]}, b"\0" * 100))
        await _expect_error(raw, "protocol", "needs 9216 bytes, got 100")
        await raw.send(struct.pack("<4sBBI", wire.MAGIC, 1, 3, 2**31) + b"{}")
        await _expect_error(raw, "protocol", "declared metadata length 2147483648 does not fit")
        await _finish_good_prompt(raw, layers, ids, expected)


async def test_decode_activation_out_of_turn(split_server, reference, model_dir):
    layers = local_layers(model_dir, 15)
    ids = reference.prompt_ids[1]
    async with await _opened(split_server.url, layers, sampling=wire.SamplingOptions(max_tokens=4, ignore_eos=True)) as raw:
        await raw.send(wire.Activation.from_tensor(layers.forward(ids), start=0, end_of_prompt=True))
        token = await raw.recv()
        assert isinstance(token, wire.Token) and token.index == 0
        row = layers.forward([token.token_id])
        await raw.send(wire.Activation.from_tensor(row, start=len(ids) + 3))
        await _expect_error(raw, "out_of_turn", f"expected 1 row at position {len(ids)}")
        await raw.send(wire.Activation.from_tensor(row, start=len(ids)))
        second = await raw.recv()
        assert isinstance(second, wire.Token) and second.token_id == reference.greedy[1][1]
        await raw.send(wire.Activation.from_tensor(row, start=len(ids)))  # a duplicate of an old step
        await _expect_error(raw, "out_of_turn", f"at position {len(ids)}: expected 1 row at position {len(ids) + 1}")


@pytest.mark.parametrize(
    "open_kw, code, match",
    [
        ({"split_layer": 31}, "split_layer", "split_layer 31 out of range: expected 0 <= split_layer <= 30"),
        ({"model_fingerprint": "fp1-0000"}, "fingerprint_mismatch", "client model fingerprint fp1-0000 does not match"),
        ({"protocol_version": 2}, "protocol_version", "client speaks protocol 2, server speaks 1"),
    ],
)
async def test_bad_open_is_refused(split_server, model_dir, open_kw, code, match):
    layers = local_layers(model_dir, 7)
    kw = {"model_fingerprint": layers.fingerprint, "split_layer": 7, **open_kw}
    async with await RawSession.connect(split_server.url) as raw:
        await raw.send(wire.Open(**kw))
        await _expect_error(raw, code, match, fatal=True)
        assert await raw.recv() is None  # the server closed the connection


async def test_activation_without_open_is_refused(split_server, model_dir):
    async with await RawSession.connect(split_server.url) as raw:
        await raw.send(wire.Activation.from_tensor(torch.zeros(1, 576), start=0, end_of_prompt=True))
        await _expect_error(raw, "out_of_turn", "expected Open as the first frame, got Activation", fatal=True)


async def test_oversized_frame_is_refused(split_server, model_dir):
    layers = local_layers(model_dir, 7)
    async with await _opened(split_server.url, layers) as raw:
        rows = (8 * 1024 * 1024) // (576 * 4) + 10  # just over the default 8 MiB limit
        await raw.send(wire.Activation.from_tensor(torch.zeros(rows, 576), start=0, end_of_prompt=True))
        frame_len = len(wire.encode(wire.Activation.from_tensor(torch.zeros(rows, 576), start=0, end_of_prompt=True)))
        await _expect_error(raw, "protocol", f"frame of {frame_len} bytes exceeds the limit of 8388608 bytes")


async def test_misbehaving_client_does_not_disturb_others(split_server, reference, model_dir):
    async def vandal():
        for _ in range(3):
            async with await RawSession.connect(split_server.url) as raw:
                await raw.send(b"\xde\xad\xbe\xef" * 1000)
                await raw.recv()
                await raw.send(wire.Open(model_fingerprint="nope", split_layer=99))
                await raw.recv()

    good = split_generate(split_server.url, local_layers(model_dir, 29), reference.prompt_ids[3],
                          max_tokens=MAX_TOKENS, ignore_eos=True)
    (tokens, _), _ = await asyncio.gather(good, vandal())
    assert tokens == reference.greedy[3]


async def _wait_for(pred, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = pred()
        if m is not None:
            return m
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


async def test_disconnect_mid_generation_aborts_and_frees_kv(split_server, reference, model_dir):
    layers = local_layers(model_dir, 7)
    ids = reference.prompt_ids[2] * 8  # a few hundred tokens: several KV blocks
    raw = await _opened(split_server.url, layers, sampling=wire.SamplingOptions(max_tokens=MAX_TOKENS, ignore_eos=True))
    await raw.send(wire.Activation.from_tensor(layers.forward(ids), start=0, end_of_prompt=True))
    token = await raw.recv()
    assert isinstance(token, wire.Token)
    # The request now waits for our activation, holding its KV blocks, without spinning.
    held = await _wait_for(lambda: (m := metrics(split_server.url))["vllm:num_requests_running"] == 1
                           and m["vllm:kv_cache_usage_perc"] > 0 and m or None, "the held request in metrics")
    assert held["vllm:kv_cache_usage_perc"] > 0
    await raw.ws.close()  # vanish mid-generation
    await raw.http.close()
    await _wait_for(lambda: (m := metrics(split_server.url))["vllm:num_requests_running"] == 0
                    and m["vllm:kv_cache_usage_perc"] == 0 or None, "the request to be aborted and its KV freed")
    # and the server still serves
    tokens, _ = await split_generate(split_server.url, layers, reference.prompt_ids[0], max_tokens=8, ignore_eos=True)
    assert tokens == reference.greedy[0][:8]
