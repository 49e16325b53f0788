"""The pure admission policy: decisions from a plain request, a fabricated load and the
admitted sessions, without asyncio, an engine or wire frames."""
import subprocess
import sys

import pytest

from vllm_split.control.live_cost import StepCost
from vllm_split.control.policy import (Admission, AdmissionInputError, AdmissionPolicy, AdmissionRequest, ClientFlops,
                                       InFlight, Refusal, Wait, retry_after_s)
from vllm_split.control.request_graph import ClientCosts, ServerLoad, busy_fraction, request_graph, split_layer_of
from vllm_split.planner import SLA, SMOLLM2_135M, NetworkSpec, greedy
from vllm_split.wire.contract import ErrorCode

LAN = NetworkSpec(uplink_bps=1e9, downlink_bps=1e9, rtt_s=0.002)
COST = StepCost(fixed_s=0.012, layer_s=0.0018, row_s=6e-5)
N = SMOLLM2_135M.num_hidden_layers
FAST = ClientCosts(prefill_s_per_token=2e-5, decode_s=4e-4)
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
    tight = Admission(first.split_layer, first.placement, first.predicted_ttft_s, first.predicted_tpot_s,
                      sla=SLA(ttft_s=5.0, tpot_s=first.predicted_tpot_s * 1.0001))
    load = busy(1)  # the admitted session runs; the newcomer would make two
    assert decide(policy(), request(), load, [InFlight(request(), tight, 0.0)]) == Wait(
        "admitting it would push an admitted session past its TPOT bound")


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
