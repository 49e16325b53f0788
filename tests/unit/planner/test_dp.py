"""The placement DP against brute force, and its guarantees."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_split.planner import (
    SLA,
    LayerGraph,
    LayerNode,
    NetworkSpec,
    Placement,
    Shape,
    client_max,
    enumerate_placements,
    evaluate,
    greedy,
    plan,
    server_only,
)
from vllm_split.planner.evaluate import compile_ticks, evaluate_ticks, meets_ticks

times = st.floats(min_value=0.0, max_value=0.05, allow_nan=False)


@st.composite
def problems(draw, max_nodes: int = 7):
    n = draw(st.integers(min_value=1, max_value=max_nodes))
    nodes = tuple(
        LayerNode(f"n{i}", draw(times), draw(times), draw(times), draw(times),
                  draw(st.sampled_from([0.0, 1.0, 2.5]) | st.floats(0.0, 10.0)))
        for i in range(n))
    sizes = st.integers(min_value=0, max_value=400_000)
    graph = LayerGraph(nodes, tuple(draw(sizes) for _ in range(n + 1)),
                       tuple(draw(sizes) for _ in range(n + 1)),
                       num_output_tokens=draw(st.integers(1, 40)))
    network = NetworkSpec(draw(st.floats(1e6, 1e9)), draw(st.floats(1e6, 1e9)), draw(st.floats(0.0, 0.06)))
    bound = st.none() | st.floats(0.001, 0.4)
    ttft, tpot, e2e = draw(bound), draw(bound), draw(st.none() | st.floats(0.01, 4.0))
    if ttft is None and tpot is None and e2e is None:
        tpot = 0.1
    tick = draw(st.sampled_from([1e-5, 1e-4, 2e-3]))
    return graph, network, SLA(ttft_s=ttft, tpot_s=tpot, e2e_s=e2e), tick


def brute_force(graph, network, sla, shape, tick, work=None):
    """Minimum ticked work over every placement of the shape (None: none feasible)."""
    p = compile_ticks(graph, network, sla, tick)
    best = None
    for placement in enumerate_placements(graph.num_nodes, shape):
        t1, t2, w = evaluate_ticks(p, placement.on_client)
        if work is not None:
            w = work(placement)
        if meets_ticks(p, t1, t2) and (best is None or w < best):
            best = w
    return p, best


@settings(max_examples=300, deadline=None)
@given(problem=problems(), shape=st.sampled_from(list(Shape)))
def test_dp_equals_brute_force(problem, shape):
    graph, network, sla, tick = problem
    p, best = brute_force(graph, network, sla, shape, tick)
    result = plan(graph, network, sla, shape=shape, tick_s=tick)
    assert result.placement.shape is shape
    t1, t2, work = evaluate_ticks(p, result.placement.on_client)
    if best is None:
        assert not result.feasible  # infeasible exactly when brute force finds nothing
    else:
        assert result.feasible
        assert meets_ticks(p, t1, t2)
        assert work == best


@settings(max_examples=300, deadline=None)
@given(problem=problems(), shape=st.sampled_from(list(Shape)))
def test_feasible_plans_meet_the_sla_in_exact_arithmetic(problem, shape):
    graph, network, sla, tick = problem
    for result in (plan(graph, network, sla, shape=shape, tick_s=tick),
                   greedy(graph, network, sla, shape=shape, tick_s=tick),
                   client_max(graph, network, sla, shape=shape, tick_s=tick)):
        ttft, tpot, e2e, work = evaluate(graph, network, result.placement)
        assert (result.ttft_s, result.tpot_s, result.e2e_s, result.server_work) == (ttft, tpot, e2e, work)
        if result.feasible:
            assert sla.is_met(ttft, tpot, e2e), result


@settings(max_examples=200, deadline=None)
@given(problem=problems(), shape=st.sampled_from(list(Shape)))
def test_infeasible_result_is_the_fastest_placement(problem, shape):
    graph, network, sla, tick = problem
    result = plan(graph, network, sla, shape=shape, tick_s=tick)
    if result.feasible:
        return
    p = compile_ticks(graph, network, sla, tick)
    m = graph.num_output_tokens - 1

    def key(mask):
        t1, t2, _ = evaluate_ticks(p, mask)
        return t1 + m * t2, t2

    fastest = min(key(pl.on_client) for pl in enumerate_placements(graph.num_nodes, shape))
    assert key(result.placement.on_client) == fastest


@settings(max_examples=200, deadline=None)
@given(problem=problems(), shape=st.sampled_from(list(Shape)))
def test_dp_never_worse_than_baselines_and_client_max_maximises_client_nodes(problem, shape):
    graph, network, sla, tick = problem
    p = compile_ticks(graph, network, sla, tick)
    result = plan(graph, network, sla, shape=shape, tick_s=tick)
    work = evaluate_ticks(p, result.placement.on_client)[2]
    for baseline in (greedy(graph, network, sla, shape=shape, tick_s=tick), server_only(graph, network, sla)):
        if baseline.feasible and meets_ticks(p, *evaluate_ticks(p, baseline.placement.on_client)[:2]):
            assert result.feasible
            assert work <= evaluate_ticks(p, baseline.placement.on_client)[2]
    _, most = brute_force(graph, network, sla, shape, tick, work=lambda pl: -pl.num_client_nodes)
    cmax = client_max(graph, network, sla, shape=shape, tick_s=tick)
    assert cmax.feasible == (most is not None)
    if most is not None:
        assert cmax.placement.num_client_nodes == -most


def _chain(n, client, server, work=1.0, act=1000):
    nodes = tuple(LayerNode(f"n{i}", client, client, server, server, work) for i in range(n))
    return LayerGraph(nodes, (4,) + (act,) * (n - 1) + (4,), (4,) + (act,) * (n - 1) + (4,))


def test_prefix_plan_offloads_as_many_layers_as_the_tpot_budget_allows():
    # TPOT(k) = 10k + (5 - k) ms of compute + 10 ms uplink switch + 10 ms token back
    # down = 9k + 25 ms; client-only is 50 ms. A 43.1 ms budget fits exactly k = 2.
    graph = _chain(5, client=0.010, server=0.001)
    network = NetworkSpec(uplink_bps=1e12, downlink_bps=1e12, rtt_s=0.020)
    result = plan(graph, network, SLA(tpot_s=0.0431), shape=Shape.PREFIX)
    assert result.feasible
    assert result.placement.split_layer == 2
    assert result.server_work == pytest.approx(3.0)
    assert result.tpot_s == pytest.approx(2 * 0.010 + 3 * 0.001 + 0.020)


def test_general_shape_beats_prefix_when_a_middle_layer_is_cheap_on_the_client():
    nodes = (LayerNode("a", 1.0, 1.0, 0.001, 0.001, 1.0),
             LayerNode("b", 0.0, 0.0, 0.001, 0.001, 5.0),
             LayerNode("c", 1.0, 1.0, 0.001, 0.001, 1.0))
    graph = LayerGraph(nodes, (4, 10, 10, 4), (4, 10, 10, 4))
    network = NetworkSpec(1e9, 1e9, 0.001)
    sla = SLA(ttft_s=0.1, tpot_s=0.1)
    general = plan(graph, network, sla, shape=Shape.GENERAL)
    prefix = plan(graph, network, sla, shape=Shape.PREFIX)
    assert general.placement.client_ranges == ((1, 2),)
    assert general.server_work == pytest.approx(2.0)
    assert prefix.placement.split_layer == 0 and prefix.server_work == pytest.approx(7.0)


def test_infeasible_sla_returns_fastest_placement_flagged_infeasible():
    graph = _chain(3, client=0.5, server=0.001)
    network = NetworkSpec(1e9, 1e9, 0.0)
    result = plan(graph, network, SLA(ttft_s=1e-4), shape=Shape.GENERAL)
    assert not result.feasible
    assert result.placement == Placement.from_mask((False,) * 3, Shape.GENERAL)
    assert result.ttft_s == pytest.approx(0.003, abs=1e-6)


def test_greedy_prefix_stops_at_the_first_violation():
    # node 1 is too slow on the client, node 2 would be free: greedy stops at k=1.
    nodes = (LayerNode("a", 0.001, 0.001, 0.001, 0.001, 1.0),
             LayerNode("b", 9.0, 9.0, 0.001, 0.001, 1.0),
             LayerNode("c", 0.0, 0.0, 0.001, 0.001, 1.0))
    graph = LayerGraph(nodes, (4, 10, 10, 4), (4, 10, 10, 4))
    network = NetworkSpec(1e9, 1e9, 0.0)
    result = greedy(graph, network, SLA(tpot_s=1.0), shape=Shape.PREFIX)
    assert result.feasible and result.placement.split_layer == 1
    general = greedy(graph, network, SLA(tpot_s=1.0), shape=Shape.GENERAL)
    assert general.placement.client_ranges == ((0, 1), (2, 3))  # first-fit skips node 1


def test_greedy_prefix_starts_from_a_pinned_client_prefix():
    # node a cannot run on the server (like the embedding): from server-only greedy gives up
    # at once; with a pinned on the client it moves b and stops at c, too slow on the client.
    nodes = (LayerNode("a", 0.001, 0.001, 99.0, 99.0, 1.0),
             LayerNode("b", 0.001, 0.001, 0.001, 0.001, 1.0),
             LayerNode("c", 9.0, 9.0, 0.001, 0.001, 1.0))
    graph = LayerGraph(nodes, (4, 10, 10, 4), (4, 10, 10, 4))
    network = NetworkSpec(1e9, 1e9, 0.0)
    assert not greedy(graph, network, SLA(tpot_s=1.0)).feasible
    pinned = greedy(graph, network, SLA(tpot_s=1.0), client_prefix=1)
    assert pinned.feasible and pinned.placement.split_layer == 2
    stuck = greedy(graph, network, SLA(tpot_s=1.0), client_prefix=3)  # the start breaks the SLA
    assert not stuck.feasible and stuck.placement.split_layer == 3
