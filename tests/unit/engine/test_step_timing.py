"""The worker's step log (``VLLM_SPLIT_STEP_LOG``) on a fake model runner (no engine): one
line per step from ``execute_model`` to the sampled output, with the time inside the
decoder layers, in the fields ``benchmarks/bench_server_step.py`` reads."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch

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

    def __init__(self, fused: bool = False) -> None:
        self.fused = fused
        self.model = None

    def load_model(self) -> None:
        self.model = SimpleNamespace(model=SimpleNamespace(layers=torch.nn.ModuleList([Sleepy(), Sleepy()])))

    def get_model(self):
        return self.model

    def run_layers(self) -> None:
        hidden = torch.zeros(1)
        for layer in self.model.model.layers:
            hidden = layer(hidden)

    def execute_model(self, scheduler_output):
        if scheduler_output.total_num_scheduled_tokens:
            time.sleep(PREP_S)
            self.run_layers()
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


@pytest.mark.parametrize("fused", [False, True])
def test_one_line_per_step_from_execute_model_to_the_sampled_output(tmp_path, monkeypatch, fused):
    log = tmp_path / "steps.jsonl"
    monkeypatch.setenv(ENV, str(log))
    runner = Runner(fused=fused)
    runner.load_model()
    for layer in runner.model.model.layers:  # a slow warm-up outside any step must not count
        layer.seconds = 0.3
    runner.run_layers()
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
    assert set(got) == {"t", "num_reqs", "num_tokens", "split_layers", "step_s", "layers_s"}
    assert (got["num_reqs"], got["num_tokens"], got["split_layers"]) == (3, 5, [15, 22])
    assert 2 * LAYER_S <= got["layers_s"] < 0.3
    assert got["step_s"] >= got["layers_s"] + PREP_S + (0 if fused else SAMPLE_S)
    assert t0 <= got["t"] <= time.time()


def test_nothing_is_installed_without_the_env_var(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    runner = Runner()
    runner.load_model()
    runner.execute_model(step({"a": 1}))
    assert runner.sample_tokens(None) == "sampled"
    assert not any(layer._forward_hooks for layer in runner.model.model.layers)
