"""A vllm-split server with its admission controller, and emulated clients for it.

Emulated clients (``harness.emulation``) replay hidden states computed beforehand by the
client library and sleep what their profile says their device would take, over an emulated
link: the 2-core machine then measures the server, and a "phone" and a "laptop" can be
told apart without owning either.
"""
from __future__ import annotations

import asyncio

import pytest

from harness.emulation import Script, make_script
from harness.server_process import VLLMServer
from tests.engine_admission.server_config import LONG, PROMPT


@pytest.fixture(scope="package")
def admission_server(model_dir, tmp_path_factory):
    with VLLMServer(model_dir, split=True, log_path=tmp_path_factory.mktemp("admission") / "server.log") as server:
        yield server


@pytest.fixture(scope="package")
def script(admission_server, model_dir) -> Script:
    from transformers import AutoTokenizer

    prompt_ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"]
    return asyncio.run(make_script(admission_server.url, model_dir, prompt_ids, LONG))
