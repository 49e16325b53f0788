"""Split sessions under ``--data-parallel-size 2 --api-server-count 2``: every session lives on
one engine (its rows delivered to, its request run on, its rows released from that engine
only), token-exact at mixed split layers beside ordinary requests; a vanishing client's KV
is freed on its engine; ``/metrics`` per engine; the admission controller spreads sessions
over the engines by their load, and no session runs on an engine other than the one it was
admitted on.

One server, on the tiny random-weight Llama of the TP tests (6 layers), two engines with one
OpenMP core each (``VLLM_CPU_OMP_THREADS_BIND``, sliced per DP rank by vLLM) and two API
servers (each its own admission controller, both polling both engines). References are the
server's own ordinary completions on each engine (vLLM's ``X-data-parallel-rank`` header).
Every engine's worker appends its steps to one step log (``engine`` names the DP rank,
``split_requests`` the split requests).
"""
from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from client_lib import LocalLayers
from harness.server_process import VLLMServer, by_engine, metrics, split_metrics, vllm_by_engine
from tests.engine_reliability.helpers import opened, wait_idle
from tests.support.references import PROMPTS, complete
from tests.support.sessions import local_layers, split_generate
from vllm_split.api.admission import POLL_S
from vllm_split.control.live_cost import LiveCostModel
from vllm_split.wire import protocol as wire

pytestmark = pytest.mark.engine
MAX_TOKENS = 16
SPLIT_LAYERS = (0, 1, 3, 5, 6)  # one per prompt; 6 = every layer on the client
# a generous default SLA and queue wait: sessions are placed by the engines' load, not held
# back by a TPOT bound that a busy CI machine misses (seen: one auto session of six refused
# after its 5 s wait while the others kept their bounds)
DP_ARGS = ("--data-parallel-size", "2", "--api-server-count", "2", "--split-default-tpot-ms", "5000",
           "--split-default-ttft-ms", "60000", "--split-admission-wait-ms", "60000")
DP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per engine (this machine has two)
ENGINES = ("0", "1")


@dataclass
class DPServer:
    server: VLLMServer
    model: str
    step_log: Path
    prompt_ids: list[list[int]]
    greedy: list[list[int]]  # ordinary completions (engine 0), MAX_TOKENS tokens, ignore_eos

    @property
    def url(self) -> str:
        return self.server.url

    def steps(self) -> list[dict]:
        return [json.loads(line) for line in self.step_log.read_text().splitlines() if line.strip()]

    def admitted_on(self) -> dict[str, str]:
        """session id -> engine, from the API servers' "admitted on engine" lines."""
        log = self.server.log_path.read_text(errors="replace")
        return dict(re.findall(r"session (\S+) admitted on engine (\d+)", log))

    def api_servers_that_admitted(self) -> set[str]:
        log = self.server.log_path.read_text(errors="replace")
        return set(re.findall(r"\((ApiServer_\d+) pid=\d+\)[^\n]*admitted on engine", log))


@pytest.fixture(scope="module")
def dp(llama_dir, tokenizer, tmp_path_factory):
    logs = tmp_path_factory.mktemp("dp2")
    step_log = logs / "steps.jsonl"
    with VLLMServer(llama_dir, split=True, log_path=logs / "server.log", extra_args=DP_ARGS,
                    env={**DP_ENV, "VLLM_SPLIT_STEP_LOG": str(step_log)}) as server:
        prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
        per_engine = [[complete(server.url, str(llama_dir), ids, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True,
                                headers={"X-data-parallel-rank": e})["token_ids"] for ids in prompt_ids]
                      for e in ENGINES]
        assert per_engine[0] == per_engine[1], "the two engines disagree on ordinary greedy completions"
        yield DPServer(server=server, model=str(llama_dir), step_log=step_log, prompt_ids=prompt_ids,
                       greedy=per_engine[0])


async def test_mixed_split_layers_on_both_engines_equal_unsplit(dp, llama_dir):
    """Five split sessions (one per split layer) beside ordinary requests: exact, on both engines."""
    sessions = [split_generate(dp.url, local_layers(llama_dir, k), ids, max_tokens=MAX_TOKENS, ignore_eos=True)
                for k, ids in zip(SPLIT_LAYERS, dp.prompt_ids)]
    plains = [asyncio.to_thread(complete, dp.url, dp.model, dp.prompt_ids[i], max_tokens=MAX_TOKENS, temperature=0,
                                ignore_eos=True) for i in (0, 1)]
    results = await asyncio.gather(*sessions, *plains)
    for k, (tokens, _), expected in zip(SPLIT_LAYERS, results, dp.greedy):
        assert tokens == expected, f"split at k={k} diverged from the unsplit engine under DP=2"
    assert [p["token_ids"] for p in results[len(SPLIT_LAYERS):]] == dp.greedy[:2]
    admitted = dp.admitted_on()
    for (_, session), k in zip(results, SPLIT_LAYERS):
        sid = session.opened.session_id
        assert sid in admitted, f"no admission line for the session at k={k}"
        _only_on(dp, sid, admitted[sid])
    engines_with_split_rows = {str(s["engine"]) for s in dp.steps() if s["split_layers"]}
    assert engines_with_split_rows == set(ENGINES), engines_with_split_rows


def _only_on(dp: DPServer, session_id: str, engine: str) -> None:
    """The session's request ran on ``engine``'s steps, never on the other's."""
    ran = {str(s["engine"]) for s in dp.steps()
           if any(r.startswith(f"split-{session_id}") for r in s.get("split_requests", []))}
    assert ran == {engine}, f"session {session_id} admitted on engine {engine} ran on engines {sorted(ran)}"


async def test_a_client_vanishing_on_each_engine_frees_its_kv(dp, llama_dir):
    # on idle engines whose measured occupancy has gone (the steps of the tests before are out
    # of the window): then each API server spreads the sessions it admits over both engines, and
    # one of the two admits at least two of the four (in CI, engine 0's steps of the test before
    # still counted and all four went to engine 1)
    await wait_idle(dp.url)
    await asyncio.sleep(LiveCostModel().occupancy_window_s + 2 * POLL_S)
    raws, layers = [], []
    for i in range(4):  # four at once: the controllers place them on both engines
        lay = LocalLayers(llama_dir, split_layer=3)
        raw = await opened(dp.url, lay, max_tokens=4 * MAX_TOKENS, ignore_eos=True)
        raws.append(raw)
        layers.append(lay)
    ids = dp.prompt_ids[1]
    for raw, lay in zip(raws, layers):
        await raw.send(wire.Activation.from_tensor(lay.forward(ids), start=0, end_of_prompt=True))
    for raw, lay in zip(raws, layers):
        for _ in range(3):  # three tokens answered: mid-generation, holding KV
            msg = await raw.recv()
            assert isinstance(msg, wire.Token), msg
            await raw.send(wire.Activation.from_tensor(lay.forward([msg.token_id]), start=len(ids) + msg.index))
    open_per_engine = by_engine(await asyncio.to_thread(split_metrics, dp.url), "vllm_split:sessions_open")
    assert all(open_per_engine.get(e, 0) >= 1 for e in ENGINES), open_per_engine
    usage = await asyncio.to_thread(vllm_by_engine, dp.url, "vllm:kv_cache_usage_perc")
    assert all(usage.get(e, 0) > 0 for e in ENGINES), usage
    for raw in raws:
        await raw.close()  # vanish without a word
    await wait_idle(dp.url)
    usage = await asyncio.to_thread(vllm_by_engine, dp.url, "vllm:kv_cache_usage_perc")
    running = await asyncio.to_thread(vllm_by_engine, dp.url, "vllm:num_requests_running")
    assert all(usage[e] == 0 and running[e] == 0 for e in ENGINES), (usage, running)
    tokens, _ = await split_generate(dp.url, local_layers(llama_dir, 5), dp.prompt_ids[2], max_tokens=MAX_TOKENS,
                                     ignore_eos=True)
    assert tokens == dp.greedy[2]


async def test_auto_placed_sessions_spread_over_the_engines_by_load(dp, llama_dir):
    """Sessions opened one after another while the earlier ones run land on both engines, each
    only on the engine it was admitted on; both API servers admit."""
    async def one(i: int):
        return await split_generate(dp.url, LocalLayers(llama_dir, split_layer="auto"), dp.prompt_ids[i % 5],
                                    max_tokens=MAX_TOKENS, ignore_eos=True)

    tasks = []
    for i in range(6):
        tasks.append(asyncio.create_task(one(i)))
        await asyncio.sleep(0.3)
    results = await asyncio.gather(*tasks)
    admitted = dp.admitted_on()
    engines = []
    for i, (tokens, session) in enumerate(results):
        assert tokens == dp.greedy[i % 5], f"auto session {i} (k = {session.opened.split_layer}) diverged"
        sid = session.opened.session_id
        engines.append(admitted[sid])
        if not session.opened.server_decode:
            _only_on(dp, sid, admitted[sid])
    assert set(engines) == set(ENGINES), engines
    assert dp.api_servers_that_admitted() == {"ApiServer_0", "ApiServer_1"}


def test_metrics_per_engine(dp):
    """vLLM's per-engine series and vllm-split's, after the sessions above."""
    s = split_metrics(dp.url)
    assert set(by_engine(s, "vllm_split:sessions_open")) == set(ENGINES)
    assert s["vllm_split:sessions_open"] == 0
    work = by_engine(s, "vllm_split:server_layer_tokens_total")
    assert all(work[e] > 0 for e in ENGINES), work
    assert set(by_engine(s, "vllm_split:server_occupancy")) == set(ENGINES)
    assert set(vllm_by_engine(dp.url, "vllm:num_requests_running")) == set(ENGINES)
    assert metrics(dp.url)["num_gpu_blocks"] > 0
    log = dp.server.log_path.read_text(errors="replace")
    assert "takes 128 of 256 sessions" in log  # each API server its share of max_sessions
