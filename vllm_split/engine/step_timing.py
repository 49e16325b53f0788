"""Per-step timings measured inside the engine's worker, for benchmarks.

Enabled only when ``VLLM_SPLIT_STEP_LOG`` names a file (the worker appends one JSON line
per step); otherwise nothing is installed. A step is ``execute_model`` plus
``sample_tokens``; ``layers_s`` is the time spent inside decoder layers (pre/post hooks on
every layer), so ``step_s - layers_s`` is the fixed part: input preparation, embedding,
final norm, LM head, sampling. ``TimingWorker`` is plain vLLM with only this timing added:
the baseline the split benchmarks compare against.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
from vllm.platforms import current_platform

ENV = "VLLM_SPLIT_STEP_LOG"


class StepTimingMixin:
    _timing_file = None

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)
        path = os.environ.get(ENV)
        if not path:
            return
        self._timing_file = open(path, "a", buffering=1)
        self._layers_s = 0.0
        self._step_t0 = None
        self._step_meta = None
        start: list[float] = [0.0]

        def pre(mod, args):
            start[0] = time.perf_counter()

        def post(mod, args, out):
            self._layers_s += time.perf_counter() - start[0]

        for layer in self.get_model().model.layers:
            layer.register_forward_pre_hook(pre)
            layer.register_forward_hook(post)

    def execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any):
        if self._timing_file is None or scheduler_output.total_num_scheduled_tokens == 0:
            return super().execute_model(scheduler_output, *args, **kwargs)
        self._layers_s = 0.0
        self._step_t0 = time.perf_counter()
        splits = getattr(scheduler_output, "split_inputs", None) or {}
        self._step_meta = {
            "num_reqs": len(scheduler_output.num_scheduled_tokens),
            "num_tokens": scheduler_output.total_num_scheduled_tokens,
            "split_layers": sorted(int(s.split_layer) for s in splits.values()),
        }
        out = super().execute_model(scheduler_output, *args, **kwargs)
        if out is not None:  # no separate sample_tokens call this step
            self._write_step()
        return out

    def sample_tokens(self, *args: Any, **kwargs: Any):
        out = super().sample_tokens(*args, **kwargs)
        if self._timing_file is not None and self._step_t0 is not None:
            self._write_step()
        return out

    def _write_step(self) -> None:
        step_s = time.perf_counter() - self._step_t0
        self._timing_file.write(json.dumps({"t": time.time(), **self._step_meta, "step_s": step_s,
                                            "layers_s": self._layers_s}) + "\n")
        self._step_t0 = None


if current_platform.is_cpu():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.cpu_worker import CPUWorker

    class TimingCPUModelRunner(StepTimingMixin, CPUModelRunner):
        pass

    class TimingWorker(CPUWorker):
        """Plain vLLM (no split logic) with step timing: the benchmarks' baseline."""

        def init_device(self) -> None:
            super().init_device()
            self.model_runner = TimingCPUModelRunner(self.vllm_config, torch.device("cpu"))
