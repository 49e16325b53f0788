"""The one layer timer: forward hooks that time each call of chosen modules.

Runs in whichever process holds the model: the client library's process
(``client_lib/profiler.py``) and the engine's worker (``vllm_split/engine/step_timing.py``
for the benchmarks' step log, ``harness/server_profile.py`` for the planner's profile).
It imports torch only, never vLLM, so the client library, which installs without vLLM,
can use it.

A forward pre-hook reads the clock (``time.perf_counter``; tests inject their own); the
forward hook appends a :class:`LayerSample`: the name the caller gave the modules, the
call's rows (the first dimension of one positional argument, when asked for) and the
seconds in between. A sample covers the module's forward call as the host sees it: on CUDA without a
synchronize that is launch time, not kernel time. Each module has its own start time, so
timed modules may nest (a layer and one of its submodules), but a module must not call
itself. Samples accumulate until :meth:`LayerTimer.take` hands them over.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, NamedTuple

import torch

__all__ = ["LayerSample", "LayerTimer"]


class LayerSample(NamedTuple):  # a tuple: cheap inside a step, and crosses collective_rpc as is
    name: str  # the name given to LayerTimer.add ("block": a decoder layer, "head": the logits)
    rows: int | None  # first dimension of the forward's ``rows_arg`` argument; None if not asked
    seconds: float  # the clock at the forward hook minus the clock at the pre-hook


class LayerTimer:
    """Times every forward call of the modules given to :meth:`add` (see module docstring)."""

    def __init__(self, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.samples: list[LayerSample] = []
        self._handles: list = []

    def add(self, modules: Iterable[torch.nn.Module], *, name: str = "block", rows_arg: int | None = None) -> None:
        """Time each of ``modules`` under ``name``; ``rows_arg`` is the index of the positional
        forward argument whose first dimension is the call's row count (e.g. 1 for a vLLM
        decoder layer's ``(positions, hidden_states, residual)``)."""
        clock = self.clock
        for module in modules:
            start = [0.0]

            def pre(mod, args, start=start) -> None:
                start[0] = clock()

            def post(mod, args, out, start=start) -> None:
                seconds = clock() - start[0]
                rows = None if rows_arg is None else int(args[rows_arg].shape[0])
                self.samples.append(LayerSample(name, rows, seconds))

            self._handles.append(module.register_forward_pre_hook(pre))
            self._handles.append(module.register_forward_hook(post))

    def take(self) -> list[LayerSample]:
        """The samples since the last ``take`` (and forget them)."""
        out, self.samples = self.samples, []
        return out

    def take_seconds(self) -> float:
        """Total seconds of the samples since the last ``take`` (and forget them)."""
        return sum(s.seconds for s in self.take())

    def remove(self) -> None:
        """Remove the hooks; safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "LayerTimer":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
