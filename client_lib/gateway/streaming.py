"""A generation answered as server-sent events (``stream: true``).

Runs in the gateway. The response starts only once the first token has arrived, so that a
refusal of the split server (at Open, before any token: ``server_busy``,
``sla_unreachable``, a bad request) is still an ordinary error answer with its HTTP status
and ``Retry-After``, and the placement headers (``x-vllm-split-layer``, ...) are known.
Then: a chat stream's role chunk, one chunk per token that adds text, a last chunk with the
finish reason and the ``vllm_split`` placement (measured TTFT/TPOT included), the usage
chunk when ``stream_options.include_usage`` asks for it, and ``data: [DONE]``. An error
after the start is sent as a ``data: {"error": ...}`` event before ``[DONE]``. A client that
goes away ends the generation (its session closes, which aborts the request on the server).
"""
from __future__ import annotations

import logging
from contextlib import aclosing

from aiohttp import web

from client_lib.gateway.errors import APIError
from client_lib.gateway.generation import SplitGeneration
from client_lib.gateway.responses import SSE_DONE, ResponseFormat, sse

logger = logging.getLogger(__name__)


async def stream_answer(request: web.Request, generation: SplitGeneration, fmt: ResponseFormat, *,
                        include_usage: bool) -> web.StreamResponse:
    async with aclosing(generation.deltas()) as deltas:
        first = await anext(deltas, None)  # an APIError here is an ordinary error answer
        if first is None:
            raise APIError(502, "the split server ended the session without sending a token")
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        response = web.StreamResponse(headers={**headers, **generation.placement.headers()})
        await response.prepare(request)
        try:
            try:
                await _events(response, deltas, first, generation, fmt, include_usage=include_usage)
            except APIError as exc:
                logger.info("stream ended by an error: %d %s", exc.status, exc.body()["error"]["type"])
                await response.write(sse(exc.body()))
            await response.write(SSE_DONE)
            await response.write_eof()
        except ConnectionResetError:
            logger.info("the client went away during a stream; its session is closed")
    return response


async def _events(response: web.StreamResponse, deltas, delta, generation: SplitGeneration, fmt: ResponseFormat, *,
                  include_usage: bool) -> None:
    opening = fmt.first_chunk()
    if opening is not None:
        await response.write(sse(opening))
    pending: list[int] = []  # token ids not yet sent with a chunk
    last_text = ""
    while delta is not None:
        pending.extend(delta.token_ids)
        if generation.outcome is not None:
            last_text += delta.text  # sent with the finish reason once the session has closed
        elif delta.text:
            await response.write(sse(fmt.chunk(text=delta.text, token_ids=pending)))
            pending = []
        delta = await anext(deltas, None)
    outcome = generation.outcome
    if outcome is None:
        raise APIError(502, "the split server ended the session before the generation finished")
    await response.write(sse(fmt.chunk(text=last_text, token_ids=pending, outcome=outcome,
                                       placement=generation.placement)))
    if include_usage:
        await response.write(sse(fmt.usage_chunk(outcome)))
