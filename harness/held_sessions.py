"""How many split sessions a server holds at once without preemption (benchmarks only).

Opens sessions one after another at one split layer, each sending the same prompt's
activations and then holding after its first token (the engine keeps its KV while it
waits for the next activation). The count stops at the first session whose first token
does not come within ``first_token_timeout_s`` (its request waits for KV blocks) or when
the engine's preemption counter moves. All sessions are closed at the end.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp

from harness.server_process import metrics
from vllm_split.wire import protocol as wire
from vllm_split.wire.contract import SESSION_PATH


@dataclass(frozen=True)
class HeldResult:
    held: int  # sessions holding their KV at once when the count stopped
    stopped_by: str  # "timeout" (a session waited for KV), "preemption" or "limit"
    preemptions: float  # engine preemptions during the count


async def count_held_sessions(url: str, *, fingerprint: str, split_layer: int, prompt_rows, max_sessions: int,
                              first_token_timeout_s: float = 15.0) -> HeldResult:
    async with aiohttp.ClientSession() as http:
        sockets = []
        before = (await asyncio.to_thread(metrics, url)).get("vllm:num_preemptions_total", 0.0)
        held, stopped_by = 0, "limit"
        try:
            for _ in range(max_sessions):
                ws = await http.ws_connect(url.replace("http://", "ws://") + SESSION_PATH, max_msg_size=0)
                sockets.append(ws)
                await ws.send_bytes(wire.encode(wire.Open(
                    model_fingerprint=fingerprint, split_layer=split_layer,
                    sampling=wire.SamplingOptions(max_tokens=64, ignore_eos=True))))
                opened = wire.decode((await ws.receive(timeout=60)).data)
                if not isinstance(opened, wire.Opened):
                    raise RuntimeError(f"session refused: {opened}")
                await ws.send_bytes(wire.encode(wire.Activation.from_tensor(prompt_rows, start=0, end_of_prompt=True)))
                try:
                    msg = await ws.receive(timeout=first_token_timeout_s)
                except asyncio.TimeoutError:
                    stopped_by = "timeout"
                    break
                token = wire.decode(msg.data)
                if not isinstance(token, wire.Token):
                    raise RuntimeError(f"expected a token, got {token}")
                now = (await asyncio.to_thread(metrics, url)).get("vllm:num_preemptions_total", 0.0)
                if now > before:
                    stopped_by = "preemption"
                    break
                held += 1
            after = (await asyncio.to_thread(metrics, url)).get("vllm:num_preemptions_total", 0.0)
        finally:
            for ws in sockets:
                await ws.close()
    return HeldResult(held=held, stopped_by=stopped_by, preemptions=after - before)
