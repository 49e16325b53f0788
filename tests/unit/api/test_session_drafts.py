"""Client drafts on the API server: negotiation at Open, decode activations with draft rows,
one ``Tokens`` frame per engine output, and the refusals; over a stand-in engine that
verifies drafts greedily against a fixed continuation, like vLLM's rejection sampler."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
import torch

from tests.unit.api.test_session_driver import _Completion, _Output
from tests.unit.engine.test_scheduler_drafts import TRUTH, greedy_verify
from vllm_split.api.session import ModelInfo, ServerSession, SessionError
from vllm_split.api.session_driver import run_session
from vllm_split.config import SplitConfig
from vllm_split.wire import protocol as wire
from vllm_split.wire.contract import UTILITY_DELIVER, UTILITY_RELEASE
from vllm_split.wire.drafts import accepted_drafts

HIDDEN = 8
MODEL = ModelInfo(fingerprint="fp", num_layers=4, hidden_size=HIDDEN, dtype=torch.float32, max_model_len=128,
                  vocab_size=1000)
PROMPT_LEN = 5


class DraftEngine:
    """Token 0 once the prompt has come; then, per delivery (the last token's row and d
    drafts), the accepted drafts and the next token of ``TRUTH``, cut at ``max_tokens``."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.engine_core = self
        self.deliveries: list[tuple] = []  # (start, num_rows, draft_ids)
        self._queue: asyncio.Queue = asyncio.Queue()
        self.released: list[str] = []

    async def call_utility_async(self, name: str, *args):
        if name == UTILITY_DELIVER:
            _, start, num_rows, _data, _turnaround, *rest = args
            delivery = (start, num_rows, tuple(rest[0]) if rest else ())
            self.deliveries.append(delivery)
            self._queue.put_nowait(delivery)
        elif name == UTILITY_RELEASE:
            self.released.append(args[0])
        return None

    async def generate(self, prompt, params, request_id: str):
        n = len(prompt["prompt_token_ids"])
        produced = 0
        while produced < self.max_tokens:
            start, num_rows, drafts = await self._queue.get()
            if produced == 0:
                assert (start, num_rows) == (0, n)
                ids = [TRUTH[0]]
            else:
                assert start == n + produced - 1 and num_rows == 1 + len(drafts)
                ids = greedy_verify(produced, drafts)
            ids = ids[: self.max_tokens - produced]
            produced += len(ids)
            last = produced == self.max_tokens
            yield _Output([_Completion(ids, "length" if last else None)], finished=last)


@dataclass
class DraftClient:
    """Asks for ``max_drafts``; after each answer sends the last token's row and ``gamma``
    drafts from ``TRUTH`` (the draft at ``wrong`` output index replaced: a rejection there)."""

    max_drafts: int = 4
    gamma: int = 4
    max_tokens: int = 10
    wrong: set = field(default_factory=set)
    before: list = field(default_factory=list)
    sent: list = field(default_factory=list)
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    server_decode: bool = False
    request_type: str = ""

    def start(self) -> None:
        self.inbox.put_nowait(wire.encode(wire.Open(
            model_fingerprint="fp", split_layer=0 if self.server_decode else 2, max_drafts=self.max_drafts,
            server_decode=self.server_decode, request_type=self.request_type,
            sampling=wire.SamplingOptions(max_tokens=self.max_tokens, ignore_eos=True))))
        for frame in self.before:
            self.inbox.put_nowait(frame)
        if self.server_decode:
            self.inbox.put_nowait(wire.encode(wire.PromptTokens.from_ids([1] * PROMPT_LEN)))
        else:
            self.inbox.put_nowait(wire.encode(wire.Activation.from_tensor(torch.zeros(PROMPT_LEN, HIDDEN), start=0,
                                                                          end_of_prompt=True)))

    def drafts_after(self, end: int) -> tuple[int, ...]:
        d = min(self.gamma, self.max_tokens - end - 1)
        return tuple(999 if end + j in self.wrong else TRUTH[end + j] for j in range(max(d, 0)))

    async def on_send(self, msg: wire.Message) -> None:
        self.sent.append(msg)
        if isinstance(msg, (wire.Tokens, wire.Token)) and msg.finish_reason is None and not self.server_decode:
            end = msg.end if isinstance(msg, wire.Tokens) else msg.index + 1
            drafts = self.drafts_after(end) if isinstance(msg, wire.Tokens) else ()
            rows = torch.zeros(1 + len(drafts), HIDDEN)
            self.inbox.put_nowait(wire.encode(wire.Activation.from_tensor(rows, start=PROMPT_LEN + end - 1,
                                                                          draft_ids=drafts)))

    async def receive(self):
        return await self.inbox.get()

    def of(self, kind) -> list:
        return [m for m in self.sent if isinstance(m, kind)]


async def _run(client: DraftClient, *, drafts: int = 4, engine=None,
               controller=None) -> tuple[ServerSession, DraftEngine]:
    engine = engine or DraftEngine(client.max_tokens)
    session = ServerSession(engine=engine, model=MODEL, config=SplitConfig(drafts=drafts), send=client.on_send,
                            controller=controller)
    client.start()
    await asyncio.wait_for(run_session(session=session, receive=client.receive), timeout=10)
    return session, engine


async def test_a_session_granted_drafts_gets_one_tokens_frame_per_step_and_the_greedy_tokens():
    client = DraftClient(max_drafts=3, gamma=3, max_tokens=10, wrong={5})
    session, engine = await _run(client, drafts=4)
    assert client.of(wire.Opened)[0].max_drafts == 3 and session.max_drafts == 3  # min(asked, server's K)
    frames = client.of(wire.Tokens)
    assert client.of(wire.Token) == [] and client.of(wire.Error) == []
    assert [t for f in frames for t in f.token_ids] == TRUTH[:10]
    assert [(f.index, len(f.token_ids)) for f in frames] == [(0, 1), (1, 4), (5, 1), (6, 4)]
    assert [f.finish_reason for f in frames] == [None, None, None, "length"]
    # each delivery: the last token's row at its position, then the drafts' rows
    assert engine.deliveries == [(0, PROMPT_LEN, ()), (PROMPT_LEN, 4, tuple(TRUTH[1:4])),
                                 (PROMPT_LEN + 4, 4, (999, TRUTH[6], TRUTH[7])),
                                 (PROMPT_LEN + 5, 4, tuple(TRUTH[6:9]))]
    accepted = [accepted_drafts(list(d), f.token_ids) for (_, _, d), f in zip(engine.deliveries[1:], frames[1:])]
    assert accepted == [3, 0, 3]
    finished = client.of(wire.Finished)[0]
    assert (finished.num_output_tokens, finished.finish_reason) == (10, "length") and session.num_output_tokens == 10
    ttft, tpot = session.measured_latencies()
    assert tpot is not None and tpot >= 0


async def test_a_granted_session_may_send_fewer_drafts_or_none():
    client = DraftClient(max_drafts=4, gamma=0, max_tokens=3)
    await _run(client, drafts=4)
    frames = client.of(wire.Tokens)
    assert [f.token_ids for f in frames] == [(TRUTH[0],), (TRUTH[1],), (TRUTH[2],)] and client.of(wire.Error) == []


@pytest.mark.parametrize("asked, server, granted", [(4, 0, 0), (0, 4, 0), (8, 2, 2)])
async def test_negotiation_and_a_session_without_drafts_keeps_token_frames(asked, server, granted):
    client = DraftClient(max_drafts=asked, gamma=0, max_tokens=3)
    await _run(client, drafts=server)
    assert client.of(wire.Opened)[0].max_drafts == granted
    if not granted:
        assert [m.token_id for m in client.of(wire.Token)] == TRUTH[:3] and client.of(wire.Tokens) == []
    else:
        assert [t for f in client.of(wire.Tokens) for t in f.token_ids] == TRUTH[:3]


async def test_server_decoded_and_u_shaped_sessions_get_no_drafts():
    class OrdinaryEngine(DraftEngine):
        async def generate(self, prompt, params, request_id: str):
            for j in range(3):
                yield _Output([_Completion([TRUTH[j]], "length" if j == 2 else None)], finished=j == 2)

    client = DraftClient(max_drafts=4, max_tokens=3, server_decode=True)
    session, _ = await _run(client, drafts=4, engine=OrdinaryEngine(3))
    assert session.server_decode and client.of(wire.Opened)[0].max_drafts == 0
    assert [m.token_id for m in client.of(wire.Token)] == TRUTH[:3]
    u = ServerSession(engine=None, model=MODEL, config=SplitConfig(drafts=4), send=None)
    u.return_layer = 3
    assert u._grant_drafts(wire.Open(model_fingerprint="fp", split_layer=1, max_drafts=4)) == 0


class NoDraftsClient(DraftClient):
    """Not granted drafts, sends them anyway after token 0 (then behaves)."""

    async def on_send(self, msg: wire.Message) -> None:
        self.sent.append(msg)
        if isinstance(msg, wire.Token) and msg.finish_reason is None:
            if msg.index == 0 and not self.of(wire.Error):
                rows = torch.zeros(3, HIDDEN)
                self.inbox.put_nowait(wire.encode(wire.Activation.from_tensor(rows, start=PROMPT_LEN,
                                                                              draft_ids=(TRUTH[1], TRUTH[2]))))
            rows = torch.zeros(1, HIDDEN)
            self.inbox.put_nowait(wire.encode(wire.Activation.from_tensor(rows, start=PROMPT_LEN + msg.index)))


async def test_drafts_from_a_client_not_granted_them_are_refused_clearly():
    client = NoDraftsClient(max_drafts=0, max_tokens=3)
    _, engine = await _run(client, drafts=4)
    assert client.of(wire.Error) == [wire.Error(
        code="bad_request", message=f"activation at position {PROMPT_LEN} carries 2 draft(s), but this session was "
                                    f"granted none (Opened.max_drafts = 0): send 1 row and no draft_ids")]
    assert len(client.of(wire.Token)) == 3 and all(d == () for _, _, d in engine.deliveries)


async def test_too_many_drafts_out_of_vocabulary_ids_and_drafts_on_a_prompt_chunk_are_refused():
    session = ServerSession(engine=DraftEngine(5), model=MODEL, config=SplitConfig(drafts=4), send=None)
    session.max_drafts, session.expected_start = 2, PROMPT_LEN
    rows = torch.zeros(4, HIDDEN)
    with pytest.raises(SessionError, match=r"carries 3 drafts, this session was granted at most 2 \(Opened.max_drafts\)"):
        await session.accept_decode(wire.Activation.from_tensor(rows, start=PROMPT_LEN, draft_ids=(1, 2, 3)))
    with pytest.raises(SessionError, match=r"draft token id 1000 is out of the model's vocabulary \(expected ids < 1000\)"):
        await session.accept_decode(wire.Activation.from_tensor(rows[:3], start=PROMPT_LEN, draft_ids=(1, 1000)))
    with pytest.raises(SessionError, match=r"activation of 2 row\(s\) at position 6: expected 1 to 3 rows \(1 \+ drafts\) "
                                           r"at position 5"):
        await session.accept_decode(wire.Activation.from_tensor(rows[:2], start=PROMPT_LEN + 1, draft_ids=(1,)))
    assert session.expected_start == PROMPT_LEN  # nothing taken
    session.num_prompt_rows = 0
    with pytest.raises(SessionError, match=r"prompt chunk at position 0 carries draft_ids: drafts ride on decode "
                                           r"activations only") as err:
        session.accept_prompt_chunk(wire.Activation.from_tensor(rows[:2], start=0, draft_ids=(1,)))
    assert err.value.code == "bad_request" and not err.value.fatal


class RecordingController:
    """Admits at the client's k and records what the session tells admission."""

    def __init__(self) -> None:
        self.requests: list = []
        self.released: list[dict] = []

    async def admit(self, session_id: str, request):
        from vllm_split.control.policy import Admission

        self.requests.append(request)
        return Admission(request.split_layer, "fixed", None, None)

    def engine_of(self, session_id: str) -> int:
        return 0

    async def release(self, session_id: str, **measured) -> None:
        self.released.append(measured)


async def test_admission_plans_with_the_grant_and_learns_the_answers_and_rows():
    controller = RecordingController()
    client = DraftClient(max_drafts=3, gamma=3, max_tokens=10, wrong={5}, request_type="code")
    session, engine = await _run(client, drafts=4, controller=controller)
    await session.release()
    (request,) = controller.requests
    assert (request.num_drafts, request.request_type) == (session.max_drafts, "code") == (3, "code")
    decode_rows = sum(rows for _, rows, _ in engine.deliveries[1:])  # 1 + 3 rows per activation, rejected ones too
    (released,) = controller.released
    assert {name: released[name] for name in ("prompt_tokens", "output_tokens", "answers", "decode_rows")} == dict(
        prompt_tokens=PROMPT_LEN, output_tokens=10, answers=4, decode_rows=12)
    assert decode_rows == 12 and released["tpot_s"] is not None


async def test_a_session_without_drafts_releases_as_before():
    controller = RecordingController()
    client = DraftClient(max_drafts=4, gamma=0, max_tokens=3)
    session, _ = await _run(client, drafts=0, controller=controller)
    await session.release()
    assert controller.requests[0].num_drafts == 0 and "answers" not in controller.released[0]


@pytest.mark.parametrize("drafts", [4, 0])
@pytest.mark.parametrize("reason, expected", [("stop", "stop"), (None, "abort")])
async def test_an_engine_output_ending_without_a_token_finishes_alike_with_or_without_drafts(drafts, reason, expected):
    class EndsEmpty(DraftEngine):  # token 0, then a last output with no token (its reason, or none)
        async def generate(self, prompt, params, request_id: str):
            await self._queue.get()
            yield _Output([_Completion([TRUTH[0]], None)], finished=False)
            await self._queue.get()
            yield _Output([_Completion([], reason)], finished=True)

    client = DraftClient(max_drafts=drafts, gamma=0, max_tokens=3)
    await _run(client, drafts=drafts, engine=EndsEmpty(3))
    finished = client.of(wire.Finished)[0]
    assert (finished.finish_reason, finished.num_output_tokens) == (expected, 1)
