"""The gateway end to end on a tiny random Llama against a scripted split server (no engine):
OpenAI answers and stream chunks, stop strings across tokens, usage, placement, errors and
refusals, the official ``openai`` package, and concurrent sessions that keep their own KV
cache (the rows each session sent equal those of separate ``LocalLayers``)."""
from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

import aiohttp
import openai
import pytest
import torch
from aiohttp import web

from client_lib import LocalLayers
from client_lib.gateway.app import Gateway, GatewayConfig, create_app
from client_lib.gateway.generation import Upstream
from client_lib.shared_layers import SharedLayers
from harness.server_process import free_port
from tests.unit.client_lib.conftest import HIDDEN, NUM_LAYERS
from tests.unit.client_lib.gateway.scripted_server import ScriptedServer
from tests.unit.client_lib.test_resume import _serve
from vllm_split.wire import protocol as wire

TEXT = "Hello world! The answer is 42. END of story. café ☕"
PROFILE = wire.ClientProfile(layer_prefill_s_per_token=1e-5, layer_decode_s=1e-4)
KEY = "gateway-key"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "What is the capital of France?"}]}


@pytest.fixture
def script(tiny_tokenizer) -> list[int]:
    return tiny_tokenizer(TEXT, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]


@asynccontextmanager
async def gateway(model_dir, tokenizer, tokens, *, api_key=None, server_url=None, split_layer="auto", privacy_floor=0,
                  fake=None, upstream_options=None, **server):
    """A gateway in front of ``fake`` (default: a :class:`ScriptedServer` of ``tokens`` and
    ``server``'s options); ``upstream_options``: more of :class:`Upstream`'s fields."""
    fake = fake or ScriptedServer(tokens, num_layers=NUM_LAYERS, hidden=HIDDEN, **server)
    server_runner, url = await _serve(fake)
    layers = LocalLayers(model_dir, split_layer=split_layer)
    upstream = Upstream(url=server_url or url, layers=SharedLayers(layers), profile=PROFILE, sla=None,
                        privacy_floor=privacy_floor, **(upstream_options or {}))
    config = GatewayConfig(model_names=("tiny",), model_root=str(model_dir), max_model_len=64, default_max_tokens=60,
                           api_key=api_key)
    runner = web.AppRunner(create_app(Gateway(config, upstream, tokenizer)))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as http:
            yield http, f"http://127.0.0.1:{port}", fake
    finally:
        await runner.cleanup()
        await server_runner.cleanup()


async def _sse(http, url: str, body: dict) -> tuple[aiohttp.ClientResponse, list[dict]]:
    """POST a streaming request; the events' JSON, checking the framing and the final [DONE]."""
    async with http.post(url, json=body) as r:
        raw = await r.text()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), raw
    assert events[-1] == "data: [DONE]"
    return r, [json.loads(e.removeprefix("data: ")) for e in events[:-1]]


def _chat_prompt(tokenizer, content: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


async def test_a_chat_answer_has_the_text_usage_and_placement(tiny_chat_model, tiny_tokenizer, script):
    async with gateway(tiny_chat_model, tiny_tokenizer, script) as (http, url, fake):
        async with http.post(url + "/v1/chat/completions", json={**CHAT, "temperature": 0}) as r:
            body, headers = await r.json(), r.headers
    prompt = _chat_prompt(tiny_tokenizer, CHAT["messages"][0]["content"])
    assert r.status == 200 and body["object"] == "chat.completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": TEXT}
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", None)  # EOS
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(script),
                             "total_tokens": len(prompt) + len(script), "prompt_tokens_details": None}
    split = body["vllm_split"]
    assert (split["split_layer"], split["num_layers"], split["placement"]) == (2, NUM_LAYERS, "dp")
    assert (split["predicted_ttft_s"], split["predicted_tpot_s"]) == (0.25, 0.05)
    assert split["measured_ttft_s"] > 0 and split["measured_tpot_s"] > 0
    assert headers["x-vllm-split-layer"] == "2" and headers["x-vllm-split-placement"] == "dp"
    assert float(headers["x-vllm-split-predicted-ttft-s"]) == 0.25
    opened = fake.sessions[0].open
    assert opened.split_layer is None and opened.client == PROFILE  # auto: the server chose k = 2
    assert opened.sampling.max_tokens == 64 - len(prompt)  # no max_tokens: what the context holds
    assert opened.sampling.temperature == 0.0
    reference = LocalLayers(tiny_chat_model, split_layer=2)
    assert torch.equal(torch.cat(fake.sessions[0].prompt_rows), reference.forward(prompt))


async def test_a_chat_stream_has_the_openai_chunks(tiny_chat_model, tiny_tokenizer, script):
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    async with gateway(tiny_chat_model, tiny_tokenizer, script) as (http, url, fake):
        r, chunks = await _sse(http, url + "/v1/chat/completions", body)
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    assert r.headers["x-vllm-split-layer"] == "2"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[0]["prompt_token_ids"] == _chat_prompt(tiny_tokenizer, CHAT["messages"][0]["content"])
    content = chunks[1:-1]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in content) == TEXT
    assert [t for c in content for t in c["choices"][0]["token_ids"]] == script
    assert all(c["choices"][0]["finish_reason"] is None for c in content[:-1])
    last = content[-1]
    assert last["choices"][0]["finish_reason"] == "stop" and last["vllm_split"]["split_layer"] == 2
    assert last["vllm_split"]["measured_tpot_s"] > 0
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(script)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_stop_string_spanning_tokens_ends_the_text_before_it(tiny_chat_model, tiny_tokenizer, script, stream):
    stop = "D of st"
    pieces = [tiny_tokenizer.decode([t]) for t in script]
    assert not any(stop in p for p in pieces)  # it spans tokens
    body = {"model": "tiny", "prompt": "Hello", "stop": ["zzz", stop], "stream": stream,
            "stream_options": {"include_usage": True} if stream else None}
    async with gateway(tiny_chat_model, tiny_tokenizer, script) as (http, url, fake):
        if stream:
            _, chunks = await _sse(http, url + "/v1/completions", body)
            text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
            choice, usage = chunks[-2]["choices"][0], chunks[-1]["usage"]
        else:
            async with http.post(url + "/v1/completions", json=body) as r:
                out = await r.json()
            text, choice, usage = out["choices"][0]["text"], out["choices"][0], out["usage"]
        await asyncio.sleep(0.05)  # the scripted server sees the session close
    assert text == TEXT[: TEXT.index(stop)] == "Hello world! The answer is 42. EN"
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop)
    ends_at = next(i for i in range(len(script)) if stop in tiny_tokenizer.decode(script[: i + 1]))
    assert usage["completion_tokens"] == ends_at + 1  # the tokens generated, the one completing the stop included
    assert fake.sessions[0].closed_early  # the session closed: the server aborts the request


async def test_completions_take_token_ids_and_return_them(tiny_chat_model, tiny_tokenizer, script):
    body = {"prompt": [5, 6, 7], "max_tokens": 5, "return_token_ids": True, "stop_token_ids": [script[4]]}
    async with gateway(tiny_chat_model, tiny_tokenizer, script, finish="stop", split_layer=3) as (http, url, fake):
        async with http.post(url + "/v1/completions", json=body) as r:
            out = await r.json()
        _, chunks = await _sse(http, url + "/v1/completions", {**body, "stream": True})
    choice = out["choices"][0]
    assert out["object"] == "text_completion" and out["model"] == "tiny"
    assert (choice["token_ids"], choice["prompt_token_ids"]) == (script[:5], [5, 6, 7])
    assert choice["text"] == tiny_tokenizer.decode(script[:5]) and choice["finish_reason"] == "length"
    assert out["vllm_split"]["placement"] == "fixed" and out["vllm_split"]["predicted_ttft_s"] is None
    opened = fake.sessions[0].open
    assert (opened.split_layer, opened.client, opened.sampling.stop_token_ids) == (3, None, (script[4],))
    assert all(c["object"] == "text_completion" for c in chunks) and "usage" not in chunks[-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert chunks[0]["choices"][0]["prompt_token_ids"] == [5, 6, 7]


async def test_the_official_openai_package_works_against_the_gateway(tiny_chat_model, tiny_tokenizer, script):
    async with gateway(tiny_chat_model, tiny_tokenizer, script, api_key=KEY) as (http, url, fake):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert [m.id async for m in client.models.list()] == ["tiny"]
        chat = await client.chat.completions.create(model="tiny", messages=CHAT["messages"], temperature=0)
        assert chat.choices[0].message.content == TEXT and chat.usage.completion_tokens == len(script)
        stream = await client.chat.completions.create(model="tiny", messages=CHAT["messages"], stream=True,
                                                      stream_options={"include_usage": True}, max_tokens=4)
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == tiny_tokenizer.decode(script[:4])
        assert chunks[-1].usage.completion_tokens == 4
        done = await client.completions.create(model="tiny", prompt="Hello", max_tokens=3)
        assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 3
        with pytest.raises(openai.NotFoundError, match="The model `gpt-4` does not exist"):
            await client.chat.completions.create(model="gpt-4", messages=CHAT["messages"])
        with pytest.raises(openai.BadRequestError, match="n = 3 is not supported"):
            await client.chat.completions.create(model="tiny", messages=CHAT["messages"], n=3)
        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        async with http.get(url + "/health") as r:  # no key needed
            assert r.status == 200


async def test_bad_requests_get_openai_errors_and_the_gateway_keeps_serving(tiny_chat_model, tiny_tokenizer, script):
    async with gateway(tiny_chat_model, tiny_tokenizer, script) as (http, url, fake):
        async def post(path: str, **kw) -> tuple[int, dict]:
            async with http.post(url + path, **kw) as r:
                return r.status, await r.json()

        status, body = await post("/v1/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"})
        assert status == 400 and body["error"]["message"].startswith("the request body is not valid JSON")
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == 400
        status, body = await post("/v1/completions", json={"prompt": [7] * 64})
        assert status == 400 and "maximum context length is 64 tokens" in body["error"]["message"]
        status, body = await post("/v1/completions", json={"prompt": [7, 10_000]})
        assert status == 400 and "token id 10000 is out of range" in body["error"]["message"]
        status, body = await post("/v1/completions", json={"prompt": ""})
        assert status == 400 and "the prompt is empty" in body["error"]["message"]
        status, body = await post("/v1/chat/completions", json={**CHAT, "max_tokens": -1})
        assert (status, body["error"]["param"]) == (400, "max_tokens")
        status, body = await post("/v1/nothing", json={})
        assert status == 404 and body["error"]["type"] == "NotFoundError"
        assert fake.sessions == []  # none of them reached the server
        status, body = await post("/v1/chat/completions", json={**CHAT, "max_tokens": 3})
        assert status == 200 and body["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("code, status, retry_after", [("server_busy", 429, "2"), ("sla_unreachable", 503, None),
                                                       ("max_tokens", 400, None)])
@pytest.mark.parametrize("stream", [False, True])
async def test_server_refusals_become_http_errors(tiny_chat_model, tiny_tokenizer, script, code, status,
                                                  retry_after, stream):
    refusal = wire.Error(code=code, message="refused for a test", fatal=True,
                         retry_after_s=1.5 if retry_after else None)
    async with gateway(tiny_chat_model, tiny_tokenizer, script, refuse=refusal) as (http, url, fake):
        async with http.post(url + "/v1/chat/completions", json={**CHAT, "stream": stream}) as r:
            assert r.status == status and r.headers.get("Retry-After") == retry_after
            body = await r.json()
    assert body["error"]["message"] == f"split server: refused for a test ({code})"


async def test_the_privacy_floor_goes_with_every_session_and_a_placement_below_it_is_a_bad_gateway(
        tiny_chat_model, tiny_tokenizer, script):
    async with gateway(tiny_chat_model, tiny_tokenizer, script, privacy_floor=2) as (http, url, fake):
        async with http.post(url + "/v1/chat/completions", json=CHAT) as r:  # the server places it at k = 2
            assert r.status == 200
    assert (fake.sessions[0].open.privacy_floor, fake.sessions[0].open.server_decode) == (2, False)
    async with gateway(tiny_chat_model, tiny_tokenizer, script, privacy_floor=3) as (http, url, fake):
        async with http.post(url + "/v1/chat/completions", json=CHAT) as r:
            body = await r.json()
    assert r.status == 502 and "below this client's privacy floor 3" in body["error"]["message"]
    assert fake.sessions[0].prompt_rows == [] and fake.sessions[0].closed_early


async def test_an_unreachable_server_is_502_and_a_failure_mid_stream_is_an_error_event(tiny_chat_model,
                                                                                       tiny_tokenizer, script):
    nobody = f"http://127.0.0.1:{free_port()}"
    async with gateway(tiny_chat_model, tiny_tokenizer, script, server_url=nobody) as (http, url, _):
        async with http.post(url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 502 and "cannot reach the split server" in (await r.json())["error"]["message"]
    async with gateway(tiny_chat_model, tiny_tokenizer, script, fail_after=3) as (http, url, _):
        r, chunks = await _sse(http, url + "/v1/chat/completions", {**CHAT, "stream": True})
    assert r.status == 200 and chunks[-1]["error"]["code"] == 502
    assert "internal: engine failed" in chunks[-1]["error"]["message"]


async def test_concurrent_streams_each_keep_their_own_context(tiny_chat_model, tiny_tokenizer, script):
    questions = [f"Question {i}: what is {i} + {i}?" for i in range(8)]
    async with gateway(tiny_chat_model, tiny_tokenizer, script) as (http, url, fake):
        results = await asyncio.gather(*[
            _sse(http, url + "/v1/chat/completions",
                 {"messages": [{"role": "user", "content": q}], "stream": True, "max_tokens": 12}) for q in questions])
    expected_text = tiny_tokenizer.decode(script[:12])
    for _, chunks in results:
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected_text
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    reference = LocalLayers(tiny_chat_model, split_layer=2)
    alone = {}  # question -> (prompt rows, decode rows) computed by one LocalLayers, one session at a time
    for q in questions:
        reference.reset()
        alone[q] = (reference.forward(_chat_prompt(tiny_tokenizer, q)),
                    torch.cat([reference.forward([t]) for t in script[:11]]))
    assert len(fake.sessions) == 8
    for rec in fake.sessions:  # the rows each session sent are those of its own prompt and tokens
        sent = torch.cat(rec.prompt_rows), torch.cat(rec.decode_rows)
        owners = [q for q, rows in alone.items() if all(torch.equal(a, b) for a, b in zip(rows, sent))]
        assert len(owners) == 1
        questions.remove(owners[0])
    assert questions == []


async def test_the_serve_command_builds_a_working_gateway(tiny_chat_model, tiny_tokenizer, script, tmp_path,
                                                          monkeypatch):
    from client_lib.gateway.serve import build_app, parse_args

    monkeypatch.setenv("VLLM_SPLIT_CACHE", str(tmp_path))  # the device profile is measured into it
    fake = ScriptedServer(script, num_layers=NUM_LAYERS, hidden=HIDDEN)
    server_runner, server_url = await _serve(fake)
    port = free_port()
    args = parse_args(["--server", server_url, "--model", str(tiny_chat_model), "--port", str(port),
                       "--served-model-name", "tiny", "other", "--ttft", "2", "--threads", "1"])
    runner = web.AppRunner(build_app(args))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={**CHAT, "model": "other"}) as r:
                body = await r.json()
    finally:
        await runner.cleanup()
        await server_runner.cleanup()
    assert body["model"] == "other" and body["choices"][0]["message"]["content"] == TEXT
    assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] <= 64  # max_position_embeddings
    opened = fake.sessions[0].open
    assert opened.sla == wire.RequestSLA(ttft_s=2.0) and opened.client.layer_decode_s > 0  # measured at start-up
