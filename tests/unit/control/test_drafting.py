"""Admission of drafted sessions (issue 14, pure): the round-trip graph against a hand
computation, rejected drafts as server work, the DP going deeper when drafts make a bound
reachable, the rows a drafted newcomer adds to the admitted sessions' steps, its own margin,
the measured mean rows per round trip (fewer rows planned where measured, ``1 + γ`` before,
never outside ``[1, 1 + γ]``), and that a session without drafts, or whose acceptance is not
measured yet, is planned as before."""
import math
from dataclasses import replace

import pytest

from vllm_split.control.drafting import (Drafting, DraftingError, expected_rows_per_round_trip,
                                         expected_tokens_per_round_trip, measured_draft_fill,
                                         measured_tokens_per_round_trip, per_round_trip)
from vllm_split.control.live_cost import StepCost
from vllm_split.control.policy import (Admission, AdmissionInputError, AdmissionPolicy, AdmissionRequest, InFlight,
                                       Wait)
from vllm_split.control.request_graph import TOKEN_BYTES, ClientCosts, ServerLoad, placement_for, request_graph
from vllm_split.planner import SLA, SMOLLM2_135M, NetworkSpec, evaluate

LAN = NetworkSpec(uplink_bps=1e9, downlink_bps=1e9, rtt_s=0.002)
COST = StepCost(fixed_s=0.012, layer_s=0.0018, row_s=6e-5)
N = SMOLLM2_135M.num_hidden_layers
ROW = 576 * 4
CLIENT = ClientCosts(prefill_s_per_token=1e-4, decode_s=4e-4)  # five rows in one pass: 5e-4 per layer
PHONE = ClientCosts(prefill_s_per_token=2e-4, decode_s=3e-3)
IDLE = ServerLoad(cost=COST, occupancy=0.0, recent_step_s=0.0, utilization=0.0)
BUSY_IDLE = replace(IDLE, utilization=0.95)  # the DP minimises server work; no step to wait for


def policy() -> AdmissionPolicy:
    return AdmissionPolicy(model=SMOLLM2_135M, hidden_bytes=ROW)


def request(tpot=0.3, client=CLIENT, **fields) -> AdmissionRequest:
    return AdmissionRequest(prompt_tokens=40, expected_output_tokens=32, sla=SLA(ttft_s=5.0, tpot_s=tpot),
                            client=client, network=LAN, **fields)


def drafted(gamma=4, e=2.5, **fields) -> AdmissionRequest:
    return request(num_drafts=gamma, tokens_per_round_trip=e, **fields)


def test_the_drafted_tpot_per_token_is_the_round_trip_over_e_by_hand():
    k, e, r = 7, 2.5, 5
    p = policy()
    ttft, tpot, work = p.predict(drafted(e=e), k, IDLE)
    round_trip = (k * max(CLIENT.decode_s, CLIENT.prefill_s_per_token * r)  # one pass over 1 + 4 rows
                  + LAN.uplink_s(ROW * r)  # 5 rows up
                  + (N - k) * (COST.layer_s + COST.row_s * r)  # the server's layers carry 5 rows
                  + COST.fixed_s  # the head
                  + LAN.downlink_s(math.ceil(TOKEN_BYTES * e)))  # E tokens down
    assert tpot == pytest.approx(round_trip / e, rel=1e-12)
    steps = 31 / e  # decode round trips; every row sent is work, the rejected ones too
    assert work == pytest.approx((N - k) * (COST.row_s * (40 + steps * r) + COST.layer_s * (1 + steps))
                                 + COST.fixed_s * (1 + steps), rel=1e-12)
    graph = request_graph(p.graph_inputs(drafted(e=e)), IDLE, CLIENT, drafting=Drafting(4, e))
    g_ttft, g_tpot, e2e, _ = evaluate(graph, LAN, placement_for(k, N))
    assert graph.num_output_tokens == 1 + math.ceil(31 / e)  # e2e: TTFT and one round trip per round trip
    assert e2e == pytest.approx(g_ttft + math.ceil(31 / e) * g_tpot) and g_tpot == pytest.approx(round_trip)
    assert ttft == pytest.approx(p.predict(request(), k, IDLE)[0])  # the prompt is as without drafts


def test_the_decode_wait_is_per_round_trip_too():
    p, busy = policy(), ServerLoad(cost=COST, occupancy=2.0, recent_step_s=COST.step_s(N, 2 * N), utilization=0.3)
    req = drafted(e=2.0)
    graph = request_graph(p.graph_inputs(req), busy, CLIENT, drafting=req.drafting)
    round_trip = evaluate(graph, LAN, placement_for(7, N))[1]
    wait = busy.recent_step_s - p.turnaround_s(req, CLIENT, 7) % busy.recent_step_s
    assert p.predict(req, 7, busy)[1] == pytest.approx((round_trip + wait) / 2.0)


@pytest.mark.parametrize("fields", [dict(), dict(num_drafts=0, tokens_per_round_trip=1.0),
                                    dict(num_drafts=4), dict(num_drafts=4, request_type="code")])
def test_without_drafts_or_before_acceptance_is_measured_it_is_planned_as_before(fields):
    p, req = policy(), request(**fields)
    assert req.drafting is None
    for k in (0, 7, N):
        assert p.predict(req, k, IDLE) == p.predict(request(), k, IDLE)
    assert p.place(req, BUSY_IDLE) == p.place(request(), BUSY_IDLE)
    assert request_graph(p.graph_inputs(req), IDLE, CLIENT, drafting=None) == request_graph(
        p.graph_inputs(request()), IDLE, CLIENT)


def test_server_work_per_token_rises_with_rejected_rows():
    p, k = policy(), 7
    works = [p.predict(drafted(gamma=4, e=e), k, IDLE)[2] for e in (5.0, 3.0, 2.0, 1.0)]
    assert works == sorted(works) and works[0] < works[-1]  # fewer accepted: more rows (and steps) per token
    plain = p.predict(request(), k, IDLE)[2]
    assert works[-1] > plain  # E = 1: four rejected rows per token on top of the token's own
    # all accepted: the same rows as without drafts, in a fifth of the steps
    rows_only = COST.row_s * (N - k) * (40 + 31)
    assert works[0] - rows_only == pytest.approx((plain - rows_only) - (COST.layer_s * (N - k) + COST.fixed_s)
                                                 * 31 * (1 - 1 / 5))


def test_the_dp_offloads_deeper_when_drafts_make_the_bound_reachable_there():
    p, bound = policy(), 0.08
    plain, fast = request(tpot=bound, client=PHONE), drafted(gamma=4, e=3.0, tpot=bound, client=PHONE)
    a = p.decide(plain, p.place(plain, BUSY_IDLE), load=BUSY_IDLE, inflight=())
    b = p.decide(fast, p.place(fast, BUSY_IDLE), load=BUSY_IDLE, inflight=())
    assert isinstance(a, Admission) and isinstance(b, Admission)
    assert b.split_layer > a.split_layer and b.server_work < a.server_work
    assert p.predict(plain, b.split_layer, BUSY_IDLE)[1] > bound  # the plain request cannot meet it there
    assert b.predicted_tpot_s <= bound and b.predicted_tpot_s == pytest.approx(
        p.predict(fast, b.split_layer, BUSY_IDLE)[1])


def test_a_drafted_newcomer_adds_its_rows_to_each_step_of_the_admitted_sessions():
    p, k = policy(), 7
    load = ServerLoad(cost=COST, occupancy=1.0, recent_step_s=COST.step_s(N, N), utilization=0.3)
    assert p.added_step_s(load, k, 5) - p.added_step_s(load, k, 1) == pytest.approx(COST.row_s * 4 * (N - k))
    admitted = request()
    ones = replace(load, occupancy=2.0, recent_step_s=load.recent_step_s + p.added_step_s(load, k, 1))
    fives = replace(load, occupancy=2.0, recent_step_s=load.recent_step_s + p.added_step_s(load, k, 5))
    with_one, with_five = p.predict(admitted, k, ones)[1], p.predict(admitted, k, fives)[1]
    assert with_one < with_five
    sla = SLA(ttft_s=5.0, tpot_s=(with_one + with_five) / 2)  # kept beside one row, missed beside five
    s = InFlight(admitted, Admission(k, "dp", 0.1, 0.05, sla=sla), 0.0)
    newcomer = request(num_drafts=4)  # not measured yet: no gain promised, its rows counted all the same
    assert p.admitted_hold(request(), k, load, [s]) is None
    assert p.admitted_hold(newcomer, k, load, [s]) == Wait("admitting it would push an admitted session past its "
                                                           "TPOT bound")
    assert p.admitted_hold(newcomer, k, load, [s], server_decode=True) is None  # server decoded: no drafts


def test_drafted_sessions_are_planned_with_their_own_margin():
    p = policy()
    load = replace(BUSY_IDLE, drafted_tpot_error=3.0)
    assert p.tpot_error(drafted(), load) == 3.0 and p.tpot_error(request(), load) == 1.0
    assert p.tpot_error(drafted(), replace(load, decoded_tpot_error=2.0), server_decode=True) == 2.0
    bound = 0.08
    plain, fast = request(tpot=bound, client=PHONE), drafted(gamma=4, e=3.0, tpot=bound, client=PHONE)
    assert p.place(plain, load) == p.place(plain, BUSY_IDLE)  # the others' margin is untouched
    assert p.place(fast, load).server_work > p.place(fast, BUSY_IDLE).server_work  # a third of the bound: less offload


def test_server_decoding_never_drafts():
    p = policy()
    decoded = dict(server_decode=True)
    assert p.predict(drafted(**decoded), 0, IDLE, server_decode=True) == p.predict(
        request(**decoded), 0, IDLE, server_decode=True)
    assert drafted().step_rows(server_decode=True) == 1 and drafted().step_rows() == 5  # unmeasured: 1 + γ


def test_sla_scaling_and_the_measured_tokens_per_round_trip():
    assert per_round_trip(SLA(ttft_s=1.0, tpot_s=0.1), Drafting(4, 2.5)) == SLA(ttft_s=1.0, tpot_s=0.25)
    assert per_round_trip(SLA(ttft_s=1.0), Drafting(4, 2.5)) == SLA(ttft_s=1.0)
    assert expected_tokens_per_round_trip([3.0, 3.0]) is None  # too few: plan as without drafts
    assert expected_tokens_per_round_trip([3.0, 1.5, 4.0, 2.0]) == 2.0  # the low quantile
    assert measured_tokens_per_round_trip(output_tokens=31, answers=11) == 3.0  # after the prompt's answer
    assert measured_tokens_per_round_trip(output_tokens=1, answers=1) is None
    assert drafted(gamma=2, e=4.0).drafting == Drafting(2, 3.0)  # at most 1 + γ


def test_measured_rows_plan_the_round_trip_by_hand():
    k, e, r = 7, 2.5, 3.0  # 4 drafts granted, 2 sent on average
    p = policy()
    _, tpot, work = p.predict(drafted(e=e, rows_per_round_trip=r), k, IDLE)
    chord = CLIENT.decode_s + (max(CLIENT.decode_s, CLIENT.prefill_s_per_token * 5) - CLIENT.decode_s) * (r - 1) / 4
    round_trip = (k * chord  # the mean pass: half way from one row's pass to five rows'
                  + LAN.uplink_s(ROW * 3)  # 3 rows up on average
                  + (N - k) * (COST.layer_s + COST.row_s * r)  # the server's layers carry 3 rows
                  + COST.fixed_s + LAN.downlink_s(math.ceil(TOKEN_BYTES * e)))
    assert tpot == pytest.approx(round_trip / e, rel=1e-12)
    steps = 31 / e
    assert work == pytest.approx((N - k) * (COST.row_s * (40 + steps * r) + COST.layer_s * (1 + steps))
                                 + COST.fixed_s * (1 + steps), rel=1e-12)


def test_fewer_measured_rows_cost_the_server_and_the_others_less_and_unmeasured_is_the_bound():
    p, k = policy(), 7
    full, fewer, unmeasured = (drafted(rows_per_round_trip=5.0), drafted(rows_per_round_trip=3.0), drafted())
    assert [req.step_rows() for req in (full, fewer, unmeasured)] == [5.0, 3.0, 5.0]
    for load in (IDLE, ServerLoad(cost=COST, occupancy=2.0, recent_step_s=COST.step_s(N, 2 * N), utilization=0.3)):
        assert p.predict(unmeasured, k, load) == p.predict(full, k, load)  # before r̄ is measured: 1 + γ, as before
        assert p.predict(fewer, k, load)[2] < p.predict(full, k, load)[2]  # fewer rows: less server work
    assert p.predict(fewer, k, IDLE)[1] < p.predict(full, k, IDLE)[1]  # and a shorter round trip
    assert p.place(unmeasured, BUSY_IDLE) == p.place(full, BUSY_IDLE)
    assert request_graph(p.graph_inputs(full), IDLE, CLIENT, drafting=Drafting(4, 2.5)) == request_graph(
        p.graph_inputs(full), IDLE, CLIENT, drafting=Drafting(4, 2.5, 5.0))
    load = ServerLoad(cost=COST, occupancy=1.0, recent_step_s=COST.step_s(N, N), utilization=0.3)
    assert p.added_step_s(load, k, fewer.step_rows()) < p.added_step_s(load, k, full.step_rows())
    # as in test_a_drafted_newcomer_adds_its_rows...: held at 1 + γ rows, not where its type sends one
    admitted = request()
    ones = replace(load, occupancy=2.0, recent_step_s=load.recent_step_s + p.added_step_s(load, k, 1))
    fives = replace(load, occupancy=2.0, recent_step_s=load.recent_step_s + p.added_step_s(load, k, 5))
    sla = SLA(ttft_s=5.0, tpot_s=(p.predict(admitted, k, ones)[1] + p.predict(admitted, k, fives)[1]) / 2)
    s = InFlight(admitted, Admission(k, "dp", 0.1, 0.05, sla=sla), 0.0)
    assert isinstance(p.admitted_hold(request(num_drafts=4), k, load, [s]), Wait)
    assert p.admitted_hold(request(num_drafts=4, rows_per_round_trip=1.0), k, load, [s]) is None


def test_the_client_pass_is_the_mean_pass_bounded_by_the_chord():
    one, full = CLIENT.pass_s(1), CLIENT.pass_s(5)
    assert CLIENT.round_trip_pass_s(None) == one and CLIENT.round_trip_pass_s(Drafting(4, 2.5)) == full
    mid = CLIENT.round_trip_pass_s(Drafting(4, 2.5, 3.0))
    assert CLIENT.pass_s(3.0) < mid < full  # above the pass at r̄ (convex), below the full pass
    assert mid == pytest.approx((one + full) / 2)  # half the round trips send all 4 drafts, half none
    assert CLIENT.round_trip_pass_s(Drafting(4, 1.0, 1.0)) == one


@pytest.mark.parametrize("rows, tokens, gamma, planned", [
    (100.0, 2.5, 4, 5.0),  # above 1 + γ (another grant's, or odd): the most it may send
    (1.0, 2.5, 4, 2.5),  # below its tokens per round trip: at least one row per token
    (1.0, None, 4, 1.0),  # acceptance unmeasured: one row, never fewer
    (3.0, None, 0, 1.0),  # no drafts: one row
])
def test_planned_rows_stay_within_one_and_one_plus_gamma(rows, tokens, gamma, planned):
    req = request(num_drafts=gamma, tokens_per_round_trip=tokens, rows_per_round_trip=rows)
    assert req.step_rows() == planned and req.step_rows(server_decode=True) == 1.0
    if req.drafting is not None:
        assert req.drafting.rows == planned and 1 <= req.drafting.rows <= 1 + gamma


def test_the_measured_share_of_drafts_sent_and_the_rows_planned_from_it():
    assert measured_draft_fill(decode_rows=30, answers=11, num_drafts=4) == 0.5  # 3 rows per round trip
    assert measured_draft_fill(decode_rows=50, answers=11, num_drafts=4) == 1.0  # every draft sent
    for odd in (dict(decode_rows=30, answers=0), dict(decode_rows=30, answers=1), dict(decode_rows=0, answers=-3)):
        assert measured_draft_fill(num_drafts=4, **odd) is None  # no decode round trip to measure
    assert measured_draft_fill(decode_rows=500, answers=11, num_drafts=4) == 1.0  # at most every draft
    assert measured_draft_fill(decode_rows=0, answers=11, num_drafts=4) == 0.0  # at least the last token's row
    assert expected_rows_per_round_trip([0.5, 0.5], 4) is None  # too few: plan at 1 + γ
    assert expected_rows_per_round_trip([0.5, 0.25, 1.0, 0.75], 4) == 4.0  # the high quantile: 0.75 of 4 drafts
    assert expected_rows_per_round_trip([0.0, 0.25, 0.5], 4) == 3.0  # three: the most
    assert expected_rows_per_round_trip([0.5, 0.5, 0.5], 2) == 2.0  # a share: 1 of 2 drafts for a grant of 2
    assert expected_rows_per_round_trip([0.0, 0.0, 0.0, float("nan"), 7.0], 4) == 1.0  # odd values are left out


@pytest.mark.parametrize("make, match", [
    (lambda: Drafting(4, 2.5, 2.0), r"Drafting.rows_per_round_trip: expected None or a number in \[2.5, 5\]"),
    (lambda: Drafting(4, 2.5, 5.5), r"rows_per_round_trip: expected None or a number in \[2.5, 5\] .* got 5.5"),
    (lambda: request(num_drafts=2, rows_per_round_trip=0.0), r"rows_per_round_trip: expected None or a number >= 1"),
    (lambda: request(num_drafts=2, rows_per_round_trip=float("nan")), r"rows_per_round_trip: expected None or a"),
    (lambda: Drafting(0, 1.0), r"Drafting.num_drafts: expected an int >= 1, got 0"),
    (lambda: Drafting(4, 5.5), r"Drafting.tokens_per_round_trip: expected a number in \[1, 5\] .* got 5.5"),
    (lambda: Drafting(4, 0.5), r"expected a number in \[1, 5\]"),
    (lambda: request(num_drafts=-1), r"AdmissionRequest.num_drafts: expected an int >= 0"),
    (lambda: request(num_drafts=2, u_shape=True), r"and 0 for a U request"),
    (lambda: request(num_drafts=2, tokens_per_round_trip=0.5), r"tokens_per_round_trip: expected None or a number >= 1"),
    (lambda: request(request_type=3), r"AdmissionRequest.request_type: expected a string, got 3"),
])
def test_bad_drafting_inputs_are_refused(make, match):
    with pytest.raises((DraftingError, AdmissionInputError), match=match):
        make()
