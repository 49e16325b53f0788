"""U-shaped split sessions on the client: token ids never leave the device.

Runs in the client's process (no vLLM), for :class:`client_lib.session.SplitSession` when it
is created with a ``tail`` (:class:`client_lib.tail_layers.TailLayers`)::

    layers = LocalLayers(model_dir, split_layer=7)         # embedding + layers [0, 7)
    tail = TailLayers(model_dir, return_layer=20)          # layers [20, L), norm, LM head
    async with await SplitSession.create(url, layers, tail=tail,
                                         sampling=SamplingOptions(max_tokens=64)) as session:
        async for token in session.generate(prompt_ids):
            print(token.token_id)

The server runs layers ``[k, m)`` only and answers ``Hidden`` frames
(:mod:`vllm_split.wire.ushape`): the layer-``m`` rows of the whole prompt, then one row per
decoded position. The client runs them through its tail (with its own KV cache), samples
(:class:`ClientSampler`: greedy, or temperature / top-k / top-p with its own seeded
generator), applies its stop tokens and ``max_tokens``, and sends the next token's
layer-``k`` row, or ``Close`` when it is done. The ``Open`` carries no token id: its
sampling is ``max_tokens`` alone (the server's limit). ``layers`` and ``tail`` are both fixed
(``k < m``) or both ``"auto"`` (the server chooses ``(k, m)``, answered in
``Opened.split_layer`` / ``Opened.return_layer``).
"""
from __future__ import annotations

import time
from typing import Any, AsyncIterator

import torch

from client_lib.session import ServerError, SplitSession, TokenEvent
from vllm_split.wire import protocol as wire
from vllm_split.wire.contract import ErrorCode


def check_u_layers(layers: Any, tail: Any) -> None:
    """Before connecting: ``layers`` and ``tail`` are both fixed with ``k < m`` or both ``auto``."""
    if getattr(layers, "auto", False) != getattr(tail, "auto", False):
        raise ValueError("a U-shaped session fixes both split_layer and return_layer or neither: got split_layer "
                         f"{'auto' if layers.auto else layers.split_layer}, return_layer "
                         f"{'auto' if tail.auto else tail.return_layer}")
    if not layers.auto and not layers.split_layer < tail.return_layer:
        raise ValueError(f"return_layer {tail.return_layer} must be above split_layer {layers.split_layer}: the "
                         "server runs layers [split_layer, return_layer), at least one")


async def accept_u_opened(session: SplitSession, msg: wire.Opened) -> None:
    """The server's answer to a U-shaped Open: a U placement (else the session is closed
    before anything is sent), which an ``auto`` tail then takes."""
    m = msg.return_layer
    if m is None or not msg.split_layer < m <= msg.num_layers:
        await session.close()
        raise _protocol_error(f"the server answered a U-shaped Open with split_layer {msg.split_layer}, return_layer {m}: "
                           f"expected split_layer < return_layer <= {msg.num_layers}; the session is closed before "
                           "anything was sent")
    if session.tail.auto:
        session.tail.use_return_layer(m)
    elif m != session.tail.return_layer:
        await session.close()
        raise _protocol_error(f"the server placed the tail at return_layer {m}, this client asked for "
                           f"{session.tail.return_layer}")


def _protocol_error(message: str) -> ServerError:
    return ServerError(ErrorCode.PROTOCOL, message, True)


class ClientSampler:
    """Sampling of :class:`wire.SamplingOptions` on the client's logits."""

    def __init__(self, options: wire.SamplingOptions, eos_token_ids: tuple[int, ...]) -> None:
        self.options = options
        self.stop_ids = set(options.stop_token_ids) | (set() if options.ignore_eos else set(eos_token_ids))
        self.generator = torch.Generator().manual_seed(options.seed) if options.seed is not None else None

    def sample(self, logits: torch.Tensor) -> int:
        o = self.options
        if o.temperature == 0:
            return int(torch.argmax(logits))
        logits = logits / o.temperature
        if o.top_k > 0:
            kth = torch.topk(logits, min(o.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if o.top_p < 1.0:
            ordered, order = torch.sort(probs, descending=True)
            drop = torch.cumsum(ordered, 0) - ordered > o.top_p
            probs = torch.zeros_like(probs).scatter(0, order, ordered.masked_fill(drop, 0.0))
        return int(torch.multinomial(probs / probs.sum(), 1, generator=self.generator))

    def finish_reason(self, token_id: int, num_tokens: int) -> str | None:
        if token_id in self.stop_ids:
            return "stop"
        return "length" if num_tokens >= self.options.max_tokens else None


async def _rows_until(session: SplitSession, end: int, index: int) -> tuple[torch.Tensor, str | None]:
    """The Hidden frames of output ``index`` up to position ``end`` (exclusive), as one tensor."""
    parts, reason, upto = [], None, None
    while upto != end:
        msg = await session._recv()
        if isinstance(msg, wire.Finished):
            raise _protocol_error(f"the server finished ({msg.finish_reason}) before the rows of output {index}")
        if not isinstance(msg, wire.Hidden) or msg.index != index or (upto is not None and msg.start != upto):
            got = type(msg).__name__ + (f"(index {msg.index}, start {msg.start})" if isinstance(msg, wire.Hidden) else "")
            raise _protocol_error(f"expected the Hidden rows of output {index} up to position {end}, got {got}")
        parts.append(msg.to_tensor(dtype=session.tail.dtype))
        upto, reason = msg.end, msg.finish_reason
        if upto > end:
            raise _protocol_error(f"Hidden rows of output {index} run to position {upto}, past {end}")
    return torch.cat(parts), reason


async def u_generate(session: SplitSession, prompt_ids: list[int], *, chunk_rows: int) -> AsyncIterator[TokenEvent]:
    """The U-shaped generation loop (module docstring)."""
    layers, tail, stats = session.layers, session.tail, session.stats
    sampler = ClientSampler(session.sampling, tail.eos_token_ids)
    layers.reset()
    tail.reset()
    n = len(prompt_ids)
    stats.num_prompt_tokens = n
    t_start = time.perf_counter()
    hidden = await session._forward(prompt_ids)
    local = time.perf_counter() - t_start
    await session._send_prompt(hidden, chunk_rows=chunk_rows)
    sent_at, index = time.perf_counter(), 0
    while True:
        rows, server_reason = await _rows_until(session, n + index, index)
        waited = time.perf_counter() - sent_at
        t0 = time.perf_counter()
        token = sampler.sample(tail.forward(rows))
        local += time.perf_counter() - t0
        reason = sampler.finish_reason(token, index + 1) or server_reason
        now = time.perf_counter()
        stats.token_times.append(now)
        if stats.time_to_first_token is None:
            stats.time_to_first_token = now - t_start
        event = TokenEvent(index=index, token_id=token, finish_reason=reason, local_seconds=local,
                           round_trip_seconds=waited)
        stats.events.append(event)
        stats.num_output_tokens = index + 1
        if reason is not None:
            yield event
            stats.finish_reason = reason
            await _end(session, server_finished=server_reason is not None)
            return
        failure = None
        try:  # the next activation leaves before the caller gets the token (SplitSession._tokens)
            t0 = time.perf_counter()
            row = await session._forward([token])
            local = time.perf_counter() - t0
            await session._send(wire.Activation.from_tensor(row, start=n + index, wire_dtype=session.opened.wire_dtype))
        except Exception as exc:  # noqa: BLE001  (raised below, once the token is out)
            failure = exc
        sent_at, index = time.perf_counter(), index + 1
        yield event
        if failure is not None:
            raise failure


async def _end(session: SplitSession, *, server_finished: bool) -> None:
    """The client is done: read the server's Finished when the server ended it, else send Close."""
    if server_finished:
        msg = await session._recv()
        if not isinstance(msg, wire.Finished):
            raise _protocol_error(f"expected Finished after the last rows, got {type(msg).__name__}")
        return
    if not session._ws.closed:
        await session._send(wire.Close())
