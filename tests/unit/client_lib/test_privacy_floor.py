"""The client's privacy floor (``SplitSession.create(privacy_floor=F)``, ``--privacy-floor``):
sent in Open without an offer of server decoding; an Opened below it (a misbehaving or older
server) closes the session before any activation or token id leaves; options that cannot
keep it are refused before connecting (a tiny random Llama, a recording server, no engine)."""
from __future__ import annotations

import pytest
from aiohttp import web

from client_lib import LocalLayers, PrivacyFloorError, SamplingOptions, ServerError, SplitSession
from tests.unit.client_lib.conftest import HIDDEN, NUM_LAYERS
from tests.unit.client_lib.test_resume import _serve
from vllm_split.wire import protocol as wire

PROFILE = wire.ClientProfile(layer_prefill_s_per_token=1e-4, layer_decode_s=1e-3)


class RecordingServer:
    """Answers Open with ``answer`` (an Opened at ``split_layer``, or the given Error), then one
    token for the prompt; records every frame each connection sent, until it closed."""

    def __init__(self, split_layer: int = 2, *, server_decode: bool = False, answer: wire.Error | None = None) -> None:
        self.split_layer, self.server_decode, self.answer = split_layer, server_decode, answer
        self.received: list[list[wire.Message]] = []

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        frames: list[wire.Message] = []
        self.received.append(frames)
        frames.append(wire.decode((await ws.receive()).data))
        await ws.send_bytes(wire.encode(self.answer or wire.Opened(
            session_id="s", split_layer=self.split_layer, num_layers=NUM_LAYERS, hidden_size=HIDDEN, dtype="float32",
            max_frame_bytes=1 << 20, placement="dp", server_decode=self.server_decode)))
        async for msg in ws:
            if msg.type != web.WSMsgType.BINARY:
                break
            frames.append(wire.decode(msg.data))
            if isinstance(frames[-1], wire.PromptTokens) or getattr(frames[-1], "end_of_prompt", False):
                await ws.send_bytes(wire.encode(wire.Token(index=0, token_id=5, finish_reason="length")))
                await ws.send_bytes(wire.encode(wire.Finished(finish_reason="length", num_prompt_tokens=3,
                                                              num_output_tokens=1)))
        return ws

    def kinds(self, connection: int = 0) -> list[str]:
        return [type(m).__name__ for m in self.received[connection]]


@pytest.fixture(autouse=True)
def profile_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_SPLIT_CACHE", str(tmp_path))


async def _generate(server: RecordingServer, layers, **options) -> list[int]:
    runner, url = await _serve(server)
    try:
        async with await SplitSession.create(url, layers, profile=PROFILE, sampling=SamplingOptions(max_tokens=1),
                                             **options) as session:
            return [e.token_id async for e in session.generate([1, 2, 3])]
    finally:
        await runner.cleanup()


async def test_the_floor_is_sent_without_an_offer_of_server_decoding(tiny_chat_model):
    server = RecordingServer(split_layer=2)
    assert await _generate(server, LocalLayers(tiny_chat_model), privacy_floor=2) == [5]
    open_ = server.received[0][0]
    assert (open_.split_layer, open_.privacy_floor, open_.server_decode) == (None, 2, False)
    assert server.kinds() == ["Open", "Activation"]  # the prompt's rows at layer 2
    plain = RecordingServer(split_layer=2)
    await _generate(plain, LocalLayers(tiny_chat_model))
    assert (plain.received[0][0].privacy_floor, plain.received[0][0].server_decode) == (0, True)


@pytest.mark.parametrize("split_layer, server_decode", [(1, False), (0, True), (0, False)])
async def test_an_opened_below_the_floor_closes_the_session_before_anything_is_sent(tiny_chat_model, split_layer,
                                                                                     server_decode):
    server = RecordingServer(split_layer=split_layer, server_decode=server_decode)
    with pytest.raises(ServerError, match=rf"the server placed this session at split layer {split_layer}.*, below "
                                          r"this client's privacy floor 2 \(expected split_layer >= 2, no server "
                                          r"decoding\); the session is closed before any activation or token id") as e:
        await _generate(server, LocalLayers(tiny_chat_model), privacy_floor=2)
    assert (e.value.code, e.value.fatal) == ("privacy_floor", True)
    assert server.kinds() == ["Open"]  # no Activation, no PromptTokens


async def test_a_fixed_split_layer_is_checked_against_the_servers_answer_too(tiny_chat_model):
    server = RecordingServer(split_layer=1)  # a server that ignored the client's fixed k = 3
    with pytest.raises(ServerError, match="split layer 1, below this client's privacy floor 3"):
        await _generate(server, LocalLayers(tiny_chat_model, split_layer=3), privacy_floor=3)
    assert server.received[0][0].split_layer == 3 and server.kinds() == ["Open"]


async def test_an_older_server_refuses_the_open_and_nothing_more_is_sent(tiny_chat_model):
    refusal = wire.Error(code="protocol", message="Open: unknown field(s) ['privacy_floor']; expected a subset of ...")
    server = RecordingServer(answer=refusal)
    with pytest.raises(ServerError, match=r"protocol: Open: unknown field\(s\) \['privacy_floor'\]"):
        await _generate(server, LocalLayers(tiny_chat_model), privacy_floor=2)
    assert server.kinds() == ["Open"]


@pytest.mark.parametrize("layers, floor, expected", [
    (dict(split_layer=1), 2, r"split_layer 1 is below privacy_floor 2: expected split_layer >= 2 or 'auto'"),
    (dict(max_layers=1), 2, r"privacy_floor 2 is above this client's memory bound: it holds at most 1 decoder layers "
                            r"\(max_layers\), so no split layer at or above the floor fits"),
    (dict(), NUM_LAYERS + 1, rf"privacy_floor {NUM_LAYERS + 1} is above the model's {NUM_LAYERS} decoder layers"),
    (dict(), -1, r"privacy_floor: expected an int >= 0, got -1"),
    (dict(), True, r"privacy_floor: expected an int >= 0, got True"),
])
async def test_options_that_cannot_keep_the_floor_are_refused_before_connecting(tiny_chat_model, layers, floor,
                                                                                expected):
    server = RecordingServer()
    with pytest.raises(PrivacyFloorError, match=expected):
        await _generate(server, LocalLayers(tiny_chat_model, **layers), privacy_floor=floor)
    assert server.received == []  # never connected


async def test_layers_at_the_floor_are_fine(tiny_chat_model):
    assert await _generate(RecordingServer(split_layer=2), LocalLayers(tiny_chat_model, split_layer=2),
                           privacy_floor=2) == [5]
    assert await _generate(RecordingServer(split_layer=2), LocalLayers(tiny_chat_model, max_layers=2),
                           privacy_floor=2) == [5]


def test_the_command_lines_take_the_floor(tiny_chat_model):
    from client_lib.cli import parse_args
    from client_lib.gateway.serve import build_app, parse_args as gateway_args

    base = ["--model", "m", "--prompt", "hi"]
    assert (parse_args(base).privacy_floor, parse_args([*base, "--privacy-floor", "12"]).privacy_floor) == (0, 12)
    assert gateway_args(["--model", "m", "--privacy-floor", "3"]).privacy_floor == 3
    args = gateway_args(["--model", str(tiny_chat_model), "--max-layers", "1", "--privacy-floor", "2"])
    with pytest.raises(PrivacyFloorError, match="privacy_floor 2 is above this client's memory bound"):
        build_app(args)  # at start-up, not on the first request
