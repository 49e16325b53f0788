"""Other architectures: the Qwen2 family is resumed exactly; an unsupported one fails at start-up.

The models are built here with random weights (no download): tiny configs, the real
SmolLM2 tokenizer files copied beside them.
"""
from __future__ import annotations

import asyncio

import pytest

from tests.support.references import complete
from tests.support.sessions import split_generate
from tests.support.tiny_models import tiny_model
from client_lib import LocalLayers
from harness.server_process import VLLMServer

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def qwen2_dir(model_dir, tmp_path_factory):
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return tiny_model(tmp_path_factory.mktemp("qwen2"), model_dir, config)


@pytest.fixture(scope="module")
def gpt2_dir(model_dir, tmp_path_factory):
    from transformers import GPT2Config

    config = GPT2Config(vocab_size=49152, n_embd=64, n_layer=2, n_head=2, n_positions=2048,
                        bos_token_id=1, eos_token_id=2)
    return tiny_model(tmp_path_factory.mktemp("gpt2"), model_dir, config)


def test_qwen2_split_equals_unsplit(qwen2_dir, tmp_path):
    server = VLLMServer(qwen2_dir, split=True, log_path=tmp_path / "server.log")
    try:
        server.wait_ready()
        prompts = [[1, 450, 3000, 17, 99, 2048], [5, 6, 7, 8, 9, 10, 11, 12, 13]]
        for ids in prompts:
            expected = complete(server.url, str(qwen2_dir), ids, max_tokens=24, temperature=0,
                                ignore_eos=True)["token_ids"]
            for k in (0, 3, 6):
                tokens, _ = asyncio.run(split_generate(server.url, LocalLayers(qwen2_dir, split_layer=k), ids,
                                                       max_tokens=24, ignore_eos=True))
                assert tokens == expected, f"Qwen2 split at k={k} diverged"
    finally:
        server.stop()


def test_unsupported_architecture_fails_at_startup(gpt2_dir, tmp_path):
    server = VLLMServer(gpt2_dir, split=True, log_path=tmp_path / "server.log")
    try:
        code = server.wait_exit(timeout=300)
        log = server.log_tail(400)
    finally:
        server.stop()
    assert code != 0
    assert "vllm-split cannot resume GPT2LMHeadModel" in log
    assert "Start vLLM without the vllm-split plugin" in log
