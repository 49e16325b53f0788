"""The privacy floor (the server's ``privacy_floor`` option, the client's ``Open.privacy_floor``):
no admitted split layer below it under any rule, load or client, never server decoding with
one, and refusals that name it and whose it is (no engine)."""
import random
from dataclasses import replace

import pytest

from tests.unit.control.test_policy import COST, FAST, IDLE, LAN, N, SLOW, decide, policy, request
from vllm_split.api.admission import AdmissionController, AdmissionRefused, request_from_open
from vllm_split.api.metrics import split_metrics
from vllm_split.control.policy import Admission, AdmissionInputError, Refusal
from vllm_split.control.privacy_floor import describe_floor, effective_floor, floor_violation
from vllm_split.control.request_graph import ClientCosts, ServerLoad, split_layer_of
from vllm_split.wire import protocol as wire
from vllm_split.wire.contract import ErrorCode

CLIENTS_12 = ("split_layer 4 is below the client's privacy floor 12 (Open.privacy_floor): expected split_layer >= 12 "
              "(the server takes no activation shallower than layer 12)")


def test_the_floor_is_the_highest_of_min_layer_and_both_privacy_floors_and_says_whose_it_is():
    assert effective_floor(min_layer=2, server_floor=0, client_floor=0) == 2
    assert effective_floor(min_layer=2, server_floor=8, client_floor=12) == 12
    assert floor_violation(12, server_floor=8, client_floor=12) is None
    assert floor_violation(4, server_floor=8, client_floor=12) == CLIENTS_12
    assert "below this server's privacy floor 8 (its privacy_floor option)" in floor_violation(
        0, server_floor=8, client_floor=4)
    assert describe_floor(server_floor=6, client_floor=6) == "the client's and this server's privacy floor 6"


@pytest.mark.parametrize("whose", ["client", "server"])
def test_an_idle_server_places_a_floored_request_at_the_floor_instead_of_decoding_it(whose):
    free = decide(policy(), request(server_decode=True), IDLE)
    assert (free.split_layer, free.server_decode) == (0, True)  # without a floor: decoded on the server
    p = policy(privacy_floor=12) if whose == "server" else policy()
    floored = request(server_decode=True, privacy_floor=12 if whose == "client" else 0)
    a = decide(p, floored, IDLE)
    assert isinstance(a, Admission) and (a.split_layer, a.placement, a.server_decode) == (12, "least_offload", False)


def test_server_decoding_is_ruled_out_by_any_privacy_floor():
    offered = request(server_decode=True)
    assert policy().server_decodes(offered, 0)
    assert not policy(privacy_floor=1).server_decodes(offered, 0)
    assert not policy().server_decodes(replace(offered, privacy_floor=1), 0)


def test_a_fixed_split_layer_below_the_floor_is_refused_naming_whose_floor():
    assert policy().fixed(request(split_layer=4, privacy_floor=12), IDLE) == Refusal(ErrorCode.SPLIT_LAYER, CLIENTS_12)
    server = policy(privacy_floor=12).fixed(request(split_layer=0, server_decode=True), IDLE)
    assert server.code == ErrorCode.SPLIT_LAYER
    assert server.message.startswith("split_layer 0 is below this server's privacy floor 12 (its privacy_floor option)")
    a = policy(privacy_floor=12).fixed(request(split_layer=12, server_decode=True, privacy_floor=3), IDLE)
    assert isinstance(a, Admission) and (a.split_layer, a.server_decode) == (12, False) and a.predicted_tpot_s > 0


def test_a_client_holding_fewer_layers_than_the_floor_is_a_bad_request_naming_both():
    bounded = replace(FAST, max_layers=8)
    assert policy().place(request(client=bounded, privacy_floor=12), IDLE) == Refusal(ErrorCode.BAD_REQUEST, (
        "no split layer fits: this client holds at most 8 decoder layers (client.max_layers) and the client's "
        "privacy floor 12 (Open.privacy_floor) keeps every split layer at or above 12"))
    server = policy(privacy_floor=12).place(request(client=bounded), IDLE)
    assert server.code == ErrorCode.BAD_REQUEST and "this server's privacy floor 12 (its privacy_floor option)" in \
        server.message
    assert policy().place(request(privacy_floor=N + 1), IDLE) == Refusal(ErrorCode.BAD_REQUEST, (
        f"no split layer fits: the client's privacy floor {N + 1} (Open.privacy_floor) is above this model's {N} "
        f"decoder layers"))
    fits = policy().place(request(client=replace(FAST, max_layers=12), privacy_floor=12), IDLE)
    assert fits.feasible and split_layer_of(fits.placement) == 12


def test_an_sla_that_no_split_layer_at_or_above_the_floor_meets_is_unreachable_and_says_so():
    slow = request(client=SLOW, server_decode=True)  # a second per layer: only k = 0 meets a TPOT of 0.3 s
    assert isinstance(decide(policy(), slow, IDLE), Admission)
    refusal = decide(policy(), replace(slow, privacy_floor=1), IDLE)
    assert refusal.code == ErrorCode.SLA_UNREACHABLE and refusal.retry_after_s is None
    assert refusal.message.startswith("no split layer at or above the client's privacy floor 1 (Open.privacy_floor) "
                                      "meets the SLA (TTFT <= 5.0 s, TPOT <= 0.3 s) even on an idle server")
    plain = decide(policy(), request(client=SLOW, tpot=0.001), IDLE)  # no floor: the message is as before
    assert plain.message.startswith("no split layer meets the SLA")


def test_the_floors_are_checked():
    with pytest.raises(AdmissionInputError, match=r"AdmissionPolicy.privacy_floor: expected an int in \[0, 30\] "
                                                  r"\(the model has 30 decoder layers\), got 31"):
        policy(privacy_floor=N + 1)
    with pytest.raises(AdmissionInputError, match=r"AdmissionRequest.privacy_floor: expected an int >= 0, got -1"):
        request(privacy_floor=-1)
    with pytest.raises(AdmissionInputError, match=r"AdmissionRequest.privacy_floor: expected an int >= 0, got True"):
        request(privacy_floor=True)


def _random_case(rng: random.Random):
    """A policy, a request (with a privacy floor somewhere) and a load, drawn at random."""
    server_floor, client_floor = rng.choice([0, 0, 3, 12, 20]), rng.choice([0, 1, 5, 12, 25, N])
    if server_floor == client_floor == 0:
        client_floor = rng.randint(1, N)
    p = policy(privacy_floor=server_floor, min_layer=rng.choice([0, 0, 2]), placement=rng.choice(["dp", "greedy"]),
               gather_max_s=rng.choice([0.0, 0.025]), offload_above=rng.choice([0.0, 0.5, 1.0]))
    client = ClientCosts(prefill_s_per_token=10 ** rng.uniform(-5, -3), decode_s=10 ** rng.uniform(-4, -1.5),
                         max_layers=rng.choice([None, None, rng.randint(0, N)]))
    req = request(tpot=rng.uniform(0.03, 1.0), client=client, server_decode=True, privacy_floor=client_floor,
                  prompt_tokens=rng.randint(1, 500), expected_output_tokens=rng.randint(1, 200),
                  split_layer=rng.choice([None, None, None, rng.randint(0, N)]))
    occupancy = rng.choice([0.0, 1.0, 4.0, 8.0])
    k_min = rng.randint(0, N) if occupancy else 0
    load = ServerLoad(cost=COST, occupancy=occupancy, recent_step_s=COST.step_s(N - k_min, (N - k_min) * occupancy),
                      utilization=rng.random(), min_split_layer=k_min, tpot_error=rng.choice([1.0, 1.5]),
                      decoded_tpot_error=rng.choice([1.0, 1.5]))
    return p, req, load


def _decision(p, req, load):
    return p.fixed(req, load) if req.split_layer is not None else decide(p, req, load)


def test_no_admitted_split_layer_is_below_the_floor_and_no_floored_session_is_server_decoded():
    rng = random.Random(15)
    admitted = below_without_floors = 0
    for _ in range(300):
        p, req, load = _random_case(rng)
        floor = max(p.min_layer, p.privacy_floor, req.privacy_floor)
        d = _decision(p, req, load)
        if isinstance(d, Admission):
            admitted += 1
            assert d.split_layer >= floor and not d.server_decode, (p, req, load, d)
        free = _decision(replace(p, privacy_floor=0), replace(req, privacy_floor=0), load)
        below_without_floors += isinstance(free, Admission) and free.split_layer < floor
    assert admitted >= 120 and below_without_floors >= 80  # the floors decided many of these


async def _no_stats(since):
    return None


async def test_the_controller_plans_the_opens_floor_and_refuses_a_fixed_layer_below_it():
    msg = wire.Open(model_fingerprint="fp", split_layer=None, sla=wire.RequestSLA(ttft_s=5.0, tpot_s=0.3),
                    client=wire.ClientProfile(layer_prefill_s_per_token=2e-5, layer_decode_s=4e-4), prompt_tokens=40,
                    sampling=wire.SamplingOptions(max_tokens=32), server_decode=True, privacy_floor=12)
    req = request_from_open(msg, LAN)
    assert (req.privacy_floor, req.server_decode) == (12, True)
    assert request_from_open(replace(msg, privacy_floor=0), LAN).privacy_floor == 0
    c = AdmissionController(policy=policy(), step_stats=_no_stats, metrics=split_metrics(N))
    a = await c.admit("a", req)
    assert a.split_layer == 12 and not a.server_decode
    with pytest.raises(AdmissionRefused, match="split_layer 4 is below the client's privacy floor 12") as err:
        await c.admit("b", request_from_open(replace(msg, split_layer=4), LAN))
    assert err.value.reason == ErrorCode.SPLIT_LAYER and list(c.inflight) == ["a"]
    await c.stop()
