"""The admission controller and drafted sessions (issue 14): the grant the policy plans with,
the measured tokens and rows per round trip per request type (none measured: as without
drafts, at ``1 + γ`` rows), their expiry and bound, the drafted sessions' own TPOT margin, and
the rows counted as work."""
from dataclasses import replace

import pytest
from prometheus_client import REGISTRY

from tests.unit.control.test_admission import FAST, LAN, controller
from vllm_split.api.admission import DRAFTS_MAX_AGE_S, MAX_REQUEST_TYPES, DraftWindows, request_from_open
from vllm_split.wire import protocol as wire


def open_msg(request_type="", max_drafts=4, **fields) -> wire.Open:
    return wire.Open(model_fingerprint="fp", split_layer=fields.pop("k", None), client=FAST,
                     sla=wire.RequestSLA(ttft_s=5.0, tpot_s=fields.pop("tpot", 1.0)), prompt_tokens=40,
                     sampling=wire.SamplingOptions(max_tokens=32), max_drafts=max_drafts, request_type=request_type,
                     **fields)


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_the_policy_sees_the_grant_the_session_will_make():
    assert request_from_open(open_msg(max_drafts=6), LAN, server_drafts=4).num_drafts == 4  # min(asked, K)
    assert request_from_open(open_msg(max_drafts=2), LAN, server_drafts=4).num_drafts == 2
    assert request_from_open(open_msg(max_drafts=4), LAN).num_drafts == 0  # a server without drafts
    msg = wire.Open(model_fingerprint="fp", split_layer=None, client=FAST, prompt_tokens=40, u_shape=True,
                    max_drafts=4, sampling=wire.SamplingOptions(max_tokens=32))
    assert request_from_open(msg, LAN, server_drafts=4).num_drafts == 0  # U-shaped: the client samples
    req = request_from_open(open_msg("code"), LAN, server_drafts=4)
    assert (req.request_type, req.tokens_per_round_trip, req.drafting) == ("code", None, None)


async def test_a_type_is_planned_with_its_measured_tokens_per_round_trip_once_three_sessions_ended():
    c = controller()
    code = request_from_open(open_msg("code"), LAN, server_drafts=4)
    for i in range(3):
        await c.admit(f"c{i}", code)
        assert c.inflight[f"c{i}"].request.tokens_per_round_trip is None  # not measured yet: as without drafts
        # 31 tokens in 11 answers: the prompt's, then 30 tokens in 10 round trips
        await c.release(f"c{i}", prompt_tokens=40, output_tokens=31, ttft_s=0.1, tpot_s=0.05, answers=11,
                        decode_rows=50)
    load = c.load()
    a = await c.admit("next", code)
    planned = c.inflight["next"].request
    assert planned.tokens_per_round_trip == pytest.approx(3.0) and planned.drafting.tokens_per_round_trip == 3.0
    assert a.predicted_tpot_s == pytest.approx(c.policy.predict(planned, a.split_layer, load)[1])
    assert a.predicted_tpot_s < c.policy.predict(code, a.split_layer, load)[1] / 2  # the gain of E = 3
    await c.admit("chat", request_from_open(open_msg("chat"), LAN, server_drafts=4))
    assert c.inflight["chat"].request.tokens_per_round_trip is None  # another type: nothing measured for it
    await c.admit("plain", request_from_open(open_msg("code", max_drafts=0), LAN, server_drafts=4))
    assert c.inflight["plain"].request.tokens_per_round_trip is None  # no drafts: nothing to plan with


def test_measurements_expire_and_the_types_kept_are_bounded():
    w = DraftWindows()
    for i in range(3):
        w.add("code", 100.0 + i, tokens_per_round_trip=3.0, draft_fill=0.5)
    assert w.expected("code", now=110.0) == 3.0 and w.expected("chat", now=110.0) is None
    assert w.expected_rows("code", 4, now=110.0) == 3.0 and w.expected_rows("chat", 4, now=110.0) is None
    assert w.expected("code", now=101.0 + DRAFTS_MAX_AGE_S) is None  # two fresh ones: too few
    assert w.expected_rows("code", 4, now=101.0 + DRAFTS_MAX_AGE_S) is None
    for i in range(MAX_REQUEST_TYPES):
        for _ in range(3):
            w.add(f"t{i}", 200.0, tokens_per_round_trip=2.0)
    assert w.expected("code", now=200.0) is None and w.expected(f"t{MAX_REQUEST_TYPES - 1}", now=200.0) == 2.0
    assert w.expected_rows("code", 4, now=200.0) is None
    assert w.expected_rows("t0", 4, now=200.0) is None  # tokens measured without rows: rows still unmeasured


async def test_a_type_is_planned_with_its_measured_rows_per_round_trip_once_three_sessions_ended():
    c = controller()
    code = request_from_open(open_msg("code"), LAN, server_drafts=4)
    observed = ("vllm_split:rows_per_round_trip_sum", {"engine": "0"})
    seen = sample(observed[0], **observed[1])
    for i in range(3):
        await c.admit(f"c{i}", code)
        assert c.inflight[f"c{i}"].request.step_rows() == 5.0  # not measured yet: the most it may send
        # 30 decode rows in 10 round trips: 3 rows (2 of 4 drafts) per round trip
        await c.release(f"c{i}", prompt_tokens=40, output_tokens=21, ttft_s=0.1, tpot_s=0.05, answers=11,
                        decode_rows=30)
    assert sample(observed[0], **observed[1]) - seen == pytest.approx(3 * 3.0)
    load = c.load()
    a = await c.admit("next", code)
    planned = c.inflight["next"].request
    assert planned.rows_per_round_trip == 3.0 and planned.step_rows() == 3.0 and planned.drafting.rows == 3.0
    assert a.server_work == pytest.approx(c.policy.predict(planned, a.split_layer, load)[2])
    at_most = replace(planned, rows_per_round_trip=None)  # the same request at 1 + γ rows
    assert a.server_work < c.policy.predict(at_most, a.split_layer, load)[2]
    two = request_from_open(open_msg("code", max_drafts=2), LAN, server_drafts=4)
    await c.admit("two", two)
    assert c.inflight["two"].request.rows_per_round_trip == 2.0  # the share sent, 1 of 2 drafts
    await c.admit("chat", request_from_open(open_msg("chat"), LAN, server_drafts=4))
    assert c.inflight["chat"].request.step_rows() == 5.0  # another type: nothing measured for it


@pytest.mark.parametrize("odd", [dict(answers=0, decode_rows=30), dict(answers=1, decode_rows=5),
                                 dict(answers=11, decode_rows=None), dict(answers=None, decode_rows=30)])
async def test_sessions_without_a_decode_round_trip_teach_no_rows(odd):
    c = controller()
    code = request_from_open(open_msg("code"), LAN, server_drafts=4)
    for i in range(4):
        await c.admit(f"c{i}", code)
        await c.release(f"c{i}", prompt_tokens=40, output_tokens=21, ttft_s=0.1, tpot_s=0.05, **odd)
    await c.admit("next", code)
    assert c.inflight["next"].request.rows_per_round_trip is None
    assert c.inflight["next"].request.step_rows() == 5.0


async def test_drafted_sessions_have_their_own_tpot_margin_and_count_their_rows():
    c = controller()
    drafted_req = request_from_open(open_msg("code", k=7), LAN, server_drafts=4)
    plain_req = request_from_open(open_msg("code", k=7, max_drafts=0), LAN, server_drafts=4)
    done = ("vllm_split:server_layer_tokens_total", {"engine": "0"})
    observed = ("vllm_split:tokens_per_round_trip_count", {"engine": "0"})
    before, seen = sample(done[0], **done[1]), sample(observed[0], **observed[1])
    for i in range(5):  # drafted sessions measured twice as slow as their predictions
        a = await c.admit(f"d{i}", drafted_req)
        await c.release(f"d{i}", prompt_tokens=40, output_tokens=31, ttft_s=0.1, tpot_s=a.predicted_tpot_s * 2,
                        answers=11, decode_rows=50)
    assert c.load().drafted_tpot_error == pytest.approx(2.0) and c.load().tpot_error == 1.0
    # 40 prompt rows and 50 decode rows (10 activations of 1 + 4) through layers [7, 30), rejected drafts too
    assert sample(done[0], **done[1]) - before == 5 * (40 + 50) * (30 - 7)
    assert sample(observed[0], **observed[1]) - seen == 5
    a = await c.admit("p", plain_req)
    before = sample(done[0], **done[1])
    await c.release("p", prompt_tokens=40, output_tokens=31, ttft_s=0.1, tpot_s=a.predicted_tpot_s * 1.5)
    assert sample(done[0], **done[1]) - before == (40 + 30) * (30 - 7)  # one row per token after the first
    assert c.load().tpot_error == 1.0 and c.load().drafted_tpot_error == pytest.approx(2.0)
