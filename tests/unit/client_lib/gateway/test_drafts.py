"""Drafts through the gateway (issue 14), no engine: every session of a drafting gateway asks for
drafts and is labelled with its request type; against the drafting fake server the answer is the
script's text, answers bring several tokens, and the rows the server kept (rejected drafts'
dropped) equal one pass of separate ``LocalLayers`` over the prompt and the output."""
from __future__ import annotations

import pytest
import torch

from client_lib import LocalLayers
from client_lib.gateway.generation import Upstream
from tests.unit.client_lib.gateway.test_app import CHAT, _chat_prompt, _sse, gateway, script  # noqa: F401 (fixture)
from tests.unit.client_lib.test_drafts_session import DraftServer

COMPLETION = {"model": "tiny", "prompt": "The answer is", "max_tokens": 8}


@pytest.mark.parametrize("options, types", [
    (dict(draft="ngram", num_drafts=3), ("chat", "completion")),  # labelled with the endpoint's kind
    (dict(draft="ngram", num_drafts=3, request_type="code"), ("code", "code")),
    (dict(draft="ngram", num_drafts=3, request_type=""), ("", "")),
    ({}, ("", "")),  # no drafts: nothing asked, no label (an older server takes the Open)
])
async def test_every_session_asks_for_the_gateways_drafts_with_its_request_type(tiny_chat_model, tiny_tokenizer,
                                                                                 script, options, types):
    async with gateway(tiny_chat_model, tiny_tokenizer, script, upstream_options=options) as (http, url, fake):
        async with http.post(url + "/v1/chat/completions", json={**CHAT, "max_tokens": 8}) as r:
            assert r.status == 200
        async with http.post(url + "/v1/completions", json=COMPLETION) as r:
            assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 8
    opens = [rec.open for rec in fake.sessions]
    assert [o.max_drafts for o in opens] == [options.get("num_drafts", 0) if options else 0] * 2
    assert tuple(o.request_type for o in opens) == types


@pytest.mark.parametrize("stream", [False, True])
async def test_a_drafting_gateway_answers_the_script_with_several_tokens_per_round_trip(tiny_chat_model,
                                                                                       tiny_tokenizer, stream):
    prompt = _chat_prompt(tiny_tokenizer, CHAT["messages"][0]["content"])
    text = "The answer is 42. The answer is 42. The answer is 42."
    out = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    server = DraftServer(script=out, num_prompt=len(prompt))
    async with gateway(tiny_chat_model, tiny_tokenizer, [], split_layer=2, fake=server,
                       upstream_options=dict(draft="ngram")) as (http, url, _):
        if stream:  # one chunk per token still
            r, chunks = await _sse(http, url + "/v1/chat/completions", {**CHAT, "stream": True})
            deltas = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
            assert "".join(d or "" for d in deltas) == text and len([d for d in deltas if d is not None]) >= len(out)
        else:
            async with http.post(url + "/v1/chat/completions", json=CHAT) as r:
                body = await r.json()
            assert body["choices"][0]["message"]["content"] == text
            assert body["usage"]["completion_tokens"] == len(out)
    assert r.status == 200
    assert server.open.max_drafts == 4 and server.open.request_type == "chat"
    assert len(server.answers) < len(out) and sum(len(a) for a in server.answers) == len(out)
    fresh = LocalLayers(tiny_chat_model, split_layer=2).forward(prompt + out)[: server.rows.shape[0]]
    assert torch.allclose(server.rows, fresh, atol=1e-4), (server.rows - fresh).abs().max().item()


def test_the_gateway_drafts_by_prompt_lookup_only(tmp_path, capsys):
    from client_lib.gateway.serve import parse_args

    for bad, match in ((dict(draft=str(tmp_path)), r"the gateway drafts with 'ngram' or 'none', got '.*' \(a draft "
                                                   r"model keeps one sequence's state"),
                       (dict(draft="ngram", num_drafts=17), "num_drafts: expected an int from 1 to 16"),
                       (dict(request_type="x" * 33), "request_type: expected 0 to 32 printable characters")):
        with pytest.raises(ValueError, match=match):
            Upstream(url="http://x", layers=None, profile=None, sla=None, **bad)
    args = parse_args(["--model", "m"])
    assert (args.draft, args.num_drafts, args.request_type) == ("none", 4, None)
    args = parse_args(["--model", "m", "--draft", "ngram", "--num-drafts", "2", "--request-type", "code"])
    assert (args.draft, args.num_drafts, args.request_type) == ("ngram", 2, "code")
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--draft", str(tmp_path)])
    assert "argument --draft: draft: the gateway drafts with 'ngram' or 'none', got" in capsys.readouterr().err
