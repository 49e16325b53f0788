"""kv_ranges with ``--split-min-layer`` under the ``grouped`` composition, and the admission
controller's KV budget on a real engine.

One server holds layers [15, 30) (``min_layer 15``) in three KV ranges of five layers
(``--split-kv-ranges 3``), steps composed ``grouped`` (high steps skip the layers below
their lowest k). Its pool is 36 blocks of 32 tokens of one range each (35 usable: vLLM keeps
a null block), so a session at k holds ``ceil(tokens / 32)`` blocks in each range that ends
above k. References: greedy decoding with transformers in this process.
"""
from __future__ import annotations

import asyncio

import pytest

from harness.server_process import VLLMServer
from tests.engine_kv_ranges.test_kv_ranges import _held_blocks
from tests.engine_reliability.helpers import opened, wait_idle
from tests.support.references import PROMPTS, transformers_greedy
from tests.support.sessions import RawSession, local_layers, split_generate
from vllm_split.wire import protocol as wire

pytestmark = pytest.mark.engine
MIN_LAYER, KV_RANGES, BLOCK_SIZE, POOL_BLOCKS = 15, 3, 32, 36
MAX_TOKENS = 16
ADMISSION_WAIT_S = 1.5


@pytest.fixture(scope="module")
def reference(model_dir, tokenizer):
    prompt_ids = [tokenizer(p)["input_ids"] * 4 for p in PROMPTS]  # 30-50 tokens
    return prompt_ids, transformers_greedy(model_dir, prompt_ids, MAX_TOKENS)


@pytest.fixture(scope="module")
def server(model_dir, reference, tmp_path_factory):  # after the references: no core shared
    log = tmp_path_factory.mktemp("kv-ranges-min-layer") / "server.log"
    args = ("--block-size", str(BLOCK_SIZE), "--max-model-len", "256", "--max-num-batched-tokens", "128",
            "--num-gpu-blocks-override", str(POOL_BLOCKS), "--split-kv-ranges", str(KV_RANGES),
            "--split-min-layer", str(MIN_LAYER), "--split-composition", "grouped",
            "--split-admission-wait-ms", str(int(ADMISSION_WAIT_S * 1000)))
    with VLLMServer(model_dir, split=True, log_path=log, extra_args=args) as s:
        yield s


def test_ranges_cover_the_held_layers_only(server):
    text = server.log_path.read_text()
    assert "KV per layer range: 3 KV cache groups over layers [15, 20) [20, 25) [25, 30)" in text
    assert "one CPU attention metadata build per step shared by 3 groups" in text


def test_concurrent_sessions_at_four_split_layers_are_token_exact(server, reference, model_dir):
    prompt_ids, greedy = reference
    ks = (15, 20, 22, 29)

    async def run():
        return await asyncio.gather(*(split_generate(server.url, local_layers(model_dir, k), prompt_ids[i],
                                                     max_tokens=MAX_TOKENS, ignore_eos=True)
                                      for i, k in enumerate(ks)))

    for k, (tokens, _), expected in zip(ks, asyncio.run(run()), greedy):
        assert tokens == expected, f"k={k} diverged with kv_ranges over [15, 30) under grouped composition"
    asyncio.run(wait_idle(server.url))


def test_a_session_holds_blocks_in_the_ranges_above_its_k(server, reference, model_dir):
    ids = reference[0][0]
    per_range = -(-len(ids) // BLOCK_SIZE)
    held = {}
    for k in (15, 22, 29):
        held[k] = asyncio.run(_held_blocks(server.url, local_layers(model_dir, k), ids))
        asyncio.run(wait_idle(server.url))
    assert held == {15: 3 * per_range, 22: 2 * per_range, 29: per_range}


def _auto_open(layers, prompt_tokens: int, max_tokens: int) -> wire.Open:
    """A placement the server chooses, for a client that holds at most 20 layers (k in [15, 20])."""
    return wire.Open(model_fingerprint=layers.fingerprint, split_layer=None, prompt_tokens=prompt_tokens,
                     sampling=wire.SamplingOptions(max_tokens=max_tokens, ignore_eos=True),
                     client=wire.ClientProfile(layer_prefill_s_per_token=1e-5, layer_decode_s=1e-4, max_layers=20),
                     sla=wire.RequestSLA(ttft_s=60.0, tpot_s=10.0))


async def _answer(raw: RawSession, timeout: float = 60) -> wire.Message:
    """The first frame that is not a network probe (each probe answered, as a client with a profile does)."""
    while True:
        msg = await raw.recv(timeout=timeout)
        if not isinstance(msg, wire.Probe):
            return msg
        await raw.send(wire.ProbeReply(nonce=msg.nonce, data=bytes(msg.reply_bytes)))


async def test_admission_waits_for_the_kv_an_admitted_session_will_take(server, reference, model_dir):
    """A (fixed k = 15) is promised 64 + 190 tokens: 8 blocks in each of 3 ranges, 24 of the 35.
    B, planned at k in [15, 20], needs 16 or 24 blocks for the same length: it waits in the
    admission queue and is refused when its wait runs out; after A ends, the same Open is
    admitted. A short B2 (5 blocks at most) fits beside A at once."""
    layers = local_layers(model_dir, MIN_LAYER)
    ids = (reference[0][0] * 3)[:64]
    a = await opened(server.url, layers, max_tokens=190, ignore_eos=True)
    try:
        layers.reset()
        await a.send(wire.Activation.from_tensor(layers.forward(ids), start=0, end_of_prompt=True))
        assert isinstance(await a.recv(), wire.Token)  # A holds its prompt's blocks; its output is to come
        await asyncio.sleep(1.0)  # the controller polls the pool twice a second
        async with await RawSession.connect(server.url) as b:
            await b.send(_auto_open(layers, 64, 190))
            err = await _answer(b, timeout=ADMISSION_WAIT_S + 30)
            assert isinstance(err, wire.Error) and (err.code, err.fatal) == ("server_busy", True), err
            assert "the KV cache cannot hold its 254 tokens yet" in err.message, err.message
            print(err.message)
        async with await RawSession.connect(server.url) as b2:  # 64 + 16 tokens: 3 blocks per range
            await b2.send(_auto_open(layers, 64, 16))
            assert isinstance(await _answer(b2), wire.Opened)
    finally:
        await a.close()
    await wait_idle(server.url)
    async with await RawSession.connect(server.url) as b:
        await b.send(_auto_open(layers, 64, 190))
        msg = await _answer(b)
        assert isinstance(msg, wire.Opened) and MIN_LAYER <= msg.split_layer <= 20, msg
