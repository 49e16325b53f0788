"""Real-engine fixtures for the reliability tests: plain references, then one split server
with small limits and a tiny KV cache (so that the engine preempts), restartable in place.

One engine at a time: the plain server is stopped before the split server starts.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.support.references import PROMPTS, complete
from harness.server_process import VLLMServer, free_port
from tests.engine_reliability.server_config import MAX_TOKENS, PROMPT_REPEAT, SERVER_ARGS

@dataclass
class Reference:
    prompt_ids: list[list[int]]  # PROMPTS, each repeated PROMPT_REPEAT times
    greedy: list[list[int]]  # plain vLLM, MAX_TOKENS tokens, ignore_eos


@pytest.fixture(scope="package")
def reference(model_dir, tokenizer, tmp_path_factory) -> Reference:
    server = VLLMServer(model_dir, split=False, log_path=tmp_path_factory.mktemp("plain") / "server.log")
    try:
        server.wait_ready()
        prompt_ids = [tokenizer(p)["input_ids"] * PROMPT_REPEAT for p in PROMPTS]
        greedy = [complete(server.url, str(model_dir), ids, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)["token_ids"]
                  for ids in prompt_ids]
    finally:
        server.stop()
    return Reference(prompt_ids=prompt_ids, greedy=greedy)


class ServerBox:
    """The split server under test; ``restart()`` replaces it on the same port."""

    def __init__(self, model_dir, log_dir) -> None:
        self.model_dir, self.log_dir, self.port, self.starts = model_dir, log_dir, free_port(), 0
        self.server = self._start()

    def _start(self) -> VLLMServer:
        self.starts += 1
        server = VLLMServer(self.model_dir, split=True, log_path=self.log_dir / f"server{self.starts}.log",
                            extra_args=SERVER_ARGS, port=self.port)
        server.wait_ready()
        return server

    @property
    def url(self) -> str:
        return self.server.url

    def restart(self) -> None:
        self.server.stop()
        self.server = self._start()

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="package")
def box(model_dir, reference, tmp_path_factory):
    server = ServerBox(model_dir, tmp_path_factory.mktemp("split"))
    try:
        yield server
    finally:
        server.stop()
