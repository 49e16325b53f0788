"""The session driver over a fake engine: phases in order, every Error sent once from one
place, the engine request aborted whenever a session ends early, engine time not idle time."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
import torch

from vllm_split.wire import protocol as wire
from vllm_split.config import SplitConfig
from vllm_split.api.admission import AdmissionRefused
from vllm_split.api.session import ModelInfo, ServerSession, SessionError
from vllm_split.api.session_driver import run_session
from vllm_split.api.session_phase import SessionPhase
from vllm_split.wire.contract import UTILITY_DELIVER, UTILITY_RELEASE

P = SessionPhase
MODEL = ModelInfo(fingerprint="fp", num_layers=4, hidden_size=8, dtype=torch.float32, max_model_len=128)
PROMPT_LEN = 5


@dataclass
class _Completion:
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class _Output:
    outputs: list[_Completion]
    finished: bool


class FakeEngine:
    """Like the split scheduler: token j is computed once the activation for position
    ``prompt_len + j - 1`` has arrived (token 0 once the prompt has)."""

    def __init__(self, tokens: list[int], *, fail_at: int | None = None, compute_s: float = 0.0) -> None:
        self.tokens, self.fail_at, self.compute_s = tokens, fail_at, compute_s
        self.engine_core = self
        self.delivered: asyncio.Queue[int] = asyncio.Queue()
        self.aborted = False
        self.released: list[str] = []

    async def call_utility_async(self, name: str, *args):
        if name == UTILITY_DELIVER:
            self.delivered.put_nowait(args[1])
        elif name == UTILITY_RELEASE:
            self.released.append(args[0])
        return None

    async def generate(self, prompt, params, request_id: str):
        n = len(prompt["prompt_token_ids"])
        try:
            for j, token in enumerate(self.tokens):
                assert await self.delivered.get() == (0 if j == 0 else n + j - 1)
                await asyncio.sleep(self.compute_s)
                if j == self.fail_at:
                    raise RuntimeError(f"engine died at token {j}")
                last = j == len(self.tokens) - 1
                yield _Output([_Completion([token], "length" if last else None)], finished=last)
        except asyncio.CancelledError:
            self.aborted = True
            raise


@dataclass
class FakeClient:
    """Sends Open and the prompt, answers each Token with its activation (until ``stop_after``
    tokens: then it goes silent, or leaves when ``leave``); records what the server sent and
    the session's phase and ``awaiting`` at that moment."""

    session: ServerSession | None = None
    extra_prompt_frames: list = field(default_factory=list)
    stop_after: int | None = None
    leave: bool = False
    sent: list = field(default_factory=list)
    seen: list = field(default_factory=list)
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)

    def start(self, session: ServerSession) -> None:
        self.session = session
        self.inbox.put_nowait(wire.encode(wire.Open(model_fingerprint="fp", split_layer=2,
                                                    sampling=wire.SamplingOptions(max_tokens=3, ignore_eos=True))))
        for frame in self.extra_prompt_frames:
            self.inbox.put_nowait(frame)
        prompt = wire.Activation.from_tensor(torch.zeros(PROMPT_LEN, 8), start=0, end_of_prompt=True)
        self.inbox.put_nowait(wire.encode(prompt))

    async def send(self, msg: wire.Message) -> None:
        self.sent.append(msg)
        self.seen.append((type(msg).__name__, self.session.phase, self.session.awaiting))
        if isinstance(msg, wire.Token) and msg.finish_reason is None:
            if self.stop_after is not None and msg.index + 1 >= self.stop_after:
                if self.leave:
                    self.inbox.put_nowait(None)
                return
            row = wire.Activation.from_tensor(torch.zeros(1, 8), start=PROMPT_LEN + msg.index)
            self.inbox.put_nowait(wire.encode(row))

    async def receive(self):
        return await self.inbox.get()

    def errors(self) -> list[wire.Error]:
        return [m for m in self.sent if isinstance(m, wire.Error)]


def _session(engine, client: FakeClient, config: SplitConfig | None = None, controller=None) -> ServerSession:
    session = ServerSession(engine=engine, model=MODEL, config=config or SplitConfig(), send=client.send,
                            controller=controller)
    client.start(session)
    return session


async def test_a_session_walks_its_phases_in_order():
    engine, client = FakeEngine([11, 12, 13]), FakeClient()
    session = _session(engine, client)
    assert session.phase is P.OPENING and session.awaiting == "the Open frame"
    await asyncio.wait_for(run_session(session=session, receive=client.receive), timeout=10)
    assert client.seen == [
        ("Opened", P.PROMPTING, "the prompt chunk at position 0"),
        ("Token", P.DECODING, "the activation for position 5 (token 0 was sent)"),
        ("Token", P.DECODING, "the activation for position 6 (token 1 was sent)"),
        ("Token", P.DECODING, None),
        ("Finished", P.FINISHED, None),
    ]
    assert [m.token_id for m in client.sent if isinstance(m, wire.Token)] == [11, 12, 13]
    assert session.phase is P.FINISHED and not engine.aborted
    await session.release()
    await session.release()  # safe twice
    assert engine.released == [session.session_id]


async def test_refused_frames_are_answered_and_the_session_goes_on():
    bad_size = wire.encode(wire.Activation.from_tensor(torch.zeros(2, 3), start=0))
    engine = FakeEngine([11, 12, 13])
    client = FakeClient(extra_prompt_frames=[b"\x00garbage", bad_size])
    session = _session(engine, client)
    await asyncio.wait_for(run_session(session=session, receive=client.receive), timeout=10)
    errors = [(e.code, e.fatal) for e in client.errors()]
    assert errors == [("protocol", False), ("hidden_size", False)]
    assert [s[1] for s in client.seen[1:3]] == [P.PROMPTING, P.PROMPTING]
    assert isinstance(client.sent[-1], wire.Finished) and client.sent[-1].num_output_tokens == 3


class RefusingController:
    def __init__(self) -> None:
        self.phase_while_queued = None
        self.released = False

    async def admit(self, session_id, *args, **kwargs):
        session = self.session
        self.phase_while_queued = (session.phase, session.awaiting)
        raise AdmissionRefused("server_busy", "the admission queue is full (3 waiting, the limit is 3)", retry_after_s=2.5)

    async def release(self, *args, **kwargs):
        self.released = True


async def test_an_admission_refusal_is_sent_once_and_ends_the_session():
    engine, client, controller = FakeEngine([11]), FakeClient(), RefusingController()
    session = _session(engine, client, controller=controller)
    controller.session = session
    with pytest.raises(SessionError, match=r"the admission queue is full \(3 waiting, the limit is 3\)"):
        await asyncio.wait_for(run_session(session=session, receive=client.receive), timeout=10)
    assert controller.phase_while_queued == (P.ADMITTING, None)  # queueing is not the client idling
    assert client.sent == [wire.Error(code="server_busy", message="the admission queue is full (3 waiting, the limit is 3)",
                                      fatal=True, retry_after_s=2.5)]
    assert session.phase is P.FINISHED
    await session.release()
    assert not controller.released and engine.released == []  # nothing was admitted or delivered


async def test_an_engine_failure_is_sent_once_as_internal():
    engine, client = FakeEngine([11, 12, 13], fail_at=1), FakeClient()
    session = _session(engine, client)
    with pytest.raises(SessionError, match=r"RuntimeError: engine died at token 1") as err:
        await asyncio.wait_for(run_session(session=session, receive=client.receive), timeout=10)
    assert err.value.code == "internal" and isinstance(err.value.__cause__, RuntimeError)
    assert client.errors() == [wire.Error(code="internal", message="RuntimeError: engine died at token 1", fatal=True)]
    assert session.phase is P.FINISHED


async def test_a_client_leaving_mid_decode_aborts_the_request_without_an_error():
    engine, client = FakeEngine([11, 12, 13]), FakeClient(stop_after=1, leave=True)
    session = _session(engine, client)
    await asyncio.wait_for(run_session(session=session, receive=client.receive), timeout=10)
    assert engine.aborted and client.errors() == [] and session.phase is P.FINISHED


async def test_engine_time_is_not_idle_time_but_a_silent_client_is_timed_out():
    engine = FakeEngine([11, 12, 13], compute_s=1.5)  # each token takes longer than the idle limit
    client = FakeClient(stop_after=2)  # answers token 0, then goes silent
    session = _session(engine, client, config=SplitConfig(idle_timeout_s=1, session_lifetime_s=0))
    with pytest.raises(SessionError, match=r"no frame within the idle limit of 1 s while the server waited for the "
                                           r"activation for position 6 \(token 1 was sent\)"):
        await asyncio.wait_for(run_session(session=session, receive=client.receive), timeout=20)
    assert [type(m).__name__ for m in client.sent] == ["Opened", "Token", "Token", "Error"]
    assert client.sent[-1].code == "idle_timeout" and client.sent[-1].fatal
    assert engine.aborted and session.phase is P.FINISHED


def test_every_phase_may_end_and_finished_is_final():
    order = [P.OPENING, P.PROBING, P.ADMITTING, P.PROMPTING, P.PREFILLING, P.DECODING]
    assert all(p.may_enter(P.FINISHED) for p in order)
    assert not any(P.FINISHED.may_enter(p) for p in P)
    assert all(not later.may_enter(earlier) for i, later in enumerate(order) for earlier in order[:i + 1])
    assert P.OPENING.may_enter(P.PROMPTING) and not P.PROMPTING.may_enter(P.DECODING)
