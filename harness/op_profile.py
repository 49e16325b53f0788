"""One engine step's operators as ``torch.profiler`` recorded them, as self CPU time per call
chain (used in the worker by ``harness/profile_worker.py``; torch only, no vLLM).

A *chain* is the names of an event's ancestors on its thread, outermost first, then its own,
joined by ``" > "``; user annotations (``record_function`` ranges: dynamo's "Torch-Compiled
Region", inductor's "## Call CompiledFxGraph ##", the profile worker's model-forward marker)
start with ``@``. Summing self time per chain keeps what a categorisation needs (is the op
under an attention op? inside the model forward?) in a few hundred entries per step;
``benchmarks/op_categories.py`` reads them.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

SEP = " > "
ANNOTATION = "@"


def event_name(event: Any) -> str:
    """The event's name, with ``@`` in front of a user annotation."""
    return (ANNOTATION if getattr(event, "is_user_annotation", False) else "") + event.name


def chain_of(event: Any) -> str:
    parts = []
    node = event
    while node is not None:
        parts.append(event_name(node))
        node = node.cpu_parent
    return SEP.join(reversed(parts))


def thread_of(events: Iterable[Any], name: str) -> int | None:
    """The thread of the first event called ``name`` (with its ``@``), or None."""
    return next((e.thread for e in events if event_name(e) == name), None)


def chain_totals(events: Iterable[Any], *, thread: int | None = None) -> tuple[dict[str, list], float]:
    """(``{chain: [self microseconds, calls]}`` of the events on ``thread`` (None: all), self
    microseconds of the events on other threads)."""
    totals: dict[str, list] = {}
    elsewhere = 0.0
    for e in events:
        if thread is not None and e.thread != thread:
            elsewhere += e.self_cpu_time_total
            continue
        t = totals.setdefault(chain_of(e), [0.0, 0])
        t[0] += e.self_cpu_time_total
        t[1] += 1
    return totals, elsewhere
