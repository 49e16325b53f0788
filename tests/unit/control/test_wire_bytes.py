"""The policy plans with the bytes a session really sends: its negotiated wire dtype's row
(``AdmissionRequest.row_bytes``), so on a slow uplink an 8-bit session's prompt upload, the
same at every split layer, costs less predicted TTFT and can meet an SLA float16 cannot."""
from __future__ import annotations

import pytest

from tests.unit.control.test_policy import FAST, IDLE, policy, request
from vllm_split.control.policy import AdmissionInputError, Refusal
from vllm_split.planner import SLA, NetworkSpec, PlanResult
from vllm_split.wire import protocol as wire

UPLINK_BPS = 5e6  # a 4G uplink
CELL = NetworkSpec(uplink_bps=UPLINK_BPS, downlink_bps=20e6, rtt_s=0.06)
HIDDEN = 576  # SmolLM2-135M, the policy's model
PROMPT = 300


def _request(dtype: str | None, **fields):
    row_bytes = None if dtype is None else wire.row_bytes(dtype, HIDDEN)
    return request(prompt_tokens=PROMPT, network=CELL, row_bytes=row_bytes, **fields)


@pytest.mark.parametrize("k", [0, 7, 15, 29])
def test_an_8bit_prompt_upload_is_cheaper_in_the_predicted_ttft_by_exactly_the_bytes_saved(k):
    p = policy()
    ttft16, tpot16, work16 = p.predict(_request("float16", split_layer=k), k, IDLE)
    ttft8, tpot8, work8 = p.predict(_request("int8_mixed", split_layer=k), k, IDLE)
    saved_per_row_s = 8 * (wire.row_bytes("float16", HIDDEN) - wire.row_bytes("int8_mixed", HIDDEN)) / UPLINK_BPS
    assert ttft16 - ttft8 == pytest.approx(PROMPT * saved_per_row_s, rel=1e-9)  # 0.25 s of 1.1 s at k = 7
    assert tpot16 - tpot8 == pytest.approx(saved_per_row_s, rel=1e-9)  # each decode row too
    assert work8 == work16  # the server's work does not depend on the wire


def test_without_a_negotiated_dtype_the_policy_plans_with_its_hidden_bytes():
    p = policy()  # hidden_bytes = 576 * 4: float32 rows
    assert p.predict(_request(None, split_layer=7), 7, IDLE) == p.predict(_request("float32", split_layer=7), 7, IDLE)
    assert p.row_bytes(_request(None)) == 576 * 4 and p.row_bytes(_request("int8_row")) == 580


def test_a_slow_uplink_meets_a_ttft_bound_in_8bit_that_float16_cannot():
    p, sla = policy(), SLA(ttft_s=0.7, tpot_s=1.0)
    refused = p.place(_request("float16", sla=sla), IDLE)
    assert isinstance(refused, Refusal) and refused.code == "sla_unreachable"
    placed = p.place(_request("int8_mixed", sla=sla), IDLE)
    assert isinstance(placed, PlanResult) and placed.feasible and placed.ttft_s <= 0.7


def test_the_decode_turnaround_uses_the_row_bytes():
    p = policy()
    slow, fast = (p.turnaround_s(_request(d), FAST, 7) for d in ("float32", "int8_mixed"))
    assert slow - fast == pytest.approx(8 * (576 * 4 - 628) / UPLINK_BPS)


@pytest.mark.parametrize("bad", [0, -4, 1.5, True])
def test_row_bytes_must_be_a_positive_int(bad):
    with pytest.raises(AdmissionInputError, match=rf"AdmissionRequest.row_bytes: expected None or an int >= 1, "
                                                  rf"got {bad!r}"):
        request(row_bytes=bad)
