"""What one engine step is, its clock, and the step records of the live cost model.

Runs in the engine's processes: :class:`StepRecorder` in the EngineCore process (inside
the split scheduler), :class:`StepClock` there and in the worker
(``vllm_split/engine/step_timing.py``). Pure bookkeeping: no torch, no vLLM.

**A step** is one ``SchedulerOutput`` that schedules at least one token: one pass of its
rows through the model and one sampling. (An output scheduling no token runs no model
and is not a step.) Each process times a step with a :class:`StepClock`, between the two
points where that process sees the step begin and end:

* EngineCore (:class:`StepRecorder`, ``StepRecord.exec_s``, read by the admission
  controller's live cost model): from ``schedule()`` returning the output to
  ``update_from_output()`` receiving its model output. This is the model's execution as
  the engine loop waits for it: the output's trip to the workers, input preparation, the
  forward, sampling, the result's trip back. With async scheduling (GPU builds) a step
  scheduled while the previous one runs also counts its wait behind that one. Why here:
  the controller budgets the engine's time, and this is the time the engine spends per
  step, round trips included.
* Worker (``StepTimingMixin``, ``step_s`` of the ``VLLM_SPLIT_STEP_LOG`` lines the
  benchmarks read): from ``execute_model(scheduler_output)`` being called to the sampled
  output being ready (``execute_model`` returning it, or ``sample_tokens`` returning when
  the runner samples in a second call). The model runner's work only, no inter-process
  trip. Why here: the benchmarks compare plain vLLM's runner and the split runner on the
  same step shapes, and the round trip, the same for both, would only add noise.

Both read ``time.perf_counter()`` and stamp the wall time (``time.time()``) at the end.
A step whose end never comes (aborted) stays pending until :data:`MAX_PENDING` newer
steps have begun; then it is forgotten, oldest first (insertion order is age).
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Hashable, Iterable

from vllm_split.wire.contract import StepRecord

__all__ = ["MAX_PENDING", "StepClock", "StepRecord", "StepRecorder", "step_shape"]

MAX_RECORDS = 2048  # kept in the engine; the controller polls far more often than this fills
MAX_PENDING = 8  # in flight at once: 1, or the batch queue's size (2 async, or the pipeline depth)


class StepClock:
    """Seconds from :meth:`begin` to :meth:`end` of each step, keyed by the caller."""

    def __init__(self, *, max_pending: int = MAX_PENDING, clock: Callable[[], float] = time.perf_counter) -> None:
        self.max_pending = max_pending
        self.clock = clock
        self._pending: dict[Hashable, tuple[float, Any]] = {}  # oldest first

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def begin(self, key: Hashable, info: Any, *, num_tokens: int) -> bool:
        """Start timing step ``key`` (``info`` comes back from :meth:`end`); False, and
        nothing timed, when it schedules no token (not a step)."""
        if num_tokens <= 0:
            return False
        self._pending.pop(key, None)  # a reused key (an id) starts a new step: the newest
        self._pending[key] = (self.clock(), info)
        while len(self._pending) > self.max_pending:  # ends that never came: oldest first
            del self._pending[next(iter(self._pending))]
        return True

    def end(self, key: Hashable) -> tuple[Any, float] | None:
        """(info, seconds since begin) of step ``key``; None for no pending step."""
        started = self._pending.pop(key, None)
        if started is None:
            return None
        t0, info = started
        return info, self.clock() - t0


def step_shape(num_layers: int, scheduled: Iterable[tuple]) -> tuple[int, int, int, int]:
    """(layer_calls, layer_rows, num_reqs, num_tokens) of a step from (tokens, split_layer
    [, return_layer]) per scheduled request (split_layer 0 for ordinary requests; a U-shaped
    one's rows run layers [split_layer, return_layer) only; None or left out: up to the top)."""
    layer_rows = num_reqs = num_tokens = 0
    lowest, highest = num_layers, 0
    for tokens, split_layer, *rest in scheduled:
        end = rest[0] if rest and rest[0] is not None else num_layers
        layer_rows += tokens * (end - split_layer)
        num_reqs += 1
        num_tokens += tokens
        lowest, highest = min(lowest, split_layer), max(highest, end)
    return max(0, highest - lowest), layer_rows, num_reqs, num_tokens


class StepRecorder:
    """EngineCore side: times each step and keeps the last records for the controller,
    which polls them through an EngineCore utility call (``patches/engine_core_utility.py``)."""

    def __init__(self, max_records: int = MAX_RECORDS, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.records: deque[StepRecord] = deque(maxlen=max_records)
        self.clock = StepClock(clock=clock)
        self._seq = 0

    def scheduled(self, key: Hashable, shape: tuple[int, int, int, int]) -> None:
        """``schedule()`` returned the step ``key`` with ``shape`` (see :func:`step_shape`)."""
        self.clock.begin(key, shape, num_tokens=shape[3])

    def finished(self, key: Hashable) -> None:
        """``update_from_output()`` received step ``key``'s model output."""
        ended = self.clock.end(key)
        if ended is None:
            return
        shape, exec_s = ended
        self._seq += 1
        self.records.append(StepRecord(self._seq, time.time(), exec_s, *shape))

    def since(self, seq: int, limit: int = 512) -> list[list]:
        out = [r.to_list() for r in self.records if r.seq > seq]
        return out[-limit:]
