"""Faults on a real engine: vanishing clients, foreign connections, preemption, dropped
connections and a server restart; every output token-exact, no KV block left behind."""
from __future__ import annotations

import asyncio

import pytest
import torch

from harness.replay import make_script, replay_many
from client_lib import SamplingOptions
from client_lib.resume import ReconnectPolicy, ResumableGeneration, ResumeError
from tests.support.sessions import RawSession, local_layers
from tests.engine_reliability.server_config import MAX_TOKENS
from tests.engine_reliability.helpers import expect_error, opened, wait_idle
from vllm_split.wire import protocol as wire
from harness.server_process import kv_blocks_in_use, metrics

pytestmark = pytest.mark.engine


async def test_disconnect_mid_prefill_aborts_and_frees_kv(box, reference, model_dir):
    layers = local_layers(model_dir, 0)
    ids = (reference.prompt_ids[2] * 8)[:390]  # several prefill chunks (--max-num-batched-tokens 128)
    raw = await opened(box.url, layers, max_tokens=8, ignore_eos=True)
    layers.reset()
    await raw.send(wire.Activation.from_tensor(layers.forward(ids), start=0, end_of_prompt=True))
    for _ in range(400):  # until the engine holds KV for the prompt
        m = await asyncio.to_thread(metrics, box.url)
        if kv_blocks_in_use(m) > 0:
            break
    with pytest.raises(asyncio.TimeoutError):
        await raw.ws.receive(timeout=0.01)  # no token yet: the prompt is still being computed
    await raw.ws.close()  # vanish mid-prefill
    await raw.http.close()
    assert kv_blocks_in_use(m) > 0
    await wait_idle(box.url)


async def test_other_connections_cannot_act_on_a_session(box, reference, model_dir):
    """No frame names a session: a session lives on its connection only. A second
    connection cannot send into it (no Open: refused; a session id field: refused) and
    cannot read its tokens; the session goes on token-exact."""
    layers = local_layers(model_dir, 7)
    ids, expected = reference.prompt_ids[0], reference.greedy[0][:6]
    async with await opened(box.url, layers, max_tokens=6, ignore_eos=True) as owner:
        layers.reset()
        await owner.send(wire.Activation.from_tensor(layers.forward(ids), start=0, end_of_prompt=True))
        first = await owner.recv()
        assert isinstance(first, wire.Token)
        row = layers.forward([first.token_id])
        async with await RawSession.connect(box.url) as intruder:
            bad = wire.encode(wire.Activation.from_tensor(torch.zeros(1, 576), start=len(ids)))
            meta_len = int.from_bytes(bad[6:10], "little")
            meta = bad[10 : 10 + meta_len][:-1] + b',"session_id":"x"}'
            await intruder.send(bad[:6] + len(meta).to_bytes(4, "little") + meta + bad[10 + meta_len :])
            await expect_error(intruder, "protocol", "Activation: unknown field(s) ['session_id']", fatal=False)
            await intruder.send(bad)
            await expect_error(intruder, "out_of_turn", "expected Open as the first frame, got Activation", fatal=True)
        got = [first.token_id]
        await owner.send(wire.Activation.from_tensor(row, start=len(ids)))
        while True:
            msg = await owner.recv()
            if isinstance(msg, wire.Finished):
                break
            got.append(msg.token_id)
            if msg.finish_reason is None:
                await owner.send(wire.Activation.from_tensor(layers.forward([msg.token_id]), start=len(ids) + msg.index))
        assert got == expected


async def test_preempted_split_requests_resume_token_exact(box, reference, model_dir):
    """Ten sessions overflow the 24-block KV cache: the engine preempts split requests and
    recomputes them from the activations the server kept; every output stays exact."""
    fingerprint = local_layers(model_dir, 7).fingerprint
    scripts = [make_script(local_layers(model_dir, k), ids, ref)
               for k in (7, 22) for ids, ref in zip(reference.prompt_ids, reference.greedy)]
    before = (await asyncio.to_thread(metrics, box.url)).get("vllm:num_preemptions_total", 0)
    results = await replay_many(box.url, scripts, fingerprint=fingerprint)
    after = (await asyncio.to_thread(metrics, box.url)).get("vllm:num_preemptions_total", 0)
    assert after > before, "the engine did not preempt: the test needs a smaller KV cache"
    assert [r.tokens for r in results] == [s.expected for s in scripts]
    await wait_idle(box.url)


async def _resumed(url, layers, ids, *, on_token) -> tuple[list[int], ResumableGeneration]:
    gen = ResumableGeneration(url, layers, sampling=SamplingOptions(max_tokens=MAX_TOKENS, ignore_eos=True),
                              policy=ReconnectPolicy(initial_delay_s=0.2, max_delay_s=2.0, give_up_after_s=240))
    tokens = []
    async for event in gen.generate(ids):
        assert event.index == len(tokens)
        tokens.append(event.token_id)
        await on_token(gen, event)
    return tokens, gen


async def test_client_reconnects_and_resumes_token_exact(box, reference, model_dir):
    async def drop_at_5_and_12(gen, event):
        if event.index in (5, 12):
            await gen.disconnect()

    tokens, gen = await _resumed(box.url, local_layers(model_dir, 15), reference.prompt_ids[3], on_token=drop_at_5_and_12)
    assert tokens == reference.greedy[3]
    assert gen.num_reconnects == 2 and gen.finish_reason == "length"
    await wait_idle(box.url)


def test_resume_refuses_sampling_it_cannot_reproduce(model_dir):
    with pytest.raises(ResumeError, match="exact only for greedy decoding"):
        ResumableGeneration("http://x", local_layers(model_dir, 7), sampling=SamplingOptions(temperature=0.8, seed=1))


async def test_server_restart_mid_generation_resumes_token_exact(box, reference, model_dir):
    restarted = []

    async def restart_at_8(gen, event):
        if event.index == 8:  # the server goes away while this client waits for token 9
            restarted.append(asyncio.create_task(asyncio.to_thread(box.restart)))

    tokens, gen = await _resumed(box.url, local_layers(model_dir, 22), reference.prompt_ids[4], on_token=restart_at_8)
    await restarted[0]
    assert box.starts == 2
    assert tokens == reference.greedy[4]
    assert gen.num_reconnects >= 1
    await wait_idle(box.url)
