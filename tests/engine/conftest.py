"""Real-engine fixtures: a plain vLLM server for references, then a vllm-split server per step
composition (``COMPOSITIONS``).

The plain server runs first and is stopped before the split server starts (one engine at
a time on this machine): ``split_server`` depends on ``reference``. Package scope: the
server is stopped before the next test package starts its own.
"""
from __future__ import annotations

import os
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


# Every test of this folder runs on a split server per step composition (the scheduler's
# gathered default and grouped, which defers requests below a split layer every other
# step); VLLM_SPLIT_TEST_COMPOSITIONS=gathered,mixed,grouped,auto runs them all.
COMPOSITIONS = os.environ.get("VLLM_SPLIT_TEST_COMPOSITIONS", "gathered,grouped").split(",")
# A step's composition matters only when sessions at different split layers (or ordinary
# requests) share the engine: on the later compositions only the tests that run them at once
# are repeated (one session alone is composed the same way by every policy), unless
# VLLM_SPLIT_TEST_ALL_MODULES=1 (CI's time: about 5 of its minutes).
MIXED_BATCH_TESTS = ("test_four_concurrent_sessions_at_different_k", "test_server_decoded_beside_split_and_ordinary_requests")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("VLLM_SPLIT_TEST_ALL_MODULES") == "1" or len(COMPOSITIONS) < 2:
        return
    keep, drop = [], []
    for item in items:
        spec = getattr(item, "callspec", None)
        composition = spec.params.get("split_server") if spec else None
        later = composition is not None and composition != COMPOSITIONS[0]
        (drop if later and item.originalname not in MIXED_BATCH_TESTS else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="package", params=COMPOSITIONS)
def split_server(request, model_dir, reference, tmp_path_factory):
    composition = request.param
    with VLLMServer(model_dir, split=True, log_path=tmp_path_factory.mktemp(f"split-{composition}") / "server.log",
                    extra_args=("--split-composition", composition)) as server:
        yield server
