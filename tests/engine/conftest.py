"""Real-engine fixtures: a plain vLLM server for references, then a vllm-split server.

The plain server runs first and is stopped before the split server starts (one engine at
a time on this machine): ``split_server`` depends on ``reference``. Package scope: the
server is stopped before the next test package starts its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from harness.server_process import VLLMServer
from tests.engine.server_config import MAX_TOKENS, SAMPLED
from tests.support.references import PROMPTS, complete



@dataclass
class Reference:
    prompt_ids: list[list[int]]
    greedy: list[list[int]]  # 64 tokens, ignore_eos
    sampled: list[int]  # prompt 0, SAMPLED params
    plain_text: str  # /v1/completions text of prompt 0 by string


@pytest.fixture(scope="package")
def reference(model_dir, tokenizer, tmp_path_factory) -> Reference:
    server = VLLMServer(model_dir, split=False, log_path=tmp_path_factory.mktemp("plain") / "server.log")
    try:
        server.wait_ready()
        m = str(model_dir)
        prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
        greedy = [complete(server.url, m, ids, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)["token_ids"]
                  for ids in prompt_ids]
        sampled = complete(server.url, m, prompt_ids[0], max_tokens=32, ignore_eos=True, **SAMPLED)["token_ids"]
        plain_text = complete(server.url, m, PROMPTS[0], max_tokens=32, temperature=0)["text"]
    finally:
        server.stop()
    return Reference(prompt_ids=prompt_ids, greedy=greedy, sampled=sampled, plain_text=plain_text)


@pytest.fixture(scope="package")
def split_server(model_dir, reference, tmp_path_factory):
    with VLLMServer(model_dir, split=True, log_path=tmp_path_factory.mktemp("split") / "server.log") as server:
        yield server
