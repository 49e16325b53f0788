"""Real-engine fixtures: references from a plain vLLM server's own OpenAI API, then a
vllm-split server and the OpenAI gateway in front of it (a subprocess, as a user runs it).

The plain server runs first and is stopped before the split server starts (one engine at
a time on this machine). Package scope: one split server and one gateway for the folder.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.server_process import REPO_ROOT, VLLMServer, free_port, wait_healthy
from tests.engine_gateway.helpers import Answer, answer, chat, spanning_stop
from tests.engine_gateway.server_config import CHAT_PROMPTS, GATEWAY_ARGS, MAX_TOKENS
from tests.support.references import PROMPTS

STARTUP_TIMEOUT_S = 300


@dataclass
class Reference:
    chats: list[Answer]  # CHAT_PROMPTS, greedy, MAX_TOKENS
    completion_text: Answer  # /v1/completions of PROMPTS[0] as a string
    completion_ids: Answer  # /v1/completions of PROMPTS[3] as token ids
    prompt_ids: list[int]  # PROMPTS[3]'s token ids
    stop: str  # a stop string spanning two tokens of chats[0]
    stopped: Answer  # chats[0] with stop=[stop]


@pytest.fixture(scope="package")
def reference(model_dir, tokenizer, tmp_path_factory) -> Reference:
    import openai

    server = VLLMServer(model_dir, split=False, log_path=tmp_path_factory.mktemp("plain") / "server.log")
    try:
        server.wait_ready()
        client, m = openai.OpenAI(base_url=server.url + "/v1", api_key="none"), str(model_dir)
        chats = [answer(chat(client, m, p)) for p in CHAT_PROMPTS]
        stop = spanning_stop(tokenizer, chats[0].token_ids)
        stopped = answer(chat(client, m, CHAT_PROMPTS[0], stop=[stop]))
        ids = tokenizer(PROMPTS[3])["input_ids"]
        completion = dict(model=m, max_tokens=MAX_TOKENS, temperature=0, extra_body={"return_token_ids": True})
        by_text = answer(client.completions.create(prompt=PROMPTS[0], **completion))
        by_ids = answer(client.completions.create(prompt=ids, **completion))
    finally:
        server.stop()
    return Reference(chats=chats, completion_text=by_text, completion_ids=by_ids, prompt_ids=ids, stop=stop,
                     stopped=stopped)


@pytest.fixture(scope="package")
def split_server(model_dir, reference, tmp_path_factory):
    with VLLMServer(model_dir, split=True, log_path=tmp_path_factory.mktemp("split") / "server.log") as server:
        yield server


class GatewayProcess:
    """``vllm-split-client serve`` in a subprocess, in front of ``server_url``."""

    def __init__(self, server_url: str, model_dir: Path, log_path: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "client_lib", "serve", "--server", server_url, "--model", str(model_dir),
               "--port", self.url.rsplit(":", 1)[1], *GATEWAY_ARGS]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)

    def wait_ready(self) -> None:
        wait_healthy(self.url, self.proc, timeout=STARTUP_TIMEOUT_S, name="the gateway", log_tail=self.log_tail,
                     poll_s=0.5)

    def log_tail(self, n: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="package")
def gateway(split_server, model_dir, tmp_path_factory):
    proc = GatewayProcess(split_server.url, model_dir, tmp_path_factory.mktemp("gateway") / "gateway.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()
