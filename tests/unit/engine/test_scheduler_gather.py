"""The split scheduler's use of the adaptive gather window, on a stand-in for vLLM's
scheduler (the queues, the slot count and the calls the mixin makes; no engine)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm_split.engine import scheduler as sched_module  # noqa: E402
from vllm_split.wire.contract import EXTRA_ARGS_KEY, StepRecord  # noqa: E402

HIDDEN = 4
MS = 0.001


class FakeTime:
    def __init__(self) -> None:
        self.now = 50.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, dt: float) -> None:
        self.now += dt


class FakeQueue(list):
    """vLLM's FCFS queue: prepend_requests puts each request at the front in turn."""

    def remove_requests(self, requests) -> None:
        gone = set(map(id, requests))
        self[:] = [r for r in self if id(r) not in gone]

    def prepend_requests(self, requests) -> None:
        for r in requests:
            self.insert(0, r)


class FakeScheduler:
    def __init__(self, additional_config: dict) -> None:
        model_config = SimpleNamespace(get_hidden_size=lambda: HIDDEN, dtype=torch.float32,
                                       hf_config=SimpleNamespace(num_hidden_layers=2))
        self.vllm_config = SimpleNamespace(model_config=model_config, additional_config=additional_config,
                                           parallel_config=SimpleNamespace(data_parallel_index=0))
        self.running: list = []
        self.waiting = FakeQueue()
        self.requests: dict = {}
        self.num_waiting_for_streaming_input = 0
        self.seen: list[tuple] = []  # what each schedule() call saw
        self.next_outputs: list = []
        pool = SimpleNamespace(num_gpu_blocks=65, get_num_free_blocks=lambda: 60)  # 64 usable (a null block)
        self.kv_cache_manager = SimpleNamespace(block_pool=pool)
        self.cache_config = SimpleNamespace(block_size=16)

    def add_request(self, request) -> None:
        self.requests[request.request_id] = request
        self.running.append(request)  # as if already prefilled

    def schedule(self, *args, **kwargs):
        self.seen.append(([r.request_id for r in self.running], [r.request_id for r in self.waiting],
                          self.num_waiting_for_streaming_input))
        return SimpleNamespace(num_scheduled_tokens={}, total_num_scheduled_tokens=0)

    def update_from_output(self, scheduler_output, model_output):
        outputs, self.next_outputs = self.next_outputs, []
        return {0: SimpleNamespace(outputs=outputs)}

    def _free_request(self, request, delay_free_blocks: bool = False):
        self.requests.pop(request.request_id, None)
        return None, None


class Sched(sched_module.SplitSchedulerMixin, FakeScheduler):
    pass


def request(req_id: str, *, split: bool = True):
    extra = {EXTRA_ARGS_KEY: {"session": f"s-{req_id}", "split_layer": 0}} if split else {}
    return SimpleNamespace(request_id=req_id, sampling_params=SimpleNamespace(extra_args=extra),
                           num_tokens_with_spec=3, num_output_placeholders=0, num_computed_tokens=3)


@pytest.fixture
def clock(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(sched_module, "time", fake)
    monkeypatch.setattr(sched_module.engine_core_utility, "apply", lambda: None)
    return fake


def make(options: dict | None = None) -> Sched:
    s = Sched({"vllm_split": options or {}})
    for _ in range(4):  # recent steps of 100 ms: the window's bound is min(25 ms, 50 ms)
        s.split_steps.records.append(StepRecord(0, 0.0, 0.100, 2, 2, 2, 2))
    return s


def deliver(s: Sched, req) -> None:
    session = f"s-{req.request_id}"
    start = s.split_store.num_rows(session)
    rows = torch.zeros(req.num_tokens_with_spec - start, HIDDEN)
    assert s.split_deliver(session, start, rows.shape[0], rows.numpy().tobytes()) is None


def tokens_leave(s: Sched, clock: FakeTime, *reqs) -> None:
    """A step ends with a new token for each of ``reqs``."""
    s.next_outputs = [SimpleNamespace(request_id=r.request_id, new_token_ids=[7], finish_reason=None) for r in reqs]
    for r in reqs:
        r.num_tokens_with_spec += 1
        r.num_computed_tokens += 1
    s.update_from_output(SimpleNamespace(num_scheduled_tokens={}, total_num_scheduled_tokens=len(reqs)), None)
    clock.now += 0.1 * MS


def train(s: Sched, clock: FakeTime, *reqs, rounds: int = 3) -> None:
    """Tokens leave; the engine schedules (nothing ready); activations come back 4 ms later."""
    for _ in range(rounds):
        tokens_leave(s, clock, *reqs)
        s.schedule()
        clock.now += 4 * MS
        for r in reqs:
            deliver(s, r)


def test_holds_the_whole_step_for_an_expected_activation_and_restores_the_queues(clock):
    s = make()
    a, b, plain = request("a"), request("b"), request("plain", split=False)
    for r in (a, b):
        s.add_request(r)
        deliver(s, r)
    train(s, clock, a, b)
    s.running.append(plain)
    w1, w2 = request("w1", split=False), request("w2", split=False)
    s.waiting.extend([w1, w2])
    tokens_leave(s, clock, a, b)
    clock.now += 0.4 * MS
    deliver(s, a)  # a is back, b is expected 4 ms after its token left
    s.seen.clear()
    s.schedule()
    assert s.seen == [([], [], 3)]  # held: nothing to schedule, every running request keeps its slot
    assert [r.request_id for r in s.running] == ["a", "b", "plain"]
    assert list(s.waiting) == [w1, w2] and s.num_waiting_for_streaming_input == 0
    clock.now += 3 * MS
    deliver(s, b)
    s.schedule()
    assert s.seen[-1] == (["a", "b", "plain"], ["w1", "w2"], 0)  # b arrived: one step for all
    stats = s.split_step_stats(0)
    gather = stats["gather"]
    # the block pool for the admission controller's KV budget (one range: every layer)
    assert stats["kv"] == {"block_size": 16, "total_blocks": 64, "free_blocks": 60, "range_ends": [2]}
    assert gather["mode"] == "adaptive"
    assert (gather["num_holds"], gather["num_caught"], gather["num_late"]) == (1, 1, 0)
    assert gather["held_s"] == pytest.approx(3 * MS, abs=0.5 * MS)


def test_no_hold_when_off_or_with_a_fixed_window(clock):
    for options, mode in (({"gather": "off"}, "off"), ({"batch_wait_ms": 0, "gather": "adaptive"}, "adaptive"),
                          ({"batch_wait_ms": 5}, "fixed")):
        s = make(options)
        assert s.split_step_stats(0)["gather"]["mode"] == mode
        if mode != "adaptive":
            assert s.split_gather is None
    s = make({"gather": "off"})
    a, b = request("a"), request("b")
    for r in (a, b):
        s.add_request(r)
        deliver(s, r)
    train(s, clock, a, b)
    tokens_leave(s, clock, a, b)
    deliver(s, a)
    s.seen.clear()
    s.schedule()
    assert s.seen == [(["a"], [], 1)]  # b is held by its missing activation only


def test_finished_requests_are_forgotten(clock):
    s = make()
    a = request("a")
    s.add_request(a)
    deliver(s, a)
    train(s, clock, a)
    assert s.split_gather.estimate("a") is not None
    s.running.remove(a)
    s._free_request(a)
    assert s.split_gather.estimate("a") is None and "s-a" not in s._split_session_reqs


@pytest.mark.parametrize("weigh, held", [("on", False), ("off", True)])
def test_a_hold_is_weighed_against_the_ordinary_requests(clock, weigh, held):
    """39 ordinary requests ready and one split request expected ~3.6 ms on: the hold would be
    worth at most 100 ms * 1 / 40 = 2.5 ms to them (``gather_weigh`` on): the step runs; off, it is
    held for the bound alone."""
    s = make({"gather_weigh": weigh})
    a, b = request("a"), request("b")
    for r in (a, b):
        s.add_request(r)
        deliver(s, r)
    train(s, clock, a, b)
    s.running.extend(request(f"plain{i}", split=False) for i in range(20))
    s.waiting.extend(request(f"w{i}", split=False) for i in range(19))
    tokens_leave(s, clock, a, b)
    clock.now += 0.4 * MS
    deliver(s, a)
    s.seen.clear()
    s.schedule()
    running, waiting, _ = s.seen[-1]
    assert (running == [] and waiting == []) is held
    if not held:
        assert "a" in running and "b" not in running and len(waiting) == 19
