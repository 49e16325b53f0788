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


def complete(url: str, model: str, prompt, *, ssl_context=None, headers: dict[str, str] | None = None,
             **params) -> dict:
    """``/v1/completions`` of ``prompt``: the first choice (``ssl_context``: an https:// server's;
    ``headers``: e.g. vLLM's ``X-data-parallel-rank`` to run it on one engine)."""
    body = {"model": model, "prompt": prompt, "return_token_ids": True, **params}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=300, context=ssl_context) as r:
        return json.load(r)["choices"][0]


def transformers_greedy(model_dir, prompt_ids: list[list[int]], num_tokens: int) -> list[list[int]]:
    """Greedy tokens with transformers' KV cache, EOS not special (as vLLM's ``ignore_eos``)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            tokens, past, x = [], None, torch.tensor([ids])
            for _ in range(num_tokens):
                step = model(input_ids=x, past_key_values=past, use_cache=True)
                past = step.past_key_values
                tokens.append(int(step.logits[0, -1].argmax()))
                x = torch.tensor([[tokens[-1]]])
            out.append(tokens)
    return out
