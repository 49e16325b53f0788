"""Fixtures of this folder: the pipeline-parallel modules' prompts and transformers' greedy
reference; the tiny Llama of the tensor- and data-parallel modules."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.references import PROMPTS, transformers_greedy
from tests.support.tiny_models import tiny_model

NUM_TOKENS = 12  # generated per request in the pipeline-parallel tests


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p)["input_ids"] for p in PROMPTS[:3]]


@pytest.fixture(scope="module")
def reference(model_dir, prompt_ids) -> list[list[int]]:
    """Greedy decoding of the same float32 checkpoint with transformers, in the test process
    (before the module's server starts: no core shared); independent of vLLM and the pipeline."""
    return transformers_greedy(model_dir, prompt_ids, NUM_TOKENS)


@pytest.fixture(scope="module")
def llama_dir(model_dir, tmp_path_factory) -> Path:
    """A tiny random-weight Llama that splits over two TP ranks (SmolLM2-135M's 9 heads do not):
    4 heads, 2 KV heads, 6 layers; SmolLM2's tokenizer."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return tiny_model(tmp_path_factory.mktemp("llama"), model_dir, config)
