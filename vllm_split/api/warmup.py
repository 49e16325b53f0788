"""Start-up warm-up: a few internal split requests so that the admission controller's live
cost model has real step timings before the first client arrives.

Two requests, at the lowest split layer the server accepts and half-way up, with random
activations (their tokens are thrown away): their prefill and decode steps differ in layer
calls and rows, which is what the fit needs to tell the three costs apart. Runs in the API
server through the same session code as a client's request.
"""
from __future__ import annotations

import asyncio

import torch
from vllm.logger import init_logger

from vllm_split.wire import protocol as wire
from vllm_split.config import SplitConfig
from vllm_split.api.engines import EngineSet
from vllm_split.api.session import ModelInfo, ServerSession

logger = init_logger(f"vllm.{__name__}")


async def warm_up(engine, model: ModelInfo, config: SplitConfig, *, prompt_tokens: int = 48,
                  output_tokens: int = 12, engines: EngineSet | None = None, engine_index: int = 0) -> None:
    """Warm engine ``engine_index`` of ``engines`` (one engine: the only one)."""
    layers = sorted({config.min_layer, (config.min_layer + model.num_layers) // 2})
    gen = torch.Generator().manual_seed(0)
    for k in layers:
        tokens: asyncio.Queue[wire.Token] = asyncio.Queue()

        async def send(msg: wire.Message) -> None:
            if isinstance(msg, wire.Token) and msg.finish_reason is None:
                tokens.put_nowait(msg)

        session = ServerSession(engine=engine, model=model, config=config, send=send, engines=engines,
                                engine_index=engine_index)
        sampling = wire.SamplingOptions(max_tokens=output_tokens, ignore_eos=True)
        await session.handle_open(wire.Open(model_fingerprint=model.fingerprint, split_layer=k, sampling=sampling))
        rows = (torch.randn(prompt_tokens + output_tokens, model.hidden_size, generator=gen) * 0.05).to(model.dtype)
        session.accept_prompt_chunk(wire.Activation.from_tensor(rows[:prompt_tokens], start=0, end_of_prompt=True))
        task = asyncio.create_task(session.generate())
        try:
            while not task.done():
                get = asyncio.create_task(tokens.get())
                await asyncio.wait({task, get}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    break
                pos = prompt_tokens + get.result().index
                await session.accept_decode(wire.Activation.from_tensor(rows[pos : pos + 1], start=pos))
            await task
        finally:
            if not task.done():
                task.cancel()
            await session.release()
    logger.info("vllm-split: warm-up ran %d requests (split layers %s) on engine %d", len(layers), layers,
                engine_index)
