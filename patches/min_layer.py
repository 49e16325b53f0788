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
How:     wraps ``get_pp_indices`` so that a range starting below N starts at N: with one
         pipeline rank ``(0, L)`` becomes ``(N, L)``; with pipeline parallelism the first
         stages' ranges lose their layers below N (``(0, 15), (15, 30)`` with N = 4 becomes
         ``(4, 15), (15, 30)``; vLLM's own partition, ``VLLM_PP_LAYER_PARTITION`` included, is
         kept otherwise). A stage that would hold no layer at or above N (N = 20 there) could
         serve nothing: refused at start-up, naming the stage and its layers.
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
    if _min_layer:
        start = min(max(start, _min_layer), end)
    return start, end


def apply(min_layer: int, *, num_hidden_layers: int, pp_size: int) -> None:
    """Idempotent; ``min_layer = 0`` leaves vLLM unchanged."""
    global _min_layer
    if min_layer <= 0:
        return
    if min_layer >= num_hidden_layers:
        raise RuntimeError(f"vllm-split: min_layer {min_layer} must be below the model's {num_hidden_layers} layers")
    for rank in range(pp_size):
        start, end = _original(num_hidden_layers, rank, pp_size)
        if end <= min_layer:
            raise RuntimeError(
                f"vllm-split: min_layer {min_layer} with pipeline parallel size {pp_size}: stage {rank} holds layers "
                f"[{start}, {end}), none at or above {min_layer}, so it could serve no split layer; use fewer "
                f"stages, a lower min_layer or a VLLM_PP_LAYER_PARTITION that gives every stage a layer >= {min_layer}")
    _min_layer = min_layer
    dist_utils.get_pp_indices = _get_pp_indices
