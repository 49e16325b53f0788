"""Plain-vLLM references shared by the engine test folders: the prompts and a completion call."""
from __future__ import annotations

import json
import urllib.request

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity to a child in two sentences.",
    "def fibonacci(n):",
    "The three most important inventions of the 20th century are",
]


def complete(url: str, model: str, prompt, *, ssl_context=None, **params) -> dict:
    """``/v1/completions`` of ``prompt``: the first choice (``ssl_context``: an https:// server's)."""
    body = {"model": model, "prompt": prompt, "return_token_ids": True, **params}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300, context=ssl_context) as r:
        return json.load(r)["choices"][0]
