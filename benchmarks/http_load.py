"""Plain OpenAI-API load for the benchmarks (concurrent /v1/completions with token ids)."""
from __future__ import annotations

import asyncio

import aiohttp


async def completions(url: str, model: str, prompts: list[list[int]], *, max_tokens: int,
                      ignore_eos: bool = True) -> list[list[int]]:
    """Greedy completions of all prompts at once; returns the generated token ids."""
    async with aiohttp.ClientSession() as http:
        async def one(ids: list[int]) -> list[int]:
            body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": ignore_eos, "return_token_ids": True}
            async with http.post(url + "/v1/completions", json=body) as r:
                r.raise_for_status()
                return (await r.json())["choices"][0]["token_ids"]

        return await asyncio.gather(*(one(ids) for ids in prompts))
