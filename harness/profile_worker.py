"""vllm-split's worker with the steps of a time window profiled by ``torch.profiler``: the
instrument of ``benchmarks/profile_split_step.py`` (harness only, not shipped).

Runs in the engine's worker process (``--worker-cls harness.profile_worker.ProfileWorker`` on
``vllm-split serve``; the server's environment has the repository root on ``PYTHONPATH``).
Enabled by ``VLLM_SPLIT_PROFILE_DIR``: the benchmark writes ``window.json`` there
(``{"tag", "start", "end", "num_tokens"}``, wall times); each step that begins inside
``[start, end]`` with ``num_tokens`` scheduled tokens (null: any) runs under its own
``torch.profiler.profile`` (CPU activity) from ``execute_model`` to its sampled output, and
one JSON line goes to ``steps.jsonl``: the tag, the step's shape, its wall time under the
profiler (``step_s``), the model forward's (``model_s``, marked ``@split_profile::model_forward``
in the trace) and the self CPU time per call chain of the forward's thread
(``harness/op_profile.py``). The profiler's start, stop and the aggregation run between
steps; the operators' recording overhead is inside them.

vLLM 0.32's own profiler (``--profiler-config.profiler=torch``, ``POST /start_profile`` and
``/stop_profile``; the CPU worker inherits it from the GPU ``Worker``) writes one trace file
and one operator table per start/stop and knows nothing of steps or of which requests ran;
here each line is one step, which the benchmark filters by shape and kind (ordinary or
split) as ``benchmarks/bench_server_step.py`` does.
Inductor's generated C++ kernels appear by name when the server runs with
``TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE=1`` (set by the benchmark).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from vllm.platforms import current_platform

from harness.op_profile import ANNOTATION, chain_totals, thread_of

ENV = "VLLM_SPLIT_PROFILE_DIR"
WINDOW = "window.json"
STEPS = "steps.jsonl"
FORWARD = "split_profile::model_forward"


class ProfileMixin:
    _prof_dir: Path | None = None
    _prof: Any = None  # the running profiler, during a profiled step

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)
        path = os.environ.get(ENV)
        if not path:
            return
        self._prof_dir = Path(path)
        self._prof_out = open(self._prof_dir / STEPS, "a", buffering=1)

    def _prof_tag(self, num_tokens: int) -> str | None:
        """The window's tag if a step of ``num_tokens`` beginning now is to be profiled (the file is
        read at every step: a few hundred bytes, and no stale window after a quick rewrite)."""
        try:
            w = json.loads((self._prof_dir / WINDOW).read_text())
        except (FileNotFoundError, json.JSONDecodeError):  # none yet, or being replaced
            return None
        if not w["start"] <= time.time() <= w["end"] or w.get("num_tokens") not in (None, num_tokens):
            return None
        return w["tag"]

    def execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any):
        num_tokens = scheduler_output.total_num_scheduled_tokens
        tag = self._prof_tag(num_tokens) if self._prof_dir is not None and num_tokens else None
        if tag is None:
            return super().execute_model(scheduler_output, *args, **kwargs)
        splits = getattr(scheduler_output, "split_inputs", None) or {}
        self._prof_info = {"tag": tag, "num_reqs": len(scheduler_output.num_scheduled_tokens),
                           "num_tokens": num_tokens,
                           "split_layers": sorted(int(s.split_layer) for s in splits.values())}
        self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._prof.start()
        self._prof_model_s = 0.0
        self._prof_t0 = time.perf_counter()
        try:
            out = super().execute_model(scheduler_output, *args, **kwargs)
        except BaseException:
            self._prof.stop()
            self._prof = None
            raise
        if out is not None:  # no separate sample_tokens call this step
            self._prof_end()
        return out

    def sample_tokens(self, *args: Any, **kwargs: Any):
        out = super().sample_tokens(*args, **kwargs)
        if self._prof is not None:
            self._prof_end()
        return out

    def _model_forward(self, *args: Any, **kwargs: Any):
        if self._prof is None:
            return super()._model_forward(*args, **kwargs)
        t0 = time.perf_counter()
        try:
            with torch.profiler.record_function(FORWARD):
                return super()._model_forward(*args, **kwargs)
        finally:
            self._prof_model_s += time.perf_counter() - t0

    def _prof_end(self) -> None:
        step_s = time.perf_counter() - self._prof_t0
        prof, self._prof = self._prof, None
        prof.stop()
        events = prof.events()
        chains, elsewhere = chain_totals(events, thread=thread_of(events, ANNOTATION + FORWARD))
        line = {"t": time.time(), **self._prof_info, "step_s": step_s, "model_s": self._prof_model_s,
                "other_threads_us": elsewhere, "chains": chains}
        self._prof_out.write(json.dumps(line) + "\n")


if current_platform.is_cpu():
    from vllm_split.engine.worker import SplitCPUModelRunner, SplitWorker

    class ProfileCPUModelRunner(ProfileMixin, SplitCPUModelRunner):
        pass

    class ProfileWorker(SplitWorker):
        """vllm-split's CPU worker whose runner profiles the steps of the benchmark's window."""

        def init_device(self) -> None:
            super().init_device()
            self.model_runner = ProfileCPUModelRunner(self.vllm_config, torch.device("cpu"))
