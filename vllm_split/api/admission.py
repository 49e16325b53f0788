"""Asynchronous admission controller: the server decides where each request splits.

Lives in the API server process, on its event loop, and never blocks it: planning runs on
a one-thread executor, waits are asyncio waits. It keeps the live step-cost model
(:mod:`vllm_split.control.live_cost`) fed from the engine's step records (polled every
``POLL_S``), plans each new request with the DP (:func:`vllm_split.planner.plan`) over the
request's graph at the current load (:mod:`vllm_split.control.request_graph`) and answers with a
placement and its predicted TTFT and TPOT, or refuses with a reason.

What it optimises depends on the load. Offloading exists to relieve a busy server; it costs
the client time and energy. So while the engine is busy less than ``offload_above`` of the
time (its utilisation over the last seconds), the server has compute to spare and takes the
least offloaded placement that meets the SLA (``server_only`` when ``k = 0`` does); above
it, the DP chooses the placement with the least server work that meets the SLA (the
paper's objective). Set ``offload_above = 0`` for the DP at any load. Refusals:

* ``sla_unreachable``: no placement meets the SLA even on an idle server (retrying will
  not help; the message gives the best latencies this client can get);
* ``server_busy``: a placement would meet it on a less loaded server, or admitting it would
  push an admitted session past its own TPOT bound, and the bounded queue is full or the
  wait ran out; ``retry_after_s`` estimates when a session will have finished.

Each admitted session's server work, predicted and measured latencies and SLA outcome go
to vLLM's ``/metrics`` (:mod:`vllm_split.api.metrics`).
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable

from vllm_split.wire import protocol as wire
from vllm_split.control.live_cost import LiveCostModel
from vllm_split.planner import SLA, NetworkSpec, evaluate, plan, result_for
from vllm_split.planner.model_configs import ModelConfig
from vllm_split.control.request_graph import (TOKEN_BYTES, ClientCosts, RequestGraphInputs, ServerLoad, busy_fraction,
                                      decode_wait_s, placement_for, request_graph, split_layer_of)
from vllm_split.wire.contract import ErrorCode, StepRecord

POLL_S = 0.5


class AdmissionRefused(Exception):
    def __init__(self, reason: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class AdmissionPolicy:
    queue_limit: int = 64  # sessions waiting for admission at once
    queue_wait_s: float = 5.0  # longest wait in the queue before a refusal
    default_sla: SLA = field(default_factory=lambda: SLA(ttft_s=5.0, tpot_s=0.25))
    offload_above: float = 0.5  # engine utilisation above which the DP minimises server work
    placement: str = "dp"  # or "greedy": the baseline rule instead of the DP (for comparisons)


@dataclass(frozen=True, slots=True)
class Admission:
    split_layer: int
    placement: str  # "dp", "least_offload", "server_only" or "fixed"
    predicted_ttft_s: float | None
    predicted_tpot_s: float | None


@dataclass(slots=True)
class _InFlight:
    admission: Admission
    sla: SLA | None
    inputs: RequestGraphInputs
    client: ClientCosts | None
    network: NetworkSpec | None
    admitted_at: float


class AdmissionController:
    def __init__(self, *, model: ModelConfig, min_layer: int, hidden_bytes: int, max_model_len: int,
                 step_stats: Callable[[int], Awaitable[dict | None]], metrics: Any,
                 policy: AdmissionPolicy = AdmissionPolicy(), max_num_seqs: int | None = None) -> None:
        self.model = model
        self.num_layers = model.num_hidden_layers
        self.min_layer = min_layer
        self.hidden_bytes = hidden_bytes
        self.max_model_len = max_model_len
        self.step_stats = step_stats
        self.metrics = metrics
        self.policy = policy
        self.costs = LiveCostModel()
        self.max_num_seqs = max_num_seqs  # the engine's request slots
        self.inflight: dict[str, _InFlight] = {}
        self.queued = 0
        self._changed = asyncio.Condition()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-split-plan")
        self._poller: asyncio.Task | None = None

    # ---------------------------------------------------------------- live model
    def start(self) -> None:
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        self._executor.shutdown(wait=False)

    async def poll_once(self) -> int:
        stats = await self.step_stats(self.costs.last_seq)
        if not stats:
            return 0
        n = self.costs.add(StepRecord.from_list(r) for r in stats["records"])
        if n:
            cost = self.costs.refit()
            for term, value in (("fixed", cost.fixed_s), ("layer", cost.layer_s), ("row", cost.row_s)):
                self.metrics.server_cost.labels(term=term).set(value)
        self.metrics.occupancy.set(self.costs.occupancy())
        return n

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # engine busy or restarting: keep the last model
                pass
            await asyncio.sleep(POLL_S)

    def load(self) -> ServerLoad:
        """The load a new session meets: the requests per engine step lately, or the sessions
        this server has admitted if more (they are about to run), and the recent step time."""
        now = time.time()
        occupancy = max(self.costs.occupancy(now), float(len(self.inflight)))
        recent_step = self.costs.recent_step_s(now)
        if occupancy and not recent_step:  # admitted sessions not running yet: a step of them
            recent_step = self.costs.cost.step_s(self.num_layers, self.num_layers * occupancy)
        return ServerLoad(cost=self.costs.cost, occupancy=occupancy, recent_step_s=recent_step)

    # ---------------------------------------------------------------- planning
    def client_costs(self, profile: wire.ClientProfile) -> ClientCosts:
        if profile.layer_decode_s is not None:
            return ClientCosts(prefill_s_per_token=profile.layer_prefill_s_per_token,
                               decode_s=profile.layer_decode_s)
        return ClientCosts.from_flops(profile.flops_per_s, self.model)

    def _predict(self, k: int, inputs: RequestGraphInputs, load: ServerLoad, client: ClientCosts,
                 network: NetworkSpec) -> tuple[float, float]:
        """Expected (TTFT, TPOT) at split layer ``k``: the graph's latencies plus the wait for
        the step in progress (half a step for the prompt, :func:`decode_wait_s` per token)."""
        graph = request_graph(inputs, load, client)
        ttft, tpot, _, _ = evaluate(graph, network, placement_for(k, self.num_layers))
        turnaround = (k * client.decode_s + network.uplink_s(self.hidden_bytes) + network.downlink_s(TOKEN_BYTES))
        return (ttft + 0.5 * busy_fraction(load) * load.recent_step_s, tpot + decode_wait_s(load, turnaround))

    def _plan(self, inputs: RequestGraphInputs, load: ServerLoad, client: ClientCosts, network: NetworkSpec,
              sla: SLA, spare: bool = False):
        """The DP's least-server-work placement; with ``spare`` (the server has compute to
        spare) the least offloaded placement meeting the SLA instead, if there is one. Both
        plan with the worst wait (a whole step when others run), so a plan that meets the SLA
        meets it whatever the phase of the steps."""
        graph = request_graph(inputs, load, client, wait_s=busy_fraction(load) * load.recent_step_s)
        candidates = [result_for(graph, network, sla, placement_for(k, self.num_layers), method="scan")
                      for k in range(self.min_layer, self.num_layers + 1)] if spare or self.policy.placement == "greedy" else []
        if spare:
            feasible = [r for r in candidates if r.feasible]
            if feasible:
                return replace(feasible[0], method="least_offload")
        if self.policy.placement == "greedy":
            # planner/baselines.py's prefix rule with the embedding pinned on the client: from
            # k = min_layer, move the next layer to the client while the SLA holds; stop at the
            # first violation
            k = 0
            while k + 1 < len(candidates) and candidates[k + 1].feasible:
                k += 1
            return replace(candidates[k], method="greedy")
        return plan(graph, network, sla)

    def _slots_full(self) -> bool:
        """No request slot for one more session: it would wait in the engine's queue, where
        its time to first token runs out unseen; it waits in the admission queue instead.
        (The engine's own waiting queue also holds split requests whose client is still
        computing its prompt, so it is no sign of full slots; the sessions this API server
        admitted are.)"""
        return self.max_num_seqs is not None and len(self.inflight) >= self.max_num_seqs

    def _others_keep_their_sla(self, load: ServerLoad) -> str | None:
        """None, or the first admitted session whose TPOT bound one more session would break
        (for each admitted session, ``load.occupancy`` counts it; the newcomer replaces it)."""
        for sid, s in self.inflight.items():
            if s.sla is None or s.sla.tpot_s is None or s.client is None or s.network is None:
                continue
            _, tpot = self._predict(s.admission.split_layer, s.inputs, load, s.client, s.network)
            if tpot > s.sla.tpot_s:
                return sid
        return None

    async def admit(self, session_id: str, msg: wire.Open, network: NetworkSpec | None) -> Admission:
        """Admit a session (waiting in the bounded queue if needed) or raise AdmissionRefused."""
        n_out = msg.expected_output_tokens or msg.sampling.max_tokens
        prompt = msg.prompt_tokens or 1
        inputs = RequestGraphInputs(num_layers=self.num_layers, min_layer=self.min_layer,
                                    hidden_bytes=self.hidden_bytes, prompt_len=prompt, output_len=n_out)
        client = self.client_costs(msg.client) if msg.client is not None else None
        sla = (SLA(ttft_s=msg.sla.ttft_s, tpot_s=msg.sla.tpot_s) if msg.sla is not None
               else self.policy.default_sla)
        if msg.split_layer is not None:  # the client fixed k: predict, admit
            admission = Admission(msg.split_layer, "fixed", None, None)
            if client is not None and network is not None:
                ttft, tpot = self._predict(msg.split_layer, inputs, self.load(), client, network)
                admission = Admission(msg.split_layer, "fixed", ttft, tpot)
            return self._register(session_id, admission, sla if msg.sla else None, inputs, client, network)
        if client is None or network is None:
            raise AdmissionRefused(ErrorCode.BAD_REQUEST, "split_layer auto needs the client's profile (client) and a "
                                   "measured network")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.policy.queue_wait_s
        queued = False
        try:
            while True:
                load = self.load()
                spare = self.costs.utilization() < self.policy.offload_above
                result = await loop.run_in_executor(self._executor, self._plan, inputs, load, client, network, sla,
                                                    spare)
                blocker = self._others_keep_their_sla(load) if result.feasible else None
                slots_full = self._slots_full()
                if result.feasible and blocker is None and not slots_full:
                    k = split_layer_of(result.placement)
                    kind = "server_only" if k == 0 else result.method
                    ttft, tpot = self._predict(k, inputs, load, client, network)
                    return self._register(session_id, Admission(k, kind, ttft, tpot), sla, inputs, client, network)
                if not result.feasible:
                    idle = ServerLoad(cost=self.costs.cost, occupancy=0.0, recent_step_s=0.0)
                    best = await loop.run_in_executor(self._executor, self._plan, inputs, idle, client, network, sla)
                    if not best.feasible:
                        self._refuse(ErrorCode.SLA_UNREACHABLE)
                        raise AdmissionRefused(ErrorCode.SLA_UNREACHABLE, (
                            f"no split layer meets the SLA (TTFT <= {sla.ttft_s} s, TPOT <= {sla.tpot_s} s) even on an "
                            f"idle server: the best this client can get is TTFT {best.ttft_s:.3f} s and TPOT "
                            f"{best.tpot_s:.3f} s (split layer {split_layer_of(best.placement)}); relax the SLA"))
                why = ("the SLA cannot be met at the current load" if not result.feasible else
                       f"all {self.max_num_seqs} request slots of the engine are taken" if slots_full else
                       "admitting it would push an admitted session past its TPOT bound")
                if not queued:
                    if self.queued >= self.policy.queue_limit:
                        self._refuse("queue_full")
                        raise AdmissionRefused(ErrorCode.SERVER_BUSY, f"{why} and the admission queue is full "
                                               f"({self.policy.queue_limit}); retry later", self.retry_after_s())
                    queued = True
                    self.queued += 1
                    self.metrics.queue_length.inc()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    self._refuse("busy_timeout")
                    raise AdmissionRefused(ErrorCode.SERVER_BUSY, f"{why}; waited {self.policy.queue_wait_s} s in the "
                                           f"admission queue; retry later", self.retry_after_s())
                async with self._changed:
                    try:
                        await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, POLL_S * 2))
                    except asyncio.TimeoutError:
                        pass
        finally:
            if queued:
                self.queued -= 1
                self.metrics.queue_length.dec()

    def _refuse(self, reason: str) -> None:
        self.metrics.refusals.labels(reason=reason).inc()

    def retry_after_s(self) -> float:
        """When the first admitted session should have finished (>= 0.5 s)."""
        now = time.monotonic()
        ends = []
        for s in self.inflight.values():
            a = s.admission
            if a.predicted_ttft_s is not None and a.predicted_tpot_s is not None:
                e2e = a.predicted_ttft_s + (s.inputs.output_len - 1) * a.predicted_tpot_s
                ends.append(s.admitted_at + e2e - now)
        return round(max(0.5, min(ends) if ends else 1.0), 3)

    def _register(self, session_id: str, admission: Admission, sla: SLA | None, inputs: RequestGraphInputs,
                  client: ClientCosts | None, network: NetworkSpec | None) -> Admission:
        self.inflight[session_id] = _InFlight(admission, sla, inputs, client, network, time.monotonic())
        m = self.metrics
        k = admission.split_layer
        m.sessions_open.inc()
        m.split_layer.observe(k)
        m.offloaded_fraction.observe(k / self.num_layers)
        if admission.predicted_ttft_s is not None:
            m.predicted_ttft.observe(admission.predicted_ttft_s)
            m.predicted_tpot.observe(admission.predicted_tpot_s)
        return admission

    async def release(self, session_id: str, *, prompt_tokens: int, output_tokens: int,
                      ttft_s: float | None, tpot_s: float | None) -> None:
        """A session ended: record what it cost and how it went, wake the queue."""
        s = self.inflight.pop(session_id, None)
        if s is None:
            return
        m = self.metrics
        m.sessions_open.dec()
        k = s.admission.split_layer
        rows = prompt_tokens + max(output_tokens - 1, 0)
        m.work_done.inc(rows * (self.num_layers - k))
        m.work_saved.inc(rows * k)
        if ttft_s is not None:
            m.measured_ttft.observe(ttft_s)
        if tpot_s is not None:
            m.measured_tpot.observe(tpot_s)
            if s.admission.predicted_tpot_s:
                m.tpot_ratio.observe(tpot_s / s.admission.predicted_tpot_s)
        if s.sla is not None and ttft_s is not None:
            met = s.sla.is_met(ttft_s, tpot_s or 0.0, 0.0)
            m.finished.labels(sla="met" if met else "missed").inc()
        else:
            m.finished.labels(sla="none").inc()
        async with self._changed:
            self._changed.notify_all()
