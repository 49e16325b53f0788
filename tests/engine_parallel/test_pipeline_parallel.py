"""Pipeline parallelism: a vllm-split server in two stages serves ordinary and split requests exactly.

One server, ``--pipeline-parallel-size 2 --enforce-eager`` (stage 0 holds layers [0, 15),
stage 1 [15, 30)). Eager is the configuration in which vLLM's CPU build dies on the first
request without ``patches/pp_intermediate_tensors.py`` (the compile warm-up would allocate
stage 1's receive buffer itself). Split steps take ``exact_forward`` on both stages: every
layer runs on every row, and each stage injects the rows whose split layer it holds.

The reference is greedy decoding of the same float32 checkpoint with transformers, in this
process: independent of vLLM and of the pipeline. Ordinary requests must equal it, and split
sessions at split layers on either stage (0, 7, 22), at the stage boundary (14, 15) and at
``k = L`` (the last stage injects before the final norm) must equal it token for token.
"""
from __future__ import annotations

import asyncio
import os

import pytest
import torch

from harness.server_process import VLLMServer, kv_blocks_in_use, metrics
from tests.engine_reliability.helpers import expect_error, opened, wait_idle
from tests.support.references import PROMPTS, complete, transformers_greedy
from tests.support.sessions import RawSession, local_layers, split_generate
from vllm_split.wire import protocol as wire

# one core per stage; without a bind list per worker the CPU build refuses two workers on
# this machine ("Not enough allowed NUMA nodes")
PP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
pytestmark = [pytest.mark.engine,
              pytest.mark.skipif(not {0, 1} <= os.sched_getaffinity(0), reason=f"binds the stages to cores 0 and 1 "
                                 f"({PP_ENV['VLLM_CPU_OMP_THREADS_BIND']}), not both allowed here")]
NUM_TOKENS = 12
PP_ARGS = ("--pipeline-parallel-size", "2")


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p)["input_ids"] for p in PROMPTS[:3]]


@pytest.fixture(scope="module")
def reference(model_dir, prompt_ids) -> list[list[int]]:
    return transformers_greedy(model_dir, prompt_ids, NUM_TOKENS)  # before the server: no core shared


@pytest.fixture(scope="module")
def pp_server(model_dir, reference, tmp_path_factory):
    log = tmp_path_factory.mktemp("split-pp2") / "server.log"
    with VLLMServer(model_dir, split=True, log_path=log, extra_args=PP_ARGS, env=PP_ENV, eager=True) as server:
        yield server


def test_two_stages_split_the_layers_and_take_the_exact_forward(pp_server):
    log = pp_server.log_path.read_text(errors="replace")
    assert "this server holds layers [0, 15)" in log and "this server holds layers [15, 30)" in log
    assert "split steps take the EXACT forward" in log and "(pipeline parallelism)" in log


def test_ordinary_requests_equal_transformers_greedy(pp_server, model_dir, prompt_ids, reference):
    for ids, expected in zip(prompt_ids, reference):
        got = complete(pp_server.url, str(model_dir), ids, max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True)
        assert got["token_ids"] == expected


@pytest.mark.parametrize("k", [0, 14, 15, 30])  # 7 and 22: in the concurrent test
async def test_split_session_equals_reference(k, pp_server, model_dir, prompt_ids, reference):
    i = k % len(prompt_ids)
    tokens, session = await split_generate(pp_server.url, local_layers(model_dir, k), prompt_ids[i],
                                           max_tokens=NUM_TOKENS, ignore_eos=True)
    assert session.opened.split_layer == k
    assert tokens == reference[i], f"split session at k={k} diverged"


async def test_concurrent_sessions_on_both_stages_and_an_ordinary_request(pp_server, model_dir, prompt_ids,
                                                                          reference):
    """Rows entering on stage 0 and on stage 1 and an ordinary request share the same steps."""
    ks = [0, 7, 15, 22]
    sessions = [split_generate(pp_server.url, local_layers(model_dir, k), prompt_ids[i % 3],
                               max_tokens=NUM_TOKENS, ignore_eos=True) for i, k in enumerate(ks)]
    ordinary = asyncio.to_thread(complete, pp_server.url, str(model_dir), prompt_ids[1], max_tokens=NUM_TOKENS,
                                 temperature=0, ignore_eos=True)
    *results, plain = await asyncio.gather(*sessions, ordinary)
    for i, (k, (tokens, _)) in enumerate(zip(ks, results)):
        assert tokens == reference[i % 3], f"concurrent session at k={k} diverged"
    assert plain["token_ids"] == reference[1]


async def test_a_disconnect_frees_the_kv_and_a_u_shape_is_refused(pp_server, model_dir, prompt_ids):
    """A client that vanishes mid-decode leaves no KV block held (one scheduler frees them for
    both stages); a U-shaped Open, which needs the compact forward, is refused with the reason
    and the server goes on serving."""
    layers = local_layers(model_dir, 15)
    raw = await opened(pp_server.url, layers, max_tokens=NUM_TOKENS, ignore_eos=True)
    layers.reset()
    await raw.send(wire.Activation.from_tensor(layers.forward(prompt_ids[0]), start=0, end_of_prompt=True))
    assert isinstance(await raw.recv(timeout=120), wire.Token)  # decoding: its KV is held, waiting for a row
    assert kv_blocks_in_use(await asyncio.to_thread(metrics, pp_server.url)) > 0
    await raw.close()  # vanish mid-decode
    await wait_idle(pp_server.url)
    async with await RawSession.connect(pp_server.url) as raw:
        await raw.send(wire.Open(model_fingerprint=layers.fingerprint, split_layer=7, u_shape=True, return_layer=22,
                                 sampling=wire.SamplingOptions(max_tokens=4)))
        await expect_error(raw, "bad_request", "this server runs pipeline parallelism", fatal=True)
