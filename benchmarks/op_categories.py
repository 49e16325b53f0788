"""Where a profiled engine step's time goes, by operator category (used by
``benchmarks/profile_split_step.py``; pure: no vLLM, no torch, no I/O).

Input: the lines ``harness/profile_worker.py`` writes, one per step: ``step_s`` and
``model_s`` (wall time of the step and of its model forward, under the profiler) and
``chains``, self CPU microseconds and calls per call chain (``harness/op_profile.py``: names
outermost first, joined by ``" > "``, user annotations with ``@``). An op's category comes
from its own name and its ancestors' (:func:`categorize`), first match wins:

* ``fused``: inductor's generated C++ kernels (``cpp_fused_*``, by name with
  ``TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE=1``): norms, residual adds, rotary, SiLU-and-mul
  and copies that the compiler fused;
* ``attention``: everything under an attention op (vLLM's ``unified_attention_with_output``
  and ``unified_kv_cache_update``, the CPU backend's ``cpu_attention_with_kv_cache`` and
  ``cpu_attn_reshape_and_cache``, with the views, allocations and copies they make);
* ``linear``: everything under a matrix product (``aten::mm``/``addmm``/``linear``, oneDNN's
  ``_C::onednn_mm``, mkldnn);
* ``python``: the self time of annotations and of the ranges the compilers record (inductor's
  "## Call CompiledFxGraph ##", dynamo's "Torch-Compiled Region" and "Pregraph bytecode"):
  Python between the ops inside them (inductor's wrapper code, the split forward's own loop);
* ``elementwise``: eager norms, residual adds, rotary, activations and other pointwise ops;
* ``copies``: copies and allocations (``copy_``, ``empty``, ``zeros``, ``cat``, index ops, ...);
* ``views``: view and shape ops (no data moved; their cost is the dispatch);
* ``other_ops``: any other op.

``unaccounted`` is wall time under no recorded op or annotation (plain Python): in the forward
``model_s`` minus the forward's ops, outside it ``step_s - model_s`` minus the other ops.
"""
from __future__ import annotations

import re
import statistics
from collections.abc import Sequence

SEP = " > "
ANNOTATION = "@"
FORWARD = ANNOTATION + "split_profile::model_forward"
CATEGORIES = ("linear", "attention", "fused", "elementwise", "copies", "views", "other_ops", "python", "unaccounted")

_FUSED = re.compile(r"(^|_)cpp_")
_ATTENTION = re.compile(r"attention|attn|kv_cache", re.I)
# ranges the compilers record around Python (not ops): inductor's graph call, dynamo's entries
_PYTHON = re.compile(r"^## .* ##$|^Torch-Compiled Region|^Pregraph bytecode|^CompiledFunction|^TorchDynamo")
_LINEAR = re.compile(r"::(mm|addmm|bmm|baddbmm|matmul|linear|_linear\w*)$|onednn|mkldnn|gemm|weight_packed_linear")
_ELEMENTWISE = re.compile(r"norm|rotary|silu|gelu|::(add|mul|sub|div|rsqrt|pow|mean|neg|exp|sigmoid|where|clamp|"
                          r"softmax|_softmax|sum|max|min|argmax|abs|sqrt|cos|sin|tanh)_?$")
_COPIES = re.compile(r"::(copy_|_copy_from\w*|empty\w*|zeros\w*|ones\w*|full\w*|new_\w+|cat|stack|index\w*|gather|"
                     r"scatter\w*|clone|contiguous|to|_to_copy|fill_|zero_|lift_fresh\w*|resize_|pad|constant_pad_nd|"
                     r"masked_fill_?|repeat\w*|embedding|arange)$")
_VIEWS = re.compile(r"::(view|_unsafe_view|reshape|_reshape_alias|slice|as_strided|split\w*|narrow|select|t|"
                    r"transpose|expand\w*|unsqueeze|squeeze\w*|permute|alias|detach\w*|unbind|flatten|chunk|"
                    r"view_as|unfold|movedim|resolve_conj|resolve_neg)$")


def categorize(chain: str) -> str:
    """The category of the op at the end of ``chain`` (see the module docstring)."""
    parts = chain.split(SEP)
    name = parts[-1]
    if _FUSED.search(name):
        return "fused"
    ops = [p for p in parts if not p.startswith(ANNOTATION)]
    if any(_ATTENTION.search(p) for p in ops):
        return "attention"
    if any(_LINEAR.search(p) for p in ops):
        return "linear"
    if name.startswith(ANNOTATION) or _PYTHON.search(name):
        return "python"
    for category, pattern in (("elementwise", _ELEMENTWISE), ("copies", _COPIES), ("views", _VIEWS)):
        if pattern.search(name):
            return category
    return "other_ops"


def in_forward(chain: str) -> bool:
    return FORWARD in chain.split(SEP)


def op_name(chain: str) -> str:
    """The op's own name (inductor's graph numbers and kernel counters kept)."""
    return chain.rsplit(SEP, 1)[-1]


def step_breakdown(step: dict) -> dict:
    """One profiled step in milliseconds per category, in the forward and outside it."""
    forward = dict.fromkeys(CATEGORIES, 0.0)
    outside = dict.fromkeys(CATEGORIES, 0.0)
    for chain, (self_us, _calls) in step["chains"].items():
        (forward if in_forward(chain) else outside)[categorize(chain)] += self_us / 1e3
    model_ms, step_ms = step["model_s"] * 1e3, step["step_s"] * 1e3
    forward["unaccounted"] = max(0.0, model_ms - sum(forward.values()))
    outside["unaccounted"] = max(0.0, step_ms - model_ms - sum(outside.values()))
    return {"step_ms": step_ms, "model_ms": model_ms, "forward": forward, "outside": outside}


def top_ops(steps: Sequence[dict], *, limit: int = 15, forward: bool = True) -> list[dict]:
    """The ops with the most self time per step (mean over ``steps``), in the forward or outside."""
    totals: dict[str, list] = {}
    for step in steps:
        for chain, (self_us, calls) in step["chains"].items():
            if in_forward(chain) == forward:
                t = totals.setdefault(op_name(chain), [0.0, 0, categorize(chain)])
                t[0] += self_us
                t[1] += calls
    n = len(steps)
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:limit]
    return [{"op": name, "category": cat, "ms_per_step": us / n / 1e3, "calls_per_step": calls / n}
            for name, (us, calls, cat) in ranked]


def scenario_breakdown(steps: Sequence[dict], *, layers_run: int) -> dict:
    """Means over ``steps`` per category (means add up: the categories sum to the step), per
    step and per decoder layer run (the forward's categories over ``layers_run``)."""
    if not steps:
        raise ValueError("no profiled steps to break down")
    parts = [step_breakdown(s) for s in steps]
    mean = lambda side, cat: statistics.fmean(p[side][cat] for p in parts)  # noqa: E731
    forward = {c: mean("forward", c) for c in CATEGORIES}
    return {"steps": len(steps), "layers_run": layers_run,
            "step_ms": statistics.fmean(p["step_ms"] for p in parts),
            "step_ms_median": statistics.median(p["step_ms"] for p in parts),
            "model_ms": statistics.fmean(p["model_ms"] for p in parts),
            "forward_ms": forward, "outside_ms": {c: mean("outside", c) for c in CATEGORIES},
            "per_layer_ms": {c: v / layers_run for c, v in forward.items()},
            "per_layer_total_ms": sum(forward.values()) / layers_run,
            "top_forward_ops": top_ops(steps), "top_outside_ops": top_ops(steps, forward=False, limit=10)}


def difference(split: dict, plain: dict) -> dict:
    """Per decoder layer, split minus plain, in ms per category (and the total)."""
    diff = {c: split["per_layer_ms"][c] - plain["per_layer_ms"][c] for c in CATEGORIES}
    return {**diff, "total": split["per_layer_total_ms"] - plain["per_layer_total_ms"]}
