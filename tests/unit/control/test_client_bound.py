"""The client's memory bound (``ClientProfile.max_layers``): no planner places a client layer
at or above it, a fixed split layer above it is refused, and a refusal says when the bound is
what stops the SLA (no engine)."""
from dataclasses import replace

import pytest

from tests.unit.control.test_policy import FAST, IDLE, LAN, N, busy, policy, request
from vllm_split.api.admission import AdmissionController, AdmissionRefused, request_from_open
from vllm_split.api.metrics import split_metrics
from vllm_split.control.policy import Admission, AdmissionInputError, ClientFlops, Refusal
from vllm_split.control.request_graph import ClientCosts, placement_for, request_graph, split_layer_of
from vllm_split.planner import SMOLLM2_135M, result_for
from vllm_split.wire import protocol as wire
from vllm_split.wire.contract import ErrorCode


def bounded(max_layers: int | None) -> ClientCosts:
    return replace(FAST, max_layers=max_layers)


def feasible_split_layers(client: ClientCosts) -> list[int]:
    p, req, load = policy(), request(client=client), busy(8)
    graph = request_graph(p.graph_inputs(req), load, client)
    return [k for k in range(N + 1)
            if result_for(graph, LAN, req.sla, placement_for(k, N), method="scan").feasible]


@pytest.mark.parametrize("bound", [0, 1, 10, 29, 30])
def test_every_split_layer_above_the_bound_is_infeasible_and_none_below_it_changes(bound):
    unbounded = feasible_split_layers(FAST)
    assert len(unbounded) > 20  # the SLA leaves room: the bound is what removes placements
    assert feasible_split_layers(bounded(bound)) == [k for k in unbounded if k <= bound]


@pytest.mark.parametrize("placement", ["dp", "greedy"])
def test_dp_and_greedy_never_place_a_client_layer_above_the_bound(placement):
    p = policy(placement=placement)
    chosen = {}
    for tpot in (0.3, 0.1, 0.06):
        for bound in range(N + 1):
            placed = p.place(request(tpot=tpot, client=bounded(bound)), busy(8))
            if isinstance(placed, Refusal):
                assert placed.code == ErrorCode.SLA_UNREACHABLE
                continue
            assert split_layer_of(placed.placement) <= bound, (tpot, bound, placed)
            chosen[tpot, bound] = split_layer_of(placed.placement), placed.feasible
    if placement == "dp":  # unbounded it offloads everything; the bound caps it and the SLA still holds
        assert [chosen[0.3, b] for b in (0, 10, 30)] == [(0, True), (10, True), (30, True)]


def test_least_offload_scan_stops_at_the_bound_and_says_when_the_bound_is_what_limits():
    p = policy()  # idle: the least offloaded placement meeting the SLA
    free = p.place(request(tpot=0.06), IDLE)
    assert free.method == "least_offload" and split_layer_of(free.placement) == 7
    assert p.place(request(tpot=0.06, client=bounded(10)), IDLE) == free
    refusal = p.place(request(tpot=0.06, client=bounded(6)), IDLE)
    assert isinstance(refusal, Refusal) and refusal.code == ErrorCode.SLA_UNREACHABLE
    assert "holds at most 6 decoder layers (client.max_layers), split layer 7 would meet the SLA" in refusal.message
    plain = p.place(request(tpot=0.001, client=bounded(6)), IDLE)  # no k at all meets this one
    assert plain.message.endswith("relax the SLA") and "max_layers" not in plain.message


@pytest.mark.parametrize("load", [IDLE, busy(8)], ids=["idle", "busy"])
def test_a_client_holding_no_layer_is_admitted_server_only(load):
    p = policy()
    req = request(client=bounded(0))
    a = p.decide(req, p.place(req, load), load=load, inflight=())
    assert isinstance(a, Admission) and (a.split_layer, a.placement) == (0, "server_only")


def test_fixed_split_layer_above_the_clients_bound_is_a_bad_request():
    p = policy()
    refusal = p.fixed(request(split_layer=12, client=bounded(8)), IDLE)
    assert refusal == Refusal(ErrorCode.BAD_REQUEST, "split_layer 12 is above this client's memory bound: it holds "
                                                     "at most 8 decoder layers (client.max_layers)")
    assert p.fixed(request(split_layer=8, client=bounded(8)), IDLE).split_layer == 8


def test_a_bound_below_the_servers_min_layer_is_a_bad_request():
    refusal = policy(min_layer=4).place(request(client=bounded(2)), IDLE)
    assert refusal == Refusal(ErrorCode.BAD_REQUEST, "no split layer fits: this client holds at most 2 decoder layers "
                                                     "(client.max_layers) and this server holds no layers below 4")
    placed = policy(min_layer=4).place(request(client=bounded(4)), IDLE)
    assert placed.feasible and split_layer_of(placed.placement) == 4


def test_a_declared_flops_client_carries_its_bound():
    p = policy()
    assert p.client_costs(request(client=ClientFlops(1e11, max_layers=5))) == ClientCosts.from_flops(
        1e11, SMOLLM2_135M, max_layers=5)
    placed = p.place(request(client=ClientFlops(1e11, max_layers=5)), busy(8))
    assert split_layer_of(placed.placement) <= 5
    with pytest.raises(AdmissionInputError, match=r"ClientFlops.max_layers: expected None or an int >= 0, got -1"):
        ClientFlops(1e11, max_layers=-1)
    with pytest.raises(ValueError, match=r"ClientCosts.max_layers: expected None or an int >= 0, got True"):
        ClientCosts(prefill_s_per_token=1e-5, decode_s=1e-4, max_layers=True)


def _open(client: wire.ClientProfile, split_layer: int | None = None):
    msg = wire.Open(model_fingerprint="fp", split_layer=split_layer, sla=wire.RequestSLA(ttft_s=5.0, tpot_s=0.3),
                    client=client, prompt_tokens=40, sampling=wire.SamplingOptions(max_tokens=32))
    return request_from_open(msg, LAN)


def test_request_from_open_passes_the_profiles_bound():
    timed = _open(wire.ClientProfile(layer_prefill_s_per_token=2e-5, layer_decode_s=4e-4, max_layers=4))
    assert timed.client == ClientCosts(prefill_s_per_token=2e-5, decode_s=4e-4, max_layers=4)
    assert _open(wire.ClientProfile(flops_per_s=1e11, max_layers=4)).client == ClientFlops(1e11, max_layers=4)
    assert _open(wire.ClientProfile(max_layers=0)).client == ClientCosts(prefill_s_per_token=0.0, decode_s=0.0,
                                                                         max_layers=0)
    assert _open(wire.ClientProfile(flops_per_s=1e11)).client.max_layers is None


async def _no_stats(since):
    return None


async def test_controller_refuses_a_fixed_split_layer_above_the_bound_and_admits_a_layerless_client():
    policy_ = policy()
    c = AdmissionController(policy=policy_, step_stats=_no_stats, metrics=split_metrics(N))
    with pytest.raises(AdmissionRefused, match=r"split_layer 12 is above this client's memory bound") as err:
        await c.admit("a", _open(wire.ClientProfile(flops_per_s=1e11, max_layers=8), split_layer=12))
    assert err.value.reason == ErrorCode.BAD_REQUEST and not c.inflight
    a = await c.admit("b", _open(wire.ClientProfile(max_layers=0)))
    assert (a.split_layer, a.placement) == (0, "server_only") and list(c.inflight) == ["b"]
    await c.stop()
