"""Session time limits: the deadline rules (fake clock) and the session driver that enforces them."""
from __future__ import annotations

import asyncio

import pytest
import torch

from vllm_split.wire import protocol as wire
from vllm_split.config import SplitConfig
from vllm_split.api.limits import SessionDeadlines
from vllm_split.api.session import ModelInfo, ServerSession, SessionError
from vllm_split.api.session_driver import run_session

MODEL = ModelInfo(fingerprint="fp", num_layers=4, hidden_size=8, dtype=torch.float32, max_model_len=128)


def test_idle_clock_runs_only_while_the_server_waits_on_the_client():
    d = SessionDeadlines(SplitConfig(idle_timeout_s=5, session_lifetime_s=0), now=0.0)
    assert d.observe("a", True, 0.0) is None
    assert d.observe("a", True, 4.9) is None
    assert d.observe("a", False, 100.0) is None  # the engine computes: the client owes nothing
    assert d.observe("a", True, 101.0) is None  # waiting again: the clock restarts
    assert d.observe("a", True, 106.0) == "idle_timeout"


def test_progress_restarts_the_idle_clock():
    d = SessionDeadlines(SplitConfig(idle_timeout_s=5, session_lifetime_s=0), now=0.0)
    for t in range(0, 50, 4):
        assert d.observe(("token", t), True, float(t)) is None
    assert d.observe(("token", 48), True, 53.0) == "idle_timeout"


def test_lifetime_counts_from_the_start_whatever_the_progress():
    d = SessionDeadlines(SplitConfig(idle_timeout_s=0, session_lifetime_s=30), now=10.0)
    assert d.observe(1, False, 39.9) is None
    assert d.observe(2, True, 40.0) == "session_lifetime"


def test_zero_disables_both_limits():
    d = SessionDeadlines(SplitConfig(idle_timeout_s=0, session_lifetime_s=0), now=0.0)
    assert d.observe(1, True, 1e9) is None


def _session(config: SplitConfig, sent: list) -> ServerSession:
    async def send(msg):
        sent.append(msg)

    return ServerSession(engine=None, model=MODEL, config=config, send=send)


async def test_a_client_that_never_opens_is_timed_out_with_a_clear_error():
    sent: list = []
    session = _session(SplitConfig(idle_timeout_s=1), sent)

    async def receive():
        await asyncio.sleep(3600)

    with pytest.raises(SessionError, match=r"no frame within the idle limit of 1 s while the server waited for the Open frame"):
        await asyncio.wait_for(run_session(session=session, receive=receive), timeout=10)
    assert isinstance(sent[-1], wire.Error) and sent[-1].code == "idle_timeout" and sent[-1].fatal


async def test_prompt_chunks_keep_the_session_alive_until_they_stop():
    sent: list = []
    session = _session(SplitConfig(idle_timeout_s=1, session_lifetime_s=0), sent)
    frames = [wire.encode(wire.Open(model_fingerprint="fp", split_layer=2))]
    frames += [wire.encode(wire.Activation.from_tensor(torch.zeros(1, 8), start=i)) for i in range(4)]

    async def receive():
        if frames:
            await asyncio.sleep(0.6)  # each gap is below the limit, the total is above it
            return frames.pop(0)
        await asyncio.sleep(3600)

    with pytest.raises(SessionError, match=r"waited for the prompt chunk at position 4"):
        await asyncio.wait_for(run_session(session=session, receive=receive), timeout=20)
    assert isinstance(sent[0], wire.Opened)


async def test_lifetime_ends_a_busy_session():
    sent: list = []
    session = _session(SplitConfig(idle_timeout_s=0, session_lifetime_s=1), sent)

    async def receive():
        await asyncio.sleep(3600)

    with pytest.raises(SessionError, match=r"the session lifetime limit of 1 s was reached after 0 tokens"):
        await asyncio.wait_for(run_session(session=session, receive=receive), timeout=10)
    assert sent[-1].code == "session_lifetime"


async def test_max_tokens_above_the_cap_is_refused_at_open():
    sent: list = []
    session = _session(SplitConfig(max_tokens_per_session=16), sent)
    with pytest.raises(SessionError, match=r"max_tokens 17 exceeds this server's limit of 16 tokens per session"):
        await session.handle_open(wire.Open(model_fingerprint="fp", split_layer=2,
                                            sampling=wire.SamplingOptions(max_tokens=17)))
    await session.handle_open(wire.Open(model_fingerprint="fp", split_layer=2,
                                        sampling=wire.SamplingOptions(max_tokens=16)))
    assert isinstance(sent[-1], wire.Opened)


async def test_sampling_vllm_refuses_is_refused_at_open():
    sent: list = []
    session = _session(SplitConfig(), sent)
    with pytest.raises(SessionError, match=r"sampling options refused: temperature must be in \[0, 2\], got 1000000.0"):
        await session.handle_open(wire.Open(model_fingerprint="fp", split_layer=2,
                                            sampling=wire.SamplingOptions(temperature=1e6)))
    assert sent == []  # no Opened: the client learns before it sends its prompt
