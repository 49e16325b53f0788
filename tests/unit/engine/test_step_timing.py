"""The worker's step log (``VLLM_SPLIT_STEP_LOG``) on a fake model runner (no engine): one
line per step from ``execute_model`` to the sampled output, with the time inside the model
forward (and, eager, inside the decoder layers), in the fields ``benchmarks/bench_server_step.py``
reads."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch

from vllm.config import CompilationMode

from vllm_split.engine.step_timing import ENV, StepTimingMixin

PREP_S, LAYER_S, SAMPLE_S = 0.01, 0.02, 0.01


class Sleepy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seconds = LAYER_S

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return hidden


class FakeRunner:
    """vLLM's runner calls as the worker sees them; samples in a second call unless ``fused``."""

    def __init__(self, fused: bool = False, compiled: bool = False) -> None:
        self.fused = fused
        self.model = None
        mode = CompilationMode.DYNAMO_TRACE_ONCE if compiled else CompilationMode.NONE
        self.vllm_config = SimpleNamespace(compilation_config=SimpleNamespace(mode=mode),
                                           parallel_config=SimpleNamespace(data_parallel_index=0))

    def load_model(self) -> None:
        self.model = SimpleNamespace(model=SimpleNamespace(layers=torch.nn.ModuleList([Sleepy(), Sleepy()])))

    def get_model(self):
        return self.model

    def run_layers(self) -> None:
        hidden = torch.zeros(1)
        for layer in self.model.model.layers:
            hidden = layer(hidden)

    def _model_forward(self):
        self.run_layers()

    def _update_states(self):
        time.sleep(PREP_S / 4)

    _prepare_inputs = _get_slot_mappings = _build_attention_metadata = _update_states

    def execute_model(self, scheduler_output):
        if scheduler_output.total_num_scheduled_tokens:
            for prepare in (self._update_states, self._prepare_inputs, self._get_slot_mappings,
                            self._build_attention_metadata):
                prepare()
            self._model_forward()
        return "output" if self.fused else None

    def sample_tokens(self, grammar_output):
        time.sleep(SAMPLE_S)
        return "sampled"


class Runner(StepTimingMixin, FakeRunner):
    pass


def step(tokens: dict[str, int], splits: dict[str, int] | None = None):
    return SimpleNamespace(num_scheduled_tokens=tokens, total_num_scheduled_tokens=sum(tokens.values()),
                           split_inputs={r: SimpleNamespace(split_layer=k) for r, k in (splits or {}).items()})


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_one_line_per_step_from_execute_model_to_the_sampled_output(tmp_path, monkeypatch, fused, compiled):
    log = tmp_path / "steps.jsonl"
    monkeypatch.setenv(ENV, str(log))
    runner = Runner(fused=fused, compiled=compiled)
    runner.load_model()
    for layer in runner.model.model.layers:  # a slow warm-up outside any step must not count
        layer.seconds = 0.3
    runner._model_forward()
    for layer in runner.model.model.layers:
        layer.seconds = LAYER_S
    t0 = time.time()
    out = runner.execute_model(step({"a": 3, "b": 1, "c": 1}, splits={"b": 22, "c": 15}))
    if not fused:
        assert out is None
        out = runner.sample_tokens(None)
    assert out in ("output", "sampled")
    runner.execute_model(step({}))  # schedules no token: not a step
    (got,) = lines(log)
    fields = {"t", "num_reqs", "num_tokens", "split_layers", "step_s", "model_s", "prep_s", "compiled_graphs",
              "pp_rank", "engine", "split_requests"}
    assert set(got) == (fields if compiled else fields | {"layers_s"})  # no hooks inside a compiled graph
    assert (got["num_reqs"], got["num_tokens"], got["split_layers"], got["pp_rank"]) == (3, 5, [15, 22], 0)
    assert (got["split_requests"], got["engine"]) == (["b", "c"], 0)
    assert 2 * LAYER_S <= got["model_s"] < 0.3
    if not compiled:
        assert 2 * LAYER_S <= got["layers_s"] <= got["model_s"]
    assert not compiled or not any(layer._forward_hooks for layer in runner.model.model.layers)
    assert got["step_s"] >= got["model_s"] + PREP_S + (0 if fused else SAMPLE_S)
    assert PREP_S <= got["prep_s"] <= got["step_s"] - got["model_s"]  # the four preparation calls, timed
    assert t0 <= got["t"] <= time.time()


def test_the_split_runners_layer_rows_go_into_the_line(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path / "steps.jsonl"))
    runner = Runner(fused=True)
    runner.load_model()
    runner._split_layer_rows = 42  # what SplitRunnerMixin counted in this step's forward
    runner.execute_model(step({"a": 3}, splits={"a": 7}))
    (got,) = lines(tmp_path / "steps.jsonl")
    assert got["layer_rows"] == 42


def test_nothing_is_installed_without_the_env_var(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    runner = Runner()
    runner.load_model()
    runner.execute_model(step({"a": 1}))
    assert runner.sample_tokens(None) == "sampled"
    assert not any(layer._forward_hooks for layer in runner.model.model.layers)
