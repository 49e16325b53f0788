"""The gateway's HTTP routes: an OpenAI-compatible API on the client device.

Runs in the gateway (``vllm-split-client serve``), an aiohttp server. Routes decode the
request (:mod:`~client_lib.gateway.openai_requests`), make the prompt's token ids (the
model's chat template for chat), check the model name and the context length, and run the
request as one split session (:class:`~client_lib.gateway.generation.SplitGeneration`);
they do no tensor math. Every error is OpenAI-shaped (:mod:`~client_lib.gateway.errors`),
aiohttp's own (unknown route, body too large) included. With an API key, every ``/v1``
route needs ``Authorization: Bearer KEY``; ``/health`` never does.

    GET  /health               200 while the gateway runs
    GET  /v1/models            the model this gateway serves
    POST /v1/completions       prompt: a string or token ids
    POST /v1/chat/completions  messages, rendered with the model's chat template
"""
from __future__ import annotations

import hmac
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from jinja2 import TemplateError

from client_lib.gateway.errors import APIError, bad_request
from client_lib.gateway.generation import SplitGeneration, Upstream
from client_lib.gateway.openai_requests import (GenerationParams, SamplingDefaults, parse_chat,
                                                parse_completion)
from client_lib.gateway.responses import ResponseFormat
from client_lib.gateway.streaming import stream_answer

logger = logging.getLogger(__name__)
MAX_BODY_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    model_names: tuple[str, ...]  # names a request may give; the first one is listed and answered with
    model_root: str  # the checkpoint folder
    max_model_len: int  # prompt + output tokens (vLLM's clamp: max_tokens is cut to what is left)
    default_max_tokens: int  # max_tokens of a request that gives none (keep <= the server's per-session cap)
    api_key: str | None = None
    sampling_defaults: SamplingDefaults = SamplingDefaults()

    def __post_init__(self) -> None:
        if not self.model_names:
            raise ValueError("model_names: expected at least one name")
        for name in ("max_model_len", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")


class Gateway:
    def __init__(self, config: GatewayConfig, upstream: Upstream, tokenizer: Any) -> None:
        self.config = config
        self.upstream = upstream
        self.tokenizer = tokenizer
        self.vocab_size = upstream.layers.layers.model.embed_tokens.num_embeddings
        self.created = int(time.time())

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def models(self, request: web.Request) -> web.Response:
        cards = [{"id": name, "object": "model", "created": self.created, "owned_by": "vllm-split",
                  "root": self.config.model_root, "parent": None, "max_model_len": self.config.max_model_len}
                 for name in self.config.model_names]
        return web.json_response({"object": "list", "data": cards})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = parse_completion(await _json(request), self.config.sampling_defaults)
        self._check_model(req.params)
        if isinstance(req.prompt, str):
            prompt_ids = self.tokenizer(req.prompt)["input_ids"]
        else:
            prompt_ids = list(req.prompt)
            too_big = [t for t in prompt_ids if t >= self.vocab_size]
            if too_big:
                raise bad_request(f"prompt: token id {too_big[0]} is out of range: the model's vocabulary has "
                                  f"{self.vocab_size} tokens", param="prompt")
        return await self._answer(request, "completion", prompt_ids, req.params, param="prompt")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        req = parse_chat(await _json(request), self.config.sampling_defaults)
        self._check_model(req.params)
        try:
            text = self.tokenizer.apply_chat_template(list(req.messages), tokenize=False,
                                                      add_generation_prompt=req.add_generation_prompt)
        except (TemplateError, ValueError, TypeError, KeyError) as exc:
            raise bad_request(f"messages: the model's chat template cannot render them: {exc}", "messages") from exc
        prompt_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return await self._answer(request, "chat", prompt_ids, req.params, param="messages")

    def _check_model(self, params: GenerationParams) -> None:
        if params.model is not None and params.model not in self.config.model_names:
            raise APIError(404, f"The model `{params.model}` does not exist.", param="model")

    def _max_tokens(self, params: GenerationParams, num_prompt_tokens: int, param: str) -> int:
        limit = self.config.max_model_len
        if num_prompt_tokens == 0:
            raise bad_request(f"{param}: the prompt is empty (0 tokens); at least one token is needed", param)
        if num_prompt_tokens >= limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, your prompt "
                              f"contains {num_prompt_tokens} input tokens, which leaves no room for output "
                              f"tokens. Please reduce the length of the input prompt.", param)
        wanted = params.max_tokens if params.max_tokens is not None else self.config.default_max_tokens
        return min(wanted, limit - num_prompt_tokens)

    async def _answer(self, request: web.Request, kind: str, prompt_ids: list[int], params: GenerationParams, *,
                      param: str) -> web.StreamResponse:
        sampling = params.sampling(self._max_tokens(params, len(prompt_ids), param))
        generation = SplitGeneration(self.upstream, self.tokenizer, prompt_ids=prompt_ids, sampling=sampling,
                                     stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output,
                                     skip_special_tokens=params.skip_special_tokens,
                                     request_type=self.upstream.request_type_for(kind))
        fmt = ResponseFormat(kind, model=params.model or self.config.model_names[0],
                             return_token_ids=params.return_token_ids, prompt_ids=prompt_ids)
        if params.stream:
            return await stream_answer(request, generation, fmt, include_usage=params.include_usage)
        async with aclosing(generation.deltas()) as deltas:
            async for _ in deltas:
                pass
        if generation.outcome is None:
            raise APIError(502, "the split server ended the session before the generation finished")
        body = fmt.body(text=generation.text, token_ids=generation.token_ids, outcome=generation.outcome,
                        placement=generation.placement)
        return web.json_response(body, headers=generation.placement.headers())


async def _json(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError as exc:  # bad JSON or bad UTF-8
        raise bad_request(f"the request body is not valid JSON: {exc}") from exc


def _error_response(exc: APIError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers())


def _middlewares(api_key: str | None):
    @web.middleware
    async def errors(request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except APIError as exc:
            logger.info("%s %s -> %d %s", request.method, request.path, exc.status, exc.body()["error"]["type"])
            return _error_response(exc)
        except web.HTTPException as exc:  # aiohttp's own: no such route, method, body too large
            if exc.status < 400:
                raise
            return _error_response(APIError(exc.status, f"{exc.reason}: {request.method} {request.path}"))
        except Exception:
            logger.exception("%s %s failed", request.method, request.path)
            return _error_response(APIError(500, "internal error in the split-inference gateway (see its log)"))

    @web.middleware
    async def auth(request: web.Request, handler) -> web.StreamResponse:
        if api_key is not None and request.path.startswith("/v1"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise APIError(401, "Unauthorized: this gateway needs its API key as 'Authorization: Bearer KEY'")
        return await handler(request)

    return [errors, auth]


def create_app(gateway: Gateway) -> web.Application:
    app = web.Application(middlewares=_middlewares(gateway.config.api_key), client_max_size=MAX_BODY_BYTES)
    app.router.add_get("/health", gateway.health)
    app.router.add_get("/v1/models", gateway.models)
    app.router.add_post("/v1/completions", gateway.completions)
    app.router.add_post("/v1/chat/completions", gateway.chat)

    async def close_layers(app: web.Application) -> None:
        gateway.upstream.layers.close()

    app.on_cleanup.append(close_layers)
    return app
