"""Client-side helpers for the engine tests."""
from __future__ import annotations

import aiohttp

from client_lib import LocalLayers, SamplingOptions, SplitSession, TailLayers
from client_lib.session import SSLOption
from vllm_split.wire.contract import SESSION_PATH
from vllm_split.wire import protocol as wire
from harness.server_process import metrics  # noqa: F401 (the engine tests import it from here)

_layers_cache: dict[tuple[str, int], LocalLayers] = {}
_tails_cache: dict[tuple[str, int], TailLayers] = {}


def local_layers(model_dir, k: int) -> LocalLayers:
    key = (str(model_dir), k)
    if key not in _layers_cache:
        _layers_cache[key] = LocalLayers(model_dir, split_layer=k)
    return _layers_cache[key]


def tail_layers(model_dir, m: int) -> TailLayers:
    """A fresh-cache TailLayers at return layer ``m`` (weights loaded once per m)."""
    key = (str(model_dir), m)
    if key not in _tails_cache:
        _tails_cache[key] = TailLayers(model_dir, return_layer=m)
    return _tails_cache[key]


async def u_generate(url: str, model_dir, k: int, m: int, prompt_ids: list[int],
                     **sampling) -> tuple[list[int], SplitSession]:
    """A whole U-shaped session's tokens: the client runs [0, k) and [m, L) (own KV caches;
    one session per (k) and (m) at a time: the caches live on the cached layers)."""
    tokens = []
    async with await SplitSession.create(url, local_layers(model_dir, k), tail=tail_layers(model_dir, m),
                                         sampling=SamplingOptions(**sampling)) as session:
        async for event in session.generate(prompt_ids):
            tokens.append(event.token_id)
    return tokens, session


async def split_generate(url: str, layers: LocalLayers, prompt_ids: list[int], *, server_decode: bool = False,
                         ssl: SSLOption = None, **sampling) -> tuple[list[int], SplitSession]:
    """A whole split session's tokens; at ``k = 0`` through activations unless ``server_decode``
    (the tests exercise the split path; the library's default offers server decoding);
    ``ssl``: an https:// server's (``SplitSession.create``)."""
    tokens = []
    async with await SplitSession.create(url, layers, sampling=SamplingOptions(**sampling),
                                         server_decode=server_decode, ssl=ssl) as session:
        async for event in session.generate(prompt_ids):
            tokens.append(event.token_id)
    return tokens, session


async def answer_tokens(raw: "RawSession", layers: LocalLayers, prompt_len: int, *,
                        wire_dtype: str | None = None) -> tuple[list[int], wire.Finished]:
    """Tokens until ``Finished``, each answered with ``layers``' row for it (as a client does)."""
    got = []
    while True:
        msg = await raw.recv()
        if isinstance(msg, wire.Finished):
            return got, msg
        assert isinstance(msg, wire.Token), msg
        got.append(msg.token_id)
        if msg.finish_reason is None:
            row = layers.forward([msg.token_id])
            await raw.send(wire.Activation.from_tensor(row, start=prompt_len + msg.index, wire_dtype=wire_dtype))


class RawSession:
    """A hand-driven WebSocket for sending arbitrary frames."""

    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.http, self.ws = http, ws

    @classmethod
    async def connect(cls, url: str) -> "RawSession":
        http = aiohttp.ClientSession()
        ws = await http.ws_connect(url.replace("http://", "ws://") + SESSION_PATH, max_msg_size=0)
        return cls(http, ws)

    async def send(self, frame: bytes | wire.Message) -> None:
        await self.ws.send_bytes(frame if isinstance(frame, bytes) else wire.encode(frame))

    async def recv(self, timeout: float = 60) -> wire.Message | None:
        msg = await self.ws.receive(timeout=timeout)
        if msg.type != aiohttp.WSMsgType.BINARY:
            return None
        return wire.decode(msg.data)

    async def close(self) -> None:
        await self.ws.close()
        await self.http.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
