"""Worker classes that build the split-aware model runner (``--worker-cls``).

CPU: ``CPUWorker.init_device`` builds ``CPUModelRunner`` directly, so we call it and
replace the runner before the model is loaded; it also applies
``patches/pp_intermediate_tensors.py`` (pipeline stages after the first, eager mode) and
``patches/cpu_expand_kernel.py`` (sampled requests with drafts). GPU:
``Worker._make_model_runner`` is the hook. Both use vLLM's V1 runner; the V2 runner has no
split support yet.
"""
from __future__ import annotations

import torch
from vllm.platforms import current_platform

from vllm_split.engine.runner import SplitRunnerMixin
from vllm_split.engine.step_timing import StepTimingMixin
from vllm_split.version import check_vllm_version

check_vllm_version()


def _require_v1_runner(worker) -> None:
    if getattr(worker, "use_v2_model_runner", False):
        raise RuntimeError(
            "vllm-split supports vLLM's V1 model runner only: set VLLM_USE_V2_MODEL_RUNNER=0"
        )


if current_platform.is_cpu():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.cpu_worker import CPUWorker

    from vllm_split.patches import cpu_expand_kernel, pp_intermediate_tensors

    class SplitCPUModelRunner(StepTimingMixin, SplitRunnerMixin, CPUModelRunner):
        pass

    class SplitWorker(CPUWorker):
        def init_device(self) -> None:
            pp_intermediate_tensors.apply()  # before load_model
            cpu_expand_kernel.apply()  # after init_worker registered the CPU platform's kernels
            super().init_device()
            _require_v1_runner(self)
            self.model_runner = SplitCPUModelRunner(self.vllm_config, torch.device("cpu"))

else:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    class SplitGPUModelRunner(StepTimingMixin, SplitRunnerMixin, GPUModelRunner):
        pass

    class SplitWorker(Worker):  # type: ignore[no-redef]
        def _make_model_runner(self):
            _require_v1_runner(self)
            return SplitGPUModelRunner(self.vllm_config, self.device)
