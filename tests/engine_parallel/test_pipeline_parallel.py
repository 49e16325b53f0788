"""Pipeline parallelism: a vllm-split server in two stages serves ordinary and split requests exactly,
and each stage runs only the rows that have entered.

One server, ``--pipeline-parallel-size 2 --enforce-eager`` (stage 0 holds layers [0, 15),
stage 1 [15, 30)). Eager is the configuration in which vLLM's CPU build dies on the first
request without ``patches/pp_intermediate_tensors.py`` (the compile warm-up would allocate
stage 1's receive buffer itself). Split steps take the compact forward on both stages
(``compact_forward.run_stage``): a stage runs its layers only on the rows of requests whose
split layer is at or below the layer, takes the rows of requests below its first layer from
the previous stage and lets the others enter at their layer. Every step's rows x layers per
stage go to a step log (``VLLM_SPLIT_STEP_LOG``, one line per step and stage).

The reference is greedy decoding of the same float32 checkpoint with transformers, in this
process: independent of vLLM and of the pipeline. Ordinary requests must equal it, and split
sessions at split layers on either stage (0, 7, 22), at the stage boundary (14, 15) and at
``k = L`` (the last stage injects before the final norm) must equal it token for token.
"""
from __future__ import annotations

import asyncio
import json
import os

import pytest
import torch

from harness.server_process import VLLMServer, kv_blocks_in_use, metrics
from tests.engine_reliability.helpers import expect_error, opened, wait_idle
from tests.engine_parallel.conftest import NUM_TOKENS
from tests.support.references import complete
from tests.support.sessions import RawSession, local_layers, split_generate
from vllm_split.wire import protocol as wire

# one core per stage; without a bind list per worker the CPU build refuses two workers on
# this machine ("Not enough allowed NUMA nodes")
PP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
pytestmark = [pytest.mark.engine,
              pytest.mark.skipif(not {0, 1} <= os.sched_getaffinity(0), reason=f"binds the stages to cores 0 and 1 "
                                 f"({PP_ENV['VLLM_CPU_OMP_THREADS_BIND']}), not both allowed here")]
ROUNDS = 4  # of the concurrent sessions, until a step mixes rows entering on both stages
PP_ARGS = ("--pipeline-parallel-size", "2")


@pytest.fixture(scope="module")
def pp_server(model_dir, reference, tmp_path_factory):
    logs = tmp_path_factory.mktemp("split-pp2")
    env = {**PP_ENV, "VLLM_SPLIT_STEP_LOG": str(logs / "steps.jsonl")}
    with VLLMServer(model_dir, split=True, log_path=logs / "server.log", extra_args=PP_ARGS, env=env,
                    eager=True) as server:
        yield server


def steps(server: VLLMServer) -> list[dict]:
    """The step log: one line per step and pipeline stage (``pp_rank``)."""
    path = server.log_path.parent / "steps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_two_stages_split_the_layers_and_take_the_compact_forward(pp_server):
    log = pp_server.log_path.read_text(errors="replace")
    assert "this server holds layers [0, 15)" in log and "this server holds layers [15, 30)" in log
    assert "split steps take the EXACT forward" not in log
    assert "split steps take the COMPACT forward on this stage's layers [0, 15) (pipeline stage 0 of 2)" in log
    assert "split steps take the COMPACT forward on this stage's layers [15, 30) (pipeline stage 1 of 2)" in log


def test_ordinary_requests_equal_transformers_greedy(pp_server, model_dir, prompt_ids, reference):
    for ids, expected in zip(prompt_ids, reference):
        got = complete(pp_server.url, str(model_dir), ids, max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True)
        assert got["token_ids"] == expected


@pytest.mark.parametrize("k", [0, 14, 15, 30])  # 7 and 22: in the concurrent test
async def test_split_session_equals_reference(k, pp_server, model_dir, prompt_ids, reference):
    i = k % len(prompt_ids)
    tokens, session = await split_generate(pp_server.url, local_layers(model_dir, k), prompt_ids[i],
                                           max_tokens=NUM_TOKENS, ignore_eos=True)
    assert session.opened.split_layer == k
    assert tokens == reference[i], f"split session at k={k} diverged"


async def test_concurrent_sessions_on_both_stages_and_an_ordinary_request(pp_server, model_dir, prompt_ids,
                                                                          reference):
    """Rows entering on stage 0 and on stage 1 and ordinary requests share the same steps.

    Two micro-batches are in flight at once under pipeline parallelism, and a session's next
    row is scheduled as soon as it arrives (a batch slot is usually free): sessions rarely
    share a step by chance. So the set of sessions runs again (at most ``ROUNDS`` times, each
    round checked token for token) until some step held split rows entering on each stage."""
    ks = [0, 7, 15, 22]
    for _ in range(ROUNDS):
        await _sessions_beside_ordinary_requests(pp_server, model_dir, prompt_ids, reference, ks)
        log = steps(pp_server)
        if any(min(s["split_layers"]) < 15 <= max(s["split_layers"]) for s in log if s["split_layers"]):
            break
    else:
        pytest.fail(f"in {ROUNDS} rounds no step held split rows entering on both stages")
    assert any(s["split_layers"] and s["num_reqs"] > len(s["split_layers"]) for s in log), \
        "no step ran an ordinary request beside split ones"


async def _sessions_beside_ordinary_requests(pp_server, model_dir, prompt_ids, reference, ks) -> None:
    sessions = [split_generate(pp_server.url, local_layers(model_dir, k), prompt_ids[i % 3],
                               max_tokens=NUM_TOKENS, ignore_eos=True) for i, k in enumerate(ks)]
    split_done = asyncio.Event()

    async def split_then_signal():
        try:
            return await asyncio.gather(*sessions)
        finally:
            split_done.set()

    async def ordinary_while_split_runs() -> list[dict]:  # one could end before the split steps begin
        done = []
        while not done or not split_done.is_set():
            done.append(await asyncio.to_thread(complete, pp_server.url, str(model_dir), prompt_ids[1],
                                                max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True))
        return done

    results, plains = await asyncio.gather(split_then_signal(), ordinary_while_split_runs())
    for i, (k, (tokens, _)) in enumerate(zip(ks, results)):
        assert tokens == reference[i % 3], f"concurrent session at k={k} diverged"
    assert all(plain["token_ids"] == reference[1] for plain in plains)


def test_each_stage_runs_only_the_rows_that_have_entered(pp_server):
    """From the step log of the sessions above: rows x layers per stage against what the exact
    path (every row on every layer of the stage) would have run."""
    log = steps(pp_server)
    assert {s["pp_rank"] for s in log} == {0, 1}
    split = [s for s in log if s["split_layers"]]
    for rank in (0, 1):
        ran = sum(s["layer_rows"] for s in split if s["pp_rank"] == rank)
        exact = sum(s["num_tokens"] * 15 for s in split if s["pp_rank"] == rank)
        assert 0 < ran < exact, f"stage {rank} ran {ran} layer-rows in split steps, the exact path {exact}"
    # steps of one split layer alone (the sessions at k = 0, 14, 15, 30 above): a stage runs each
    # row on its layers at or above k, none at all where k is at or above its last layer
    single = [s for s in split if s["num_reqs"] == len(s["split_layers"]) and len(set(s["split_layers"])) == 1]
    assert {0, 14, 15, 30} <= {s["split_layers"][0] for s in single}
    for s in single:
        k = s["split_layers"][0]
        on_stage = 15 - min(k, 15) if s["pp_rank"] == 0 else 30 - max(k, 15)
        assert s["layer_rows"] == on_stage * s["num_tokens"], s
    # plain steps: every row on every layer of the stage
    assert all(s["layer_rows"] == 15 * s["num_tokens"] for s in log if not s["split_layers"])


async def test_a_disconnect_frees_the_kv_and_a_u_shape_is_refused(pp_server, model_dir, prompt_ids):
    """A client that vanishes mid-decode leaves no KV block held (one scheduler frees them for
    both stages); a U-shaped Open (single-stage only) is refused with the reason and the server
    goes on serving."""
    layers = local_layers(model_dir, 15)
    raw = await opened(pp_server.url, layers, max_tokens=NUM_TOKENS, ignore_eos=True)
    layers.reset()
    await raw.send(wire.Activation.from_tensor(layers.forward(prompt_ids[0]), start=0, end_of_prompt=True))
    assert isinstance(await raw.recv(timeout=120), wire.Token)  # decoding: its KV is held, waiting for a row
    assert kv_blocks_in_use(await asyncio.to_thread(metrics, pp_server.url)) > 0
    await raw.close()  # vanish mid-decode
    await wait_idle(pp_server.url)
    async with await RawSession.connect(pp_server.url) as raw:
        await raw.send(wire.Open(model_fingerprint=layers.fingerprint, split_layer=7, u_shape=True, return_layer=22,
                                 sampling=wire.SamplingOptions(max_tokens=4)))
        await expect_error(raw, "bad_request", "this server runs pipeline parallelism", fatal=True)
