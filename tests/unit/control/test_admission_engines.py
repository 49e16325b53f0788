"""The admission controller with several engines (data parallelism), no engine: each engine
has its own poller, cost model, block pool and admitted sessions; a newcomer goes to the
least-occupied engine that admits it, waits when none does yet, and is refused only when
every engine refuses it; a poll answered by another engine's records is rejected."""
import asyncio
import time

import pytest

from vllm_split.api.admission import AdmissionController, AdmissionRefused, QueueLimits
from vllm_split.api.metrics import split_metrics
from vllm_split.control.policy import AdmissionPolicy
from vllm_split.planner import SMOLLM2_135M
from vllm_split.wire.contract import StepRecord
from tests.unit.control.test_admission import COST, FAST, PHONE, N, open_request

RANKS = (0, 1)


def stats_of(engine: int, pending: list[StepRecord], kv: dict | None = None):
    async def step_stats(since):
        return {"engine": engine, "records": [r.to_list() for r in pending if r.seq > since], "kv": kv}
    return step_stats


def two_engines(queue_wait_s=5.0, polls=None, **policy) -> AdmissionController:
    polls = polls or [stats_of(e, []) for e in RANKS]
    c = AdmissionController(policy=AdmissionPolicy(model=SMOLLM2_135M, min_layer=0, hidden_bytes=576 * 4, **policy),
                            step_stats=polls, engine_ranks=RANKS, metrics=split_metrics(N),
                            queue=QueueLimits(limit=8, wait_s=queue_wait_s))
    for p in c.pollers:
        p.costs.cost = COST
    return c


def busy(c: AdmissionController, engine: int, requests: int, fraction: float = 0.95) -> None:
    """Steps of ``requests`` requests at k = 0 filling ``fraction`` of engine ``engine``'s last 2 s."""
    costs = c.pollers[engine].costs
    step = COST.step_s(N, N * requests)
    now = time.time()
    count = max(1, int(fraction * 2.0 / step))
    costs.records.clear()
    costs.add(StepRecord(i + 1, now - 2.0 + (i + 0.5) * 2.0 / count, step, N, N * requests, requests, requests)
              for i in range(count))


async def test_a_loaded_engine_sends_newcomers_to_the_other():
    c = two_engines()
    busy(c, 0, 8)
    a = await c.admit("a", open_request(PHONE, tpot=0.5))
    assert c.engine_of("a") == 1 and (a.split_layer, a.placement) == (0, "server_only")  # idle engine 1: no offload
    assert [len(c.inflight_on(e)) for e in RANKS] == [0, 1]
    # the newcomer's prediction is engine 1's: on engine 0's load it would have been planned deeper
    assert c.load(1).occupancy < c.load(0).occupancy


async def test_sessions_opened_one_after_another_spread_over_idle_engines():
    c = two_engines()
    for i in range(6):
        await c.admit(f"s{i}", open_request(FAST, tpot=1.0))
    assert sorted(c.engine_of(f"s{i}") for i in range(6)) == [0, 0, 0, 1, 1, 1]
    await c.release("s0", prompt_tokens=40, output_tokens=32, ttft_s=0.1, tpot_s=0.05)
    assert "s0" not in c.inflight and [len(c.inflight_on(e)) for e in RANKS] == [2, 3] or \
        [len(c.inflight_on(e)) for e in RANKS] == [3, 2]


async def test_an_sla_met_only_on_the_quieter_engine_is_placed_there():
    c = two_engines()
    busy(c, 0, 8)
    busy(c, 1, 2)
    # TPOT 0.15 s: missed at 8 requests per step, met at 2
    assert type(c.policy.decide(open_request(FAST, tpot=0.15), c.policy.place(open_request(FAST, tpot=0.15), c.load(0)),
                                load=c.load(0), inflight=[])).__name__ == "Wait"
    a = await c.admit("x", open_request(FAST, tpot=0.15))
    assert c.engine_of("x") == 1 and a.predicted_tpot_s <= 0.15


async def test_both_engines_loaded_means_a_wait_and_a_quieter_engine_admits_it():
    pending: list[StepRecord] = []
    c = two_engines(polls=[stats_of(0, []), stats_of(1, pending)])
    busy(c, 0, 8)
    busy(c, 1, 8)
    waiting = asyncio.create_task(c.admit("w", open_request(FAST, tpot=0.045)))
    await asyncio.sleep(0.2)
    assert not waiting.done() and c.queued == 1
    now, start = time.time(), c.pollers[1].costs.last_seq + 1  # engine 1 goes quiet: one request at k = 30
    pending.extend(StepRecord(start + i, now - 1.0 + i / 512, COST.step_s(0, 0), 0, 0, 1, 1) for i in range(512))
    await c.pollers[1].poll_once()
    await asyncio.wait_for(waiting, 0.5)
    assert c.engine_of("w") == 1 and c.queued == 0


async def test_an_engine_whose_kv_is_exhausted_is_passed_over():
    full = {"block_size": 16, "total_blocks": 100, "free_blocks": 1, "range_ends": [N]}
    roomy = {**full, "free_blocks": 100}
    c = two_engines(polls=[stats_of(0, [], roomy), stats_of(1, [], full)])
    await c.poll_all()
    for i in range(3):  # equal occupancy would alternate: engine 1 cannot hold a 72-token session
        await c.admit(f"s{i}", open_request(FAST, tpot=1.0))
        assert c.engine_of(f"s{i}") == 0


async def test_a_fixed_split_layer_goes_to_the_less_occupied_engine():
    c = two_engines()
    busy(c, 0, 6)
    a = await c.admit("f", open_request(FAST, tpot=10.0, k=12))
    assert c.engine_of("f") == 1 and a.placement == "fixed"


async def test_refused_only_when_every_engine_refuses():
    c = two_engines()
    with pytest.raises(AdmissionRefused) as err:
        await c.admit("a", open_request(PHONE, tpot=0.001))
    assert err.value.reason == "sla_unreachable" and not c.inflight


async def test_a_poll_answered_by_another_engines_records_is_rejected():
    pending = [StepRecord(1, time.time(), 0.05, N, N, 1, 1)]
    c = two_engines(polls=[stats_of(0, []), stats_of(0, pending)])  # engine 1's poll reaches engine 0
    with pytest.raises(RuntimeError, match="engine 0 answered a poll of engine 1"):
        await c.pollers[1].poll_once()
    assert c.pollers[1].costs.last_seq == 0  # nothing of it was fitted


async def test_metrics_carry_the_engine_of_the_session():
    from prometheus_client import REGISTRY

    c = two_engines()
    busy(c, 0, 8)
    before = REGISTRY.get_sample_value("vllm_split:sessions_open", {"engine": "1"}) or 0.0
    await c.admit("m", open_request(FAST, tpot=1.0))
    assert REGISTRY.get_sample_value("vllm_split:sessions_open", {"engine": "1"}) == before + 1
    await c.release("m", prompt_tokens=40, output_tokens=32, ttft_s=0.1, tpot_s=0.05)
    assert REGISTRY.get_sample_value("vllm_split:sessions_open", {"engine": "1"}) == before
    assert REGISTRY.get_sample_value("vllm_split:server_layer_tokens_total", {"engine": "1"}) > 0


def test_step_stats_and_ranks_must_pair():
    with pytest.raises(ValueError, match="2 step-stats polls for engine ranks"):
        AdmissionController(policy=AdmissionPolicy(model=SMOLLM2_135M, min_layer=0, hidden_bytes=576 * 4),
                            step_stats=[stats_of(0, []), stats_of(1, [])], engine_ranks=[0], metrics=split_metrics(N))
