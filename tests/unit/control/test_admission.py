"""Admission controller logic with a fabricated live load (no engine): placements by load,
the bounded queue and what wakes it (a session's end, new step records), refusals and
their retry hints."""
import asyncio
import time
from dataclasses import replace

import pytest

from vllm_split.wire import protocol as wire
from vllm_split.api.admission import AdmissionController, AdmissionRefused, QueueLimits, StepPoller, request_from_open
from vllm_split.control.live_cost import StepCost
from vllm_split.control.policy import AdmissionPolicy
from vllm_split.planner import SLA, SMOLLM2_135M, NetworkSpec
from vllm_split.api.metrics import split_metrics
from vllm_split.wire.contract import StepRecord

LAN = NetworkSpec(uplink_bps=1e9, downlink_bps=1e9, rtt_s=0.002)
COST = StepCost(fixed_s=0.012, layer_s=0.0018, row_s=6e-5)
N = SMOLLM2_135M.num_hidden_layers


async def no_stats(since):
    return None


def engine_steps(pending: list[StepRecord]):
    """A fake EngineCore step-stats call serving the records appended to ``pending``."""
    async def step_stats(since):
        return {"records": [r.to_list() for r in pending if r.seq > since]}
    return step_stats


def controller(queue_limit=64, queue_wait_s=5.0, step_stats=no_stats, **policy) -> AdmissionController:
    c = AdmissionController(policy=AdmissionPolicy(model=SMOLLM2_135M, min_layer=0, hidden_bytes=576 * 4, **policy),
                            step_stats=step_stats, metrics=split_metrics(N),
                            queue=QueueLimits(limit=queue_limit, wait_s=queue_wait_s))
    c.costs.cost = COST
    return c


def load(c: AdmissionController, requests: int, busy: float) -> None:
    """Steps of ``requests`` requests at k=0 filling ``busy`` of the last 2 s."""
    step = COST.step_s(N, N * requests)
    now = time.time()
    count = max(1, int(busy * 2.0 / step))
    c.costs.records.clear()
    c.costs.add(StepRecord(i + 1, now - 2.0 + (i + 0.5) * 2.0 / count, step, N, N * requests, requests, requests)
                for i in range(count))


def open_request(profile, tpot, ttft=5.0, k=None):
    """The request a client opening with this profile and SLA on the LAN link describes."""
    msg = wire.Open(model_fingerprint="fp", split_layer=k, sla=wire.RequestSLA(ttft_s=ttft, tpot_s=tpot),
                    client=profile, prompt_tokens=40, sampling=wire.SamplingOptions(max_tokens=32))
    return request_from_open(msg, LAN)


PHONE = wire.ClientProfile(layer_prefill_s_per_token=2e-4, layer_decode_s=3e-3)
FAST = wire.ClientProfile(layer_prefill_s_per_token=2e-5, layer_decode_s=4e-4)


async def test_idle_server_offloads_least_busy_server_runs_the_dp():
    c = controller()
    idle = await c.admit("a", open_request(PHONE, tpot=0.5))
    assert (idle.split_layer, idle.placement) == (0, "server_only")
    await c.release("a", prompt_tokens=40, output_tokens=32, ttft_s=0.1, tpot_s=0.1)
    load(c, 8, busy=0.95)
    busy = await c.admit("b", open_request(PHONE, tpot=0.5))
    assert busy.placement == "dp" and busy.split_layer > idle.split_layer
    assert busy.predicted_tpot_s <= 0.5


async def test_greedy_stops_at_the_first_violation_and_never_beats_the_dp():
    dp, gr = controller(), controller(placement="greedy")
    for c in (dp, gr):
        load(c, 8, busy=0.95)
    a = await dp.admit("x", open_request(PHONE, tpot=0.2))
    b = await gr.admit("x", open_request(PHONE, tpot=0.2))
    assert b.placement in ("greedy", "server_only") and b.split_layer <= a.split_layer


async def test_impossible_sla_is_refused_without_retry_hint():
    c = controller()
    with pytest.raises(AdmissionRefused) as err:
        await c.admit("a", open_request(PHONE, tpot=0.001))
    assert err.value.reason == "sla_unreachable" and err.value.retry_after_s is None
    assert "best this client can get" in str(err.value)


async def test_busy_server_queues_then_refuses_with_a_retry_hint():
    c = controller(queue_limit=1, queue_wait_s=0.3)
    load(c, 8, busy=0.95)
    # SLA met on an idle server (about 0.1 s) but not with 8 requests per step
    with pytest.raises(AdmissionRefused) as err:
        await c.admit("a", open_request(FAST, tpot=0.04, ttft=5.0, k=None))
    assert err.value.reason == "server_busy" and err.value.retry_after_s >= 0.5
    assert "waited 0.3 s in the admission queue" in str(err.value)


async def test_full_queue_refuses_at_once_and_a_release_admits_the_waiting():
    c = controller(queue_limit=1, queue_wait_s=5.0)
    first = await c.admit("s1", open_request(FAST, tpot=0.3))  # idle: admitted
    # the admitted session meets its bound now, and misses it if anyone joins it
    s1 = c.inflight["s1"]
    now_tpot = c.policy.predict(s1.request, first.split_layer, c.load())[1]
    tight = SLA(ttft_s=5.0, tpot_s=now_tpot * 1.0001)
    c.inflight["s1"] = replace(s1, admission=replace(s1.admission, sla=tight))
    waiting = asyncio.create_task(c.admit("s2", open_request(FAST, tpot=0.3)))
    await asyncio.sleep(0.1)
    assert not waiting.done() and c.queued == 1
    with pytest.raises(AdmissionRefused) as err:  # the queue (1) is full
        await c.admit("s3", open_request(FAST, tpot=0.3))
    assert err.value.reason == "server_busy" and "queue is full" in str(err.value)
    await c.release("s1", prompt_tokens=40, output_tokens=32, ttft_s=0.1, tpot_s=0.05)
    admitted = await asyncio.wait_for(waiting, 0.3)  # at once, on the release (no re-plan tick)
    assert admitted.split_layer >= 0 and c.queued == 0


async def test_new_step_records_that_lighten_the_load_admit_a_waiting_request_at_once():
    pending: list[StepRecord] = []

    c = controller(queue_wait_s=5.0, step_stats=engine_steps(pending))
    load(c, 8, busy=0.95)  # 8 requests per step: TPOT 0.045 s cannot be met
    waiting = asyncio.create_task(c.admit("s", open_request(FAST, tpot=0.045)))
    await asyncio.sleep(1.2)  # longer than the old 1 s re-plan tick: nothing changed, it waits
    assert not waiting.done() and c.queued == 1
    # the engine now runs one request at a time at k = 28 or 30 (512 steps: the window's old steps drop out)
    now, start = time.time(), c.costs.last_seq + 1
    for i in range(512):
        calls = 2 * (i % 2)
        pending.append(StepRecord(start + i, now - 1.0 + i / 512, COST.step_s(calls, calls), calls, calls, 1, 1))
    t0 = time.monotonic()
    assert await c.poller.poll_once() == 512
    admitted = await asyncio.wait_for(waiting, 0.5)
    assert time.monotonic() - t0 < 0.5 and admitted.split_layer >= N - 2 and c.queued == 0


async def test_the_poller_reports_new_steps_and_steps_leaving_the_window():
    pending: list[StepRecord] = []
    updates = []

    async def on_update():
        updates.append(len(pending))

    poller = StepPoller(step_stats=engine_steps(pending), metrics=split_metrics(N), on_update=on_update)
    poller.costs.occupancy_window_s = 0.2
    assert await poller.poll_once() == 0 and updates == []  # idle, nothing changed
    pending.append(StepRecord(1, time.time(), 0.05, N, N, 1, 1))
    assert await poller.poll_once() == 1 and updates == [1]
    assert await poller.poll_once() == 0 and updates == [1]  # the same load
    await asyncio.sleep(0.25)  # the step leaves the load's window: the engine went quiet
    assert await poller.poll_once() == 0 and updates == [1, 1]


async def test_fixed_split_layer_is_admitted_with_predictions():
    c = controller()
    a = await c.admit("f", open_request(FAST, tpot=10.0, k=12))
    assert (a.split_layer, a.placement) == (12, "fixed") and a.predicted_tpot_s > 0


async def test_a_session_waits_for_a_request_slot_instead_of_the_engine_queue():
    c = controller(queue_limit=4, queue_wait_s=0.3, max_num_seqs=1)
    await c.admit("s1", open_request(FAST, tpot=1.0))
    with pytest.raises(AdmissionRefused) as err:
        await c.admit("s2", open_request(FAST, tpot=1.0))
    assert err.value.reason == "server_busy" and "all 1 request slots of the engine are taken" in str(err.value)
    await c.release("s1", prompt_tokens=40, output_tokens=32, ttft_s=0.1, tpot_s=0.05)
    assert (await c.admit("s3", open_request(FAST, tpot=1.0))).split_layer >= 0


async def test_released_sessions_set_the_planning_margin_of_their_kind():
    c = controller()
    load(c, 4, busy=0.95)
    assert c.load().tpot_error == 1.0
    for i in range(6):  # split sessions measured 40% slower than predicted
        a = await c.admit(f"s{i}", open_request(FAST, tpot=1.0, k=7))
        await c.release(f"s{i}", prompt_tokens=40, output_tokens=32, ttft_s=0.1, tpot_s=a.predicted_tpot_s * 1.4)
    assert c.load().tpot_error == pytest.approx(1.4)
    assert c.load().ttft_error == 1.0  # their TTFTs came in under the predictions
    msg = wire.Open(model_fingerprint="fp", split_layer=0, server_decode=True, client=FAST,
                    sla=wire.RequestSLA(ttft_s=5.0, tpot_s=1.0), prompt_tokens=40)
    assert c.load().decoded_tpot_error == 1.0
    for i in range(6):  # server-decoded sessions set their own margin, not the round trips'
        a = await c.admit(f"d{i}", request_from_open(msg, LAN))
        assert a.server_decode
        await c.release(f"d{i}", prompt_tokens=40, output_tokens=32, ttft_s=0.1, tpot_s=a.predicted_tpot_s * 2)
    assert c.load().tpot_error == pytest.approx(1.4)
    assert c.load().decoded_tpot_error == pytest.approx(2.0)
    declined = request_from_open(msg, LAN, server_decode_allowed=False)  # the server's option off
    assert not (await c.admit("x", declined)).server_decode


def test_a_margin_learnt_in_an_overload_expires_without_fresh_measurements():
    """Else a high margin refuses every newcomer, nothing ends, nothing is measured: for good."""
    from vllm_split.api.admission import ERROR_MAX_AGE_S, ERROR_WINDOW, ErrorWindow

    window = ErrorWindow()
    for i in range(10):
        window.add(2.5, now=100.0 + i)
    assert window.error(now=110.0) == pytest.approx(2.5)
    assert window.error(now=105.0 + ERROR_MAX_AGE_S) == pytest.approx(2.5)  # the newest five still count
    assert window.error(now=110.0 + ERROR_MAX_AGE_S) == 1.0  # too few recent ones to say
    for i in range(5):  # fresh measurements in a calmer load set it again
        window.add(1.2, now=200.0 + i)
    assert window.error(now=205.0) == pytest.approx(1.2)
    for i in range(2 * ERROR_WINDOW):
        window.add(1.0, now=300.0)
    assert window.error(now=300.0) == 1.0  # only the last ERROR_WINDOW are kept


def test_a_round_trip_margin_falls_back_to_the_models_standing_bias_not_to_one():
    """Round trips come seldom at low load: between them the margin is the median of every
    kept ratio (at most 1.5), so offloads are not planned at the SLA's edge by a model known
    to be optimistic; a fresh quantile wins once there are enough fresh ratios."""
    from vllm_split.api.admission import ERROR_MAX_AGE_S, ErrorWindow
    from vllm_split.control.measured_load import BIAS_MAX

    window, plain = ErrorWindow(keep_bias=True), ErrorWindow()
    for w in (window, plain):
        for i, ratio in enumerate((1.05, 1.1, 1.2, 1.25, 1.3, 1.6, 2.1)):
            w.add(ratio, now=100.0 + i)
    later = 200.0 + ERROR_MAX_AGE_S
    assert plain.error(now=later) == 1.0
    assert window.error(now=later) == pytest.approx(1.25)  # the median of the seven
    assert window.error(now=106.0) == pytest.approx(1.6)  # fresh: the 75% quantile as before
    for i in range(3):  # three fresh ones are too few for a quantile: the bias, over all ten kept
        window.add(1.4, now=later + i)
    assert window.error(now=later + 3) == pytest.approx(1.4)  # the median of the ten kept
    high = ErrorWindow(keep_bias=True)
    for i in range(8):
        high.add(2.8, now=float(i))
    assert high.error(now=1e4) == BIAS_MAX  # an old overload never holds round trips back by more
    few = ErrorWindow(keep_bias=True)
    for i in range(4):
        few.add(2.0, now=float(i))
    assert few.error(now=1e4) == 1.0  # fewer than five measured: nothing to say


async def test_a_session_waits_for_kv_memory_that_an_admitted_session_has_promised():
    kv = {"block_size": 16, "total_blocks": 100, "free_blocks": 6, "range_ends": [N]}

    async def step_stats(since):
        return {"records": [], "kv": kv}

    c = controller(queue_wait_s=2.0, step_stats=step_stats)
    await c.poller.poll_once()
    assert c.load().kv.free_blocks == 6
    # 40 prompt + 32 output tokens = 5 blocks: fits; a second one does not beside the first's 2 output blocks
    first = await c.admit("s1", open_request(FAST, tpot=1.0))
    kv["free_blocks"] = 3  # the engine took s1's prompt (3 blocks)
    await c.poller.poll_once()
    waiting = asyncio.create_task(c.admit("s2", open_request(FAST, tpot=1.0)))
    await asyncio.sleep(0.1)
    assert not waiting.done() and c.queued == 1
    await c.release("s1", prompt_tokens=40, output_tokens=32, ttft_s=0.1, tpot_s=0.05)
    await asyncio.sleep(0.1)  # its promise is gone, but the engine has not freed its blocks yet
    assert not waiting.done()
    kv["free_blocks"] = 6  # now it has: the poll that sees it wakes the queue
    await c.poller.poll_once()
    assert (await asyncio.wait_for(waiting, 0.5)).split_layer >= 0 and first.split_layer >= 0
