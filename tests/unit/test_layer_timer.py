"""The one layer timer (``vllm_split/layer_timer.py``) on small torch modules, a tiny
transformers model and the client profiler built on it; and that the client side of it
imports without vLLM."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vllm_split.layer_timer import LayerSample, LayerTimer

ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Layer(torch.nn.Module):
    """A "decoder layer" called like vLLM's, ``layer(positions, hidden_states)``, that takes
    ``seconds`` on ``clock``."""

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        super().__init__()
        self.clock, self.seconds = clock, seconds

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        self.clock.now += self.seconds
        return hidden


def test_each_call_is_one_sample_with_its_name_rows_and_seconds():
    clock = FakeClock()
    layers = torch.nn.ModuleList([Layer(clock, 0.25), Layer(clock, 0.5)])
    timer = LayerTimer(clock=clock)
    timer.add(layers, name="block", rows_arg=1)
    hidden = torch.zeros(5, 4)
    for layer in layers:
        clock.now += 1.0  # time between layers is not layer time
        hidden = layer(torch.arange(5), hidden)
    assert timer.take() == [LayerSample("block", 5, 0.25), LayerSample("block", 5, 0.5)]
    assert timer.take() == []  # take hands samples over once
    layers[0](torch.arange(2), hidden[:2])
    layers[1](torch.arange(2), hidden[:2])
    assert timer.take_seconds() == 0.75


def test_rows_are_none_unless_asked_and_remove_stops_timing():
    clock = FakeClock()
    layer = Layer(clock, 0.5)
    with LayerTimer(clock=clock) as timer:
        timer.add([layer], name="x")
        layer(torch.arange(3), torch.zeros(3, 2))
        assert timer.take() == [LayerSample("x", None, 0.5)]
    layer(torch.arange(3), torch.zeros(3, 2))
    assert timer.take() == [] and not layer._forward_hooks and not layer._forward_pre_hooks
    timer.remove()  # safe twice


def test_nested_modules_keep_their_own_start_times():
    clock = FakeClock()
    inner = Layer(clock, 0.25)

    class Outer(torch.nn.Module):
        def forward(self, positions, hidden):
            clock.now += 0.5
            return inner(positions, hidden)

    outer = Outer()
    timer = LayerTimer(clock=clock)
    timer.add([outer], name="outer")
    timer.add([inner], name="inner")
    outer(torch.arange(1), torch.zeros(1, 2))
    assert timer.take() == [LayerSample("inner", None, 0.25), LayerSample("outer", None, 0.75)]


def test_times_the_layers_of_a_transformers_model():
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaModel(config).eval()
    timer = LayerTimer()
    timer.add(model.layers)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=torch.arange(7)[None])
    total = time.perf_counter() - t0
    samples = timer.take()
    assert len(samples) == 3 and all(s.seconds > 0 for s in samples)
    assert sum(s.seconds for s in samples) < total


def test_samples_rebuild_from_plain_lists():
    # the engine's transport may return a worker's samples as lists (server_profile relies on it)
    assert LayerSample(*["head", 4, 0.5]) == LayerSample("head", 4, 0.5)


def test_client_profiler_measures_a_tiny_checkpoint(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from client_lib.profiler import profile_client

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    out = profile_client(tmp_path, prefill_tokens=(4, 8), decode_contexts=(4,), repeats=1)
    assert [(m["node"], m["phase"], m["tokens"], m["context"]) for m in out] == [
        ("block", "prefill", 4, 0), ("block", "prefill", 8, 0), ("block", "decode", 1, 8)]
    assert all(m["seconds"] > 0 for m in out)


@pytest.mark.parametrize("module", ["vllm_split.layer_timer", "client_lib.profiler",
                                    "vllm_split.engine.step_records", "vllm_split.engine.step_timing"])
def test_imports_without_vllm(module):
    code = f"import sys; sys.modules['vllm'] = None; import {module}"  # any vLLM import fails
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
