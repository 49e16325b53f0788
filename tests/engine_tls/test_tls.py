"""The split route over TLS: wss:// to a server started with vLLM's --ssl-keyfile/--ssl-certfile
(a self-signed certificate made at test time). The client verifies the certificate by default."""
from __future__ import annotations

import asyncio
import http.client
import ssl
import urllib.error
import urllib.request

import aiohttp
import pytest

from client_lib import ServerError
from harness.server_process import metrics, split_metrics
from tests.support.references import PROMPTS, complete
from tests.support.sessions import local_layers, split_generate
from vllm_split.wire.contract import ErrorCode

pytestmark = pytest.mark.engine
K, MAX_TOKENS = 7, 8


def _generate(url: str, layers, ids: list[int], **options) -> list[int]:
    tokens, _ = asyncio.run(asyncio.wait_for(
        split_generate(url, layers, ids, max_tokens=MAX_TOKENS, ignore_eos=True, **options), 300))
    return tokens


def test_a_split_session_over_wss_equals_the_servers_own_completion(tls_server, tls_files, model_dir, tokenizer):
    assert tls_server.url.startswith("https://")
    ids = tokenizer(PROMPTS[0])["input_ids"]
    expected = complete(tls_server.url, str(model_dir), ids, ssl_context=tls_server.ssl_context,
                        max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)["token_ids"]
    assert len(expected) == MAX_TOKENS
    assert _generate(tls_server.url, local_layers(model_dir, K), ids, ssl=str(tls_files.ca_file)) == expected
    # the harness reads the metrics over https too
    assert "vllm:kv_cache_usage_perc" in metrics(tls_server.url, tls_server.ssl_context)
    assert split_metrics(tls_server.url, tls_server.ssl_context)


def test_an_untrusted_certificate_is_refused_by_default(tls_server, model_dir):
    with pytest.raises(ServerError) as refused:
        _generate(tls_server.url, local_layers(model_dir, K), [1, 504, 3458, 282])
    assert refused.value.code == ErrorCode.TLS
    wss = tls_server.url.replace("https://", "wss://")
    assert f"{wss}/v1/split/session: certificate verification failed" in str(refused.value)
    with pytest.raises(urllib.error.URLError) as http_refused:  # the OpenAI routes verify it too
        urllib.request.urlopen(tls_server.url + "/health", timeout=30)
    assert isinstance(http_refused.value.reason, ssl.SSLCertVerificationError)


def test_plain_ws_and_http_to_the_tls_port_fail_cleanly(tls_server, tls_files, model_dir, tokenizer):
    plain = tls_server.url.replace("https://", "http://")
    with pytest.raises(aiohttp.ClientError):  # ws://: the server drops the plain-text handshake
        _generate(plain, local_layers(model_dir, K), [1, 504, 3458, 282])
    with pytest.raises((OSError, http.client.HTTPException)):
        complete(plain, str(model_dir), "Hello", max_tokens=2)
    # and the server goes on serving TLS clients
    ids = tokenizer(PROMPTS[1])["input_ids"]
    assert len(_generate(tls_server.url, local_layers(model_dir, K), ids, ssl=str(tls_files.ca_file))) == MAX_TOKENS
