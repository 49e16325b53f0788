"""Split generation on a real vLLM engine equals the unsplit engine, token for token (float32)."""
from __future__ import annotations

import asyncio

import pytest

from tests.engine.server_config import MAX_TOKENS, SAMPLED
from tests.support.references import complete
from tests.support.sessions import local_layers, split_generate

pytestmark = pytest.mark.engine


@pytest.mark.parametrize("k", [0, 1, 7, 15, 29])
async def test_greedy_split_equals_unsplit(k, split_server, reference, model_dir):
    layers = local_layers(model_dir, k)
    for ids, expected in zip(reference.prompt_ids, reference.greedy):
        tokens, session = await split_generate(split_server.url, layers, ids, max_tokens=MAX_TOKENS, ignore_eos=True)
        assert len(expected) == MAX_TOKENS
        assert tokens == expected
        assert session.stats.finish_reason == "length"
        assert session.stats.num_output_tokens == MAX_TOKENS
        assert session.stats.num_prompt_tokens == len(ids)


async def test_steps_of_rows_all_at_layer_0_run_vllms_own_model(split_server, reference, model_dir):
    """Whole-graph steps (on by default, compiled mode): a session at k = 0 runs in vLLM's own
    compiled model, the split rows as its input embeddings, and stays exact."""
    from vllm_split.engine.runner import WHOLE_GRAPH_LOG

    tokens, _ = await split_generate(split_server.url, local_layers(model_dir, 0), reference.prompt_ids[1],
                                     max_tokens=16, ignore_eos=True)
    assert tokens == reference.greedy[1][:16]
    assert WHOLE_GRAPH_LOG in split_server.log_path.read_text(errors="replace")


async def test_four_concurrent_sessions_at_different_k(split_server, reference, model_dir):
    ks = [0, 7, 15, 29]
    jobs = [split_generate(split_server.url, local_layers(model_dir, k), reference.prompt_ids[i],
                           max_tokens=MAX_TOKENS, ignore_eos=True) for i, k in enumerate(ks)]
    results = await asyncio.gather(*jobs)
    for i, (tokens, _) in enumerate(results):
        assert tokens == reference.greedy[i], f"session at k={ks[i]} diverged"


async def test_sampled_split_equals_unsplit_with_seed(split_server, reference, model_dir):
    tokens, _ = await split_generate(split_server.url, local_layers(model_dir, 7), reference.prompt_ids[0],
                                     max_tokens=32, ignore_eos=True, **SAMPLED)
    assert tokens == reference.sampled
    assert tokens != reference.greedy[0][:32]  # really sampled, not greedy


async def test_stop_token_ends_generation(split_server, reference, model_dir):
    greedy = reference.greedy[1]
    stop_at = 5
    tokens, session = await split_generate(split_server.url, local_layers(model_dir, 15), reference.prompt_ids[1],
                                           max_tokens=MAX_TOKENS, ignore_eos=True, stop_token_ids=(greedy[stop_at],))
    first = greedy.index(greedy[stop_at])
    assert tokens == greedy[: first + 1]
    assert session.stats.finish_reason == "stop"


async def test_long_prompt_is_chunked_and_exact(split_server, reference, model_dir, tokenizer):
    ids = (reference.prompt_ids[2] * 40)[:700]
    plain = complete(split_server.url, str(model_dir), ids, max_tokens=8, temperature=0, ignore_eos=True)["token_ids"]
    layers = local_layers(model_dir, 7)
    from client_lib import SamplingOptions, SplitSession

    tokens = []
    async with await SplitSession.create(split_server.url, layers, sampling=SamplingOptions(max_tokens=8, ignore_eos=True)) as s:
        async for e in s.generate(ids, chunk_rows=128):  # 6 frames for the prompt
            tokens.append(e.token_id)
    assert tokens == plain


def test_plain_completion_unchanged_by_plugin(split_server, reference, model_dir):
    from tests.support.references import PROMPTS

    text = complete(split_server.url, str(model_dir), PROMPTS[0], max_tokens=32, temperature=0)["text"]
    assert text == reference.plain_text
