"""Helpers for the gateway tests: one greedy chat, the parts of an answer both servers must
agree on (from a whole response or from stream chunks), a stop string that spans tokens."""
from __future__ import annotations

from dataclasses import dataclass

from tests.engine_gateway.server_config import MAX_TOKENS


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    finish_reason: str
    stop_reason: int | str | None
    usage: tuple[int, int]  # prompt tokens, completion tokens


def answer(response) -> Answer:
    """The parts of an ``openai`` chat or completion response both servers must agree on."""
    choice = response.choices[0]
    text = choice.message.content if hasattr(choice, "message") else choice.text
    extra = choice.model_extra or {}
    return Answer(text=text, token_ids=extra.get("token_ids"), finish_reason=choice.finish_reason,
                  stop_reason=extra.get("stop_reason"),
                  usage=(response.usage.prompt_tokens, response.usage.completion_tokens))


def spanning_stop(tokenizer, token_ids: list[int]) -> str:
    """A stop string of up to two characters each side of a token boundary of ``token_ids``'
    text (at least three in all, after the fourth token) that first occurs there."""
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    for i in range(4, len(token_ids) - 1):
        a, b, c = (tokenizer.decode(token_ids[:n], skip_special_tokens=True) for n in (i, i + 1, i + 2))
        left, right = b[len(a):][-2:], c[len(b):][:2]
        stop = left + right
        if left and right and len(stop) >= 3 and text.find(stop) == len(b) - len(left):
            return stop
    raise AssertionError(f"no token boundary in {text!r} with a stop string that first occurs there")


def streamed(chunks: list) -> Answer:
    """The :class:`Answer` of a stream's chunks (``stream_options.include_usage`` set)."""
    choices = [c.choices[0] for c in chunks if c.choices]
    text = "".join((ch.delta.content or "") if hasattr(ch, "delta") else ch.text for ch in choices)
    token_ids = [t for ch in choices for t in (ch.model_extra or {}).get("token_ids") or []]
    (last,) = [ch for ch in choices if ch.finish_reason is not None]
    usage = chunks[-1].usage
    return Answer(text=text, token_ids=token_ids, finish_reason=last.finish_reason,
                  stop_reason=(last.model_extra or {}).get("stop_reason"),
                  usage=(usage.prompt_tokens, usage.completion_tokens))


def chat(client, model: str, prompt: str, **kw):
    """A greedy chat of MAX_TOKENS tokens with its token ids (vLLM's ``return_token_ids``)."""
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          temperature=0, max_tokens=MAX_TOKENS,
                                          extra_body={"return_token_ids": True}, **kw)
