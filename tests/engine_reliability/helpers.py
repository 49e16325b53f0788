"""Helpers for the reliability tests: raw sessions, waiting for the server to be idle."""
from __future__ import annotations

import asyncio
import time

from tests.support.sessions import RawSession
from vllm_split.wire import protocol as wire
from harness.server_process import kv_blocks_in_use, metrics


async def opened(url: str, layers, **sampling) -> RawSession:
    sampling.setdefault("max_tokens", 8)  # within the test server's max_tokens_per_session
    raw = await RawSession.connect(url)
    await raw.send(wire.Open(model_fingerprint=layers.fingerprint, split_layer=layers.split_layer,
                             sampling=wire.SamplingOptions(**sampling)))
    msg = await raw.recv()
    assert isinstance(msg, wire.Opened), msg
    return raw


async def expect_error(raw: RawSession, code: str, match: str, *, fatal: bool, timeout: float = 60) -> wire.Error:
    msg = await raw.recv(timeout=timeout)
    assert isinstance(msg, wire.Error), msg
    assert (msg.code, msg.fatal) == (code, fatal), msg
    assert match in msg.message, msg.message
    return msg


async def wait_idle(url: str, timeout: float = 60) -> dict[str, float]:
    """Wait until no request runs or waits and no KV block is held; returns the metrics."""
    deadline = time.monotonic() + timeout
    while True:
        m = await asyncio.to_thread(metrics, url)
        if m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0 and kv_blocks_in_use(m) == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle after {timeout}s: running {m['vllm:num_requests_running']}, "
                                 f"waiting {m['vllm:num_requests_waiting']}, KV blocks {kv_blocks_in_use(m)}")
        await asyncio.sleep(0.25)
