"""Per-step timings measured inside the engine's worker, for benchmarks.

Runs in the worker process, as a mixin on the model runner (``SplitWorker``'s runner, and
the benchmarks' plain-vLLM baseline ``harness/timing_worker.py``). Enabled only when
``VLLM_SPLIT_STEP_LOG`` names a file (the worker appends one JSON line per step);
otherwise nothing is installed.

A step and the worker's view of it are defined in :mod:`vllm_split.engine.step_records`:
``step_s`` runs from ``execute_model`` being called to the sampled output being ready
(a :class:`~vllm_split.engine.step_records.StepClock`). ``model_s`` is the time inside
the runner's ``_model_forward`` (embedding, the decoder layers, final norm: timed outside
any compiled graph, so it means the same for eager and compiled models, plain and split),
so ``step_s - model_s`` is the fixed part: input preparation, attention metadata, LM head,
sampling. ``prep_s`` is the part of it spent in the runner's per-KV-cache-group input
preparation (``_update_states``, ``_prepare_inputs``, ``_get_slot_mappings``,
``_build_attention_metadata``: block tables, slot mappings, attention metadata). With ``--enforce-eager`` the line also has ``layers_s``, the time inside the
decoder layers alone (a :class:`~vllm_split.layer_timer.LayerTimer` on every layer; its
hooks are not installed on a compiled model, whose graph they would enter). Each line also
has ``t`` (wall time at the end), ``num_reqs``, ``num_tokens`` and ``split_layers``
(sorted, one per split request), ``return_layers`` (only with U-shaped requests: their
``m``, sorted) and ``compiled_graphs`` (torch.compile graphs made in this
process so far: a number that grows while serving is a recompilation), ``pp_rank`` (the
pipeline stage of the worker that wrote the line: every stage writes one per step), ``engine``
(its DP rank: under data parallelism every engine's worker appends to the same file),
``split_requests`` (the split requests' ids, sorted) and, from
the split runner, ``layer_rows``: the rows times decoder layers this worker's forward ran
(every row on every layer of the stage for plain and exact steps, only the entered rows on
the compact path; absent where not counted, e.g. U-shaped steps).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

from vllm_split.engine.compiled_layers import compiled_graphs
from vllm_split.engine.step_records import StepClock
from vllm_split.layer_timer import LayerTimer

ENV = "VLLM_SPLIT_STEP_LOG"


class StepTimingMixin:
    _step_log = None  # the open log file when ENV is set

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)
        path = os.environ.get(ENV)
        if not path:
            return
        self._step_log = open(path, "a", buffering=1)
        self._step_clock = StepClock()
        self._step_key: int | None = None  # the step between execute_model and its output
        self._model_s = self._prep_s = 0.0
        self._layer_timer: LayerTimer | None = None
        from vllm.config import CompilationMode  # here: this module imports without vLLM
        from vllm.distributed import get_pp_group, model_parallel_is_initialized

        self._step_pp_rank = get_pp_group().rank_in_group if model_parallel_is_initialized() else 0
        self._step_engine = self.vllm_config.parallel_config.data_parallel_index  # the DP rank (0 without DP)

        if self.vllm_config.compilation_config.mode == CompilationMode.NONE:
            self._layer_timer = LayerTimer()
            self._layer_timer.add(self.get_model().model.layers)

    def _model_forward(self, *args: Any, **kwargs: Any):
        if self._step_log is None:
            return super()._model_forward(*args, **kwargs)
        t0 = time.perf_counter()
        try:
            return super()._model_forward(*args, **kwargs)
        finally:
            self._model_s += time.perf_counter() - t0

    # the runner's input preparation that runs once per KV cache group (block tables, slot
    # mappings, attention metadata): ``prep_s``, what ``--split-kv-ranges`` multiplies
    def _timed_prep(self, method: Any, *args: Any, **kwargs: Any):
        if self._step_log is None:
            return method(*args, **kwargs)
        t0 = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            self._prep_s += time.perf_counter() - t0

    def _update_states(self, *args: Any, **kwargs: Any):
        return self._timed_prep(super()._update_states, *args, **kwargs)

    def _prepare_inputs(self, *args: Any, **kwargs: Any):
        return self._timed_prep(super()._prepare_inputs, *args, **kwargs)

    def _get_slot_mappings(self, *args: Any, **kwargs: Any):
        return self._timed_prep(super()._get_slot_mappings, *args, **kwargs)

    def _build_attention_metadata(self, *args: Any, **kwargs: Any):
        return self._timed_prep(super()._build_attention_metadata, *args, **kwargs)

    def execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any):
        if self._step_log is None:
            return super().execute_model(scheduler_output, *args, **kwargs)
        splits = getattr(scheduler_output, "split_inputs", None) or {}
        info = {
            "num_reqs": len(scheduler_output.num_scheduled_tokens),
            "num_tokens": scheduler_output.total_num_scheduled_tokens,
            "split_layers": sorted(int(s.split_layer) for s in splits.values()),
            "split_requests": sorted(splits),
        }
        if returns := sorted(int(s.return_layer) for s in splits.values() if getattr(s, "return_layer", None)):
            info["return_layers"] = returns  # U-shaped requests' m (their rows leave after layer m - 1)
        self._model_s = self._prep_s = 0.0  # forwards outside a step (warm-up, dummy runs) do not count
        if self._layer_timer is not None:
            self._layer_timer.take()
        if not self._step_clock.begin(id(scheduler_output), info, num_tokens=info["num_tokens"]):
            return super().execute_model(scheduler_output, *args, **kwargs)
        self._step_key = id(scheduler_output)
        out = super().execute_model(scheduler_output, *args, **kwargs)
        if out is not None:  # no separate sample_tokens call this step
            self._end_step()
        return out

    def sample_tokens(self, *args: Any, **kwargs: Any):
        out = super().sample_tokens(*args, **kwargs)
        if self._step_log is not None and self._step_key is not None:
            self._end_step()
        return out

    def _end_step(self) -> None:
        ended = self._step_clock.end(self._step_key)
        self._step_key = None
        if ended is None:
            return
        info, step_s = ended
        line = {"t": time.time(), **info, "step_s": step_s, "model_s": self._model_s, "prep_s": self._prep_s,
                "compiled_graphs": compiled_graphs(), "pp_rank": self._step_pp_rank,
                "engine": self._step_engine}
        if (layer_rows := getattr(self, "_split_layer_rows", None)) is not None:
            line["layer_rows"] = layer_rows
        if self._layer_timer is not None:
            line["layers_s"] = self._layer_timer.take_seconds()
        self._step_log.write(json.dumps(line) + "\n")
