"""Emulated split clients: activations computed beforehand, replayed over real sessions.

On a 2-core machine the clients' own compute would compete with the server being
measured. So each client's activations are computed exactly, once, by the client library
(greedy decoding makes the token sequence known in advance: it is the unsplit engine's
continuation), and a replaying client only sends the stored rows over a real WebSocket
session to the real server, checking that every token the server returns is the expected
one.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import torch

from client_lib.local_layers import LocalLayers
from vllm_split.wire.contract import SESSION_PATH
from vllm_split.wire import protocol as wire


@dataclass(frozen=True)
class Script:
    """What one emulated client sends: prompt rows and one row per expected token."""

    split_layer: int
    prompt_rows: torch.Tensor  # [prompt_len, hidden]
    decode_rows: torch.Tensor  # [len(expected) - 1, hidden]: rows for tokens 0..n-2
    expected: list[int]  # the continuation the server must produce
    return_layer: int | None = None  # U-shaped: the server runs [split_layer, return_layer) and returns rows


def make_script(layers: LocalLayers, prompt_ids: list[int], continuation: list[int]) -> Script:
    layers.reset()
    rows = layers.forward(list(prompt_ids) + list(continuation[:-1]))
    layers.reset()
    n = len(prompt_ids)
    return Script(split_layer=layers.split_layer, prompt_rows=rows[:n], decode_rows=rows[n:],
                  expected=list(continuation))


@dataclass
class ReplayResult:
    tokens: list[int]
    exact: bool
    times: list[float]  # time.perf_counter() when each token (U-shaped: each output's rows) arrived
    rows: list[torch.Tensor] | None = None  # U-shaped: the layer-m rows of each output (the prompt's first)


async def replay(url: str, script: Script, *, fingerprint: str, http: aiohttp.ClientSession,
                 chunk_rows: int = 1024, turnaround_s: float = 0.0,
                 sla: wire.RequestSLA | None = None) -> ReplayResult:
    """Run one session from a script; returns the tokens the server sent. ``turnaround_s``:
    how long the emulated client takes from a token to its next activation (its layers and
    its network), slept before each one; ``sla``: the bounds the session states."""
    n_tokens = len(script.expected)
    u = script.return_layer is not None  # a U Open carries no token id: max_tokens alone
    sampling = wire.SamplingOptions(max_tokens=n_tokens, ignore_eos=not u)
    ws = await http.ws_connect(url.replace("http://", "ws://") + SESSION_PATH, max_msg_size=0)
    try:
        await ws.send_bytes(wire.encode(wire.Open(
            model_fingerprint=fingerprint, split_layer=script.split_layer, sampling=sampling, sla=sla,
            u_shape=u, return_layer=script.return_layer)))
        opened = wire.decode((await ws.receive()).data)
        if not isinstance(opened, wire.Opened):
            raise RuntimeError(f"session refused: {opened}")
        n = script.prompt_rows.shape[0]
        for begin in range(0, n, chunk_rows):
            end = min(begin + chunk_rows, n)
            await ws.send_bytes(wire.encode(wire.Activation.from_tensor(
                script.prompt_rows[begin:end], start=begin, end_of_prompt=end == n)))
        tokens: list[int] = []
        times: list[float] = []
        rows: list[torch.Tensor] = []
        parts: list[torch.Tensor] = []
        while True:
            msg = wire.decode((await ws.receive()).data)
            if isinstance(msg, wire.Finished):
                break
            if isinstance(msg, wire.Error):
                raise RuntimeError(f"server error: {msg}")
            if u:
                if not isinstance(msg, wire.Hidden) or msg.index != len(rows):
                    raise RuntimeError(f"expected the Hidden rows of output {len(rows)}, got {msg}")
                parts.append(msg.to_tensor(dtype=torch.float32))
                if msg.end < n + msg.index:  # more frames of this output's rows follow
                    continue
                rows.append(torch.cat(parts))
                parts = []
            else:
                tokens.append(msg.token_id)
            times.append(time.perf_counter())
            if msg.finish_reason is None:
                if turnaround_s > 0:
                    await asyncio.sleep(turnaround_s)
                await ws.send_bytes(wire.encode(wire.Activation.from_tensor(
                    script.decode_rows[msg.index : msg.index + 1], start=n + msg.index)))
        if u:
            return ReplayResult(tokens=[], exact=False, times=times, rows=rows)  # check_u_tokens fills them in
        return ReplayResult(tokens=tokens, exact=tokens == script.expected, times=times)
    finally:
        await ws.close()


async def replay_many(url: str, scripts: list[Script], *, fingerprint: str) -> list[ReplayResult]:
    async with aiohttp.ClientSession() as http:
        return await asyncio.gather(*(replay(url, s, fingerprint=fingerprint, http=http) for s in scripts))


def check_u_tokens(results: list[ReplayResult], scripts: list[Script], tails: dict) -> None:
    """Fill in the tokens of the U-shaped results: the client's tail (``tails[return_layer]``,
    a :class:`client_lib.tail_layers.TailLayers`) over the returned rows, greedy, as the
    client would sample them; ``exact`` against the script's continuation."""
    for result, script in zip(results, scripts):
        if script.return_layer is None:
            continue
        tail = tails[script.return_layer]
        tail.reset()
        result.tokens = [int(torch.argmax(tail.forward(r))) for r in result.rows]
        result.exact = result.tokens == script.expected
        tail.reset()
