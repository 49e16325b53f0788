"""The scheduler's buffer of U-shaped rows on their way back: contiguous positions, held
until an output leaves, each position sent once (a preempted request recomputes)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from vllm_split.engine.returns import ReturnBuffer
from vllm_split.wire.contract import RETURN_KEY
from vllm_split.wire.tensors import decode_tensor


@dataclass
class _Out:
    request_id: str
    new_token_ids: list
    kv_transfer_params: dict | None = None


def _rows(payload):
    return decode_tensor(payload["dtype"], (payload["rows"], 4), payload["data"])


def test_chunks_wait_for_the_output_and_go_once():
    buf, rows = ReturnBuffer(), torch.arange(24, dtype=torch.float32).reshape(6, 4)
    buf.add("r", 0, rows[:3])  # a prefill chunk that samples nothing: no output yet
    buf.attach([_Out("r", [])])
    buf.add("r", 3, rows[3:5])
    out = _Out("r", [0])
    buf.attach([out, _Out("other", [7])])
    payload = out.kv_transfer_params[RETURN_KEY]
    assert (payload["start"], payload["rows"]) == (0, 5) and torch.equal(_rows(payload), rows[:5])
    buf.add("r", 0, rows[:6])  # recomputed after a preemption: only position 5 is new
    out = _Out("r", [0])
    buf.attach([out])
    assert out.kv_transfer_params[RETURN_KEY]["start"] == 5 and torch.equal(_rows(out.kv_transfer_params[RETURN_KEY]), rows[5:])
    assert buf.take("r") is None


def test_a_finished_requests_last_rows_reach_its_final_output():
    """vLLM frees a finished request inside update_from_output, before the output leaves."""
    buf = ReturnBuffer()
    buf.add("r", 0, torch.ones(3, 4))
    buf.retire("r")
    assert buf
    out = _Out("r", [0])
    buf.attach([out])
    assert out.kv_transfer_params[RETURN_KEY]["rows"] == 3 and not buf
    buf.add("s", 0, torch.ones(1, 4))
    buf.retire("s")  # aborted: no final output; the next attach drops its rows
    buf.attach([])
    assert not buf


def test_a_gap_is_an_error():
    with pytest.raises(ValueError, match="start at position 2, expected <= 0"):
        ReturnBuffer().add("r", 2, torch.zeros(1, 4))
