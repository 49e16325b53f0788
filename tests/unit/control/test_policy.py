"""The pure admission policy: decisions from a plain request, a fabricated load and the
admitted sessions, without asyncio, an engine or wire frames."""
import subprocess
import sys

import pytest

from dataclasses import replace

from vllm_split.control.live_cost import LiveCostModel, StepCost
from vllm_split.control.measured_load import server_load
from vllm_split.control.policy import (Admission, AdmissionInputError, AdmissionPolicy, AdmissionRequest, ClientFlops, InFlight, Refusal, Wait, retry_after_s)
from vllm_split.control.request_graph import ClientCosts, ServerLoad, busy_fraction, request_graph, split_layer_of
from vllm_split.planner import SLA, SMOLLM2_135M, NetworkSpec, greedy
from vllm_split.wire.contract import ErrorCode, StepRecord

LAN = NetworkSpec(uplink_bps=1e9, downlink_bps=1e9, rtt_s=0.002)
COST = StepCost(fixed_s=0.012, layer_s=0.0018, row_s=6e-5)
N = SMOLLM2_135M.num_hidden_layers
FAST = ClientCosts(prefill_s_per_token=2e-5, decode_s=4e-4)
SLOW = ClientCosts(prefill_s_per_token=0.01, decode_s=1.0)  # too slow for any round trip
IDLE = ServerLoad(cost=COST, occupancy=0.0, recent_step_s=0.0, utilization=0.0)


def busy(requests: int) -> ServerLoad:
    step = COST.step_s(N, N * requests)
    return ServerLoad(cost=COST, occupancy=float(requests), recent_step_s=step, utilization=0.95)


def policy(**options) -> AdmissionPolicy:
    return AdmissionPolicy(model=SMOLLM2_135M, hidden_bytes=576 * 4, **options)


def request(tpot=0.3, **fields) -> AdmissionRequest:
    base = dict(prompt_tokens=40, expected_output_tokens=32, sla=SLA(ttft_s=5.0, tpot_s=tpot), client=FAST, network=LAN)
    return AdmissionRequest(**{**base, **fields})


def decide(p: AdmissionPolicy, req: AdmissionRequest, load: ServerLoad, inflight=()):
    return p.decide(req, p.place(req, load), load=load, inflight=inflight)


def test_policy_imports_without_vllm_or_asyncio():
    code = ("import sys; sys.modules['vllm'] = None; sys.modules['asyncio'] = None; sys.modules['torch'] = None; "
            "import vllm_split.control.policy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_idle_server_runs_it_all_and_holds_it_to_the_default_sla():
    p = policy()
    a = decide(p, request(sla=None), IDLE)
    assert isinstance(a, Admission) and (a.split_layer, a.placement) == (0, "server_only")
    assert a.sla == p.default_sla and a.predicted_tpot_s <= p.default_sla.tpot_s and a.server_work > 0


def test_busy_server_waits_when_the_sla_holds_only_on_a_less_loaded_one():
    assert decide(policy(), request(tpot=0.04), busy(8)) == Wait("the SLA cannot be met at the current load")


def test_full_slots_and_an_admitted_sessions_bound_make_it_wait():
    p = policy(max_num_seqs=1)
    first = decide(p, request(), IDLE)
    admitted = [InFlight(request(), first, admitted_at=0.0)]
    assert decide(p, request(), IDLE, admitted) == Wait("all 1 request slots of the engine are taken")
    load = busy(1)  # the admitted session runs and meets its bound; the newcomer would make two
    now_tpot = p.predict(request(), first.split_layer, load)[1]
    tight = Admission(first.split_layer, first.placement, first.predicted_ttft_s, first.predicted_tpot_s,
                      sla=SLA(ttft_s=5.0, tpot_s=now_tpot * 1.0001))
    assert decide(policy(), request(), load, [InFlight(request(), tight, 0.0)]) == Wait(
        "admitting it would push an admitted session past its TPOT bound")


def admitted_at(k: int, tpot_bound: float) -> InFlight:
    return InFlight(request(), Admission(k, "dp", 0.1, 0.05, sla=SLA(ttft_s=5.0, tpot_s=tpot_bound)), 0.0)


def test_a_session_over_its_bound_already_does_not_hold_the_newcomer_back():
    p, load = policy(), busy(4)
    over = admitted_at(0, p.predict(request(), 0, load)[1] * 0.9)  # misses its bound with or without the newcomer
    assert p.first_pushed_past_bound(load, [over], split_layer=0) is None
    assert isinstance(decide(p, request(), load, [over]), Admission)


def test_the_newcomer_is_weighed_by_the_step_time_its_split_layer_adds():
    p = policy()
    # two requests per step, the lowest at k = 20: the steps run layers [20, 30)
    load = ServerLoad(cost=COST, occupancy=2.0, recent_step_s=COST.step_s(10, 20), utilization=0.95, min_split_layer=20)
    assert p.added_step_s(load, 20) == pytest.approx(COST.row_s * 10)  # one row through the layers that run anyway
    assert p.added_step_s(load, 0) == pytest.approx(COST.row_s * 30 + COST.layer_s * 20)  # and 20 more layer calls
    assert p.added_step_s(load, 25) == pytest.approx(COST.row_s * 5)

    def joined(k):
        return replace(load, occupancy=3.0, recent_step_s=load.recent_step_s + p.added_step_s(load, k))
    now, at20, at0 = (p.predict(request(), 20, x)[1] for x in (load, joined(20), joined(0)))
    assert now < at20 < at0
    session = admitted_at(20, (at20 + at0) / 2)  # room for a newcomer at k = 20, not for one at k = 0
    assert p.first_pushed_past_bound(load, [session], split_layer=20) is None
    assert p.first_pushed_past_bound(load, [session], split_layer=0) is session
    no_sla = InFlight(request(), Admission(20, "fixed", None, None), 0.0)  # nothing to hold it to
    assert p.first_pushed_past_bound(load, [no_sla, session], split_layer=0) is session


def test_least_offload_starts_at_the_running_steps_lowest_split_layer():
    p = policy()
    spare = ServerLoad(cost=COST, occupancy=1.0, recent_step_s=COST.step_s(18, 18), utilization=0.1, min_split_layer=12)
    placed = p.place(request(tpot=0.15), spare)  # k = 0 meets the SLA too, but would add 12 layer calls to each step
    assert (placed.method, split_layer_of(placed.placement)) == ("least_offload", 12)
    plain = p.place(request(tpot=0.15), replace(spare, min_split_layer=0))  # ordinary requests run every layer
    assert (plain.method, split_layer_of(plain.placement)) == ("least_offload", 0)
    # a slow client cannot meet the SLA from k = 12 up: the DP places it lower
    slow = p.place(request(tpot=0.15, client=ClientCosts(prefill_s_per_token=2e-5, decode_s=5e-3)), spare)
    assert slow.feasible and slow.method == "dp" and split_layer_of(slow.placement) < 12


def test_server_load_measures_the_batch_and_adds_only_the_unmeasured_admissions():
    costs = LiveCostModel(occupancy_window_s=2.0)
    costs.cost = COST
    # four split sessions, each in every other step: two requests per step, the lowest at k = 12
    costs.add(StepRecord(i + 1, 1000.0 - 1.9 + i * 0.1, COST.step_s(18, 36), 18, 36, 2, 2) for i in range(20))
    long_ago = [30.0] * 4
    load = server_load(costs, admitted_ages_s=long_ago, num_layers=N, now=1000.0)
    assert load.occupancy == pytest.approx(2.0) and load.min_split_layer == 12  # not the 4 admitted
    assert load.recent_step_s == pytest.approx(COST.step_s(18, 36))
    # just admitted: not measured at all; admitted half a window ago: half measured
    fresh = server_load(costs, admitted_ages_s=long_ago + [0.0, 1.0], num_layers=N, now=1000.0)
    assert fresh.occupancy == pytest.approx(2.0 + 1.0 + 0.5)
    idle = server_load(costs, admitted_ages_s=[0.0], num_layers=N, now=5000.0)  # admitted, no step ran lately
    assert (idle.occupancy, idle.min_split_layer) == (1.0, 0)
    assert idle.recent_step_s == pytest.approx(COST.step_s(N, N))


def test_unreachable_sla_and_an_unplannable_request_are_refused_without_retry_hint():
    refusal = decide(policy(), request(tpot=0.001), IDLE)
    assert isinstance(refusal, Refusal) and refusal.code == ErrorCode.SLA_UNREACHABLE and refusal.retry_after_s is None
    assert "TPOT <= 0.001 s" in refusal.message and "best this client can get" in refusal.message
    assert decide(policy(), request(client=None), IDLE).code == ErrorCode.BAD_REQUEST


def test_greedy_placement_is_the_planners_rule_from_min_layer():
    p = policy(placement="greedy", min_layer=3)
    req, load = request(tpot=0.2), busy(8)
    placed = p.place(req, load)
    graph = request_graph(p.graph_inputs(req), load, FAST, wait_s=busy_fraction(load) * load.recent_step_s)
    assert placed == greedy(graph, LAN, req.sla, client_prefix=4)
    assert placed.method == "greedy" and split_layer_of(placed.placement) >= 3


def test_fixed_split_layer_is_predicted_and_held_only_to_a_stated_sla():
    a = policy().fixed(request(split_layer=12, sla=None), busy(4))
    assert (a.split_layer, a.placement, a.sla) == (12, "fixed", None) and a.predicted_tpot_s > 0
    blind = policy().fixed(request(split_layer=12, client=None), IDLE)
    assert (blind.predicted_ttft_s, blind.predicted_tpot_s) == (None, None)


def test_a_declared_flops_client_is_planned_with_the_models_layer_times():
    p = policy()
    declared = p.fixed(request(split_layer=12, client=ClientFlops(1e11)), busy(4))
    timed = p.fixed(request(split_layer=12, client=ClientCosts.from_flops(1e11, SMOLLM2_135M)), busy(4))
    assert declared == timed and declared.predicted_tpot_s > 0


def test_retry_hint_is_when_the_first_admitted_session_ends():
    a = Admission(0, "server_only", predicted_ttft_s=0.5, predicted_tpot_s=0.1)
    inflight = [InFlight(request(), a, admitted_at=100.0), InFlight(request(expected_output_tokens=2), a, 100.0)]
    assert retry_after_s(inflight, now=100.0) == 0.6  # 0.5 + (2 - 1) * 0.1
    assert retry_after_s(inflight, now=103.9) == 0.5 and retry_after_s([], now=0.0) == 1.0


def test_bad_request_descriptions_and_options_name_the_value():
    with pytest.raises(AdmissionInputError, match=r"prompt_tokens: expected an int >= 1, got 0"):
        request(prompt_tokens=0)
    with pytest.raises(AdmissionInputError, match=r"split_layer: expected None or an int >= 0, got -1"):
        request(split_layer=-1)
    with pytest.raises(AdmissionInputError, match=r"min_layer: expected an int in \[0, 30\] .* got 31"):
        policy(min_layer=31)
    with pytest.raises(AdmissionInputError, match=r"placement: expected one of \['dp', 'greedy'\], got 'best'"):
        policy(placement="best")


def test_gather_window_lifts_the_missed_step_from_predictions_and_plans():
    # a busy server (step about 0.2 s): without gathering, a k = 0 client on the LAN misses
    # the step in progress and waits most of one; the gather window waits for it instead
    load = busy(8)
    off, on = policy(), policy(gather_max_s=0.025)
    thin = replace(FAST, max_layers=0)  # holds no layer: k = 0 only
    req = request(tpot=0.3, client=thin)
    _, tpot_off, _ = off.predict(req, 0, load)
    _, tpot_on, _ = on.predict(req, 0, load)
    assert tpot_off - tpot_on == pytest.approx(load.recent_step_s - on.turnaround_s(req, thin, 0), rel=1e-6)
    assert on.gather_s(load) == 0.025 and on.gather_s(IDLE) == 0.0
    # a bound only the gathered placements meet: admitted with the window, waits without it
    bound = (tpot_on + tpot_off) / 2
    assert decide(off, request(tpot=bound, client=thin), load) == Wait("the SLA cannot be met at the current load")
    a = decide(on, request(tpot=bound, client=thin), load)
    assert isinstance(a, Admission) and a.split_layer == 0 and a.predicted_tpot_s <= bound


def test_gathered_split_layers_stop_where_the_turnaround_outgrows_the_window():
    p = policy(gather_max_s=0.025)
    load = busy(8)
    slow = ClientCosts(prefill_s_per_token=2e-5, decode_s=0.004)  # 4 ms per layer: about 5 layers fit in 25 ms
    k = p._gathered_split_layer(request(client=slow), slow, load)
    assert p.turnaround_s(request(client=slow), slow, k) <= 0.025 < p.turnaround_s(request(client=slow), slow, k + 1)
    assert p._gathered_split_layer(request(client=replace(slow, max_layers=2)), replace(slow, max_layers=2), load) == 2
    assert p._gathered_split_layer(request(), FAST, IDLE) is None  # nobody runs: no step to wait for
    with pytest.raises(AdmissionInputError, match="gather_max_s"):
        policy(gather_max_s=-1)


def test_layers_the_running_steps_run_anyway_save_only_rows_and_still_cost_their_time():
    # others run at k_min = 0: every layer runs in the step whatever this request keeps on
    # its client, so offloading k layers adds the client's time and saves only its rows
    p, req = policy(), request()
    steps = ServerLoad(cost=COST, occupancy=4.0, recent_step_s=0.0, utilization=0.9, min_split_layer=0)
    ttft0, tpot0, work0 = p.predict(req, 0, steps)
    ttft10, tpot10, work10 = p.predict(req, 10, steps)
    assert tpot10 - tpot0 == pytest.approx(10 * (FAST.decode_s - COST.row_s), rel=1e-6)
    rows = req.prompt_tokens + req.expected_output_tokens - 1
    assert work0 - work10 == pytest.approx(10 * COST.row_s * rows, rel=1e-6)
    # the running steps start at layer 20: layers below it leave the step with this request
    high = replace(steps, min_split_layer=20)
    _, tpot_h, work_h = p.predict(req, 10, high)
    assert tpot_h < tpot10 and p.predict(req, 0, high)[2] - work_h > 10 * COST.row_s * rows
    # an idle server runs only this request's layers: each one offloaded saves its call
    _, tpot_i, _ = p.predict(req, 10, replace(steps, occupancy=0.0))
    assert tpot_i < tpot10


# ---------------------------------------------------------------- server decoding at k = 0
def test_an_offer_of_server_decoding_turns_k0_into_it_with_no_round_trip_in_the_tpot():
    p, load = policy(), busy(2)
    per_token = p.predict(request(), 0, load)
    decoded = p.predict(request(server_decode=True), 0, load, server_decode=True)
    assert decoded[2] == pytest.approx(per_token[2])  # the same server work
    assert decoded[1] == pytest.approx(COST.step_s(N, 3 * N))  # one step with it in: no wait, no network
    assert decoded[1] < per_token[1]
    spare = replace(load, utilization=0.1)
    a = decide(p, request(server_decode=True), spare)
    assert isinstance(a, Admission) and (a.split_layer, a.placement, a.server_decode) == (0, "server_only", True)
    assert a.predicted_tpot_s == pytest.approx(decoded[1])
    assert not decide(p, request(), spare).server_decode  # not offered: activations per token


def test_under_load_the_dp_still_offloads_and_takes_server_decoding_when_only_it_meets_the_sla():
    p, load = policy(), busy(4)
    offloads = decide(p, request(server_decode=True), load)
    assert offloads.split_layer > 0 and not offloads.server_decode  # less server work meets the SLA
    decoded_tpot = p.predict(request(server_decode=True), 0, load, server_decode=True)[1]
    tight = request(tpot=decoded_tpot * 1.01, server_decode=True)
    assert isinstance(decide(p, replace(tight, server_decode=False), load), Wait)  # no placement with round trips
    a = decide(p, tight, load)
    assert isinstance(a, Admission) and (a.split_layer, a.server_decode) == (0, True)


def test_server_decoding_needs_k0_and_a_server_that_holds_layer_0():
    p = policy()
    assert p.fixed(request(split_layer=0, server_decode=True), IDLE).server_decode
    assert not p.fixed(request(split_layer=7, server_decode=True), IDLE).server_decode
    assert p.fixed(request(split_layer=0, server_decode=True, client=None), IDLE).server_decode  # no profile: no prediction
    high = policy(min_layer=4)
    assert not high.server_decodes(request(server_decode=True), 0)
    a = decide(high, request(server_decode=True), IDLE)
    assert a.split_layer >= 4 and not a.server_decode


def test_an_admitted_server_decoded_session_is_weighed_by_its_own_tpot():
    p, load = policy(), busy(2)
    decoded_now = p.predict(request(server_decode=True), 0, load, server_decode=True)[1]
    session = InFlight(request(server_decode=True),
                       Admission(0, "server_only", 0.1, decoded_now, sla=SLA(ttft_s=5.0, tpot_s=decoded_now * 1.0001),
                                 server_decode=True), 0.0)
    assert p.first_pushed_past_bound(load, [session], split_layer=0) is session
    # weighed as a session with a round trip per token it would be over its bound already
    per_token = InFlight(session.request, replace(session.admission, server_decode=False), 0.0)
    assert p.first_pushed_past_bound(load, [per_token], split_layer=0) is None


# ---------------------------------------------------------------- the model's measured error
def test_tpot_error_is_a_high_quantile_of_the_ratios_within_bounds():
    from vllm_split.control.measured_load import TPOT_ERROR_MAX, calibrated, model_error as tpot_error

    tight = calibrated(SLA(ttft_s=2.0, tpot_s=0.3), 1.5, 2.0)
    assert (tight.ttft_s, tight.tpot_s) == (pytest.approx(1.0), pytest.approx(0.2))
    assert calibrated(SLA(tpot_s=0.3), 0.5) == SLA(tpot_s=0.3)  # never loosened

    assert tpot_error([2.0] * 4) == 1.0  # too few to say
    assert tpot_error([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7]) == pytest.approx(1.6)  # the 75% quantile
    assert tpot_error([0.5] * 10) == 1.0  # a pessimistic model is not made optimistic
    assert tpot_error([9.0] * 10) == TPOT_ERROR_MAX


def test_a_measured_error_plans_round_trips_with_a_margin_and_leaves_server_decoding_alone():
    p, load = policy(), busy(4)
    edge = decide(p, request(), load)  # the DP's placement on the model as it is
    assert isinstance(edge, Admission) and edge.split_layer > 0
    bound = edge.predicted_tpot_s * 1.05  # a bound the placement meets by 5% on the model
    req = request(tpot=bound)
    assert isinstance(decide(p, req, load), Admission)
    erring = replace(load, tpot_error=1.3)  # the model was 30% optimistic lately
    assert isinstance(decide(p, req, erring), Wait)  # no placement with round trips meets bound / 1.3
    decoded = decide(p, replace(req, server_decode=True), erring)
    assert isinstance(decoded, Admission) and decoded.server_decode  # no round trip: its own error (none)
    assert decoded.predicted_tpot_s <= bound


def test_the_server_decoded_error_makes_a_newcomer_wait_at_saturation():
    p, load = policy(), busy(4)
    decoded = decide(p, request(server_decode=True, tpot=1.0, client=SLOW), load)
    assert isinstance(decoded, Admission) and decoded.server_decode
    bound = decoded.predicted_tpot_s * 1.2  # met by 20% on the model
    req = request(server_decode=True, tpot=bound, client=ClientCosts(prefill_s_per_token=0.01, decode_s=1.0))
    assert isinstance(decide(p, req, load), Admission)
    assert isinstance(decide(p, req, replace(load, tpot_error=1.5)), Admission)  # the round trips' error: not its
    saturated = replace(load, decoded_tpot_error=1.5)  # server-decoded sessions ran 50% slower than predicted
    assert isinstance(decide(p, req, saturated), Wait)
    assert isinstance(decide(p, req, replace(load, decoded_tpot_error=1.1)), Admission)


def test_an_admitted_session_is_protected_on_its_calibrated_prediction():
    p, load = policy(), busy(4)
    admitted = decide(p, request(server_decode=True, tpot=1.0, client=SLOW), load)
    assert admitted.server_decode
    inflight = InFlight(request(server_decode=True, tpot=1.0, client=SLOW), admitted, 0.0)
    tpot = admitted.predicted_tpot_s
    joined = p.predict(inflight.request, 0, replace(load, occupancy=load.occupancy + 1.0,
                       recent_step_s=load.recent_step_s + p.added_step_s(load, 0)), server_decode=True)[1]
    edge = replace(admitted, sla=SLA(ttft_s=10.0, tpot_s=(tpot + joined) / 2 * 1.5))  # met only on the model x 1.5
    guarded = InFlight(inflight.request, edge, 0.0)
    assert p.first_pushed_past_bound(load, [guarded], split_layer=0) is None  # on the model: far from its bound
    assert p.first_pushed_past_bound(replace(load, decoded_tpot_error=1.5), [guarded], split_layer=0) is guarded


def test_a_measured_ttft_error_tightens_the_ttft_bound_of_round_trip_placements():
    p, load = policy(), busy(4)
    edge = decide(p, request(), load)  # k = 30: the client's prefill of every layer
    req = next(r for f in (1.2, 1.5, 2.0, 3.0) if isinstance(
        decide(p, r := request(sla=SLA(ttft_s=edge.predicted_ttft_s * f, tpot_s=1.0)), load), Admission))
    admitted = decide(p, req, load)
    placed = decide(p, req, replace(load, ttft_error=1.3))  # the TTFT model was 30% optimistic lately
    assert isinstance(placed, Wait) or placed.split_layer < admitted.split_layer


def test_an_offload_saving_too_little_gives_way_to_server_decoding():
    load = busy(4)
    offloaded = decide(policy(min_offload_saving=0.0), request(server_decode=True), load)
    decoded_work = policy().predict(request(server_decode=True), 0, load, server_decode=True)[2]
    saving = 1 - offloaded.server_work / decoded_work
    assert offloaded.split_layer > 0 and 0 < saving < 0.98
    below = decide(policy(min_offload_saving=round(saving + 0.01, 3)), request(server_decode=True), load)
    assert (below.split_layer, below.server_decode) == (0, True)
    above = decide(policy(min_offload_saving=round(saving - 0.01, 3)), request(server_decode=True), load)
    assert above.split_layer == offloaded.split_layer and not above.server_decode
    assert not decide(policy(min_offload_saving=0.99), request(), load).server_decode  # not offered: the DP's
    with pytest.raises(AdmissionInputError, match="min_offload_saving"):
        policy(min_offload_saving=1.0)
