"""A vllm-split server with its admission controller, and emulated clients for it.

Emulated clients (``client_lib.emulation``) replay hidden states computed beforehand by the
client library and sleep what their profile says their device would take, over an emulated
link: the 2-core machine then measures the server, and a "phone" and a "laptop" can be
told apart without owning either.
"""
from __future__ import annotations

import asyncio

import pytest

from client_lib.emulation import EmulatedLink, Script, make_script, run_emulated
from vllm_split import protocol as wire
from vllm_split.server_process import VLLMServer

PROMPT = "Write a short poem about the sea and the wind."
LONG = 256  # tokens in the script: enough for the load sessions

FAST = wire.ClientProfile(layer_prefill_s_per_token=2e-5, layer_decode_s=4e-4)  # faster than this server
MEDIUM = wire.ClientProfile(layer_prefill_s_per_token=5e-5, layer_decode_s=2.2e-3)  # a bit slower
SLOW = wire.ClientProfile(layer_prefill_s_per_token=2e-4, layer_decode_s=8e-3)  # much slower
LAN = EmulatedLink(rtt_s=0.004, uplink_bps=1e9, downlink_bps=1e9)
WIFI = EmulatedLink(rtt_s=0.02, uplink_bps=5e7, downlink_bps=5e7)


@pytest.fixture(scope="package")
def admission_server(model_dir, tmp_path_factory):
    server = VLLMServer(model_dir, split=True, log_path=tmp_path_factory.mktemp("admission") / "server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="package")
def script(admission_server, model_dir) -> Script:
    from transformers import AutoTokenizer

    prompt_ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"]
    return asyncio.run(make_script(admission_server.url, model_dir, prompt_ids, LONG))


emulated = run_emulated
