"""Engine step records for the admission controller's live cost model.

Runs in the EngineCore process, inside the split scheduler: for each step it notes what
the model ran (decoder-layer calls, layer-rows, requests, tokens) when ``schedule`` returns
and the time until ``update_from_output`` receives the model's output (the model's
execution, workers included). The API server polls the records through an EngineCore
utility call (``patches/engine_core_utility.py``). Pure bookkeeping: no torch, no vLLM.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Iterable

from vllm_split.wire.contract import StepRecord

__all__ = ["StepRecord", "StepRecorder", "step_shape"]

MAX_RECORDS = 2048  # kept in the engine; the controller polls far more often than this fills


def step_shape(num_layers: int, scheduled: Iterable[tuple[int, int]]) -> tuple[int, int, int, int]:
    """(layer_calls, layer_rows, num_reqs, num_tokens) of a step from (tokens, split_layer)
    per scheduled request (split_layer 0 for ordinary requests)."""
    layer_rows = num_reqs = num_tokens = 0
    lowest = num_layers
    for tokens, split_layer in scheduled:
        layer_rows += tokens * (num_layers - split_layer)
        num_reqs += 1
        num_tokens += tokens
        lowest = min(lowest, split_layer)
    return num_layers - lowest, layer_rows, num_reqs, num_tokens


class StepRecorder:
    """Pairs each scheduled step with its output and keeps the last records."""

    def __init__(self, max_records: int = MAX_RECORDS) -> None:
        self.records: deque[StepRecord] = deque(maxlen=max_records)
        self._pending: dict[int, tuple[float, tuple[int, int, int, int]]] = {}
        self._seq = 0

    def scheduled(self, key: int, shape: tuple[int, int, int, int]) -> None:
        if shape[2]:  # an empty step runs no model
            self._pending[key] = (time.perf_counter(), shape)

    def finished(self, key: int) -> None:
        started = self._pending.pop(key, None)
        if started is None:
            return
        t0, shape = started
        self._seq += 1
        self.records.append(StepRecord(self._seq, time.time(), time.perf_counter() - t0, *shape))
        if len(self._pending) > 8:  # outputs that never came (aborted steps): forget them
            for old in sorted(self._pending)[:-8]:
                del self._pending[old]

    def since(self, seq: int, limit: int = 512) -> list[list]:
        out = [r.to_list() for r in self.records if r.seq > seq]
        return out[-limit:]
