"""The OpenAI gateway on a real split server, driven by the official ``openai`` package (and
plain HTTP for the stream's framing): the same token ids, text, finish reasons and usage as
the unsplit vLLM server's own OpenAI API for the same greedy requests, stop strings that span
tokens, OpenAI-shaped errors after which the gateway keeps serving, and eight concurrent
streaming chats."""
from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import openai
import pytest

from tests.engine_gateway.helpers import answer, chat, streamed
from tests.engine_gateway.server_config import CHAT_PROMPTS, GATEWAY_KEY, MAX_MODEL_LEN, MAX_TOKENS
from tests.support.references import PROMPTS

pytestmark = pytest.mark.engine
PLACEMENTS = ("dp", "least_offload", "server_only")


def _client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=300)


def _post(gateway, path: str, data: bytes) -> tuple[int, dict, str]:
    """A raw POST: status, headers, body text (errors included)."""
    req = urllib.request.Request(gateway.url + path, data=data, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {GATEWAY_KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def _openai_error(info: pytest.ExceptionInfo, status: int, param: str | None) -> str:
    """Check an ``openai`` error's status and the OpenAI shape of its body; its message."""
    assert info.value.status_code == status
    error = info.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert error["param"] == param
    return error["message"]


def test_chats_and_completions_equal_the_plain_server(gateway, reference, model_dir):
    client, m = _client(gateway), str(model_dir)
    assert [card.id for card in client.models.list()] == [m]
    for i in (0, 1):
        assert answer(chat(client, m, CHAT_PROMPTS[i])) == reference.chats[i]
    raw = client.chat.completions.with_raw_response.create(
        model=m, messages=[{"role": "user", "content": CHAT_PROMPTS[2]}], temperature=0, max_tokens=MAX_TOKENS,
        extra_body={"return_token_ids": True})
    response = raw.parse()
    assert answer(response) == reference.chats[2]
    split = response.model_extra["vllm_split"]  # auto: the server's admission controller placed it
    assert 0 <= split["split_layer"] <= split["num_layers"] == 30 and split["placement"] in PLACEMENTS
    assert split["predicted_ttft_s"] > 0 and split["predicted_tpot_s"] > 0 and split["measured_ttft_s"] > 0
    assert raw.headers["x-vllm-split-layer"] == str(split["split_layer"])
    completion = dict(model=m, max_tokens=MAX_TOKENS, temperature=0, extra_body={"return_token_ids": True})
    assert answer(client.completions.create(prompt=PROMPTS[0], **completion)) == reference.completion_text
    assert answer(client.completions.create(prompt=reference.prompt_ids, **completion)) == reference.completion_ids


def test_streams_equal_the_plain_server(gateway, reference, model_dir):
    client, m = _client(gateway), str(model_dir)
    chunks = list(chat(client, m, CHAT_PROMPTS[1], stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert streamed(chunks) == reference.chats[1]
    body = {"model": m, "prompt": reference.prompt_ids, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True}
    status, headers, raw = _post(gateway, "/v1/completions", json.dumps(body).encode())
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    data = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(d["object"] == "text_completion" for d in data)
    assert "".join(d["choices"][0]["text"] for d in data if d["choices"]) == reference.completion_ids.text
    assert [t for d in data if d["choices"] for t in d["choices"][0]["token_ids"]] == reference.completion_ids.token_ids
    assert data[-1]["choices"] == [] and data[-1]["usage"]["completion_tokens"] == reference.completion_ids.usage[1]
    assert data[-2]["choices"][0]["finish_reason"] == reference.completion_ids.finish_reason
    assert data[-2]["vllm_split"]["split_layer"] == int(headers["x-vllm-split-layer"])


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_spanning_tokens_ends_the_text_as_on_the_plain_server(gateway, reference, model_dir, stream):
    expected = reference.stopped
    assert (expected.finish_reason, expected.stop_reason) == ("stop", reference.stop)
    assert expected.text == reference.chats[0].text[: reference.chats[0].text.index(reference.stop)]
    client, m = _client(gateway), str(model_dir)
    if stream:
        got = streamed(list(chat(client, m, CHAT_PROMPTS[0], stop=[reference.stop], stream=True,
                                 stream_options={"include_usage": True})))
    else:
        got = answer(chat(client, m, CHAT_PROMPTS[0], stop=[reference.stop]))
    assert got == expected


def test_bad_requests_get_openai_errors_and_the_gateway_keeps_serving(gateway, reference, model_dir):
    client, m = _client(gateway), str(model_dir)
    with pytest.raises(openai.NotFoundError) as info:
        chat(client, "no-such-model", CHAT_PROMPTS[0])
    assert _openai_error(info, 404, "model") == "The model `no-such-model` does not exist."
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, m, CHAT_PROMPTS[0], n=3)
    assert "n = 3 is not supported" in _openai_error(info, 400, "n")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=m, messages=[{"role": "user", "content": "Hi"}], max_tokens=-1)
    assert _openai_error(info, 400, "max_tokens") == "max_tokens: expected an integer >= 1, got -1"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=m, prompt=[42] * (MAX_MODEL_LEN + 50), max_tokens=4)
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in _openai_error(info, 400, "prompt")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gateway.url + "/v1", api_key="wrong", max_retries=0).models.list()
    status, _, body = _post(gateway, "/v1/chat/completions", b'{"model": "x", "messages": [')
    error = json.loads(body)["error"]
    assert status == 400 and error["type"] == "BadRequestError" and "not valid JSON" in error["message"]
    assert gateway.proc.poll() is None
    assert answer(chat(client, m, CHAT_PROMPTS[0])) == reference.chats[0]


async def test_eight_concurrent_streaming_chats_complete_correctly(gateway, reference, model_dir):
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=600)

    async def one(prompt: str) -> list:
        stream = await client.chat.completions.create(
            model=str(model_dir), messages=[{"role": "user", "content": prompt}], temperature=0,
            max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True},
            extra_body={"return_token_ids": True})
        return [chunk async for chunk in stream]

    assert len(CHAT_PROMPTS) == 8
    results = await asyncio.gather(*[one(p) for p in CHAT_PROMPTS])
    for prompt, chunks, expected in zip(CHAT_PROMPTS, results, reference.chats):
        assert streamed(chunks) == expected, f"the chat {prompt!r} diverged"
