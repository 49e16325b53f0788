"""The client sends its next activation before it hands a token to the caller, so the caller's
work per token overlaps the server's next step instead of lengthening every round trip; and a
failure to send still hands over the tokens received (against the fake servers of the draft
and U-shaped session tests: no engine)."""
from __future__ import annotations

import pytest

from client_lib import LocalLayers, SamplingOptions, SplitSession, TailLayers
from tests.unit.client_lib.test_drafts_session import PROFILE, PROMPT, SCRIPT, DraftServer, Oracle
from tests.unit.client_lib.test_resume import _serve
from tests.unit.client_lib.test_ushape_session import M, PROMPT as U_PROMPT, MiddleServer
from vllm_split.wire import protocol as wire


@pytest.fixture(autouse=True)
def profile_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_SPLIT_CACHE", str(tmp_path))


def _record_sends(session: SplitSession) -> list[int]:
    """The start position of every decode activation the session sends, in order."""
    starts: list[int] = []
    send = session._send

    async def recording(msg):
        await send(msg)
        if isinstance(msg, wire.Activation) and not msg.end_of_prompt:
            starts.append(msg.start)

    session._send = recording
    return starts


async def _consume(url: str, layers, prompt: list[int], *, max_tokens: int, fail_after: int | None = None, **options):
    """Each event with the decode activations sent when the caller got it."""
    seen = []
    async with await SplitSession.create(url, layers, profile=PROFILE, sampling=SamplingOptions(max_tokens=max_tokens),
                                         **options) as session:
        starts = _record_sends(session)
        if fail_after is not None:
            send = session._send

            async def failing(msg):
                if isinstance(msg, wire.Activation) and len(starts) >= fail_after:
                    raise ConnectionResetError("link down")
                await send(msg)

            session._send = failing
        try:
            async for event in session.generate(prompt):
                seen.append((event, list(starts)))
        except ConnectionResetError:
            seen.append(("raised", list(starts)))
    return seen


@pytest.mark.parametrize("draft", ["none", "oracle"])
async def test_the_next_activation_leaves_before_the_caller_gets_the_token(tiny_chat_model, draft):
    server = DraftServer()
    runner, url = await _serve(server)
    try:
        options = {"draft": Oracle(), "num_drafts": 3} if draft == "oracle" else {}
        seen = await _consume(url, LocalLayers(tiny_chat_model, split_layer=2), PROMPT, max_tokens=len(SCRIPT),
                              server_decode=False, **options)
    finally:
        await runner.cleanup()
    assert [e.token_id for e, _ in seen] == SCRIPT
    last_answer = len(SCRIPT) - len(server.answers[-1])  # the index of the final answer's first token
    assert last_answer > 0
    for event, starts in seen[:last_answer]:
        # the activation of the answer's last token (at its position) is already out; with drafts
        # an answer holds several tokens, and the activation carries the last one's row
        assert starts and starts[-1] >= len(PROMPT) + event.index, (event.index, starts)
    assert seen[-1][0].finish_reason == "length"
    assert len(seen[-1][1]) == len(server.answers) - 1  # nothing sent after the last answer


async def test_a_failed_send_still_hands_over_the_tokens_received(tiny_chat_model):
    server = DraftServer()
    runner, url = await _serve(server)
    try:
        seen = await _consume(url, LocalLayers(tiny_chat_model, split_layer=2), PROMPT, max_tokens=len(SCRIPT),
                              server_decode=False, fail_after=3)
    finally:
        await runner.cleanup()
    *events, (raised, starts) = seen
    assert raised == "raised" and len(starts) == 3
    assert [e.token_id for e, _ in events] == SCRIPT[:4]  # the answer whose activation failed is handed over too


async def test_a_u_shaped_session_sends_before_the_caller_gets_the_token(tiny_chat_model):
    server = MiddleServer(tiny_chat_model)
    runner, url = await _serve(server)
    seen = []
    try:
        async with await SplitSession.create(url, LocalLayers(tiny_chat_model, split_layer=0),
                                             tail=TailLayers(tiny_chat_model, return_layer=M),
                                             sampling=SamplingOptions(max_tokens=5, ignore_eos=True)) as session:
            starts = _record_sends(session)
            async for event in session.generate(U_PROMPT):
                seen.append((event, list(starts)))
    finally:
        await runner.cleanup()
    assert len(seen) == 5
    for event, starts in seen[:-1]:
        assert starts[-1] == len(U_PROMPT) + event.index  # the token's own row is out already
    assert len(seen[-1][1]) == 4
