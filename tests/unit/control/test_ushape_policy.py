"""The admission policy's U shapes: the planner's U-shape DP on the request's graph with the
head on the client and the layer-m download in the cost; the choice of (k, m) against the
load, the SLA, the privacy floor and the client's memory bound (pure, no engine)."""
from __future__ import annotations

from dataclasses import replace

import pytest

from tests.unit.control.test_policy import COST, FAST, IDLE, LAN, N, SLOW, busy, decide, policy, request
from vllm_split.control.policy import Admission, AdmissionInputError, Refusal, Wait
from vllm_split.control.request_graph import ClientCosts
from vllm_split.control.ushape_policy import u_graph, u_layers_of, u_placement
from vllm_split.planner import SLA, NetworkSpec, Shape, enumerate_placements, evaluate
from vllm_split.wire.contract import ErrorCode


PHONE = ClientCosts(prefill_s_per_token=4e-4, decode_s=8e-3)  # a slow client: the server must run many layers


def u_request(**fields):
    return request(u_shape=True, **fields)


def test_idle_server_takes_the_least_offloaded_u():
    a = decide(policy(), u_request(), IDLE)
    assert isinstance(a, Admission) and (a.split_layer, a.return_layer, a.placement) == (0, N, "least_offload")
    assert a.predicted_tpot_s <= 0.3 and a.server_work > 0


def test_busy_server_takes_the_dps_least_server_work_u_and_it_is_the_brute_force_optimum():
    p, load = policy(), busy(4)
    req = u_request(tpot=0.25, client=PHONE)
    a = decide(p, req, load)
    assert isinstance(a, Admission) and a.placement == "dp" and a.split_layer < a.return_layer < N
    assert a.predicted_tpot_s <= 0.25
    # brute force over every U placement of the graph (the planner's own enumeration)
    from vllm_split.control.measured_load import calibrated

    graph = u_graph(p, req, load, PHONE, wait_s=load.recent_step_s)
    sla = calibrated(req.sla, load.tpot_error, load.ttft_error)
    served = []
    for placement in enumerate_placements(graph.num_nodes, Shape.U):
        layers = u_layers_of(placement)
        ttft, tpot, e2e, work = evaluate(graph, LAN, placement)
        if layers is not None and sla.is_met(ttft, tpot, e2e):
            served.append((work, layers))
    best_work = min(w for w, _ in served)
    chosen = evaluate(graph, LAN, u_placement(a.split_layer, a.return_layer, N))[3]
    assert chosen <= best_work * 1.02  # the DP's ticks round latencies: within 2 %
    assert a.return_layer - a.split_layer < N  # offloads: the server runs fewer than all layers


def test_the_download_of_the_layer_m_state_is_in_the_cost():
    """On a slow downlink the whole prompt's layer-m rows cost TTFT: a U predicts more than
    the same (k, m) on a fast link, by at least the rows' transfer time."""
    p = policy()
    slow = NetworkSpec(uplink_bps=1e9, downlink_bps=1e6, rtt_s=0.002)
    req = u_request(split_layer=3, return_layer=20)
    fast_ttft = p.fixed(req, IDLE).predicted_ttft_s
    slow_ttft = p.fixed(replace(req, network=slow), IDLE).predicted_ttft_s
    assert slow_ttft - fast_ttft >= 8 * 40 * 576 * 4 / 1e6 * 0.99  # 40 prompt rows of 576 float32 down


def test_privacy_floor_bounds_k_and_the_memory_bound_counts_both_ends():
    a = decide(policy(), u_request(privacy_floor=9), busy(4))
    assert isinstance(a, Admission) and a.split_layer >= 9
    bounded = u_request(client=replace(FAST, max_layers=6))
    b = decide(policy(), bounded, busy(4))
    assert isinstance(b, Admission) and b.split_layer + N - b.return_layer <= 6
    none_fit = u_request(client=replace(FAST, max_layers=2), privacy_floor=5)
    r = decide(policy(), none_fit, busy(4))
    assert isinstance(r, Refusal) and r.code == ErrorCode.BAD_REQUEST and "holds at most 2 decoder layers" in r.message


def test_a_client_fast_enough_for_the_whole_model_gets_the_u_with_the_least_server_work():
    """The DP's optimum is then every node on the client, which is no session: the scan's
    least-work U that the server can serve takes its place (one server layer)."""
    a = decide(policy(), u_request(tpot=0.25), busy(4))
    assert isinstance(a, Admission) and a.placement == "u_scan" and a.return_layer - a.split_layer == 1


def test_a_u_that_holds_only_on_a_less_loaded_server_waits():
    assert decide(policy(), u_request(tpot=0.12), busy(8)) == Wait("the SLA cannot be met at the current load")


def test_fixed_u_is_admitted_there_or_refused_above_the_memory_bound():
    a = policy().fixed(u_request(split_layer=4, return_layer=25), IDLE)
    assert isinstance(a, Admission) and (a.split_layer, a.return_layer, a.placement) == (4, 25, "fixed")
    r = policy().fixed(u_request(split_layer=4, return_layer=25, client=replace(FAST, max_layers=5)), IDLE)
    assert isinstance(r, Refusal) and r.code == ErrorCode.BAD_REQUEST and "needs 9 decoder layers" in r.message
    below = policy(privacy_floor=6).fixed(u_request(split_layer=4, return_layer=25), IDLE)
    assert isinstance(below, Refusal) and below.code == ErrorCode.SPLIT_LAYER


def test_an_unreachable_sla_is_refused_naming_the_best_u():
    r = decide(policy(), u_request(client=SLOW, tpot=0.05), IDLE)
    assert isinstance(r, Refusal) and r.code == ErrorCode.SLA_UNREACHABLE and "no U shape meets the SLA" in r.message


def test_return_layer_needs_a_u_request_with_a_lower_split_layer():
    with pytest.raises(AdmissionInputError, match="return_layer 5"):
        request(split_layer=7, return_layer=5, u_shape=True)
    with pytest.raises(AdmissionInputError, match="return_layer 5"):
        request(split_layer=2, return_layer=5)


def test_prefix_requests_are_unchanged():
    assert COST.layer_s > 0  # the same fixtures as test_policy
    a = decide(policy(), request(), IDLE)
    assert a.return_layer is None
