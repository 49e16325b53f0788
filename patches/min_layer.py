"""Patch: the server holds no weights and no KV cache for layers below ``min_layer``.

Target:  ``vllm.distributed.utils.get_pp_indices`` (read lazily by ``make_layers`` in
         ``model_executor/models/utils.py`` and by ``ModelConfig.get_layers_start_end_indices``).
Process: worker(s), applied by ``SplitRunnerMixin.load_model`` before the model is built,
         only when ``--additional-config '{"vllm_split": {"min_layer": N}}'`` sets N > 0.
Why:     When every client runs at least the first N layers, the server never needs them.
         vLLM already knows how to build a model that lacks some layers: a pipeline rank
         gets ``PPMissingLayer`` (no weights, no attention, so no KV cache) outside its
         ``[start_layer, end_layer)``. Moving the single rank's start to N reuses that.
Why not subclass: ``make_layers`` is a module function called from every model's
         constructor; there is no per-model or per-config hook for the layer range.
How:     wraps ``get_pp_indices`` so that, with one pipeline rank, ``(0, L)`` becomes
         ``(N, L)``; everything else is passed through. Pipeline parallelism with N > 0 is
         refused at start-up (not supported yet).
Upstream: none; a "first layer" option for partial models would make this unnecessary.
Remove when: vLLM can build a model from a layer range without pipeline parallelism.
Pinned version: every version in ``vllm_split.version.SUPPORTED_VLLM`` (0.32.0, 0.33.0), one code path:
         ``get_pp_indices`` and its lazy look-ups are identical in both (``test_patch_contracts.py``).
"""
from __future__ import annotations

import vllm.distributed.utils as dist_utils

_original = dist_utils.get_pp_indices
_min_layer = 0


def _get_pp_indices(num_hidden_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    start, end = _original(num_hidden_layers, pp_rank, pp_size)
    if _min_layer and pp_size == 1:
        start = min(max(start, _min_layer), end)
    return start, end


def apply(min_layer: int, *, num_hidden_layers: int, pp_size: int) -> None:
    """Idempotent; ``min_layer = 0`` leaves vLLM unchanged."""
    global _min_layer
    if min_layer <= 0:
        return
    if pp_size > 1:
        raise RuntimeError(f"vllm-split: min_layer {min_layer} with pipeline parallel size {pp_size} is not supported")
    if min_layer >= num_hidden_layers:
        raise RuntimeError(f"vllm-split: min_layer {min_layer} must be below the model's {num_hidden_layers} layers")
    _min_layer = min_layer
    dist_utils.get_pp_indices = _get_pp_indices
