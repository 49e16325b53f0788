"""Scheduler hook: hold split requests until their client's activation has arrived.

Runs in the EngineCore process. A split request (``SamplingParams.extra_args`` carries
``vllm_split: {session, split_layer}``) may only be scheduled for positions whose hidden
states the client has delivered. Until then it is taken out of the queues for the step
(keeping its KV blocks and its slot) and is not counted as unfinished, so EngineCore
blocks on its input queue instead of spinning through empty steps; the delivery, a
utility call on that same queue, wakes it.

Each scheduled split request's rows for the step travel to the workers on the
``SchedulerOutput`` (``split_inputs``), which vLLM already broadcasts to every worker.

Gather windows: a step that would start while split requests' activations are about to
arrive can be held so that they join it (otherwise they wait a whole step). The adaptive
window (``gather``, the default; the rule is ``gather.py``'s) holds the whole step (every
running and waiting request) for activations expected soon, from each client's measured
turnaround; the fixed one (``batch_wait_ms > 0``, replaces it) defers ready split requests
for up to that long. While a step is held, ``schedule()`` returns an empty output after a
0.2 ms sleep: EngineCore processes its input queue (the deliveries), finds the ready
requests still unfinished and schedules again (after its own 1 ms sleep for a step that
ran no model).

Step composition (``composition``; the model and the rule are ``composition.py``'s):
``gathered`` is the above; ``mixed`` never holds; ``grouped`` alternates *high* steps (the
ready requests at or above a threshold split layer: the step skips the layers below it)
with *low* steps (the others, deferred from the high step; they keep their slot); ``auto``
asks the roofline model which of the three serves the running batch best, again whenever
the running set changes and every ``RECHOOSE_STEPS`` steps, with its step costs refitted on
the last ``COST_FIT_STEPS`` steps' engine time. The model's turnarounds are the API
server's (each decode delivery carries the time since its session's token left).

Client drafts (``drafts`` option, K > 0; docs/design/issue14_drafts.md): a decode delivery
may carry the rows of up to K draft tokens after its first row, and their ids. At the top
of ``schedule()`` every split request's ``spec_token_ids`` is set to its delivered drafts
(running requests) or ``[]``, before the held check, so vLLM schedules 1 + d tokens,
verifies the drafts with its rejection sampler and rolls ``num_computed_tokens`` back;
after ``update_from_output`` the rows of rejected (or unscheduled) drafts are dropped from
the store. Positions vLLM pads with ``-1`` drafts (a waiting request with one token left)
get zero rows: they are always rejected. Without a speculative config none of this runs.
"""
from __future__ import annotations

import statistics
import time
from collections import deque
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_split.patches import engine_core_utility
from vllm_split.version import check_vllm_version
from vllm_split.config import SplitConfig
from vllm_split.wire.contract import EXTRA_ARGS_KEY
from vllm_split.engine.activations import ActivationStore, DeliveryError, SplitInput
from vllm_split.engine.drafts import server_drafts
from vllm_split.control.live_cost import StepCost, fit_step_cost
from vllm_split.engine.composition import Choice, RooflineCost, Row, choose
from vllm_split.engine import kv_range_manager
from vllm_split.engine.gather import GatherWindow
from vllm_split.engine.returns import ReturnBuffer
from vllm_split.engine.step_records import StepRecorder, step_shape

logger = init_logger(f"vllm.{__name__}")  # under "vllm": uses vLLM's log handlers

HOLD_SLEEP_S = 0.0002  # EngineCore loops while a step is held: do not spin hot
RECENT_STEPS = 8  # steps whose mean time sizes the adaptive window
RECHOOSE_STEPS = 16  # auto / grouped composition: steps between choices for an unchanged running set
COST_FIT_STEPS = 256  # the composer's step model: fitted on this many recent steps (their engine time)
# how many steps' worth the reference costs weigh in that fit: a light pull, for batches
# whose steps cannot tell the fixed part from the layers (all at one split layer)
COST_PRIOR_WEIGHT = 0.1
TURNAROUND_SAMPLES = 8  # per session: the composer's turnaround is their median
# logged when the last split request of a burst ends (benchmarks/bench_gather.py reads it)
GATHER_LOG = "vllm-split gather totals: holds=%d held_s=%.4f caught=%d late=%d probes=%d"


def _split_args(request: Any) -> dict | None:
    """The ``extra_args`` entry that marks a split request (None: an ordinary one)."""
    params = getattr(request, "sampling_params", None)
    return (getattr(params, "extra_args", None) or {}).get(EXTRA_ARGS_KEY)


def split_request_info(request: Any) -> tuple[str, int] | None:
    """(session id, split layer) of a split request, None for an ordinary one."""
    info = _split_args(request)
    if info is None:
        return None
    return str(info["session"]), int(info["split_layer"])


def split_return_layer(request: Any) -> int | None:
    """A U-shaped request's return layer ``m`` (None: not U-shaped, or an ordinary request)."""
    m = (_split_args(request) or {}).get("return_layer")
    return int(m) if m is not None else None


def split_tpot_bound(request: Any) -> float | None:
    """The TPOT bound its session is held to (None: none, or an ordinary request)."""
    bound = (_split_args(request) or {}).get("tpot_s")
    return float(bound) if isinstance(bound, (int, float)) and bound > 0 else None


class SplitSchedulerMixin:
    """Adds activation gating to a vLLM scheduler class (see module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_vllm_version()
        engine_core_utility.apply()
        super().__init__(*args, **kwargs)
        model_config = self.vllm_config.model_config
        self.split_store = ActivationStore(
            hidden_size=model_config.get_hidden_size(), dtype=model_config.dtype
        )
        # request id -> (session id, split layer), for live split requests
        self.split_requests: dict[str, tuple[str, int]] = {}
        config = SplitConfig.from_additional_config(self.vllm_config.additional_config)
        self.split_batch_wait_s = config.gather_max_s if config.gather_mode == "fixed" else 0.0
        self._split_gather_since: float | None = None
        # session id -> request id, for live split requests
        self._split_session_reqs: dict[str, str] = {}
        self.split_gather_mode = config.gather_mode
        self.split_gather = (GatherWindow(max_s=config.gather_max_s)
                             if self.split_gather_mode == "adaptive" else None)
        self.split_gather_weigh = config.gather_weigh == "on"
        self._split_gather_logged: dict | None = None
        self.split_num_layers = model_config.hf_config.num_hidden_layers
        self.split_steps = StepRecorder()
        # step composition (composition.py)
        self.split_composition = config.composition
        self.split_cost = RooflineCost()
        self.split_gather_max_s = config.gather_max_s
        self._split_bounds: dict[str, float | None] = {}  # request id -> its session's TPOT bound
        self._split_turnarounds: dict[str, deque] = {}  # session id -> recent turnarounds (s)
        self._split_choice = Choice("mixed" if config.composition == "mixed" else "gathered")
        self._split_choice_key: frozenset | None = None
        self._split_choice_age = 0
        self._split_high_next = True  # grouped: the next step may be a high one
        self.split_composition_steps: dict[str, int] = {}  # steps run per composition
        self._split_return_layers: dict[str, int] = {}  # request id -> m, U-shaped requests
        self.split_returns = ReturnBuffer()  # their layer-m rows until an output carries them
        # KV per layer range (kv_range_manager.py): the range groups' managers ask for a
        # request's split layer; preemption keeps it (split_requests is cleared on finish only)
        self.split_kv_ranges = (kv_range_manager.install(self.kv_cache_manager, self._split_k_of,
                                                          num_ranges=config.kv_ranges)
                                if config.kv_ranges > 1 else None)
        # client drafts: K (0: none); with any speculative config split requests' spec_token_ids
        # are ours to set (none but their client's drafts), else nothing below runs
        spec_config = getattr(self.vllm_config, "speculative_config", None)
        self.split_num_drafts = server_drafts(config, spec_config)
        self._split_spec = spec_config is not None
        self._split_drafts: dict[str, list[int]] = {}  # session id -> delivered drafts not yet verified
        self.split_draft_counts = {"steps": 0, "drafted": 0, "accepted": 0, "rejected": 0, "padded": 0}

    # ---------------------------------------------------------------- deliveries
    def split_deliver(self, session_id: str, start: int, num_rows: int, data: bytes,
                      turnaround_s: float | None = None, draft_ids: tuple[int, ...] | list[int] = ()) -> str | None:
        """Store rows (raw bytes in the model dtype); returns an error message or None.
        ``turnaround_s``: for a decode row, the API server's time from its token to it.
        ``draft_ids``: a decode delivery's draft tokens (at most K), whose rows follow its first."""
        if draft_ids:
            if len(draft_ids) > self.split_num_drafts:
                return (f"session {session_id}: {len(draft_ids)} drafts, this server verifies at most "
                        f"{self.split_num_drafts}")
            if num_rows != 1 + len(draft_ids):
                return f"session {session_id}: {len(draft_ids)} drafts need {1 + len(draft_ids)} rows, got {num_rows}"
        try:
            rows = torch.frombuffer(bytearray(data), dtype=self.split_store.dtype)
            rows = rows.reshape(num_rows, self.split_store.hidden_size)
        except RuntimeError as exc:
            return f"session {session_id}: {len(data)} bytes are not {num_rows} rows: {exc}"
        try:
            self.split_store.append(session_id, start=start, rows=rows)
        except DeliveryError as exc:
            return str(exc)
        if draft_ids:
            self._split_drafts[session_id] = [int(t) for t in draft_ids]
        if turnaround_s is not None and num_rows == 1 + len(draft_ids) and turnaround_s >= 0:
            self._split_turnarounds.setdefault(session_id, deque(maxlen=TURNAROUND_SAMPLES)).append(turnaround_s)
        req_id = self._split_session_reqs.get(session_id)
        request = self.requests.get(req_id) if req_id is not None else None
        if self.split_gather is not None and request is not None and not self._split_is_held(request):
            self.split_gather.arrived(req_id, time.monotonic())  # ignored unless a token of it is out
        return None

    def split_release(self, session_id: str) -> bool:
        """Drop a session's activations (its request has ended or never started)."""
        self._split_drafts.pop(session_id, None)
        return self.split_store.release(session_id)

    # ---------------------------------------------------------------- gating
    def _split_is_held(self, request: Any) -> bool:
        info = self.split_requests.get(request.request_id)
        if info is None:
            return False
        if self._split_spec:  # its own drafts only, whatever vLLM's proposer path left in spec_token_ids
            needed = request.num_tokens + len(self._split_spec_ids(request, info[0])) + request.num_output_placeholders
        else:
            needed = request.num_tokens_with_spec + request.num_output_placeholders
        return self.split_store.num_rows(info[0]) < needed

    def add_request(self, request: Any) -> None:
        info = split_request_info(request)
        if info is not None:
            self.split_requests[request.request_id] = info
            self._split_session_reqs[info[0]] = request.request_id
            self._split_bounds[request.request_id] = split_tpot_bound(request)
            if (m := split_return_layer(request)) is not None:
                self._split_return_layers[request.request_id] = m
        super().add_request(request)

    def _split_gathering(self, held_running: list) -> list:
        """Ready split requests to defer while the gather window waits for the held ones."""
        if self.split_batch_wait_s <= 0 or not held_running:
            self._split_gather_since = None
            return []
        ready = [r for r in self.running if r.request_id in self.split_requests and not self._split_is_held(r)]
        if not ready:
            return []
        now = time.monotonic()
        if self._split_gather_since is None:
            self._split_gather_since = now
        if now - self._split_gather_since >= self.split_batch_wait_s:
            self._split_gather_since = None
            return []
        time.sleep(HOLD_SLEEP_S)
        return ready

    def _split_holding(self, held_running: list, held_waiting: list) -> bool:
        """Whether the adaptive window holds this step (then nothing is scheduled)."""
        gather = self.split_gather
        if gather is None:
            return False
        now = time.monotonic()
        gather.scheduling(now)
        if len(self.running) == len(held_running) and len(self.waiting) == len(held_waiting):
            gather.close(now)  # nothing could run: nothing to hold
            return False
        ordinary = (sum(r.request_id not in self.split_requests for r in (*self.running, *self.waiting))
                    if self.split_gather_weigh else 0)
        until = gather.hold_until((r.request_id for r in held_running), now, self._split_recent_step_s(),
                                  ordinary=ordinary)
        if until is None:
            return False
        time.sleep(HOLD_SLEEP_S)
        return True

    def _split_recent_step_s(self) -> float | None:
        """Mean time of the last steps that ran the model (None before the first)."""
        records = self.split_steps.records
        n = min(len(records), RECENT_STEPS)
        return sum(records[-i].exec_s for i in range(1, n + 1)) / n if n else None

    # ---------------------------------------------------------------- composition
    def _split_k(self, request: Any) -> int:
        return self._split_k_of(request.request_id)

    def _split_k_of(self, request_id: str) -> int:
        """Split layer of a live request by id (0: an ordinary one), for the KV range managers."""
        return self.split_requests.get(request_id, ("", 0))[1]

    def _split_row(self, request: Any) -> Row:
        info = self.split_requests.get(request.request_id)
        samples = self._split_turnarounds.get(info[0]) if info is not None else None
        return Row(split_layer=info[1] if info is not None else 0, context=request.num_computed_tokens,
                   turnaround_s=statistics.median(samples) if samples else 0.0,
                   tpot_bound_s=self._split_bounds.get(request.request_id))

    def _split_compose(self) -> Choice:
        """The composition of this step: the configured one, or (auto, grouped) the model's
        choice for the running decode requests, kept while the running set stays the same
        for up to ``RECHOOSE_STEPS`` steps."""
        if self.split_composition in ("gathered", "mixed"):
            return self._split_choice  # fixed
        if not self.split_requests:  # ordinary requests only: nothing to compose
            return Choice("gathered")
        key = frozenset(r.request_id for r in self.running)
        self._split_choice_age += 1
        if key != self._split_choice_key or self._split_choice_age >= RECHOOSE_STEPS:
            self.split_cost = self._split_fitted_cost()
            rows = [self._split_row(r) for r in self.running if r.num_computed_tokens >= r.num_prompt_tokens]
            choice = choose(rows, self.split_composition, self.split_num_layers, self.split_cost,
                            gather_max_s=self.split_gather_max_s).choice if rows else Choice("gathered")
            if choice != self._split_choice:
                logger.debug("vllm-split composition: %s", choice)
            self._split_choice, self._split_choice_key, self._split_choice_age = choice, key, 0
        return self._split_choice

    def _split_fitted_cost(self) -> RooflineCost:
        """The step model fitted on the recent steps' engine time (a step's period: the
        worker's step and the loop around it), towards the reference machine's defaults."""
        records = list(self.split_steps.records)[-COST_FIT_STEPS:]
        ref = RooflineCost()
        fit = fit_step_cost(records, prior=StepCost(ref.fixed_s, ref.layer_s, ref.row_s), prior_weight=COST_PRIOR_WEIGHT)
        return RooflineCost(fixed_s=fit.fixed_s, layer_s=fit.layer_s, row_s=fit.row_s, kv_s=0.0 if records else ref.kv_s)

    def _split_grouped_defer(self, held_running: list, threshold: int) -> list:
        """Grouped: the ready requests below ``threshold`` to defer so that this step is a
        high one (after a low step, when both groups have ready requests)."""
        held_ids = {id(r) for r in held_running}
        ready = [r for r in self.running if id(r) not in held_ids]
        low = [r for r in ready if self._split_k(r) < threshold]
        high = len(low) < len(ready)
        defer = low if self._split_high_next and high and low else []
        self._split_high_next = not (high and (defer or not low))  # after a high step, a low one
        return defer

    def _split_set_drafts(self) -> None:
        """Spec config on: each split request's ``spec_token_ids`` are its client's drafts
        (running requests with only their last token left to compute, cut to K) or none,
        whatever else wrote them (the proposer's zero-id drafts near ``max_model_len``, a
        preemption); the held check then waits for their rows. A waiting request, or one still
        recomputing after a preemption, verifies none (vLLM would append them to the chunk)."""
        for request in self.running:
            info = self.split_requests.get(request.request_id)
            if info is not None:
                request.spec_token_ids = self._split_spec_ids(request, info[0])
        for request in self.waiting:
            if request.request_id in self.split_requests and request.spec_token_ids:
                request.spec_token_ids = []

    def _split_spec_ids(self, request: Any, session_id: str) -> list[int]:
        """The drafts a split request verifies in its next step: its client's (at most K),
        once only its last token is left to compute; else none."""
        drafts = self._split_drafts.get(session_id)
        if drafts and request.num_computed_tokens >= request.num_tokens - 1:
            return drafts[: self.split_num_drafts]
        return []

    def schedule(self, *args: Any, **kwargs: Any):
        if self._split_spec and self.split_requests:
            self._split_set_drafts()
        choice = self._split_compose()
        held_running = [r for r in self.running if self._split_is_held(r)]
        if choice.mode == "grouped":
            held_running += self._split_grouped_defer(held_running, choice.threshold)
        elif choice.mode == "gathered":
            held_running += self._split_gathering(held_running)
        held_waiting = [r for r in self.waiting if self._split_is_held(r)]
        if choice.mode == "gathered" and self._split_holding(held_running, held_waiting):
            held_running, held_waiting = list(self.running), list(self.waiting)
        elif choice.mode != "gathered" and self.split_gather is not None:  # keep its clock, hold nothing
            now = time.monotonic()
            self.split_gather.scheduling(now)
            self.split_gather.close(now)
        if held_running:
            held_ids = {id(r) for r in held_running}
            self.running = [r for r in self.running if id(r) not in held_ids]
        if held_waiting:
            self.waiting.remove_requests(held_waiting)
        # Held running requests keep their model-runner slot: count them like vLLM counts
        # paused streaming sessions so that admission stays within max_num_seqs.
        self.num_waiting_for_streaming_input += len(held_running)
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            self.num_waiting_for_streaming_input -= len(held_running)
            self.running = held_running + self.running
            if held_waiting:  # FCFS prepends one by one to the front: reversed keeps the order
                self.waiting.prepend_requests(reversed(held_waiting))
        output.split_inputs = self._split_inputs_for(output)
        if output.total_num_scheduled_tokens > 0 and self.split_requests:
            label = choice.mode if choice.threshold is None else f"grouped@{choice.threshold}"
            self.split_composition_steps[label] = self.split_composition_steps.get(label, 0) + 1
        self.split_steps.scheduled(id(output), step_shape(self.split_num_layers, (
            (count, self.split_requests.get(req_id, ("", 0))[1], self._split_return_layers.get(req_id))
            for req_id, count in output.num_scheduled_tokens.items())))
        return output

    def update_from_output(self, scheduler_output: Any, *args: Any, **kwargs: Any):
        self.split_steps.finished(id(scheduler_output))
        runner_output = args[0] if args else kwargs.get("model_runner_output")
        returned = getattr(runner_output, "split_returned", None)
        for req_id, (start, rows) in (returned or {}).items():
            if req_id in self._split_return_layers:
                if self._split_spec and (pad := scheduler_output.scheduled_spec_decode_tokens.get(req_id)):
                    rows = rows[: rows.shape[0] - len(pad)]  # vLLM's -1 padding: not positions of the request
                try:
                    self.split_returns.add(req_id, start, rows)
                except ValueError as exc:  # the session sees the gap and fails alone, the engine goes on
                    logger.warning("vllm-split: %s", exc)
        before = self._split_before_update(scheduler_output) if self._split_drafts else None
        verified = ([(req_id, drafts) for req_id, drafts in scheduler_output.scheduled_spec_decode_tokens.items()
                     if req_id in self.split_requests] if self._split_spec and self.split_requests else None)
        outputs = super().update_from_output(scheduler_output, *args, **kwargs)
        if verified:
            self._split_count_drafts(verified, runner_output)
        if before:
            self._split_after_update(before)
        if self.split_returns:
            for engine_outputs in outputs.values():
                self.split_returns.attach(engine_outputs.outputs)
        if self.split_gather is not None and scheduler_output.total_num_scheduled_tokens > 0:
            now = time.monotonic()
            self.split_gather.step_ended(now)
            for engine_outputs in outputs.values():
                for out in engine_outputs.outputs:  # a token left: its client's activation is due
                    if out.new_token_ids and out.finish_reason is None and out.request_id in self.split_requests:
                        self.split_gather.token_sent(out.request_id, now)
        return outputs

    def _split_before_update(self, scheduler_output: Any) -> list[tuple[str, Any, int]]:
        """(session, request, num_tokens) of the scheduled split requests with drafts pending."""
        scheduled = scheduler_output.num_scheduled_tokens
        before = []
        for session_id in self._split_drafts:
            req_id = self._split_session_reqs.get(session_id)
            if req_id in scheduled and (request := self.requests.get(req_id)) is not None:
                before.append((session_id, request, request.num_tokens))
        return before

    def _split_after_update(self, before: list[tuple[str, Any, int]]) -> None:
        """A request with drafts that got its tokens this step (the verification, or a
        preempted request's recompute): its rows beyond the last token's position are rejected
        or unverified drafts (vLLM rolled ``num_computed_tokens`` back past them): drop them
        and the drafts. A step that ended a prefill chunk without a token keeps both."""
        for session_id, request, num_tokens in before:
            if request.num_tokens > num_tokens and request.request_id in self.split_requests:
                self.split_store.truncate(session_id, request.num_tokens - 1)
                self._split_drafts.pop(session_id, None)

    def _split_count_drafts(self, verified: list[tuple[str, list[int]]], runner_output: Any) -> None:
        """Draft rows of the split requests this step verified (``verified``: request id,
        scheduled drafts): drafted (the clients'), accepted (by the rejection sampler: the
        request's sampled tokens less one), rejected; ``padded``: vLLM's ``-1`` padding rows
        (zero rows, always rejected)."""
        counts = self.split_draft_counts
        index = getattr(runner_output, "req_id_to_index", None) or {}
        sampled = getattr(runner_output, "sampled_token_ids", None)
        drafted = False
        for req_id, drafts in verified:
            if drafts and drafts[0] == -1:
                counts["padded"] += len(drafts)
                continue
            i = index.get(req_id)
            accepted = max(len(sampled[i]) - 1, 0) if sampled is not None and i is not None else 0
            accepted = min(accepted, len(drafts))
            counts["drafted"] += len(drafts)
            counts["accepted"] += accepted
            counts["rejected"] += len(drafts) - accepted
            drafted = True
        counts["steps"] += drafted

    def split_step_stats(self, since: int) -> dict:
        """Step records newer than ``since``, the queue lengths and the block pool (for the
        controller) and the gather window's counters (totals since start-up)."""
        return {"engine": self.vllm_config.parallel_config.data_parallel_index,  # the DP rank (0 without DP)
                "num_layers": self.split_num_layers, "records": self.split_steps.since(since),
                "num_running": len(self.running), "num_waiting": len(self.waiting),
                "kv": self._split_kv_stats(),
                "gather": self._split_gather_stats(),
                "composition": {"mode": self.split_composition, "steps": dict(self.split_composition_steps)},
                "drafts": {"k": self.split_num_drafts, **self.split_draft_counts}}

    def _split_kv_stats(self) -> dict:
        """The block pool (``control/kv_budget.py:KVState``): block size, usable (the null block
        excluded) and free blocks, the end layer of each KV range (one range: every layer)."""
        pool = self.kv_cache_manager.block_pool
        ranges = self.split_kv_ranges
        return {"block_size": self.cache_config.block_size, "total_blocks": pool.num_gpu_blocks - 1,
                "free_blocks": pool.get_num_free_blocks(),
                "range_ends": [r.end for r in ranges] if ranges else [self.split_num_layers]}

    def _split_gather_stats(self) -> dict:
        counts = self.split_gather.stats() if self.split_gather is not None else {}
        return {"mode": self.split_gather_mode, **counts}

    def _split_inputs_for(self, output: Any) -> dict[str, SplitInput]:
        inputs: dict[str, SplitInput] = {}
        for req_id, count in output.num_scheduled_tokens.items():
            info = self.split_requests.get(req_id)
            if info is None:
                continue
            request = self.requests[req_id]
            # _update_after_schedule has already advanced num_computed_tokens by count
            start = request.num_computed_tokens - count
            have = self.split_store.num_rows(info[0])
            if start + count <= have or not self._split_spec:
                hidden = self.split_store.rows(info[0], start=start, count=count)
            else:  # vLLM's -1 draft padding: positions without rows, always rejected
                pad = output.scheduled_spec_decode_tokens.get(req_id) or ()
                assert start + count - have <= sum(1 for t in pad if t == -1), \
                    f"{req_id}: rows [{start}, {start + count}) of {have}, padding {list(pad)}"
                hidden = torch.zeros((count, self.split_store.hidden_size), dtype=self.split_store.dtype)
                if have > start:
                    hidden[: have - start] = self.split_store.rows(info[0], start=start, count=have - start)
            inputs[req_id] = SplitInput(
                split_layer=info[1], hidden=hidden,
                start=start, return_layer=self._split_return_layers.get(req_id),
            )
        return inputs

    def get_num_unfinished_requests(self) -> int:
        num = super().get_num_unfinished_requests()
        if self.split_requests:
            num -= sum(1 for r in self.running if self._split_is_held(r))
            num -= sum(1 for r in self.waiting if self._split_is_held(r))
        return max(num, 0)

    def _free_request(self, request: Any, *args: Any, **kwargs: Any):
        info = self.split_requests.pop(request.request_id, None)
        if info is not None:
            self.split_store.release(info[0])
            self._split_drafts.pop(info[0], None)
            self._split_session_reqs.pop(info[0], None)
            self._split_bounds.pop(request.request_id, None)
            self._split_turnarounds.pop(info[0], None)
            self._split_return_layers.pop(request.request_id, None)
            self.split_returns.retire(request.request_id)  # its final output is made after this
            if self.split_gather is not None:
                self.split_gather.forget(request.request_id)
                if not self.split_requests:
                    self._split_log_gather()
        return super()._free_request(request, *args, **kwargs)

    def _split_log_gather(self) -> None:
        """The adaptive window's totals, once per burst of split requests that held a step."""
        stats = self.split_gather.stats()
        if stats["num_holds"] and stats != self._split_gather_logged:
            self._split_gather_logged = stats
            logger.info(GATHER_LOG, stats["num_holds"], stats["held_s"], stats["num_caught"], stats["num_late"],
                        stats["num_probes"])


class SplitScheduler(SplitSchedulerMixin, Scheduler):
    """vLLM's synchronous scheduler with split gating (the CPU build's default)."""


class SplitAsyncScheduler(SplitSchedulerMixin, AsyncScheduler):
    """vLLM's async scheduler with split gating (GPU builds schedule asynchronously)."""
