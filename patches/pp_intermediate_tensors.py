"""Patch: a CPU pipeline stage after the first gets its receive buffer without a warm-up run.

Target:  ``vllm.v1.worker.cpu_model_runner.CPUModelRunner.load_model`` (wrapped: once the
         model is built, a stage that is not the first allocates ``intermediate_tensors``).
Process: worker(s), applied by ``SplitWorker.init_device`` (CPU build) before the model is
         loaded; at pipeline size 1 and on the first stage it changes nothing.
Why:     A stage after the first copies the tensors it receives from the previous stage into
         a persistent buffer, ``GPUModelRunner.intermediate_tensors`` (``None`` from
         ``__init__``, gpu_model_runner.py:846), in ``sync_and_gather_intermediate_tensors``,
         which asserts that the buffer exists (:3174) and runs in ``_preprocess`` of every
         real step (:3412-3416). vLLM allocates that buffer only lazily, in ``_dummy_run``
         (:5801-5808). The GPU worker always gets there (``profile_run``); the CPU worker
         only through ``CPUModelRunner.warming_up_model``, which returns at once under
         ``--enforce-eager`` (``CompilationMode.NONE``, cpu_model_runner.py:85-86) and which
         ``CPUWorker`` does not even call when eager runs with an explicit KV cache size
         (``VLLM_CPU_KVCACHE_SPACE``; ``_should_warm_up_model``, cpu_worker.py:190-202) or under
         ``VLLM_CPU_CI_ENV``. So an eager CPU server with ``--pipeline-parallel-size 2``
         starts, then dies on its first request (``AssertionError`` on stage 1, then
         ``EngineDeadError``). In vLLM's default compiled mode the warm-up allocates it.
How:     after the original ``load_model``, a stage that is not the first and has no buffer
         yet allocates it as ``_dummy_run`` does (``make_empty_intermediate_tensors`` of
         ``max_num_tokens`` rows, model dtype, runner device); ``_dummy_run`` then reuses it.
Why not subclass: the stock ``CPUWorker.init_device`` builds ``CPUModelRunner`` itself (no
         hook), so a fix of vLLM's class is the one place that serves every CPU worker; the
         split runner (a subclass) gets it through ``super().load_model``. A plain-vLLM CPU
         worker can take it by calling ``apply()`` before its model is loaded (a worker
         subclass given to ``--worker-cls``); without it, run compiled (no ``--enforce-eager``).
Upstream: not reported yet. Report text: "[Bug][CPU] --pipeline-parallel-size 2 with
         --enforce-eager dies on the first request: AssertionError `assert
         self.intermediate_tensors is not None` in sync_and_gather_intermediate_tensors on PP
         rank 1. vllm-cpu 0.32.0 (same code in 0.33.0), any model, e.g. `VLLM_CPU_OMP_THREADS_BIND='0|1'
         vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --pipeline-parallel-size 2 --enforce-eager`.
         The receive buffer is only allocated in GPUModelRunner._dummy_run; the CPU worker
         runs that only in the compile warm-up (CPUModelRunner.warming_up_model returns under
         CompilationMode.NONE; CPUWorker._should_warm_up_model skips it for eager + explicit
         KV cache size). Fix: allocate it after load_model on non-first PP ranks (the comment at
         gpu_model_runner.py:845 already says 'set after load_model')."
Remove when: vLLM allocates the buffer without a warm-up run on CPU (the contract test on
         ``warming_up_model``'s early return fails when that code changes: then re-check).
Pinned version: every version in ``vllm_split.version.SUPPORTED_VLLM`` (0.32.0, 0.33.0), one code path:
         ``cpu_model_runner.py`` is identical in both, and the lines it relies on are checked by
         ``test_patch_contracts.py`` (run against a release's own sources by
         ``scripts/check_vllm_release.sh``); the plugin refuses other versions at start-up.
"""
from __future__ import annotations

import functools
from typing import Any

_MARK = "_vllm_split_pp_receive_buffer"


def allocate_receive_buffer(runner: Any) -> None:
    """Give ``runner`` (a V1 model runner whose model is loaded) the buffer ``_dummy_run`` would."""
    from vllm.distributed import get_pp_group

    if get_pp_group().is_first_rank or runner.intermediate_tensors is not None:
        return
    runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
        batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device)


def apply() -> None:
    """Idempotent."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    original = CPUModelRunner.load_model
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        allocate_receive_buffer(self)
        return result

    setattr(load_model, _MARK, True)
    CPUModelRunner.load_model = load_model
