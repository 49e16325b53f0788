"""This folder's servers: a plain vLLM server for references, then a default vllm-split
server with the OpenAI gateway (``vllm-split-client serve``) in front of it: split layer
auto (the server's admission controller chooses k per request), a lax SLA so that eight
concurrent sessions on two cores are admitted, and the server's context length."""
from __future__ import annotations

from tests.support.references import PROMPTS

MAX_TOKENS = 16
CHAT_PROMPTS = PROMPTS + ["Name three colours.", "Why is the sky blue?", "Write one sentence about cats."]
GATEWAY_KEY = "gateway-test-key"
MAX_MODEL_LEN = 2048  # harness.server_process.VLLMServer's --max-model-len
GATEWAY_ARGS = ("--split-layer", "auto", "--ttft", "60", "--tpot", "5", "--max-model-len", str(MAX_MODEL_LEN),
                "--threads", "1", "--api-key", GATEWAY_KEY)
