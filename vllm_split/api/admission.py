"""Asynchronous admission controller: the asyncio side of deciding where a request splits.

Process: the API server, on its event loop, which it never blocks: planning runs on a
one-thread executor, waits are asyncio waits. The decisions themselves are the pure policy's
(:mod:`vllm_split.control.policy`); this module owns what needs the loop:

* :func:`request_from_open`: the client's ``Open`` and the measured network -> the policy's
  :class:`~vllm_split.control.policy.AdmissionRequest`;
* :class:`StepPoller`: feeds the live step-cost model (:mod:`vllm_split.control.live_cost`)
  from the engine's step records, polled every ``POLL_S`` through an EngineCore utility call,
  and tells the controller when the load it measures changed (``on_update``);
* :class:`AdmissionController`: the admitted sessions, the bounded admission queue (a
  request the policy makes wait is re-planned on events, not on a tick: whenever a session
  ends and whenever the poller reports a changed load; at most ``QueueLimits.wait_s``, then
  refused with ``server_busy`` and a ``retry_after_s``), the planning executor, the
  measured errors of the latency model (:class:`ErrorWindow`: the last ``ERROR_WINDOW``
  split sessions' measured / predicted TPOT and TTFT that ended within ``ERROR_MAX_AGE_S``,
  the policy's planning margins), the measured tokens and rows per round trip of drafted
  sessions per request type (:class:`DraftWindows`: a newcomer granted drafts is planned with
  its type's) and the metrics on vLLM's ``/metrics`` (:mod:`vllm_split.api.metrics`).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable, Sequence

from vllm_split.control.drafting import (expected_rows_per_round_trip, expected_tokens_per_round_trip,
                                         measured_draft_fill, measured_tokens_per_round_trip)
from vllm_split.control.kv_budget import KVState
from vllm_split.control.live_cost import LiveCostModel
from vllm_split.control.measured_load import TPOT_ERROR_MIN_SAMPLES, model_error, server_load, standing_bias
from vllm_split.control.policy import (Admission, AdmissionPolicy, AdmissionRequest, ClientFlops, InFlight, Refusal,
                                       retry_after_s)
from vllm_split.control.request_graph import ClientCosts, ServerLoad
from vllm_split.planner import SLA, NetworkSpec
from vllm_split.wire import protocol as wire
from vllm_split.wire.contract import ErrorCode, StepRecord

logger = logging.getLogger(f"vllm.{__name__}")  # under "vllm": vLLM's log handlers
POLL_S = 0.5
ERROR_WINDOW = 64  # recent split sessions whose measured / predicted TPOT and TTFT set the planning margins
ERROR_MAX_AGE_S = 30.0  # older measurements no longer count (a few sessions' lifetimes)
DRAFTS_MAX_AGE_S = 600.0  # tokens per round trip: a property of the workload, not of the load
MAX_REQUEST_TYPES = 64  # request types whose acceptance is kept (the least recently measured goes)


class ErrorWindow:
    """Measured / predicted ratios of one kind of session (a latency and a placement kind):
    the margin is :func:`model_error` over the last ``ERROR_WINDOW`` that ended within
    ``max_age_s`` (``ERROR_MAX_AGE_S``). The age limit keeps the controller live: a margin learnt in an
    overload makes newcomers wait and be refused, so no session ends and nothing new is
    measured; kept for good, it would refuse every newcomer for good (seen: 0 of 49 met at
    a rate the server had met 99% of). With no fresh evidence the margin returns to 1, or,
    with ``keep_bias``, to the standing bias of every kept ratio (:func:`standing_bias`,
    the median, at most 1.5): for round-trip sessions, which come too seldom for a fresh
    quantile at low load and whose model errs one way; a server-decoded session's margin
    returns to 1 (its error grows with load, and a margin learnt in an overload is the one
    that must not outlive it). :class:`DraftWindows` keeps other measurements (tokens and
    rows per round trip) the same way."""

    def __init__(self, max_age_s: float = ERROR_MAX_AGE_S, *, keep_bias: bool = False) -> None:
        self.max_age_s = max_age_s
        self.keep_bias = keep_bias
        self._samples: deque[tuple[float, float]] = deque(maxlen=ERROR_WINDOW)  # (ended at, value)

    def add(self, ratio: float, now: float) -> None:
        self._samples.append((now, ratio))

    def fresh(self, now: float) -> list[float]:
        """The kept values that ended within ``max_age_s`` of ``now``."""
        return [r for t, r in self._samples if now - t <= self.max_age_s]

    def error(self, now: float) -> float:
        fresh = self.fresh(now)
        if self.keep_bias and len(fresh) < TPOT_ERROR_MIN_SAMPLES:  # too few for a fresh quantile
            return standing_bias([r for _, r in self._samples])
        return model_error(fresh)


class DraftWindows:
    """Finished drafted sessions' measurements, per request type (``Open.request_type``; ``""``
    is a type too): their tokens per round trip and their shares of granted drafts sent
    (:func:`measured_draft_fill`), each an :class:`ErrorWindow` of the last ``ERROR_WINDOW``
    within ``DRAFTS_MAX_AGE_S``; at most ``MAX_REQUEST_TYPES`` types (a client's free text
    cannot grow it without bound). A newcomer of a type is planned with
    :func:`expected_tokens_per_round_trip` (a low quantile) and
    :func:`expected_rows_per_round_trip` (a high one) of its windows once there are a few;
    before, None (as without drafts, and at ``1 + γ`` rows)."""

    def __init__(self) -> None:
        self._by_type: OrderedDict[str, tuple[ErrorWindow, ErrorWindow]] = OrderedDict()  # (tokens, fill)

    def add(self, request_type: str, now: float, *, tokens_per_round_trip: float | None = None,
            draft_fill: float | None = None) -> None:
        windows = self._by_type.pop(request_type, None) or (ErrorWindow(DRAFTS_MAX_AGE_S),
                                                              ErrorWindow(DRAFTS_MAX_AGE_S))
        for window, value in zip(windows, (tokens_per_round_trip, draft_fill)):
            if value is not None:
                window.add(value, now)
        self._by_type[request_type] = windows  # the most recently measured last
        while len(self._by_type) > MAX_REQUEST_TYPES:
            self._by_type.popitem(last=False)

    def expected(self, request_type: str, now: float) -> float | None:
        """Tokens per round trip to plan a newcomer of ``request_type`` with (None: too few measured)."""
        windows = self._by_type.get(request_type)
        return None if windows is None else expected_tokens_per_round_trip(windows[0].fresh(now))

    def expected_rows(self, request_type: str, num_drafts: int, now: float) -> float | None:
        """Mean rows per round trip to plan a newcomer of ``request_type`` granted ``num_drafts``
        with (None: too few measured, planned at ``1 + num_drafts``)."""
        windows = self._by_type.get(request_type)
        return None if windows is None else expected_rows_per_round_trip(windows[1].fresh(now), num_drafts)


class AdmissionRefused(Exception):
    """A session refused at admission: ``reason`` is its ``Error.code``."""

    def __init__(self, reason: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class QueueLimits:
    limit: int = 64  # sessions waiting for admission at once (0: refuse at once when busy)
    wait_s: float = 5.0  # longest wait in the queue before a refusal

    def __post_init__(self) -> None:
        if self.limit < 0 or self.wait_s < 0:
            raise ValueError(f"QueueLimits: expected limit >= 0 and wait_s >= 0, got limit={self.limit!r}, "
                             f"wait_s={self.wait_s!r}")


def granted_drafts(msg: wire.Open, server_drafts: int) -> int:
    """Drafts per activation a session of ``msg`` gets unless it is server decoded (then
    none): what the client asked (``Open.max_drafts``), at most the server's ``drafts``
    option; none for a U-shaped one (the client samples: nothing to verify). The session's
    grant (``Opened.max_drafts``) and the policy's ``AdmissionRequest.num_drafts`` both."""
    return 0 if msg.u_shape else min(msg.max_drafts, server_drafts)


def request_from_open(msg: wire.Open, network: NetworkSpec | None, *, server_decode_allowed: bool = True,
                      wire_dtype: str | None = None, hidden_size: int | None = None,
                      server_drafts: int = 0) -> AdmissionRequest:
    """The policy's description of the request ``msg`` opens (``network``: as measured on
    its connection, None when it was not probed). The client's memory bound
    (``ClientProfile.max_layers``) goes with its speed, its privacy floor
    (``Open.privacy_floor``) as it is; its offer of server decoding counts where the server
    allows it (``SplitConfig.server_decode``). ``wire_dtype``: the one the
    server accepted from the client's offer (None: none negotiated, the policy's default row
    size); with the model's ``hidden_size`` it sets the bytes one row costs on the wire.
    ``server_drafts``: the server's ``drafts`` option; the drafts granted (:func:`granted_drafts`)
    and ``Open.request_type`` go as they are (the controller adds the type's measured tokens
    per round trip when it admits)."""
    if wire_dtype is not None and hidden_size is None:
        raise ValueError(f"request_from_open: wire_dtype {wire_dtype!r} needs the model's hidden_size")
    client: ClientCosts | ClientFlops | None = None
    profile = msg.client
    if profile is not None and profile.layer_decode_s is not None:
        client = ClientCosts(prefill_s_per_token=profile.layer_prefill_s_per_token, decode_s=profile.layer_decode_s,
                             max_layers=profile.max_layers)
    elif profile is not None and profile.flops_per_s is not None:
        client = ClientFlops(profile.flops_per_s, max_layers=profile.max_layers)
    elif profile is not None:  # max_layers=0: no layer on the client, so its speed does not matter
        client = ClientCosts(prefill_s_per_token=0.0, decode_s=0.0, max_layers=profile.max_layers)
    return AdmissionRequest(
        prompt_tokens=msg.prompt_tokens or 1,
        expected_output_tokens=msg.expected_output_tokens or msg.sampling.max_tokens,
        sla=SLA(ttft_s=msg.sla.ttft_s, tpot_s=msg.sla.tpot_s) if msg.sla is not None else None,
        client=client, network=network, split_layer=msg.split_layer,
        server_decode=msg.server_decode and server_decode_allowed,
        row_bytes=None if wire_dtype is None else wire.row_bytes(wire_dtype, hidden_size),
        privacy_floor=msg.privacy_floor, u_shape=msg.u_shape, return_layer=msg.return_layer,
        num_drafts=granted_drafts(msg, server_drafts), request_type=msg.request_type)


class StepPoller:
    """Keeps one engine's live cost model fed from its step records, publishes its fit and
    calls ``on_update`` when the load it measures changed."""

    def __init__(self, *, step_stats: Callable[[int], Awaitable[dict | None]], metrics: Any,
                 on_update: Callable[[], Awaitable[None]] | None = None, engine: int = 0) -> None:
        self.step_stats = step_stats  # (since_seq) -> {"records": [...]} or None
        self.metrics = metrics
        self.on_update = on_update  # awaited after a poll that changed the measured load
        self.engine = engine  # the DP rank polled: the metrics' label, and the rank its answers must name
        self.costs = LiveCostModel()
        self.kv: KVState | None = None  # the engine's block pool at the last poll
        self._num_recent = 0  # steps in the load's window at the last poll
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll_forever())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def poll_once(self) -> int:
        """Fetch the steps since the last one seen and the block pool, refit; the number of new
        steps. The measured load changed when there are new steps, when steps left its window
        (the engine went quiet) or when KV blocks were freed: then ``on_update`` is awaited."""
        stats = await self.step_stats(self.costs.last_seq)
        if stats and stats.get("engine", self.engine) != self.engine:  # never plan on another engine's records
            raise RuntimeError(f"step records of engine {stats['engine']} answered a poll of engine {self.engine}")
        n = self.costs.add(StepRecord.from_list(r) for r in stats["records"]) if stats else 0
        kv_before = self.kv
        if stats:
            self.kv = KVState.from_stats(stats.get("kv"), now=time.monotonic())
        kv_freed = self.kv is not None and (kv_before is None or self.kv.free_blocks > kv_before.free_blocks)
        if n:
            cost = self.costs.refit()
            for term, value in (("fixed", cost.fixed_s), ("layer", cost.layer_s), ("row", cost.row_s)):
                self.metrics.server_cost.labels(term=term, engine=str(self.engine)).set(value)
        self.metrics.occupancy.labels(engine=str(self.engine)).set(self.costs.occupancy())
        num_recent, before = len(self.costs.recent()), self._num_recent
        self._num_recent = num_recent
        if (n or num_recent != before or kv_freed) and self.on_update is not None:
            await self.on_update()
        return n

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # engine busy or restarting: keep the last model
                logger.debug("vllm-split: step poll of engine %d failed", self.engine, exc_info=True)
            await asyncio.sleep(POLL_S)


class AdmissionController:
    """Admits sessions by the policy, queues the ones it makes wait, records the metrics.

    With several engines (data parallelism, ``step_stats`` one poll per engine) each engine
    has its own poller, live cost model, block pool and admitted sessions: a newcomer is
    planned against every engine's load and placed on the one that admits it with the
    lowest occupancy (:meth:`_choose`); it waits when none admits it and at least one would
    later, and is refused when every engine refuses it. The latency model's measured errors
    (``ErrorWindow``) are the replica's: they describe the model, not one engine."""

    def __init__(self, *, policy: AdmissionPolicy,
                 step_stats: Callable[[int], Awaitable[dict | None]] | Sequence[Callable[[int], Awaitable[dict | None]]],
                 metrics: Any, queue: QueueLimits = QueueLimits(), engine_ranks: Sequence[int] | None = None,
                 first_turn: int = 0) -> None:
        self.policy = policy
        self.queue = queue
        self.metrics = metrics
        polls = [step_stats] if callable(step_stats) else list(step_stats)
        ranks = list(engine_ranks) if engine_ranks is not None else list(range(len(polls)))
        if not polls or len(ranks) != len(polls):
            raise ValueError(f"AdmissionController: {len(polls)} step-stats polls for engine ranks {ranks}")
        self.pollers = [StepPoller(step_stats=poll, metrics=metrics, on_update=self._notify, engine=rank)
                        for poll, rank in zip(polls, ranks)]
        self.inflight: dict[str, InFlight] = {}  # every engine's admitted sessions
        self._engine_of: dict[str, int] = {}  # session -> index of its engine in ``pollers``
        self.queued = 0
        self._changed = asyncio.Condition()  # notified on each event that may admit a waiting session
        self._num_events = 0  # sessions ended and load changes so far (a waiter re-plans when it moved)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-split-plan")
        self._tpot_ratios = ErrorWindow(keep_bias=True)  # split sessions' with round trips
        self._ttft_ratios = ErrorWindow(keep_bias=True)
        self._decoded_tpot_ratios = ErrorWindow()  # server-decoded sessions'
        self._drafted_tpot_ratios = ErrorWindow(keep_bias=True)  # sessions granted drafts' (draft-aware predictions)
        self._drafts = DraftWindows()  # drafted sessions' tokens and rows per round trip, per request type
        self._rotation = itertools.count(first_turn)  # ties between equally loaded engines go round
        for poller in self.pollers:  # every engine's series exist from the start (a dashboard's zero)
            label = str(poller.engine)
            metrics.sessions_open.labels(engine=label)
            metrics.work_done.labels(engine=label)
            metrics.work_saved.labels(engine=label)

    @property
    def poller(self) -> StepPoller:
        """The first engine's poller (the only one without data parallelism)."""
        return self.pollers[0]

    @property
    def costs(self) -> LiveCostModel:
        """The first engine's live cost model (the only one without data parallelism)."""
        return self.pollers[0].costs

    def start(self) -> None:
        for poller in self.pollers:
            poller.start()

    async def stop(self) -> None:
        for poller in self.pollers:
            poller.stop()
        self._executor.shutdown(wait=False)

    async def poll_all(self) -> None:
        await asyncio.gather(*(poller.poll_once() for poller in self.pollers))

    def engine_of(self, session_id: str) -> int:
        """The engine (index into the engine ranks) an admitted session runs on."""
        return self._engine_of[session_id]

    def inflight_on(self, engine: int) -> list[InFlight]:
        return [s for sid, s in self.inflight.items() if self._engine_of.get(sid, 0) == engine]

    def load(self, engine: int = 0) -> ServerLoad:
        now = time.monotonic()  # InFlight.admitted_at's clock; the step records use wall time
        poller = self.pollers[engine]
        load = server_load(poller.costs, admitted_ages_s=[now - s.admitted_at for s in self.inflight_on(engine)],
                           num_layers=self.policy.num_layers, now=time.time())
        return replace(load, tpot_error=self._tpot_ratios.error(now), ttft_error=self._ttft_ratios.error(now),
                       decoded_tpot_error=self._decoded_tpot_ratios.error(now),
                       drafted_tpot_error=self._drafted_tpot_ratios.error(now), kv=poller.kv)

    def retry_after_s(self) -> float:
        return retry_after_s(self.inflight.values(), time.monotonic())

    def with_measured_drafts(self, request: AdmissionRequest) -> AdmissionRequest:
        """``request`` with its type's measured tokens and rows per round trip when it is
        granted drafts (None: too few measured, planned as without drafts and at ``1 + γ`` rows)."""
        if not request.num_drafts:
            return request
        kind, now = request.request_type, time.monotonic()
        return replace(request, tokens_per_round_trip=self._drafts.expected(kind, now),
                       rows_per_round_trip=self._drafts.expected_rows(kind, request.num_drafts, now))

    async def admit(self, session_id: str, request: AdmissionRequest) -> Admission:
        """Admit a session (waiting in the bounded queue if needed) or raise AdmissionRefused;
        :meth:`engine_of` then names its engine. A request granted drafts is planned with its
        type's measured tokens and rows per round trip (:meth:`with_measured_drafts`)."""
        request = self.with_measured_drafts(request)
        engines = range(len(self.pollers))
        if request.split_layer is not None:  # the client fixed k: predict, admit (or refuse a k above its bound)
            loads = [self.load(e) for e in engines]
            fixed = [self.policy.fixed(request, load) for load in loads]
            chosen = self._choose(fixed, loads)
            if chosen is None:
                raise AdmissionRefused(fixed[0].code, fixed[0].message, fixed[0].retry_after_s)
            return self._register(session_id, request, fixed[chosen], chosen)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.queue.wait_s
        queued = False
        try:
            while True:
                seen = self._num_events
                loads, placed = await self._place_all(request)
                # on the loop from here to _register: the admitted sessions cannot change meanwhile
                decisions = [self.policy.decide(request, p, load=load, inflight=self.inflight_on(e))
                             for e, (p, load) in enumerate(zip(placed, loads))]
                chosen = self._choose(decisions, loads)
                if chosen is not None:
                    return self._register(session_id, request, decisions[chosen], chosen)
                waits = [d for d in decisions if not isinstance(d, Refusal)]
                if not waits:  # every engine refuses it
                    decision = decisions[0]
                    if decision.code == ErrorCode.SLA_UNREACHABLE:  # a bad request is not counted
                        self._count_refusal(decision.code)
                    raise AdmissionRefused(decision.code, decision.message, decision.retry_after_s)
                why = waits[0].why
                if not queued:
                    if self.queued >= self.queue.limit:
                        self._count_refusal("queue_full")
                        raise AdmissionRefused(ErrorCode.SERVER_BUSY, f"{why} and the admission queue is full "
                                               f"({self.queue.limit}); retry later", self.retry_after_s())
                    queued = True
                    self.queued += 1
                    self.metrics.queue_length.inc()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    self._count_refusal("busy_timeout")
                    raise AdmissionRefused(ErrorCode.SERVER_BUSY, f"{why}; waited {self.queue.wait_s} s in "
                                           f"the admission queue; retry later", self.retry_after_s())
                async with self._changed:  # until an event since this plan, or the wait runs out
                    try:
                        await asyncio.wait_for(self._changed.wait_for(lambda: self._num_events != seen), remaining)
                    except asyncio.TimeoutError:
                        pass
        finally:
            if queued:
                self.queued -= 1
                self.metrics.queue_length.dec()

    async def admit_unprobed(self, session_id: str, request: AdmissionRequest) -> Admission | None:
        """Admit at once, before the session's network is measured, where the network cannot
        change the placement: ``request.network`` is a slow one assumed for the purpose
        (``net_probe.UNPROBED``) and an engine with compute to spare decodes the session
        itself (:meth:`AdmissionPolicy.network_free`); its predictions are then pessimistic
        by the assumed network. None, with nothing registered: probe, then :meth:`admit`."""
        if request.split_layer is not None or not request.server_decode:
            return None
        loads, placed = await self._place_all(request)
        # on the loop from here to _register, as in admit()
        decisions = [self.policy.decide(request, p, load=load, inflight=self.inflight_on(e))
                     if self.policy.network_free(p) else None for e, (p, load) in enumerate(zip(placed, loads))]
        chosen = self._choose(decisions, loads)
        return None if chosen is None else self._register(session_id, request, decisions[chosen], chosen)

    async def _place_all(self, request: AdmissionRequest) -> tuple[list[ServerLoad], list[Any]]:
        """Each engine's load and the policy's placement of ``request`` at it (planned on the
        planning thread)."""
        loop = asyncio.get_running_loop()
        loads = [self.load(e) for e in range(len(self.pollers))]
        return loads, [await loop.run_in_executor(self._executor, self.policy.place, request, load) for load in loads]

    def _choose(self, decisions: Sequence[Any], loads: Sequence[ServerLoad]) -> int | None:
        """The engine to place on among those whose decision is an ``Admission``: the lowest
        occupancy (measured plus the admitted sessions not yet measured), then the lowest
        utilisation, then in turn (None: no engine admits)."""
        admitted = [e for e, d in enumerate(decisions) if isinstance(d, Admission)]
        if not admitted:
            return None
        turn = next(self._rotation) % len(decisions)
        return min(admitted, key=lambda e: (round(loads[e].occupancy, 6), round(loads[e].utilization, 6),
                                            (e - turn) % len(decisions)))

    async def _notify(self) -> None:
        """Something that may admit a waiting session happened: wake the queue to re-plan."""
        async with self._changed:
            self._num_events += 1
            self._changed.notify_all()

    def _count_refusal(self, reason: str) -> None:
        self.metrics.refusals.labels(reason=reason).inc()

    def _register(self, session_id: str, request: AdmissionRequest, admission: Admission, engine: int) -> Admission:
        self.inflight[session_id] = InFlight(request, admission, time.monotonic())
        self._engine_of[session_id] = engine
        label = str(self.pollers[engine].engine)
        if len(self.pollers) > 1:
            logger.info("vllm-split: session %s admitted on engine %s (k = %d)", session_id, label,
                        admission.split_layer)
        m = self.metrics
        k = admission.split_layer
        m.sessions_open.labels(engine=label).inc()
        m.split_layer.labels(engine=label).observe(k)
        if admission.server_decode:
            m.server_decoded.labels(engine=label).inc()
        top = self.policy.num_layers if admission.return_layer is None else admission.return_layer
        m.offloaded_fraction.labels(engine=label).observe(1 - (top - k) / self.policy.num_layers)
        if admission.predicted_ttft_s is not None:
            m.predicted_ttft.labels(engine=label).observe(admission.predicted_ttft_s)
            m.predicted_tpot.labels(engine=label).observe(admission.predicted_tpot_s)
        return admission

    async def release(self, session_id: str, *, prompt_tokens: int, output_tokens: int,
                      ttft_s: float | None, tpot_s: float | None, answers: int | None = None,
                      decode_rows: int | None = None) -> None:
        """A session ended: record what it cost and how it went, wake the queue. A session
        granted drafts says how many answers (``Tokens`` frames) it sent and how many decode
        rows it was delivered (``1 + d`` per activation): its tokens and rows per round trip
        join its request type's windows, and its rows, rejected drafts included, are the work
        counted."""
        s = self.inflight.pop(session_id, None)
        if s is None:
            return
        label = str(self.pollers[self._engine_of.pop(session_id, 0)].engine)
        m = self.metrics
        m.sessions_open.labels(engine=label).dec()
        k, n = s.admission.split_layer, self.policy.num_layers
        top = n if s.admission.return_layer is None else s.admission.return_layer  # U: the server ran [k, m)
        rows = prompt_tokens + (max(output_tokens - 1, 0) if decode_rows is None else decode_rows)
        m.work_done.labels(engine=label).inc(rows * (top - k))
        m.work_saved.labels(engine=label).inc(rows * (n - top + k))
        if ttft_s is not None:
            m.measured_ttft.labels(engine=label).observe(ttft_s)
            if s.admission.predicted_ttft_s and not s.admission.server_decode:
                self._ttft_ratios.add(ttft_s / s.admission.predicted_ttft_s, time.monotonic())
        if tpot_s is not None:
            m.measured_tpot.labels(engine=label).observe(tpot_s)
            if s.admission.predicted_tpot_s:
                ratio = tpot_s / s.admission.predicted_tpot_s
                m.tpot_ratio.labels(engine=label).observe(ratio)
                self._tpot_window(s).add(ratio, time.monotonic())
        self._record_drafts(s, label, output_tokens=output_tokens, answers=answers, decode_rows=decode_rows)
        sla = s.admission.sla
        if sla is not None and ttft_s is not None:
            met = sla.is_met(ttft_s, tpot_s or 0.0, 0.0)
            m.finished.labels(sla="met" if met else "missed", engine=label).inc()
        else:
            m.finished.labels(sla="none", engine=label).inc()
        await self._notify()

    def _tpot_window(self, s: InFlight) -> ErrorWindow:
        """The TPOT margin window of ``s``'s kind (the same split as ``AdmissionPolicy.tpot_error``)."""
        if s.admission.server_decode:
            return self._decoded_tpot_ratios
        return self._drafted_tpot_ratios if s.request.num_drafts else self._tpot_ratios

    def _record_drafts(self, s: InFlight, label: str, *, output_tokens: int, answers: int | None,
                       decode_rows: int | None) -> None:
        """A session that drafted: its tokens per decode round trip and its share of granted
        drafts sent (rows per round trip), to its type's windows and the metrics."""
        g = s.request.num_drafts
        if not g or s.admission.server_decode or answers is None:
            return
        tokens = measured_tokens_per_round_trip(output_tokens=output_tokens, answers=answers)
        fill = None if decode_rows is None else measured_draft_fill(decode_rows=decode_rows, answers=answers,
                                                                    num_drafts=g)
        if tokens is None and fill is None:  # nothing measured: no type to keep for it
            return
        self._drafts.add(s.request.request_type, time.monotonic(), tokens_per_round_trip=tokens, draft_fill=fill)
        if tokens is not None:
            self.metrics.tokens_per_round_trip.labels(engine=label).observe(tokens)
        if fill is not None:
            self.metrics.rows_per_round_trip.labels(engine=label).observe(1 + g * fill)
