"""min_layer: the server drops layers [0, min_layer): more KV capacity, same tokens."""
from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest

from tests.support.references import complete
from tests.support.sessions import RawSession, split_generate
from client_lib import LocalLayers
from vllm_split.wire import protocol as wire
from harness.server_process import VLLMServer, kv_capacity_tokens

pytestmark = pytest.mark.engine
MIN_LAYER = 15


@pytest.fixture(scope="module")
def plain_run(model_dir, tokenizer, tmp_path_factory):
    log = tmp_path_factory.mktemp("plain-kv") / "server.log"
    server = VLLMServer(model_dir, split=False, log_path=log)
    try:
        server.wait_ready()
        ids = tokenizer("The three most important inventions of the 20th century are")["input_ids"]
        tokens = complete(server.url, str(model_dir), ids, max_tokens=24, temperature=0, ignore_eos=True)["token_ids"]
    finally:
        server.stop()
    return ids, tokens, kv_capacity_tokens(log)


def test_min_layer_server(model_dir, plain_run, tmp_path):
    ids, expected, plain_kv = plain_run
    log = tmp_path / "server.log"
    server = VLLMServer(model_dir, split=True, log_path=log, extra_args=("--split-min-layer", str(MIN_LAYER)))
    try:
        server.wait_ready()
        kv = kv_capacity_tokens(log)
        assert plain_kv and kv and kv / plain_kv >= 1.8, (kv, plain_kv)
        assert "this server holds layers [15, 30)" in log.read_text()
        # split sessions at k >= min_layer: the same tokens as the full plain engine
        for k in (MIN_LAYER, 22):
            tokens, _ = asyncio.run(split_generate(server.url, LocalLayers(model_dir, split_layer=k), ids,
                                                   max_tokens=24, ignore_eos=True))
            assert tokens == expected, k

        async def refused() -> wire.Message:
            layers = LocalLayers(model_dir, split_layer=7)
            async with await RawSession.connect(server.url) as raw:
                await raw.send(wire.Open(model_fingerprint=layers.fingerprint, split_layer=7))
                return await raw.recv()

        msg = asyncio.run(refused())
        assert isinstance(msg, wire.Error) and msg.fatal
        assert "expected 15 <= split_layer <= 30 (this server holds no layers below 15)" in msg.message
        # ordinary requests cannot run without layers [0, 15): refused, and the server goes on
        body = {"model": str(model_dir), "prompt": ids, "max_tokens": 4}
        req = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused_http:
            urllib.request.urlopen(req, timeout=120)
        assert refused_http.value.code in (400, 500)
        assert "serves split sessions at split_layer >= 15 only" in refused_http.value.read().decode()
        tokens, _ = asyncio.run(split_generate(server.url, LocalLayers(model_dir, split_layer=MIN_LAYER), ids,
                                               max_tokens=24, ignore_eos=True))
        assert tokens == expected
    finally:
        server.stop()
