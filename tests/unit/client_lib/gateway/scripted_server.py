"""A split server for the gateway's unit tests: it answers every session with the same
scripted tokens and records what each session sent (the Open and every activation row)."""
from __future__ import annotations

from dataclasses import dataclass, field

import aiohttp
import torch
from aiohttp import web

from vllm_split.wire import protocol as wire


@dataclass
class Recorded:
    open: wire.Open
    prompt_rows: list[torch.Tensor] = field(default_factory=list)
    decode_rows: list[torch.Tensor] = field(default_factory=list)
    closed_early: bool = False  # the client closed before the last token (a stop string, a refused Opened)


class ScriptedServer:
    """Sends ``tokens`` (cut at ``max_tokens``: finish "length"; else the last ends with
    ``finish``), or refuses every session with ``refuse`` (a fatal ``Error``), or fails
    each session with an internal error after ``fail_after`` tokens."""

    def __init__(self, tokens: list[int], *, num_layers: int, hidden: int, finish: str = "stop",
                 refuse: wire.Error | None = None, fail_after: int | None = None, auto_layer: int = 2) -> None:
        self.tokens, self.num_layers, self.hidden = tokens, num_layers, hidden
        self.finish, self.refuse, self.fail_after, self.auto_layer = finish, refuse, fail_after, auto_layer
        self.sessions: list[Recorded] = []

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        opened = wire.decode((await ws.receive()).data)
        rec = Recorded(open=opened)
        self.sessions.append(rec)
        if self.refuse is not None:
            await ws.send_bytes(wire.encode(self.refuse))
            await ws.close()
            return ws
        auto = opened.split_layer is None
        await ws.send_bytes(wire.encode(wire.Opened(
            session_id=f"s{len(self.sessions)}", split_layer=self.auto_layer if auto else opened.split_layer,
            num_layers=self.num_layers, hidden_size=self.hidden, dtype="float32", max_frame_bytes=1 << 20,
            placement="dp" if auto else "fixed", predicted_ttft_s=0.25 if auto else None,
            predicted_tpot_s=0.05 if auto else None)))
        while True:
            msg = await ws.receive()
            if msg.type != aiohttp.WSMsgType.BINARY:  # the client left before its prompt (it refused the Opened)
                rec.closed_early = True
                return ws
            act = wire.decode(msg.data)
            rec.prompt_rows.append(act.to_tensor())
            if act.end_of_prompt:
                break
        max_tokens = opened.sampling.max_tokens
        tokens = self.tokens[:max_tokens]
        for index, token in enumerate(tokens):
            if index == self.fail_after:
                await ws.send_bytes(wire.encode(wire.Error(code="internal", message="engine failed", fatal=True)))
                await ws.close()
                return ws
            last = index == len(tokens) - 1
            reason = ("length" if len(tokens) == max_tokens else self.finish) if last else None
            await ws.send_bytes(wire.encode(wire.Token(index=index, token_id=token, finish_reason=reason)))
            if last:
                break
            msg = await ws.receive()
            if msg.type != aiohttp.WSMsgType.BINARY:
                rec.closed_early = True
                return ws
            rec.decode_rows.append(wire.decode(msg.data).to_tensor())
        await ws.send_bytes(wire.encode(wire.Finished(finish_reason=reason, num_prompt_tokens=0,
                                                      num_output_tokens=len(tokens))))
        await ws.close()
        return ws
