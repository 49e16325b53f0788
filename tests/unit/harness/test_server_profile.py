"""The server profiler's worker side and its grouping, on a fake worker and ``LLM`` (no
engine): hooks on every decoder layer and the logits processor, samples read back through
``collective_rpc`` (as the engine's transport may return them: plain lists)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from harness.server_profile import _install_hooks, _per_step, _take

NUM_LAYERS = 3


class Layer(torch.nn.Module):
    def forward(self, positions, hidden, residual):
        return hidden, residual


class Logits(torch.nn.Module):
    def forward(self, lm_head, hidden):
        return hidden


class FakeLLM:
    def __init__(self) -> None:
        layers = torch.nn.ModuleList([Layer() for _ in range(NUM_LAYERS)])
        self.model = SimpleNamespace(model=SimpleNamespace(layers=layers), logits_processor=Logits())
        self.worker = SimpleNamespace(model_runner=SimpleNamespace(get_model=lambda: self.model))

    def collective_rpc(self, fn):
        out = fn(self.worker)
        return [[list(s) for s in out] if isinstance(out, list) else out]

    def step(self, rows: int) -> None:
        hidden = torch.zeros(rows, 4)
        for layer in self.model.model.layers:
            hidden, _ = layer(torch.arange(rows), hidden, None)
        self.model.logits_processor(None, hidden[-1:])  # vLLM computes logits for the last rows only


def test_samples_group_into_steps_by_rows():
    llm = FakeLLM()
    assert llm.collective_rpc(_install_hooks) == [NUM_LAYERS]
    for rows in (5, 1, 5):
        llm.step(rows)
    records = _take(llm)
    assert [(r.name, r.rows) for r in records[:NUM_LAYERS + 1]] == [("block", 5)] * NUM_LAYERS + [("head", 1)]
    steps = _per_step(records, NUM_LAYERS, 5)
    assert len(steps["block"]) == 2 and len(steps["head"]) == 3
    assert all(s > 0 for s in steps["block"])
    assert len(_per_step(records, NUM_LAYERS, 1)["block"]) == 1
    assert _take(llm) == []  # taken once
