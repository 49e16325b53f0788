"""A vllm-split server with its admission controller, and emulated clients for it.

Emulated clients (``client_lib.emulation``) replay hidden states computed beforehand by the
client library and sleep what their profile says their device would take, over an emulated
link: the 2-core machine then measures the server, and a "phone" and a "laptop" can be
told apart without owning either.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
import torch

from client_lib import LocalLayers, SamplingOptions, SplitSession
from client_lib.emulation import EmulatedLink, ReplayLayers, all_layer_states
from vllm_split import protocol as wire
from vllm_split.server_process import VLLMServer

PROMPT = "Write a short poem about the sea and the wind."
LONG = 256  # tokens in the script: enough for the load sessions

FAST = wire.ClientProfile(layer_prefill_s_per_token=2e-5, layer_decode_s=4e-4)  # faster than this server
MEDIUM = wire.ClientProfile(layer_prefill_s_per_token=5e-5, layer_decode_s=2.2e-3)  # a bit slower
SLOW = wire.ClientProfile(layer_prefill_s_per_token=2e-4, layer_decode_s=8e-3)  # much slower
LAN = EmulatedLink(rtt_s=0.004, uplink_bps=1e9, downlink_bps=1e9)
WIFI = EmulatedLink(rtt_s=0.02, uplink_bps=5e7, downlink_bps=5e7)


@dataclass
class Script:
    prompt_ids: list[int]
    expected: list[int]  # the greedy continuation (from a fixed-k split session)
    states: torch.Tensor  # [N + 1, prompt + LONG, hidden]
    fingerprint: str


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
    layers = LocalLayers(model_dir, split_layer=7)

    async def reference() -> list[int]:
        out = []
        async with await SplitSession.create(admission_server.url, layers,
                                             sampling=SamplingOptions(max_tokens=LONG, ignore_eos=True)) as s:
            async for event in s.generate(prompt_ids):
                out.append(event.token_id)
        return out

    expected = asyncio.run(reference())
    full = LocalLayers(model_dir, split_layer="auto")
    states = all_layer_states(full, prompt_ids + expected)
    return Script(prompt_ids, expected, states, full.fingerprint)


async def emulated(url: str, script: Script, *, profile: wire.ClientProfile, link: EmulatedLink,
                   sla: wire.RequestSLA | None, max_tokens: int, split_layer: int | str = "auto"
                   ) -> tuple[SplitSession, list[int], ReplayLayers]:
    """One emulated client's whole session; returns the session (opened, stats), tokens, layers."""
    layers = ReplayLayers(script.states, script.prompt_ids + script.expected, profile=profile,
                          fingerprint=script.fingerprint, split_layer=split_layer)
    tokens = []
    async with await SplitSession.create(url, layers, sampling=SamplingOptions(max_tokens=max_tokens, ignore_eos=True),
                                         sla=sla, profile=profile, link=link) as session:
        async for event in session.generate(script.prompt_ids):
            tokens.append(event.token_id)
    return session, tokens, layers
