"""Plain vLLM with only the step timing added: the baseline of ``benchmarks/bench_server_step.py``.

Runs in the engine's worker process, named by ``--worker-cls harness.timing_worker.TimingWorker``
(the server's environment has the repository root on ``PYTHONPATH``: see
``harness/server_process.py``). No split logic: vLLM's own model runner with
:class:`~vllm_split.engine.step_timing.StepTimingMixin`, which logs each step to
``VLLM_SPLIT_STEP_LOG`` exactly as the split worker does. CPU builds only, like the
benchmark.
"""
from __future__ import annotations

import torch
from vllm.platforms import current_platform

from vllm_split.engine.step_timing import StepTimingMixin

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
