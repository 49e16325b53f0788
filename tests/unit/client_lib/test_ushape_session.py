"""A U-shaped SplitSession against a stand-in server (no engine; the tiny random Llama of
conftest): the client at k = 0 sends embeddings; the server recovers each row's token from
the embedding matrix and runs layers [0, m) on it (a LocalLayers at split layer m, its own
KV cache), answering Hidden frames. The client's greedy tokens then equal the full model's,
its frames carry no token id, it stops on its own stop token with Close, and it takes the
server's finish_reason when the server's max_tokens ends first."""
from __future__ import annotations

import pytest
import torch
from aiohttp import web

from client_lib import LocalLayers, SamplingOptions, SplitSession, TailLayers
from tests.unit.client_lib.conftest import NUM_LAYERS
from tests.unit.client_lib.test_resume import _serve
from vllm_split.wire import protocol as wire

M = 2
PROMPT = [5, 17, 42, 7]


class MiddleServer:
    def __init__(self, model_dir) -> None:
        self.at_m = LocalLayers(model_dir, split_layer=M)
        self.embed = LocalLayers(model_dir, split_layer=0).model.embed_tokens.weight
        self.received: list[wire.Message] = []

    def _ids(self, rows: torch.Tensor) -> list[int]:
        return torch.cdist(rows, self.embed).argmin(dim=1).tolist()

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        msg = wire.decode((await ws.receive()).data)
        self.received.append(msg)
        await ws.send_bytes(wire.encode(wire.Opened(session_id="s", split_layer=0, num_layers=NUM_LAYERS,
                                                    hidden_size=16, dtype="float32", max_frame_bytes=1 << 20,
                                                    return_layer=M)))
        self.at_m.reset()
        act = wire.decode((await ws.receive()).data)
        self.received.append(act)
        n, index = act.rows, 0
        rows = self.at_m.forward(self._ids(act.to_tensor()))
        while True:
            last = index == msg.sampling.max_tokens - 1
            await ws.send_bytes(wire.encode(wire.Hidden.from_tensor(rows, index=index, start=n + index - rows.shape[0],
                                                                    finish_reason="length" if last else None)))
            if last:
                await ws.send_bytes(wire.encode(wire.Finished(finish_reason="length", num_prompt_tokens=n,
                                                              num_output_tokens=index + 1)))
                break
            frame = await ws.receive()
            if frame.type != web.WSMsgType.BINARY:
                break
            act = wire.decode(frame.data)
            self.received.append(act)
            if isinstance(act, wire.Close):
                break
            assert act.start == n + index
            rows = self.at_m.forward(self._ids(act.to_tensor()))
            index += 1
        await ws.close()
        return ws


@torch.no_grad()
def _greedy(model_dir, steps: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = list(PROMPT)
    for _ in range(steps):
        ids.append(int(full(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(PROMPT):]


async def _run(model_dir, server: MiddleServer, **sampling) -> tuple[list[int], SplitSession]:
    runner, url = await _serve(server)
    try:
        async with await SplitSession.create(url, LocalLayers(model_dir, split_layer=0),
                                             tail=TailLayers(model_dir, return_layer=M),
                                             sampling=SamplingOptions(**sampling)) as session:
            tokens = [e.token_id async for e in session.generate(PROMPT)]
    finally:
        await runner.cleanup()
    return tokens, session


async def test_u_session_equals_the_full_model_and_sends_no_token_id(tiny_chat_model):
    server = MiddleServer(tiny_chat_model)
    tokens, session = await _run(tiny_chat_model, server, max_tokens=6, ignore_eos=True)
    assert tokens == _greedy(tiny_chat_model, 6)
    assert session.stats.finish_reason == "length" and session.opened.return_layer == M
    open_, *rest = server.received
    assert open_.u_shape and open_.return_layer == M and open_.sampling == wire.SamplingOptions(max_tokens=6)
    assert all(isinstance(m, wire.Activation) for m in rest)


async def test_the_client_stops_on_its_own_stop_token_with_close(tiny_chat_model):
    expected = _greedy(tiny_chat_model, 6)
    stop = expected[2]
    server = MiddleServer(tiny_chat_model)
    tokens, session = await _run(tiny_chat_model, server, max_tokens=6, ignore_eos=True, stop_token_ids=(stop,))
    assert tokens == expected[: expected.index(stop) + 1] and session.stats.finish_reason == "stop"
    assert server.received[0].sampling.stop_token_ids == ()  # the stop id stayed on the client
    assert isinstance(server.received[-1], wire.Close)


async def test_a_server_without_a_u_answer_is_refused_before_anything_is_sent(tiny_chat_model):
    class NoU(MiddleServer):
        async def handle(self, request):
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            self.received.append(wire.decode((await ws.receive()).data))
            await ws.send_bytes(wire.encode(wire.Opened(session_id="s", split_layer=0, num_layers=NUM_LAYERS,
                                                        hidden_size=16, dtype="float32", max_frame_bytes=1 << 20)))
            await ws.receive()
            return ws

    from client_lib import ServerError

    server = NoU(tiny_chat_model)
    with pytest.raises(ServerError, match="return_layer None: expected split_layer < return_layer"):
        await _run(tiny_chat_model, server, max_tokens=3)
    assert len(server.received) == 1
