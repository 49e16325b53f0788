"""vLLM's --api-key guards the split route too: no session without the key."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest

from client_lib import LocalLayers, SamplingOptions, SplitSession
from vllm_split.wire.contract import SESSION_PATH
from harness.server_process import VLLMServer

pytestmark = pytest.mark.engine
KEY = "test-secret-key"


def test_split_sessions_need_the_api_key(model_dir, tmp_path):
    server = VLLMServer(model_dir, split=True, log_path=tmp_path / "server.log", extra_args=("--api-key", KEY))
    try:
        server.wait_ready()
        layers = LocalLayers(model_dir, split_layer=7)

        async def handshake(headers: dict) -> int | None:
            async with aiohttp.ClientSession() as http:
                try:
                    ws = await http.ws_connect(server.url.replace("http://", "ws://") + SESSION_PATH, headers=headers)
                except aiohttp.WSServerHandshakeError as exc:
                    return exc.status
                await ws.close()
                return None

        assert asyncio.run(handshake({})) == 401
        assert asyncio.run(handshake({"Authorization": "Bearer wrong"})) == 401

        async def with_key() -> list[int]:
            tokens = []
            async with await SplitSession.create(server.url, layers, sampling=SamplingOptions(max_tokens=4),
                                                 api_key=KEY) as session:
                async for event in session.generate([1, 504, 3458, 282]):
                    tokens.append(event.token_id)
            return tokens

        assert len(asyncio.run(with_key())) == 4
    finally:
        server.stop()
