"""The gateway's OpenAI answers: response bodies, stream chunks and server-sent events.

Runs in the gateway; pure (dicts in, dicts and bytes out). Shapes follow vLLM's OpenAI
server: ``chat.completion`` / ``chat.completion.chunk`` and ``text_completion`` objects,
``finish_reason`` plus vLLM's ``stop_reason`` (the stop string or stop token id), ``usage``,
vLLM's ``token_ids`` / ``prompt_token_ids`` when ``return_token_ids`` is asked for, and the
gateway's own ``vllm_split`` field with the placement (:class:`Placement`). A stream is
``data: {json}`` events ending with ``data: [DONE]``.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass

SSE_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class Placement:
    """Where the request ran and how fast: the server's prediction and the session's measurement."""

    split_layer: int
    num_layers: int
    placement: str  # "fixed" (the gateway's k), or the server's choice: "dp", "least_offload", "server_only"
    predicted_ttft_s: float | None
    predicted_tpot_s: float | None
    measured_ttft_s: float | None = None
    measured_tpot_s: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def headers(self) -> dict[str, str]:
        """Response headers for tools that read the placement before the body."""
        out = {"x-vllm-split-layer": str(self.split_layer), "x-vllm-split-placement": self.placement}
        for name in ("predicted_ttft_s", "predicted_tpot_s", "measured_ttft_s", "measured_tpot_s"):
            value = getattr(self, name)
            if value is not None:
                out[f"x-vllm-split-{name.replace('_', '-')}"] = f"{value:.6f}"
        return out


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a generation ended."""

    finish_reason: str  # "stop" or "length"
    stop_reason: int | str | None  # the stop string or stop token id; None for EOS and length
    num_prompt_tokens: int
    num_output_tokens: int

    def usage(self) -> dict:
        return {"prompt_tokens": self.num_prompt_tokens, "total_tokens": self.num_prompt_tokens + self.num_output_tokens,
                "completion_tokens": self.num_output_tokens, "prompt_tokens_details": None}


def sse(event: dict) -> bytes:
    return b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"


class ResponseFormat:
    """One endpoint's answers: ``chat`` (``/v1/chat/completions``) or ``completion`` (``/v1/completions``)."""

    def __init__(self, kind: str, *, model: str, return_token_ids: bool, prompt_ids: list[int]) -> None:
        if kind not in ("chat", "completion"):
            raise ValueError(f"kind: expected 'chat' or 'completion', got {kind!r}")
        self.chat = kind == "chat"
        self.model = model
        self.return_token_ids = return_token_ids
        self.prompt_ids = prompt_ids
        self.id = f"chatcmpl-{uuid.uuid4().hex}" if self.chat else f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._sent_prompt_ids = False

    def _envelope(self, object_name: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model, "choices": choices}

    def body(self, *, text: str, token_ids: list[int], outcome: Outcome, placement: Placement | None) -> dict:
        """The whole answer of a request that did not stream."""
        choice: dict = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice.update(logprobs=None, finish_reason=outcome.finish_reason, stop_reason=outcome.stop_reason)
        if self.return_token_ids:
            choice["token_ids"] = list(token_ids)
            if not self.chat:
                choice["prompt_token_ids"] = list(self.prompt_ids)
        out = self._envelope("chat.completion" if self.chat else "text_completion", [choice])
        out["usage"] = outcome.usage()
        if self.chat and self.return_token_ids:
            out["prompt_token_ids"] = list(self.prompt_ids)
        out["vllm_split"] = placement.to_dict() if placement is not None else None
        return out

    def first_chunk(self) -> dict | None:
        """A chat stream opens with the assistant's role (completions have no first chunk)."""
        if not self.chat:
            return None
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        out = self._envelope("chat.completion.chunk", [choice])
        if self.return_token_ids:
            out["prompt_token_ids"] = list(self.prompt_ids)
        return out

    def chunk(self, *, text: str, token_ids: list[int], outcome: Outcome | None = None,
              placement: Placement | None = None) -> dict:
        """One stream chunk: new text, and on the last one how it ended and the placement."""
        choice: dict = {"index": 0}
        if self.chat:
            choice["delta"] = {"content": text} if text or outcome is None else {}
        else:
            choice["text"] = text
        choice.update(logprobs=None, finish_reason=outcome.finish_reason if outcome else None,
                      stop_reason=outcome.stop_reason if outcome else None)
        if self.return_token_ids:
            choice["token_ids"] = list(token_ids)
            if not self.chat and not self._sent_prompt_ids:  # vLLM: on a completion stream's first chunk
                choice["prompt_token_ids"] = list(self.prompt_ids)
                self._sent_prompt_ids = True
        out = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])
        if outcome is not None:
            out["vllm_split"] = placement.to_dict() if placement is not None else None
        return out

    def usage_chunk(self, outcome: Outcome) -> dict:
        """``stream_options.include_usage``: the last chunk, with no choices and the usage."""
        out = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        out["usage"] = outcome.usage()
        return out
