"""Split sessions under ``--tensor-parallel-size 2``: token-exact at mixed split layers in one
batch, beside an ordinary request; a vanishing client's KV is freed; ``/metrics`` answers;
split steps take the compute-saving compact path with the compiled layer bodies on both ranks.

One server, on a tiny random-weight Llama model: SmolLM2-135M cannot be split over two ranks
(9 attention heads, 3 KV heads); this one has 4 heads and 2 KV heads over 6 layers. The
references are the server's own ordinary completions (same engine, same ranks, unsplit).
Two CPU workers on this machine need one OpenMP core each (``VLLM_CPU_OMP_THREADS_BIND``,
else vLLM refuses with "Not enough allowed NUMA nodes"). Every step's split layers go to a
step log (both ranks write one line per step), so that the tests can see which steps mixed
split layers. Fixtures are module-scoped: the server is stopped before another module of
this folder starts its own (one engine at a time).
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.server_process import VLLMServer, kv_blocks_in_use, metrics, split_metrics
from tests.engine_reliability.helpers import opened, wait_idle
from tests.support.references import PROMPTS, complete
from tests.support.sessions import local_layers, split_generate
from vllm_split.wire import protocol as wire

pytestmark = pytest.mark.engine
MAX_TOKENS = 24
SPLIT_LAYERS = (0, 1, 3, 5, 6)  # one per prompt; 6 = every layer on the client
TP_ARGS = ("--tensor-parallel-size", "2")
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per rank (this machine has two)


@dataclass
class TPServer:
    server: VLLMServer
    model: str  # the model directory, as the server names it
    step_log: Path  # VLLM_SPLIT_STEP_LOG: one JSON line per step and rank
    prompt_ids: list[list[int]]  # PROMPTS
    greedy: list[list[int]]  # their ordinary completions on this server, MAX_TOKENS tokens, ignore_eos

    @property
    def url(self) -> str:
        return self.server.url

    def steps(self) -> list[dict]:
        return [json.loads(line) for line in self.step_log.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tp(llama_dir, tokenizer, tmp_path_factory):
    logs = tmp_path_factory.mktemp("tp2")
    step_log = logs / "steps.jsonl"
    with VLLMServer(llama_dir, split=True, log_path=logs / "server.log", extra_args=TP_ARGS,
                    env={**TP_ENV, "VLLM_SPLIT_STEP_LOG": str(step_log)}) as server:
        prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
        greedy = [complete(server.url, str(llama_dir), ids, max_tokens=MAX_TOKENS, temperature=0,
                           ignore_eos=True)["token_ids"] for ids in prompt_ids]
        yield TPServer(server=server, model=str(llama_dir), step_log=step_log, prompt_ids=prompt_ids,
                       greedy=greedy)


async def test_mixed_split_layers_in_one_batch_equal_unsplit(tp, llama_dir):
    """Five split sessions (one per split layer) and ordinary requests, back to back, while they run."""
    sessions = [split_generate(tp.url, local_layers(llama_dir, k), ids, max_tokens=MAX_TOKENS, ignore_eos=True)
                for k, ids in zip(SPLIT_LAYERS, tp.prompt_ids)]
    split_done = asyncio.Event()

    async def ordinary_while_split_runs() -> list[dict]:
        # one request can end before the split sessions' first steps on this tiny model (it did on
        # CI); asking again until they end makes an ordinary row beside split ones certain
        done = []
        while not done or not split_done.is_set():
            done.append(await asyncio.to_thread(complete, tp.url, tp.model, tp.prompt_ids[0],
                                                max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
        return done

    async def split_then_signal():
        try:
            return await asyncio.gather(*sessions)
        finally:
            split_done.set()

    split_results, plains = await asyncio.gather(split_then_signal(), ordinary_while_split_runs())
    for k, (tokens, _), expected in zip(SPLIT_LAYERS, split_results, tp.greedy):
        assert tokens == expected, f"split at k={k} diverged from the unsplit engine under TP=2"
    assert all(plain["token_ids"] == tp.greedy[0] for plain in plains)
    # the batches really mixed: steps with several split layers, and with ordinary rows beside split ones
    steps = tp.steps()
    assert max(len(set(s["split_layers"])) for s in steps) >= 3, "no step mixed three split layers"
    assert any(s["split_layers"] and s["num_reqs"] > len(s["split_layers"]) for s in steps), \
        "no step ran an ordinary request beside split ones"


async def test_client_vanishing_mid_generation_frees_kv_and_serving_goes_on(tp, llama_dir):
    layers = local_layers(llama_dir, 3)
    ids = tp.prompt_ids[1]
    raw = await opened(tp.url, layers, max_tokens=4 * MAX_TOKENS, ignore_eos=True)
    layers.reset()
    await raw.send(wire.Activation.from_tensor(layers.forward(ids), start=0, end_of_prompt=True))
    for _ in range(3):  # three tokens answered: the request is mid-generation, holding KV
        msg = await raw.recv()
        assert isinstance(msg, wire.Token), msg
        await raw.send(wire.Activation.from_tensor(layers.forward([msg.token_id]), start=len(ids) + msg.index))
    m = await asyncio.to_thread(metrics, tp.url)
    assert kv_blocks_in_use(m) > 0
    await raw.close()  # vanish without a word
    await wait_idle(tp.url)
    tokens, _ = await split_generate(tp.url, local_layers(llama_dir, 5), tp.prompt_ids[2],
                                     max_tokens=MAX_TOKENS, ignore_eos=True)
    assert tokens == tp.greedy[2]
    await wait_idle(tp.url)


async def test_a_session_at_layer_0_runs_whole_graph_steps_on_both_ranks(tp, llama_dir):
    """Alone on the server, a session at k = 0 runs vLLM's own compiled model on each rank (its
    rows as input embeddings: whole-graph steps), token-exact."""
    from vllm_split.engine.runner import WHOLE_GRAPH_LOG

    await wait_idle(tp.url)
    tokens, _ = await split_generate(tp.url, local_layers(llama_dir, 0), tp.prompt_ids[3], max_tokens=MAX_TOKENS,
                                     ignore_eos=True)
    assert tokens == tp.greedy[3]
    assert tp.server.log_path.read_text(errors="replace").count(WHOLE_GRAPH_LOG) == 2, "expected one line per rank"


def test_metrics_answer(tp):
    """After the sessions above: vLLM's and vllm-split's metrics, from one API server over two ranks."""
    m = metrics(tp.url)
    assert m["num_gpu_blocks"] > 0 and "vllm:kv_cache_usage_perc" in m
    s = split_metrics(tp.url)
    assert s["vllm_split:sessions_open"] == 0
    assert s["vllm_split:server_layer_tokens_total"] > 0
    assert s["vllm_split:server_layer_tokens_saved_total"] > 0  # sessions at k > 0 ran layers on the client


def test_both_ranks_take_the_compact_compiled_path(tp):
    """The server's work shrinks with k under TP too: no EXACT fallback, compiled bodies on each rank."""
    log = tp.server.log_path.read_text(errors="replace")
    assert "split steps take the EXACT forward" not in log
    assert "split steps run EAGER decoder layers" not in log
    assert log.count("vllm-split: compiled the split layer bodies") == 2, "expected one line per TP rank"
    assert "Worker_TP1" in log  # the second rank really ran
