"""patches/pp_intermediate_tensors: a later pipeline stage gets its receive buffer at load time (no engine)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

import vllm.distributed  # noqa: E402
from vllm.model_executor.models.utils import make_empty_intermediate_tensors_factory  # noqa: E402
from vllm.v1.worker.cpu_model_runner import CPUModelRunner  # noqa: E402

from vllm_split.patches import pp_intermediate_tensors as patch  # noqa: E402

HIDDEN = 8
MAX_TOKENS = 4


def _runner(**overrides) -> SimpleNamespace:
    """What ``allocate_receive_buffer`` reads off a runner, as ``_dummy_run`` does."""
    model = SimpleNamespace(make_empty_intermediate_tensors=make_empty_intermediate_tensors_factory(
        ["hidden_states", "residual"], HIDDEN))
    fields = dict(intermediate_tensors=None, model=model, max_num_tokens=MAX_TOKENS,
                  model_config=SimpleNamespace(dtype=torch.float32), device=torch.device("cpu"))
    return SimpleNamespace(**{**fields, **overrides})


@pytest.fixture
def stage(monkeypatch):
    """Set the pipeline stage ``get_pp_group()`` reports: ``stage(first=False)``."""
    def set_stage(*, first: bool) -> None:
        monkeypatch.setattr(vllm.distributed, "get_pp_group", lambda: SimpleNamespace(is_first_rank=first))
    return set_stage


@pytest.fixture
def clean_load_model(monkeypatch):
    """``CPUModelRunner.load_model`` replaced by a stand-in that builds the model; restored afterwards."""
    calls = []

    def load_model(self, load_dummy_weights: bool = False) -> None:
        calls.append(load_dummy_weights)
        self.model = _runner().model

    monkeypatch.setattr(CPUModelRunner, "load_model", load_model)
    return load_model, calls


def test_a_later_stage_gets_the_buffer_dummy_run_would_allocate(stage):
    stage(first=False)
    runner = _runner()
    patch.allocate_receive_buffer(runner)
    tensors = runner.intermediate_tensors
    assert set(tensors.tensors) == {"hidden_states", "residual"}
    for t in tensors.tensors.values():
        assert t.shape == (MAX_TOKENS, HIDDEN) and t.dtype == torch.float32 and t.device.type == "cpu"


def test_the_first_stage_and_an_existing_buffer_are_left_alone(stage):
    stage(first=True)
    runner = _runner()
    patch.allocate_receive_buffer(runner)
    assert runner.intermediate_tensors is None  # the first stage receives nothing
    stage(first=False)
    existing = object()
    runner = _runner(intermediate_tensors=existing)
    patch.allocate_receive_buffer(runner)
    assert runner.intermediate_tensors is existing  # e.g. allocated by a compile warm-up


def test_apply_wraps_load_model_once_and_allocates_after_loading(stage, clean_load_model):
    original, calls = clean_load_model
    patch.apply()
    wrapped = CPUModelRunner.load_model
    patch.apply()  # idempotent: no double wrapping
    assert CPUModelRunner.load_model is wrapped and wrapped is not original and wrapped.__wrapped__ is original
    stage(first=False)
    runner = _runner(model=None)  # the model exists only once the original load_model has run
    CPUModelRunner.load_model(runner, load_dummy_weights=False)
    assert calls == [False]
    assert runner.intermediate_tensors["hidden_states"].shape == (MAX_TOKENS, HIDDEN)
