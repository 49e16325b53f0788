"""Fixtures of the pipeline-parallel modules: their prompts and transformers' greedy reference."""
from __future__ import annotations

import pytest

from tests.support.references import PROMPTS, transformers_greedy

NUM_TOKENS = 12  # generated per request in the pipeline-parallel tests


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p)["input_ids"] for p in PROMPTS[:3]]


@pytest.fixture(scope="module")
def reference(model_dir, prompt_ids) -> list[list[int]]:
    """Greedy decoding of the same float32 checkpoint with transformers, in the test process
    (before the module's server starts: no core shared); independent of vLLM and the pipeline."""
    return transformers_greedy(model_dir, prompt_ids, NUM_TOKENS)
