"""A drafting ``ResumableGeneration`` (issue 14) against the drafting fake server (no engine):
the server's "model" is a script of the output after the original prompt, it accepts the
drafts that match it, and it goes away mid-generation. After each drop the generation must
replay exactly the rows of the prompt and of the output tokens (none of a rejected or an
unanswered draft), computed by a tiny random Llama whose KV cache was cut back with them, and
the new session must draft from the prompt's and the tokens' ids."""
from __future__ import annotations

import pytest
import torch

from client_lib import LocalLayers, SamplingOptions
from client_lib.resume import ResumableGeneration, _KeptRows
from tests.unit.client_lib.test_drafts_session import PROMPT, SCRIPT, DraftServer, Oracle
from tests.unit.client_lib.test_resume import FAST, FakeLayers, _serve

K = 2


class CheckedOracle(Oracle):
    """The script's next tokens, for a context that must be the prompt and the output so far."""

    def propose(self, context, limit):
        assert list(context) == PROMPT + SCRIPT[: len(context) - len(PROMPT)], list(context)
        return super().propose(context, limit)


@pytest.fixture(scope="module")
def fresh(tiny_chat_model) -> torch.Tensor:
    """The rows of the prompt and the whole script, from one pass without drafts."""
    return LocalLayers(tiny_chat_model, split_layer=K).forward(PROMPT + SCRIPT)


async def _resume(server: DraftServer, layers, *, on_event=None, **options) -> tuple[list[int], ResumableGeneration]:
    runner, url = await _serve(server)
    try:
        gen = ResumableGeneration(url, layers, sampling=SamplingOptions(max_tokens=len(SCRIPT)), policy=FAST,
                                  **options)
        tokens = []
        async for event in gen.generate(PROMPT):
            assert event.index == len(tokens)
            tokens.append(event.token_id)
            if on_event is not None:
                await on_event(gen, event)
    finally:
        await runner.cleanup()
    return tokens, gen


def _check_replayed(server: DraftServer, fresh: torch.Tensor) -> list[int]:
    """Every session's prompt is the rows of the prompt and the tokens before it, as a pass
    without drafts computes them; the last session kept the rows of every position. The
    number of output tokens before each session."""
    done = []
    for rows in server.prompts:
        assert rows.shape[0] >= len(PROMPT)
        delta = (rows - fresh[: rows.shape[0]]).abs().max().item()
        assert torch.allclose(rows, fresh[: rows.shape[0]], atol=1e-4), delta
        done.append(rows.shape[0] - len(PROMPT))
    assert torch.allclose(server.rows, fresh[: server.rows.shape[0]], atol=1e-4)
    return done


def _session_starts(server: DraftServer) -> list[int]:
    """Where each session's activations begin in ``server.activations`` (its one prompt chunk)."""
    return [i for i, a in enumerate(server.activations) if a.start == 0]


def _pending_at_drops(server: DraftServer) -> list[tuple[int, ...]]:
    """The drafts of the last activation each dropped session received (never answered)."""
    return [server.activations[i - 1].draft_ids for i in _session_starts(server)[1:]]


@pytest.mark.parametrize("draft", ["oracle", "ngram"])
async def test_a_drafting_generation_resumes_exactly_and_replays_only_output_rows(tiny_chat_model, fresh, draft):
    server = DraftServer(drop_before=(5, 4))  # the first session drops at 5+ tokens, the second after 4+ more
    drafter = CheckedOracle() if draft == "oracle" else "ngram"
    tokens, gen = await _resume(server, LocalLayers(tiny_chat_model, split_layer=K), draft=drafter, num_drafts=4,
                                request_type="code")
    assert tokens == SCRIPT and gen.finish_reason == "length" and gen.num_reconnects == 2
    assert [(o.max_drafts, o.request_type) for o in server.opens] == [(4, "code")] * 3
    assert [o.sampling.max_tokens for o in server.opens] == [len(SCRIPT) - d for d in _check_replayed(server, fresh)]
    pending = _pending_at_drops(server)
    sent = sum(len(a.draft_ids) for a in server.activations)
    assert gen.drafts_sent == sent and gen.drafts_accepted == sum(len(ids) - 1 for ids in server.answers)
    print(f"{draft}: {len(SCRIPT)} tokens in {gen.round_trips} round trips over 3 sessions; drafts {sent} sent, "
          f"{gen.drafts_accepted} accepted, {pending} unanswered at the drops")
    if draft == "oracle":
        # drafts were in flight at both drops, and the resumed sessions drafted from the right context:
        # every answered draft was accepted
        assert all(pending) and gen.drafts_accepted == sent - sum(len(d) for d in pending)
        assert all(server.activations[i + 1].draft_ids for i in _session_starts(server))  # each session drafts at once
        assert gen.round_trips < len(SCRIPT)
    else:
        assert 0 < gen.drafts_accepted < sent


async def test_a_drop_inside_a_several_token_answer(tiny_chat_model, fresh):
    """The consumer drops the connection at a token in the middle of an answer: the answer's
    later tokens still come, the rows already computed for the next drafts are dropped."""
    async def drop_at_7(gen, event):
        if event.index == 7:  # the answer with tokens 6 to 10
            await gen.disconnect()

    server = DraftServer()
    tokens, gen = await _resume(server, LocalLayers(tiny_chat_model, split_layer=K), on_event=drop_at_7,
                                draft=CheckedOracle(), num_drafts=4)
    assert server.answers[:3] == [tuple(SCRIPT[:1]), tuple(SCRIPT[1:6]), tuple(SCRIPT[6:11])]
    assert tokens == SCRIPT and gen.num_reconnects == 1
    assert _check_replayed(server, fresh) == [0, 11]


async def test_a_server_granting_no_drafts_resumes_as_before(tiny_chat_model, fresh):
    server = DraftServer(grant=0, drop_before=(6,))
    tokens, gen = await _resume(server, LocalLayers(tiny_chat_model, split_layer=K), draft="ngram")
    assert tokens == SCRIPT and gen.num_reconnects == 1 and gen.drafts_sent == 0
    assert _check_replayed(server, fresh) == [0, 6]


def test_drafting_options_are_checked_up_front():
    for bad, match in ((dict(draft="ngram"), "draft: FakeLayers has no truncate"),
                       (dict(num_drafts=0), "num_drafts: expected an int from 1 to 16"),
                       (dict(request_type="x" * 33), "request_type: expected 0 to 32 printable characters")):
        with pytest.raises(ValueError, match=match):
            ResumableGeneration("http://127.0.0.1:9", FakeLayers(), **bad)


def test_kept_rows_are_cut_where_the_kv_cache_is():
    class Counting(FakeLayers):
        def truncate(self, num_positions: int) -> None:
            assert 0 <= num_positions <= self.num_rows
            self.num_rows = num_positions

    kept = _KeptRows(Counting())
    kept.forward([1, 2, 3])
    kept.forward([4, 5, 6, 7])
    kept.forward([8, 9])
    kept.truncate(5)  # drops a whole chunk and part of another
    assert kept.num_rows() == kept.layers.num_rows == 5
    assert torch.cat(kept.rows)[:, 0].tolist() == [1, 2, 3, 4, 5]
    kept.forward([6])
    kept.truncate(6)  # nothing to cut
    assert torch.cat(kept.rows)[:, 0].tolist() == [1, 2, 3, 4, 5, 6]
