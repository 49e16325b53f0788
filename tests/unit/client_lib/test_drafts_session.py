"""A drafting ``SplitSession`` (issue 14) against a fake server (no engine): the server's
"model" is a fixed script of output tokens; it grants drafts at Open, accepts the drafts that
match the script (as vLLM's greedy rejection sampler would) and answers ``Tokens`` frames. The
client runs a tiny random Llama; the rows the server keeps (after dropping rejected drafts')
must equal a fresh pass over the whole sequence."""
from __future__ import annotations

import pytest
import torch
from aiohttp import web

from client_lib import LocalLayers, SamplingOptions, ServerError, SplitSession
from client_lib.drafts import Drafter
from tests.unit.client_lib.conftest import HIDDEN, NUM_LAYERS
from tests.unit.client_lib.test_resume import _serve
from vllm_split.wire import protocol as wire

PROFILE = wire.ClientProfile(layer_prefill_s_per_token=1e-4, layer_decode_s=1e-3)
PROMPT = [5, 6, 7, 8, 9, 10, 5, 6, 7, 11, 12]
# repeats of the prompt (drafts accepted) and departures from it (drafts rejected)
SCRIPT = [8, 9, 10, 5, 6, 7, 20, 21, 5, 6, 7, 8, 9, 30, 31, 32, 5, 6, 7, 11, 12, 40, 41]


class DraftServer:
    """Grants ``min(Open.max_drafts, grant)`` drafts (None: an older server without the
    field's support is emulated by ``refuse``); answers the script; keeps every position's
    row, dropping rows of rejected drafts. ``lie``: at that answer, claim the first draft
    accepted but change it (a faulty server). ``stop_at``: finish with ``stop`` at that
    output index, cutting the answer there. The script is the output after ``num_prompt``
    positions: a session whose prompt is longer (a resumed one: prompt and tokens so far) goes on
    from there. ``drop_before``: per session, close the connection instead of answering once the
    session's output reaches that many tokens (the drafts sent last are never answered)."""

    def __init__(self, *, grant: int = 8, script=SCRIPT, lie: int | None = None, stop_at: int | None = None,
                 refuse: bool = False, refuse_type: bool = False, drop_before: tuple[int, ...] = (),
                 num_prompt: int = len(PROMPT)) -> None:
        self.grant, self.script, self.lie, self.stop_at, self.refuse = grant, list(script), lie, stop_at, refuse
        self.refuse_type = refuse_type  # a server that takes max_drafts but predates Open.request_type
        self.drop_before, self.num_prompt = list(drop_before), num_prompt
        self.opens: list[wire.Open] = []
        self.prompts: list[torch.Tensor] = []  # per session: the prompt rows received
        self.open: wire.Open | None = None
        self.activations: list[wire.Activation] = []
        self.rows: torch.Tensor | None = None  # every kept position's row
        self.answers: list[tuple[int, ...]] = []

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.open = msg = wire.decode((await ws.receive()).data)
        self.opens.append(msg)
        if (self.refuse and msg.max_drafts) or (self.refuse_type and msg.request_type):
            names = "['max_drafts']" if self.refuse else "['request_type']"
            await ws.send_bytes(wire.encode(wire.Error(code="protocol", message=f"Open: unknown field(s) {names}; "
                                                                               f"expected a subset of ['max_drafts']")))
            await ws.close()
            return ws
        granted = min(msg.max_drafts, self.grant)
        await ws.send_bytes(wire.encode(wire.Opened(session_id="s", split_layer=msg.split_layer, num_layers=NUM_LAYERS,
                                                    hidden_size=HIDDEN, dtype="float32", max_frame_bytes=1 << 20,
                                                    max_drafts=granted)))
        rows = []
        while True:  # the prompt
            act = wire.decode((await ws.receive()).data)
            self.activations.append(act)
            rows.append(act.to_tensor())
            if act.end_of_prompt:
                break
        rows = torch.cat(rows)
        self.prompts.append(rows)
        n, max_tokens = rows.shape[0], msg.sampling.max_tokens
        script = self.script[n - self.num_prompt:]  # the output after this session's prompt
        drop = self.drop_before.pop(0) if self.drop_before else None
        end = min(max_tokens, len(script))
        index, drafts = 0, ()
        while True:
            if drop is not None and index >= drop:
                await ws.close()  # the server goes away; the drafts sent last are never answered
                return ws
            accepted = 0
            while accepted < len(drafts) and index + accepted < end and drafts[accepted] == script[index + accepted]:
                accepted += 1
            ids = list(script[index : min(index + accepted + 1, end)])
            if self.lie is not None and len(self.answers) == self.lie:
                ids = [ids[0] + 1, *ids]
            reason = "length" if index + len(ids) >= end else None
            if self.stop_at is not None and index + len(ids) > self.stop_at:
                ids, reason = ids[: self.stop_at - index + 1], "stop"
            self.answers.append(tuple(ids))
            frame = (wire.Tokens(index=index, token_ids=tuple(ids), finish_reason=reason) if granted
                     else wire.Token(index=index, token_id=ids[0], finish_reason=reason))
            await ws.send_bytes(wire.encode(frame))
            index += len(ids)
            if reason is not None:
                break
            act = wire.decode((await ws.receive()).data)
            self.activations.append(act)
            assert act.start == n + index - 1, (act.start, n, index)  # the last token's position
            assert act.rows == 1 + len(act.draft_ids) and len(act.draft_ids) <= granted
            rows = torch.cat([rows[: act.start], act.to_tensor()])  # drop the rejected drafts' rows
            drafts = act.draft_ids
        self.rows = rows[: n + index - 1]  # the rows of every position before the last token
        await ws.send_bytes(wire.encode(wire.Finished(finish_reason=reason, num_prompt_tokens=n,
                                                      num_output_tokens=index)))
        await ws.close()
        return ws

    @property
    def decode_activations(self) -> list[wire.Activation]:
        return [a for a in self.activations if not a.end_of_prompt and a.start >= len(PROMPT)]


@pytest.fixture(autouse=True)
def profile_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_SPLIT_CACHE", str(tmp_path))


async def _generate(server: DraftServer, layers, *, max_tokens: int = len(SCRIPT), **options):
    runner, url = await _serve(server)
    try:
        async with await SplitSession.create(url, layers, profile=PROFILE,
                                             sampling=SamplingOptions(max_tokens=max_tokens), **options) as session:
            events = [e async for e in session.generate(PROMPT)]
    finally:
        await runner.cleanup()
    return events, session


class Oracle(Drafter):
    """Proposes the script itself (``wrong``: every draft off by one)."""

    def __init__(self, wrong: bool = False) -> None:
        self.wrong, self.accepted = wrong, []

    def propose(self, context, limit):
        done = len(context) - len(PROMPT)
        return [t + self.wrong for t in SCRIPT[done : done + limit]]

    def accept(self, token_ids) -> None:
        self.accepted.append(tuple(token_ids))


def _check_rows(server: DraftServer, model_dir, k: int) -> None:
    fresh = LocalLayers(model_dir, split_layer=k).forward(PROMPT + SCRIPT)[: server.rows.shape[0]]
    delta = (server.rows - fresh).abs().max().item()
    print(f"k={k}: server rows vs a fresh pass: max|Δ|={delta:.3g}")
    assert torch.allclose(server.rows, fresh, atol=1e-4), delta


@pytest.mark.parametrize("k", [0, 2, NUM_LAYERS])
async def test_ngram_drafts_give_the_scripts_tokens_in_fewer_round_trips(tiny_chat_model, k):
    server = DraftServer()
    events, session = await _generate(server, LocalLayers(tiny_chat_model, split_layer=k), draft="ngram",
                                      server_decode=False)
    assert server.open.max_drafts == 4 and session.granted_drafts == 4
    assert [e.token_id for e in events] == SCRIPT and [e.index for e in events] == list(range(len(SCRIPT)))
    assert [e.finish_reason for e in events] == [None] * (len(SCRIPT) - 1) + ["length"]
    stats = session.stats
    assert stats.finish_reason == "length" and stats.num_output_tokens == len(SCRIPT)
    assert session.round_trips == len(server.answers) < len(SCRIPT)
    assert 0 < session.drafts_accepted < session.drafts_sent  # acceptances and rejections both happen
    assert session.drafts_sent == sum(len(a.draft_ids) for a in server.decode_activations)
    assert session.drafts_accepted == sum(len(ids) - 1 for ids in server.answers)
    assert stats.tokens_per_round_trip == len(SCRIPT) / session.round_trips
    print(f"k={k}: {len(SCRIPT)} tokens in {session.round_trips} round trips, drafts {session.drafts_sent} sent, "
          f"{session.drafts_accepted} accepted")
    _check_rows(server, tiny_chat_model, k)


async def test_every_draft_right_or_wrong(tiny_chat_model):
    right = DraftServer()
    drafter = Oracle()
    events, session = await _generate(right, LocalLayers(tiny_chat_model, split_layer=2), draft=drafter, num_drafts=3,
                                      server_decode=False)
    assert [e.token_id for e in events] == SCRIPT
    assert session.drafts_accepted == session.drafts_sent == len(SCRIPT) - session.round_trips
    assert session.round_trips == 1 + -(-(len(SCRIPT) - 1) // 4)  # the prompt's answer, then 4 tokens per trip
    # told every answer but the last (it finished the generation)
    assert [t for ids in drafter.accepted for t in ids] == SCRIPT[: len(SCRIPT) - len(right.answers[-1])]
    _check_rows(right, tiny_chat_model, 2)
    wrong = DraftServer()
    events, session = await _generate(wrong, LocalLayers(tiny_chat_model, split_layer=2), draft=Oracle(wrong=True),
                                      num_drafts=3, server_decode=False)
    assert [e.token_id for e in events] == SCRIPT and session.round_trips == len(SCRIPT)
    assert session.drafts_accepted == 0 and session.drafts_sent > 0
    _check_rows(wrong, tiny_chat_model, 2)


async def test_no_draft_past_max_tokens_and_fewer_when_fewer_are_granted(tiny_chat_model):
    server = DraftServer(grant=2)
    events, session = await _generate(server, LocalLayers(tiny_chat_model, split_layer=1), draft=Oracle(),
                                      num_drafts=6, max_tokens=10, server_decode=False)
    assert server.open.max_drafts == 6 and session.granted_drafts == 2
    assert [e.token_id for e in events] == SCRIPT[:10]
    assert all(len(a.draft_ids) <= 2 for a in server.decode_activations)
    for act in server.decode_activations:  # the last token's index + drafts + the server's token <= max_tokens
        assert act.start - len(PROMPT) + 1 + len(act.draft_ids) + 1 <= 10


async def test_a_stop_inside_an_answer_ends_the_generation(tiny_chat_model):
    server = DraftServer(stop_at=6)
    events, session = await _generate(server, LocalLayers(tiny_chat_model, split_layer=2), draft=Oracle(),
                                      server_decode=False)
    assert [e.token_id for e in events] == SCRIPT[:7] and events[-1].finish_reason == "stop"
    assert session.stats.finish_reason == "stop"


async def test_a_server_granting_none_gets_one_row_per_token(tiny_chat_model):
    server = DraftServer(grant=0)
    events, session = await _generate(server, LocalLayers(tiny_chat_model, split_layer=2), draft="ngram",
                                      server_decode=False)
    assert server.open.max_drafts == 4 and session.granted_drafts == 0
    assert [e.token_id for e in events] == SCRIPT
    assert all(a.rows == 1 and not a.draft_ids for a in server.decode_activations)
    assert (session.drafts_sent, session.drafts_accepted, session.round_trips) == (0, 0, len(SCRIPT))


async def test_without_drafts_nothing_is_asked(tiny_chat_model):
    server = DraftServer()
    events, session = await _generate(server, LocalLayers(tiny_chat_model, split_layer=2), server_decode=False)
    assert server.open.max_drafts == 0 and session.granted_drafts == 0
    assert b"max_drafts" not in wire.encode(server.open)  # left out: older servers take the Open
    assert [e.token_id for e in events] == SCRIPT and session.drafts_sent == 0


async def test_an_answer_that_is_not_a_prefix_of_the_drafts_is_a_protocol_error(tiny_chat_model):
    server = DraftServer(lie=2)
    with pytest.raises(ServerError, match=r"expected the first \d+ of the drafts sent .* then the server's own token, "
                                          r"but draft 0 differs \(only 0 accepted\)") as e:
        await _generate(server, LocalLayers(tiny_chat_model, split_layer=2), draft=Oracle(), server_decode=False)
    assert e.value.code == "protocol"


async def test_an_older_server_refusing_max_drafts_says_to_draft_none(tiny_chat_model):
    server = DraftServer(refuse=True)
    with pytest.raises(ServerError, match=r"protocol: Open: unknown field\(s\) \['max_drafts'\].* this server does not "
                                          r"take client drafts .* open the session with draft='none' \(--draft none\)"):
        await _generate(server, LocalLayers(tiny_chat_model, split_layer=2), draft="ngram", server_decode=False)


async def test_the_request_type_goes_in_the_open_and_an_older_server_refusing_it_says_so(tiny_chat_model):
    server = DraftServer()
    await _generate(server, LocalLayers(tiny_chat_model, split_layer=2), draft="ngram", request_type="code",
                    server_decode=False)
    assert server.open.request_type == "code"
    await _generate(server, LocalLayers(tiny_chat_model, split_layer=2), draft="ngram", server_decode=False)
    assert b"request_type" not in wire.encode(server.open)  # left out: older servers take the Open
    with pytest.raises(ServerError, match=r"unknown field\(s\) \['request_type'\].* this server does not take request "
                                          r"types .* open the session without one \(request_type=''\)$"):
        await _generate(DraftServer(refuse_type=True), LocalLayers(tiny_chat_model, split_layer=2), draft="ngram",
                        request_type="code", server_decode=False)


async def test_options_are_checked_before_connecting(tiny_chat_model):
    from client_lib.tail_layers import TailLayers

    layers = LocalLayers(tiny_chat_model, split_layer=1)
    for bad, match in ((dict(draft="eagle"), "expected 'ngram', 'none', a local model directory or a Drafter"),
                       (dict(draft="ngram", num_drafts=0), "num_drafts: expected an int from 1 to 16"),
                       (dict(draft="ngram", num_drafts=17), "num_drafts: expected an int from 1 to 16"),
                       (dict(draft="ngram", tail=TailLayers(tiny_chat_model, return_layer=3)), "U-shaped"),
                       (dict(request_type="x" * 33), "request_type: expected 0 to 32 printable characters")):
        with pytest.raises(ValueError, match=match):
            await SplitSession.create("http://127.0.0.1:9", layers, **bad)

    class NoTruncate:
        fingerprint, split_layer, num_layers = layers.fingerprint, 1, NUM_LAYERS

    with pytest.raises(ValueError, match="NoTruncate has no truncate"):
        await SplitSession.create("http://127.0.0.1:9", NoTruncate(), draft="ngram")


def test_the_command_line_takes_drafts(tmp_path, capsys):
    from client_lib.cli import parse_args

    base = ["--model", "m", "--prompt", "hi"]
    args = parse_args(base)
    assert (args.draft, args.num_drafts) == ("none", 4)
    args = parse_args([*base, "--draft", "ngram", "--num-drafts", "6"])
    assert (args.draft, args.num_drafts) == ("ngram", 6)
    assert parse_args([*base, "--draft", str(tmp_path)]).draft == str(tmp_path)  # a draft model's directory
    for bogus in ("eagle", str(tmp_path / "missing"), str(tmp_path / "file")):
        (tmp_path / "file").write_text("not a directory")
        with pytest.raises(SystemExit):
            parse_args([*base, "--draft", bogus])
        assert (f"argument --draft: expected 'ngram', 'none' or a draft model's local directory, got {bogus!r} "
                f"(no such directory)") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args([*base, "--draft", "ngram", "--num-drafts", "0"])
    assert (parse_args(base).request_type, parse_args([*base, "--request-type", "code"]).request_type) == ("", "code")
    with pytest.raises(SystemExit):
        parse_args([*base, "--request-type", "x" * 33])
