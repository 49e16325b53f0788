"""kv_ranges on a real engine: KV per layer range gives the same tokens at every split layer,
alone, mixed with ordinary requests and through preemption, holds the same KV capacity for
ordinary requests, and a split request at k = 15 holds half the blocks of one at k = 0."""
from __future__ import annotations

import asyncio

import pytest

from harness.replay import make_script, replay_many
from harness.server_process import VLLMServer, kv_blocks_in_use, kv_capacity_tokens, metrics
from tests.engine_reliability.helpers import opened, wait_idle
from tests.support.references import PROMPTS, complete, transformers_greedy
from tests.support.sessions import local_layers, split_generate
from vllm_split.wire import protocol as wire

pytestmark = pytest.mark.engine
KV_RANGES = 6  # ranges of 5 of SmolLM2's 30 layers
BLOCK_SIZE = 32
NUM_BLOCKS = 12  # plain vLLM's pool: 12 blocks x 32 tokens = 384 tokens of KV for all 30 layers
MAX_TOKENS = 24
COMMON = ("--block-size", str(BLOCK_SIZE), "--max-model-len", "256", "--max-num-batched-tokens", "128")


@pytest.fixture(scope="module")
def plain(model_dir, tokenizer):
    """The prompts and their references: greedy decoding with transformers in this process
    (independent of vLLM and of the KV layout), and plain vLLM's capacity for NUM_BLOCKS
    blocks (vLLM reports ``num_gpu_blocks_override x block_size`` tokens)."""
    prompt_ids = [tokenizer(p)["input_ids"] * 8 for p in PROMPTS]  # 60-100 tokens
    return prompt_ids, transformers_greedy(model_dir, prompt_ids, MAX_TOKENS), NUM_BLOCKS * BLOCK_SIZE


@pytest.fixture(scope="module")
def server(model_dir, plain, tmp_path_factory):  # after plain: no core shared
    log = tmp_path_factory.mktemp("split-kv-ranges") / "server.log"
    # the same bytes: a pool block holds one range (1/6 of the layers), so 6x the blocks
    with VLLMServer(model_dir, split=True, log_path=log,
                    extra_args=(*COMMON, "--num-gpu-blocks-override", str(NUM_BLOCKS * KV_RANGES),
                                "--split-kv-ranges", str(KV_RANGES))) as s:
        yield s


def test_layout_and_capacity(server, plain):
    text = server.log_path.read_text()
    assert "KV per layer range: 6 KV cache groups over layers [0, 5) [5, 10) [10, 15) [15, 20) [20, 25) [25, 30)" \
        in text
    # patches/cpu_range_metadata.py: one attention metadata build per step for the six range groups
    assert "one CPU attention metadata build per step shared by 6 groups" in text
    assert kv_capacity_tokens(server.log_path) == plain[2] == NUM_BLOCKS * BLOCK_SIZE


@pytest.mark.parametrize("k", [0, 1, 7, 15, 29])
def test_split_sessions_are_token_exact(server, plain, model_dir, k):
    prompt_ids, greedy, _ = plain
    tokens, _ = asyncio.run(split_generate(server.url, local_layers(model_dir, k), prompt_ids[0],
                                           max_tokens=MAX_TOKENS, ignore_eos=True))
    assert tokens == greedy[0]


async def _held_blocks(url, layers, ids) -> int:
    """KV blocks the engine holds for one session waiting for its first decode activation."""
    before = kv_blocks_in_use(await asyncio.to_thread(metrics, url))
    raw = await opened(url, layers, max_tokens=8, ignore_eos=True)
    try:
        layers.reset()
        await raw.send(wire.Activation.from_tensor(layers.forward(ids), start=0, end_of_prompt=True))
        assert isinstance(await raw.recv(), wire.Token)
        m = await asyncio.to_thread(metrics, url)
        return kv_blocks_in_use(m) - before
    finally:
        await raw.close()


def test_a_split_request_holds_only_its_ranges(server, plain, model_dir):
    ids = plain[0][4]
    per_range = -(-len(ids) // BLOCK_SIZE)
    at_0 = asyncio.run(_held_blocks(server.url, local_layers(model_dir, 0), ids))
    asyncio.run(wait_idle(server.url))
    at_15 = asyncio.run(_held_blocks(server.url, local_layers(model_dir, 15), ids))
    asyncio.run(wait_idle(server.url))
    at_22 = asyncio.run(_held_blocks(server.url, local_layers(model_dir, 22), ids))
    asyncio.run(wait_idle(server.url))
    print(f"KV blocks held for {len(ids)} prompt tokens: k=0 {at_0}, k=15 {at_15}, k=22 {at_22}")
    assert (at_0, at_15, at_22) == (6 * per_range, 3 * per_range, 2 * per_range)


def test_mixed_batch_with_preemption_is_token_exact(server, plain, model_dir):
    """25 sessions at five split layers and three ordinary requests overflow the 384-token
    cache: the engine preempts and resumes; every output stays exact."""
    prompt_ids, greedy, _ = plain
    scripts = [make_script(local_layers(model_dir, k), ids, ref)
               for k in (0, 7, 15, 22, 29) for ids, ref in zip(prompt_ids, greedy)]
    fingerprint = local_layers(model_dir, 7).fingerprint

    async def run():
        ordinary = [asyncio.to_thread(complete, server.url, str(model_dir), ids, max_tokens=MAX_TOKENS,
                                      temperature=0, ignore_eos=True) for ids in prompt_ids[2:5]]
        return await asyncio.gather(replay_many(server.url, scripts, fingerprint=fingerprint), *ordinary)

    before = metrics(server.url).get("vllm:num_preemptions_total", 0)
    results, *ordinary = asyncio.run(run())
    after = metrics(server.url).get("vllm:num_preemptions_total", 0)
    print(f"preemptions: {after - before}")
    assert [r.tokens for r in results] == [s.expected for s in scripts]
    assert [o["token_ids"] for o in ordinary] == greedy[2:5]
    assert after > before, "the engine did not preempt: the test needs a smaller KV cache"
    asyncio.run(wait_idle(server.url))
