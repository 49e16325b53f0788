"""OpenAI request bodies: what the gateway takes, what it refuses (a 400 naming the field),
and the OpenAI-shaped error bodies, server refusals included."""
from __future__ import annotations

import pytest

from client_lib.gateway.errors import APIError, from_server_error, unreachable
from client_lib.gateway.openai_requests import SamplingDefaults, parse_chat, parse_completion
from vllm_split.wire.contract import ErrorCode

DEFAULTS = SamplingDefaults()
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


def _refused(parse, body: dict) -> APIError:
    with pytest.raises(APIError) as info:
        parse(body, DEFAULTS)
    assert info.value.status == 400
    return info.value


def test_a_chat_request_becomes_sampling_options():
    req = parse_chat({**CHAT, "max_completion_tokens": 7, "max_tokens": 99, "temperature": 0, "top_p": 0.5,
                      "top_k": -1, "seed": 3, "stop": "END", "stop_token_ids": [2], "ignore_eos": True,
                      "stream": True, "stream_options": {"include_usage": True}, "n": 1, "presence_penalty": 0.0,
                      "user": "ignored", "some_new_field": {"ignored": True}}, DEFAULTS)
    p = req.params
    assert (p.max_tokens, p.stop, p.stream, p.include_usage, p.top_k) == (7, ("END",), True, True, 0)
    s = p.sampling(p.max_tokens)
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.stop_token_ids, s.ignore_eos) == \
        (7, 0.0, 0.5, 0, 3, (2,), True)
    assert req.messages == ({"role": "user", "content": "Hi"},) and req.add_generation_prompt


def test_defaults_come_from_the_model_generation_config(tmp_path):
    assert SamplingDefaults.from_model_dir(tmp_path) == SamplingDefaults(1.0, 1.0, 0)
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.6, "top_p": 0.9, "top_k": null}')
    defaults = SamplingDefaults.from_model_dir(tmp_path)
    p = parse_chat(CHAT, defaults).params
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.6, 0.9, 0, None)


def test_completion_prompts_text_ids_or_a_batch_of_one():
    assert parse_completion({"prompt": "Hello"}, DEFAULTS).prompt == "Hello"
    assert parse_completion({"prompt": [1, 2, 3]}, DEFAULTS).prompt == (1, 2, 3)
    assert parse_completion({"prompt": [[4, 5]]}, DEFAULTS).prompt == (4, 5)
    assert parse_completion({"prompt": ["Hi"], "stop": ["a", "b"]}, DEFAULTS).params.stop == ("a", "b")
    assert "a batch of 2 prompts" in _refused(parse_completion, {"prompt": ["a", "b"]}).message
    assert _refused(parse_completion, {"prompt": [1, -2]}).message == "prompt: token ids must be >= 0, got -2"
    assert _refused(parse_completion, {"prompt": []}).param == "prompt"
    assert _refused(parse_completion, {}).param == "prompt"


@pytest.mark.parametrize("body, param, message", [
    ({"n": 3}, "n", "n = 3 is not supported by the split-inference gateway (accepted: 1, null or absent)"),
    ({"max_tokens": -1}, "max_tokens", "max_tokens: expected an integer >= 1, got -1"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "max_completion_tokens: expected an integer >= 1, got 0"),
    ({"temperature": -0.5}, "temperature", "temperature: expected a number in [0.0, inf], got -0.5"),
    ({"top_p": 0}, "top_p", "top_p: expected a number in (0.0, 1.0], got 0"),
    ({"seed": "7"}, "seed", 'seed: expected an integer >= 0, got "7"'),
    ({"stop": [1]}, "stop", "stop: expected a string or a list of strings, got [1]"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "stream_options: only allowed with stream = true"),
    ({"stream": "yes"}, "stream", 'stream: expected true or false, got "yes"'),
    ({"logprobs": True}, "logprobs", "logprobs = true is not supported"),
    ({"frequency_penalty": 0.5}, "frequency_penalty", "frequency_penalty = 0.5 is not supported"),
    ({"tools": [{"type": "function"}]}, "tools", "tools = "),
    ({"model": 5}, "model", "model: expected a string, got 5"),
])
def test_bad_fields_are_refused_with_the_field_named(body, param, message):
    err = _refused(parse_chat, {**CHAT, **body})
    assert err.param == param and err.message.startswith(message)
    assert err.body() == {"error": {"message": err.message, "type": "BadRequestError", "param": param, "code": 400}}


def test_messages_must_be_text():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert parse_chat({"messages": [{"role": "user", "content": parts}]}, DEFAULTS).messages[0]["content"] == "a\nb"
    image = [{"type": "image_url", "image_url": {"url": "x"}}]
    assert "only text parts" in _refused(parse_chat, {"messages": [{"role": "user", "content": image}]}).message
    assert _refused(parse_chat, {"messages": []}).param == "messages"
    assert "string role" in _refused(parse_chat, {"messages": [{"content": "x"}]}).message
    assert "JSON object" in _refused(parse_chat, ["not", "an", "object"]).message


def test_server_refusals_map_to_statuses_with_retry_after():
    busy = from_server_error(ErrorCode.SERVER_BUSY, "engine is full; retry later", retry_after_s=2.2)
    assert busy.status == 429 and busy.headers() == {"Retry-After": "3"}
    assert busy.body()["error"] == {"message": "split server: engine is full; retry later (server_busy)",
                                    "type": "RateLimitError", "param": None, "code": 429}
    sla = from_server_error(ErrorCode.SLA_UNREACHABLE, "no split layer meets the SLA", retry_after_s=None)
    assert (sla.status, sla.body()["error"]["type"], sla.headers()) == (503, "ServiceUnavailableError", {})
    assert from_server_error(ErrorCode.MAX_TOKENS, "too many", None).param == "max_tokens"
    assert from_server_error(ErrorCode.PROMPT_TOO_LONG, "too long", None).status == 400
    broken = from_server_error(ErrorCode.FINGERPRINT_MISMATCH, "weights differ", None)
    assert broken.status == 502 and "fingerprint_mismatch: weights differ" in broken.message
    down = unreachable("http://h:1", ConnectionRefusedError("refused"))
    assert down.status == 502 and down.body()["error"]["type"] == "BadGatewayError"
