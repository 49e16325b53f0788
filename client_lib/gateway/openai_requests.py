"""OpenAI request bodies, parsed and checked into the gateway's typed requests.

Runs in the gateway; pure (no I/O, no torch). Follows vLLM's OpenAI server where its fields
apply to a split session: ``max_tokens`` / ``max_completion_tokens``, ``temperature``,
``top_p``, ``top_k``, ``seed``, ``stop``, ``stop_token_ids``, ``ignore_eos``,
``include_stop_str_in_output``, ``skip_special_tokens``, ``return_token_ids``, ``stream``,
``stream_options.include_usage``. Fields the gateway cannot honour (``n`` other than 1,
penalties, logprobs, tools, ...) are refused unless they carry their neutral value; fields it
does not know are ignored, as vLLM ignores them. Every refusal is an :class:`APIError` (400)
naming the field, what was expected and what arrived.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client_lib.gateway.errors import bad_request
from vllm_split.wire import protocol as wire

# Fields the gateway cannot honour, accepted only absent, null or at one of these values.
_NEUTRAL: dict[str, tuple] = {
    "n": (1,), "best_of": (1,), "presence_penalty": (0,), "frequency_penalty": (0,), "repetition_penalty": (1,),
    "min_p": (0,), "min_tokens": (0,), "logprobs": (False,), "top_logprobs": (0,), "prompt_logprobs": (),
    "echo": (False,), "suffix": ("",), "logit_bias": ({},), "tools": ([],), "response_format": ({"type": "text"},),
    "structured_outputs": (), "guided_json": (), "guided_regex": (), "guided_choice": (), "guided_grammar": (),
}


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    """Sampling for fields a request leaves out: the model's ``generation_config.json``
    values where it has them (vLLM's ``--generation-config auto``), else OpenAI's."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "SamplingDefaults":
        path = Path(model_dir) / "generation_config.json"
        config = json.loads(path.read_text()) if path.exists() else {}
        found = {name: config[name] for name in ("temperature", "top_p", "top_k") if config.get(name) is not None}
        return cls(**found)


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """What a request asks of its one generation, checked."""

    model: str | None
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    max_tokens: int | None  # None: as many as the context holds (up to the gateway's default)
    temperature: float
    top_p: float
    top_k: int  # 0: off
    seed: int | None
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    include_stop_str_in_output: bool
    skip_special_tokens: bool
    return_token_ids: bool  # vLLM's field: token ids in the answer

    def sampling(self, max_tokens: int) -> wire.SamplingOptions:
        """The session's sampling options (the wire module's checks too, as 400s)."""
        try:
            return wire.SamplingOptions(max_tokens=max_tokens, temperature=float(self.temperature),
                                        top_p=float(self.top_p), top_k=self.top_k, seed=self.seed,
                                        stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos)
        except wire.ProtocolError as exc:
            raise bad_request(str(exc), param=str(exc).split(":")[0].removesuffix("[]")) from exc


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    params: GenerationParams
    prompt: str | tuple[int, ...]  # text, or token ids


@dataclass(frozen=True, slots=True)
class ChatRequest:
    params: GenerationParams
    messages: tuple[dict, ...]  # each with "role" and text "content"
    add_generation_prompt: bool


def parse_completion(body: Any, defaults: SamplingDefaults) -> CompletionRequest:
    body = _object(body)
    return CompletionRequest(params=_params(body, defaults, max_tokens=_int(body, "max_tokens", None, low=1)),
                             prompt=_prompt(body.get("prompt")))


def parse_chat(body: Any, defaults: SamplingDefaults) -> ChatRequest:
    body = _object(body)
    max_tokens = _int(body, "max_completion_tokens", None, low=1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", None, low=1)
    return ChatRequest(params=_params(body, defaults, max_tokens=max_tokens), messages=_messages(body.get("messages")),
                       add_generation_prompt=_bool(body, "add_generation_prompt", True))


def _params(body: dict, defaults: SamplingDefaults, *, max_tokens: int | None) -> GenerationParams:
    for name, neutral in _NEUTRAL.items():
        value = body.get(name)
        if value is not None and not any(_same(value, v) for v in neutral):
            accepted = " or ".join(json.dumps(v) for v in neutral)
            raise bad_request(f"{name} = {json.dumps(value)} is not supported by the split-inference gateway "
                              f"(accepted: {accepted + ', ' if accepted else ''}null or absent)", param=name)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request(f"model: expected a string, got {json.dumps(model)}", param="model")
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not stream:
        raise bad_request("stream_options: only allowed with stream = true", param="stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request(f"stream_options: expected an object, got {json.dumps(options)}", param="stream_options")
    top_k = _int(body, "top_k", defaults.top_k, low=-1)
    return GenerationParams(
        model=model, stream=stream, include_usage=_bool(options or {}, "include_usage", False, where="stream_options."),
        max_tokens=max_tokens, temperature=_number(body, "temperature", defaults.temperature, low=0.0),
        top_p=_number(body, "top_p", defaults.top_p, low=0.0, high=1.0, low_open=True),
        top_k=max(top_k, 0), seed=_int(body, "seed", None, low=0), stop=_stop(body.get("stop")),
        stop_token_ids=tuple(_int_list(body, "stop_token_ids")), ignore_eos=_bool(body, "ignore_eos", False),
        include_stop_str_in_output=_bool(body, "include_stop_str_in_output", False),
        skip_special_tokens=_bool(body, "skip_special_tokens", True),
        return_token_ids=_bool(body, "return_token_ids", False))


# ---------------------------------------------------------------- prompts and messages
def _prompt(value: Any) -> str | tuple[int, ...]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one prompt
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        if min(value) < 0:
            raise bad_request(f"prompt: token ids must be >= 0, got {min(value)}", param="prompt")
        return tuple(value)
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise bad_request(f"prompt: a batch of {len(value)} prompts; the gateway takes one prompt per request",
                          param="prompt")
    raise bad_request(f"prompt: expected a string or a non-empty list of token ids, got {_short(value)}", param="prompt")


def _messages(value: Any) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        raise bad_request(f"messages: expected a non-empty list of messages, got {_short(value)}", param="messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request(f"messages[{i}]: expected an object with a string role, got {_short(message)}",
                              param="messages")
        out.append({**message, "content": _content(message.get("content"), i)})
    return tuple(out)


def _content(content: Any, i: int) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"messages[{i}].content: expected a string or a list of parts, got {_short(content)}",
                          param="messages")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise bad_request(f"messages[{i}].content[{j}]: only text parts are supported, got {_short(part)}",
                              param="messages")
        texts.append(part["text"])
    return "\n".join(texts)  # as vLLM joins text parts


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise bad_request(f"stop: expected a string or a list of strings, got {_short(value)}", param="stop")


# ---------------------------------------------------------------- fields
def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _same(value: Any, neutral: Any) -> bool:
    """``value`` is ``neutral`` (numbers by value, 0 == 0.0; a bool only as that bool)."""
    if isinstance(value, bool) or isinstance(neutral, bool):
        return value is neutral
    return value == neutral


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(body: dict, name: str, default: int | None, *, low: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or value < low:
        raise bad_request(f"{name}: expected an integer >= {low}, got {_short(value)}", param=name)
    return value


def _number(body: dict, name: str, default: float, *, low: float, high: float | None = None,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (low_open and value == low) or (high is not None and value > high):
        bound = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"
        raise bad_request(f"{name}: expected a number in {bound}, got {_short(value)}", param=name)
    return value


def _bool(body: dict, name: str, default: bool, *, where: str = "") -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{where}{name}: expected true or false, got {_short(value)}", param=where + name)
    return value


def _int_list(body: dict, name: str) -> list[int]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(_is_int(v) and v >= 0 for v in value):
        raise bad_request(f"{name}: expected a list of token ids (integers >= 0), got {_short(value)}", param=name)
    return value


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
