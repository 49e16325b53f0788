"""One vllm-split server over TLS (vLLM's own ``--ssl-certfile``/``--ssl-keyfile``) with a
self-signed certificate made at test time; its URL is https://, its session route wss://.
Package scope: stopped before the next test package starts its own server."""
from __future__ import annotations

import pytest

from harness.server_process import TLSFiles, VLLMServer
from tests.support.tls import self_signed_cert


@pytest.fixture(scope="package")
def tls_files(tmp_path_factory) -> TLSFiles:
    return self_signed_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="package")
def tls_server(model_dir, tls_files, tmp_path_factory):
    with VLLMServer(model_dir, split=True, log_path=tmp_path_factory.mktemp("split-tls") / "server.log",
                    tls=tls_files) as server:
        yield server
