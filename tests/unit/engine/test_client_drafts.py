"""The no-op ``custom_class`` proposer that carries client drafts: vLLM's proposer contract."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from vllm_split.config import SplitConfig
from vllm_split.engine.drafts import CLASS_PATH, ClientDrafts, server_drafts, speculative_config


def _vllm_config(k: int = 4):
    return SimpleNamespace(speculative_config=SimpleNamespace(method="custom_class", model=CLASS_PATH,
                                                              num_speculative_tokens=k))


def test_it_proposes_nothing_for_every_request_and_loads_nothing():
    drafts = ClientDrafts(_vllm_config())
    assert drafts.num_speculative_tokens == 4
    assert drafts.load_model(object()) is None  # the CPU runner calls it unchecked
    out = drafts.propose([[5], [6, 7], []], [3, 4, 5], None, slot_mappings=None)
    assert out == [[], [], []]


def test_vllms_loader_takes_it():
    pytest.importorskip("vllm")
    from vllm.v1.spec_decode.custom_class_proposer import create_custom_proposer

    proposer = create_custom_proposer(_vllm_config(3))
    assert type(proposer).__name__ == "ClientDrafts" and proposer.propose([[1]], [1], None) == [[]]


def test_the_speculative_config_names_the_class_and_k():
    assert json.loads(speculative_config(4)) == {"method": "custom_class", "model": CLASS_PATH,
                                                 "num_speculative_tokens": 4}
    assert CLASS_PATH == f"{ClientDrafts.__module__}.{ClientDrafts.__qualname__}"


def test_server_drafts_is_the_option_when_the_spec_config_carries_it():
    assert server_drafts(SplitConfig(), None) == 0
    assert server_drafts(SplitConfig(), _vllm_config().speculative_config) == 0  # a spec config alone grants nothing
    assert server_drafts(SplitConfig(drafts=3), _vllm_config(4).speculative_config) == 3
