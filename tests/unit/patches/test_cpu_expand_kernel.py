"""``patches/cpu_expand_kernel.py``: the rejection sampler spreads each request's sampling
parameters over its draft positions; vLLM's CPU fallback leaves float32 and int32 outputs
unfilled, the patched kernel fills them. No engine: the CPU platform's kernel overrides are
registered in this process, as ``WorkerWrapperBase.init_worker`` does in a worker."""
from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from vllm_split.patches import cpu_expand_kernel  # noqa: E402

CU = torch.tensor([2, 5, 6], dtype=torch.int32)  # 3 requests with 2, 3 and 1 positions


@pytest.fixture
def cpu_kernels():
    """vLLM's CPU kernel overrides, registered afresh (undoing an earlier test's ``apply``)."""
    from vllm.platforms.cpu import CpuPlatform
    from vllm.triton_utils import HAS_TRITON

    if HAS_TRITON:
        pytest.skip("Triton-CPU runs the real kernels: no fallback to patch")
    CpuPlatform.register_triton_kernel_overrides()
    from vllm.v1.sample import rejection_sampler

    return rejection_sampler


def expand(rejection_sampler, values: torch.Tensor, *, replace_from=0, replace_to=0) -> torch.Tensor:
    """The sampler's expansion into a known output (-7 everywhere), as ``expand_batch_to_tokens`` launches it."""
    out = torch.full((6,), -7, dtype=values.dtype)
    rejection_sampler._expand(out, values, CU, replace_from, replace_to)
    return out


def test_vllms_fallback_fills_int64_outputs_only(cpu_kernels):
    """The reason for the patch: temperatures (float32) and top-k (int32) are never written."""
    assert expand(cpu_kernels, torch.tensor([5, 7, 9])).tolist() == [5, 5, 7, 7, 7, 9]
    assert expand(cpu_kernels, torch.tensor([5, 7, 9], dtype=torch.int32)).tolist() == [-7] * 6
    assert expand(cpu_kernels, torch.tensor([0.7, 1.0, 0.5])).tolist() == [-7.0] * 6


def test_the_patched_kernel_fills_every_dtype_and_replaces(cpu_kernels):
    assert cpu_expand_kernel.apply() is True
    assert cpu_expand_kernel.apply() is False  # once only
    temperature = expand(cpu_kernels, torch.tensor([0.7, 0.0, 0.5]), replace_from=0, replace_to=1)
    assert temperature.tolist() == pytest.approx([0.7, 0.7, 1.0, 1.0, 1.0, 0.5])
    assert expand(cpu_kernels, torch.tensor([5, 7, 9], dtype=torch.int32)).tolist() == [5, 5, 7, 7, 7, 9]
    assert expand(cpu_kernels, torch.tensor([5, 7, 9])).tolist() == [5, 5, 7, 7, 7, 9]
    got = cpu_kernels.expand_batch_to_tokens(torch.tensor([0.7, 1.0, 0.5]), CU, 6, replace_from=0, replace_to=1)
    assert got.tolist() == pytest.approx([0.7, 0.7, 1.0, 1.0, 1.0, 0.5])
