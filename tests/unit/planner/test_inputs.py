"""Bad planner input raises PlannerInputError with the numbers in the message."""

from __future__ import annotations

import pytest

from vllm_split.planner import (
    SLA,
    LayerGraph,
    LayerNode,
    ModelConfig,
    NetworkSpec,
    Placement,
    PlannerInputError,
    RequestShape,
    Shape,
    plan,
)


def _node(**kw):
    base = dict(name="n", client_prefill_s=0.1, client_decode_s=0.1, server_prefill_s=0.1,
                server_decode_s=0.1, server_work=1.0)
    return LayerNode(**{**base, **kw})


def test_negative_time_is_rejected_with_its_value():
    with pytest.raises(PlannerInputError, match=r"client_decode_s must be a finite number >= 0, got -0\.5"):
        _node(client_decode_s=-0.5)


def test_nan_work_is_rejected():
    with pytest.raises(PlannerInputError, match=r"server_work .* got nan"):
        _node(server_work=float("nan"))


def test_edge_count_must_match_nodes():
    with pytest.raises(PlannerInputError, match=r"prefill_edge_bytes must have num_nodes \+ 1 = 3 entries .* got 2"):
        LayerGraph((_node(), _node()), (4, 4), (4, 4, 4))


def test_negative_edge_bytes_are_rejected():
    with pytest.raises(PlannerInputError, match=r"decode_edge_bytes\[1\] must be an int >= 0 bytes, got -3"):
        LayerGraph((_node(),), (4, 4), (4, -3))


def test_empty_graph_is_rejected():
    with pytest.raises(PlannerInputError, match="at least 1 node, got 0"):
        LayerGraph((), (4,), (4,))


def test_output_tokens_must_be_positive():
    with pytest.raises(PlannerInputError, match="num_output_tokens must be an int >= 1, got 0"):
        LayerGraph((_node(),), (4, 4), (4, 4), num_output_tokens=0)


def test_network_needs_positive_bandwidth():
    with pytest.raises(PlannerInputError, match=r"uplink_bps must be a finite number > 0 bits/s, got 0"):
        NetworkSpec(uplink_bps=0, downlink_bps=1e6, rtt_s=0.01)
    with pytest.raises(PlannerInputError, match=r"rtt_s must be a finite number >= 0, got -1"):
        NetworkSpec(uplink_bps=1e6, downlink_bps=1e6, rtt_s=-1)


def test_sla_needs_a_bound_and_positive_values():
    with pytest.raises(PlannerInputError, match="at least one of ttft_s, tpot_s, e2e_s"):
        SLA()
    with pytest.raises(PlannerInputError, match=r"SLA.tpot_s must be a finite number > 0 seconds or None, got -0\.1"):
        SLA(tpot_s=-0.1)


def test_placement_ranges_are_validated():
    with pytest.raises(PlannerInputError, match=r"within \[0, 3\), got \(\(2, 5\),\)"):
        Placement(Shape.GENERAL, 3, ((2, 5),))
    with pytest.raises(PlannerInputError, match=r"prefix placement .* starting at 0, got \(\(1, 2\),\)"):
        Placement(Shape.PREFIX, 3, ((1, 2),))
    with pytest.raises(PlannerInputError, match=r"U placement .* \[m, 4\), got \(\(1, 2\),\)"):
        Placement(Shape.U, 4, ((1, 2),))
    with pytest.raises(PlannerInputError, match=r"split_layer must be an int in \[0, 3\], got 4"):
        Placement.prefix(4, 3)
    with pytest.raises(PlannerInputError, match="split_layer is defined for the prefix shape, not 'general'"):
        _ = Placement(Shape.GENERAL, 3, ()).split_layer


def test_placement_round_trips_masks():
    placement = Placement.from_mask([True, False, True, True], Shape.GENERAL)
    assert placement.client_ranges == ((0, 1), (2, 4))
    assert placement.on_client == (True, False, True, True)
    assert Placement.prefix(2, 5).split_layer == 2 and Placement.prefix(0, 5).client_ranges == ()


def test_plan_rejects_bad_shape_tick_and_mismatched_placement():
    graph = LayerGraph((_node(),), (4, 4), (4, 4))
    net, sla = NetworkSpec(1e6, 1e6, 0.0), SLA(tpot_s=1.0)
    with pytest.raises(PlannerInputError, match="shape must be one of prefix, u, general; got 'zigzag'"):
        plan(graph, net, sla, shape="zigzag")
    with pytest.raises(PlannerInputError, match=r"tick_s must be a finite number > 0 seconds, got 0"):
        plan(graph, net, sla, tick_s=0)
    with pytest.raises(PlannerInputError, match="expected a SLA, got dict"):
        plan(graph, net, {"tpot_s": 1.0})


def test_model_and_request_configs_are_validated():
    with pytest.raises(PlannerInputError, match="hidden_size 100 is not divisible by num_attention_heads 3"):
        ModelConfig("m", 100, 10, 1, 3, 3, 10, False)
    with pytest.raises(PlannerInputError, match=r"HF config lacks \['vocab_size'\]"):
        ModelConfig.from_hf_config({"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
                                    "num_attention_heads": 2})
    with pytest.raises(PlannerInputError, match="RequestShape.prompt_len must be an int >= 1, got 0"):
        RequestShape(prompt_len=0, output_len=1)


def test_greedy_client_prefix_must_fit_the_graph_and_the_shape():
    from vllm_split.planner import greedy

    graph = LayerGraph((_node(), _node()), (4, 4, 4), (4, 4, 4))
    network = NetworkSpec(1e9, 1e9, 0.0)
    with pytest.raises(PlannerInputError, match=r"client_prefix must be an int in \[0, 2\] .* got 3"):
        greedy(graph, network, SLA(tpot_s=1.0), client_prefix=3)
    with pytest.raises(PlannerInputError, match=r"client_prefix applies to the prefix and U shapes, not general; "
                                                r"got client_prefix 1"):
        greedy(graph, network, SLA(tpot_s=1.0), shape=Shape.GENERAL, client_prefix=1)
