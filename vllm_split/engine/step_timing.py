"""Per-step timings measured inside the engine's worker, for benchmarks.

Runs in the worker process, as a mixin on the model runner (``SplitWorker``'s runner, and
the benchmarks' plain-vLLM baseline ``harness/timing_worker.py``). Enabled only when
``VLLM_SPLIT_STEP_LOG`` names a file (the worker appends one JSON line per step);
otherwise nothing is installed.

A step and the worker's view of it are defined in :mod:`vllm_split.engine.step_records`:
``step_s`` runs from ``execute_model`` being called to the sampled output being ready
(a :class:`~vllm_split.engine.step_records.StepClock`). ``layers_s`` is the time spent
inside decoder layers during the step (the :class:`~vllm_split.layer_timer.LayerTimer`
on every layer), so ``step_s - layers_s`` is the fixed part: input preparation,
embedding, final norm, LM head, sampling. Each line also has ``t`` (wall time at the
end), ``num_reqs``, ``num_tokens`` and ``split_layers`` (sorted, one per split request).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

from vllm_split.engine.step_records import StepClock
from vllm_split.layer_timer import LayerTimer

ENV = "VLLM_SPLIT_STEP_LOG"


class StepTimingMixin:
    _step_log = None  # the open log file when ENV is set

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)
        path = os.environ.get(ENV)
        if not path:
            return
        self._step_log = open(path, "a", buffering=1)
        self._step_clock = StepClock()
        self._step_key: int | None = None  # the step between execute_model and its output
        self._layer_timer = LayerTimer()
        self._layer_timer.add(self.get_model().model.layers)

    def execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any):
        if self._step_log is None:
            return super().execute_model(scheduler_output, *args, **kwargs)
        splits = getattr(scheduler_output, "split_inputs", None) or {}
        info = {
            "num_reqs": len(scheduler_output.num_scheduled_tokens),
            "num_tokens": scheduler_output.total_num_scheduled_tokens,
            "split_layers": sorted(int(s.split_layer) for s in splits.values()),
        }
        self._layer_timer.take()  # layers run outside a step (warm-up, dummy runs) do not count
        if not self._step_clock.begin(id(scheduler_output), info, num_tokens=info["num_tokens"]):
            return super().execute_model(scheduler_output, *args, **kwargs)
        self._step_key = id(scheduler_output)
        out = super().execute_model(scheduler_output, *args, **kwargs)
        if out is not None:  # no separate sample_tokens call this step
            self._end_step()
        return out

    def sample_tokens(self, *args: Any, **kwargs: Any):
        out = super().sample_tokens(*args, **kwargs)
        if self._step_log is not None and self._step_key is not None:
            self._end_step()
        return out

    def _end_step(self) -> None:
        ended = self._step_clock.end(self._step_key)
        self._step_key = None
        if ended is None:
            return
        info, step_s = ended
        self._step_log.write(json.dumps({"t": time.time(), **info, "step_s": step_s,
                                         "layers_s": self._layer_timer.take_seconds()}) + "\n")
