"""A vllm-split server for U-shaped sessions, and the unsplit references from its own
ordinary requests (one engine start for the folder)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from harness.server_process import VLLMServer
from tests.engine_ushape.server_config import MAX_TOKENS, NUM_PROMPTS
from tests.support.references import PROMPTS, complete


@dataclass
class Reference:
    prompt_ids: list[list[int]]
    greedy: list[list[int]]  # MAX_TOKENS tokens each, ignore_eos


@pytest.fixture(scope="package")
def u_server(model_dir, tmp_path_factory):
    with VLLMServer(model_dir, split=True, log_path=tmp_path_factory.mktemp("ushape") / "server.log") as server:
        yield server


@pytest.fixture(scope="package")
def reference(u_server, model_dir, tokenizer) -> Reference:
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS[:NUM_PROMPTS]]
    greedy = [complete(u_server.url, str(model_dir), ids, max_tokens=MAX_TOKENS, temperature=0,
                       ignore_eos=True)["token_ids"] for ids in prompt_ids]
    return Reference(prompt_ids=prompt_ids, greedy=greedy)
