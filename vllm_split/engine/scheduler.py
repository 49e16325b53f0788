"""Scheduler hook: hold split requests until their client's activation has arrived.

Runs in the EngineCore process. A split request (``SamplingParams.extra_args`` carries
``vllm_split: {session, split_layer}``) may only be scheduled for positions whose hidden
states the client has delivered. Until then it is taken out of the queues for the step
(keeping its KV blocks and its slot) and is not counted as unfinished, so EngineCore
blocks on its input queue instead of spinning through empty steps; the delivery, a
utility call on that same queue, wakes it.

Each scheduled split request's rows for the step travel to the workers on the
``SchedulerOutput`` (``split_inputs``), which vLLM already broadcasts to every worker.
"""
from __future__ import annotations

import time
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
from vllm_split.engine.step_records import StepRecorder, step_shape

logger = init_logger(f"vllm.{__name__}")  # under "vllm": uses vLLM's log handlers



def split_request_info(request: Any) -> tuple[str, int] | None:
    """(session id, split layer) of a split request, None for an ordinary one."""
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None) or {}
    info = extra.get(EXTRA_ARGS_KEY)
    if info is None:
        return None
    return str(info["session"]), int(info["split_layer"])


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
        self.split_batch_wait_s = config.batch_wait_ms / 1000.0
        self._split_gather_since: float | None = None
        self.split_num_layers = model_config.hf_config.num_hidden_layers
        self.split_steps = StepRecorder()

    # ---------------------------------------------------------------- deliveries
    def split_deliver(self, session_id: str, start: int, num_rows: int, data: bytes) -> str | None:
        """Store rows (raw bytes in the model dtype); returns an error message or None."""
        try:
            rows = torch.frombuffer(bytearray(data), dtype=self.split_store.dtype)
            rows = rows.reshape(num_rows, self.split_store.hidden_size)
        except RuntimeError as exc:
            return f"session {session_id}: {len(data)} bytes are not {num_rows} rows: {exc}"
        try:
            self.split_store.append(session_id, start=start, rows=rows)
        except DeliveryError as exc:
            return str(exc)
        return None

    def split_release(self, session_id: str) -> bool:
        """Drop a session's activations (its request has ended or never started)."""
        return self.split_store.release(session_id)

    # ---------------------------------------------------------------- gating
    def _split_is_held(self, request: Any) -> bool:
        info = self.split_requests.get(request.request_id)
        if info is None:
            return False
        needed = request.num_tokens_with_spec + request.num_output_placeholders
        return self.split_store.num_rows(info[0]) < needed

    def add_request(self, request: Any) -> None:
        info = split_request_info(request)
        if info is not None:
            self.split_requests[request.request_id] = info
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
        time.sleep(0.0002)  # EngineCore loops while we gather: do not spin hot
        return ready

    def schedule(self, *args: Any, **kwargs: Any):
        held_running = [r for r in self.running if self._split_is_held(r)]
        held_running += self._split_gathering(held_running)
        held_waiting = [r for r in self.waiting if self._split_is_held(r)]
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
            if held_waiting:
                self.waiting.prepend_requests(held_waiting)
        output.split_inputs = self._split_inputs_for(output)
        self.split_steps.scheduled(id(output), step_shape(self.split_num_layers, (
            (count, self.split_requests.get(req_id, ("", 0))[1])
            for req_id, count in output.num_scheduled_tokens.items())))
        return output

    def update_from_output(self, scheduler_output: Any, *args: Any, **kwargs: Any):
        self.split_steps.finished(id(scheduler_output))
        return super().update_from_output(scheduler_output, *args, **kwargs)

    def split_step_stats(self, since: int) -> dict:
        """Step records newer than ``since`` and the queue lengths (for the controller)."""
        return {"num_layers": self.split_num_layers, "records": self.split_steps.since(since),
                "num_running": len(self.running), "num_waiting": len(self.waiting)}

    def _split_inputs_for(self, output: Any) -> dict[str, SplitInput]:
        inputs: dict[str, SplitInput] = {}
        for req_id, count in output.num_scheduled_tokens.items():
            info = self.split_requests.get(req_id)
            if info is None:
                continue
            request = self.requests[req_id]
            # _update_after_schedule has already advanced num_computed_tokens by count
            start = request.num_computed_tokens - count
            inputs[req_id] = SplitInput(
                split_layer=info[1],
                hidden=self.split_store.rows(info[0], start=start, count=count),
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
        return super()._free_request(request, *args, **kwargs)


class SplitScheduler(SplitSchedulerMixin, Scheduler):
    """vLLM's synchronous scheduler with split gating (the CPU build's default)."""


class SplitAsyncScheduler(SplitSchedulerMixin, AsyncScheduler):
    """vLLM's async scheduler with split gating (GPU builds schedule asynchronously)."""
