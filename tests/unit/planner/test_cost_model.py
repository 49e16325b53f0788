"""Analytic cost model, graph building, profile parsing and calibration."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from vllm_split.planner import (
    LLAMA3_8B,
    LLAMA3_70B,
    SMOLLM2_135M,
    DeviceSpec,
    ProfileError,
    RequestShape,
    build_graph,
    calibrate_device,
    devices_from_profile,
    fit_efficiency,
    node_cost,
    parse_profile,
)

EXAMPLE = Path(__file__).resolve().parents[3] / "benchmarks" / "profiles" / "smollm2_example.json"
SERVER = DeviceSpec("server", 989.4e12, 3.35e12, 0.6, 1e-5)
PHONE = DeviceSpec("phone", 4e12, 76.8e9, 0.5)


def test_model_constants_match_their_published_configs():
    assert (SMOLLM2_135M.num_hidden_layers, SMOLLM2_135M.hidden_size, SMOLLM2_135M.kv_dim) == (30, 576, 192)
    assert SMOLLM2_135M.tie_word_embeddings and not LLAMA3_8B.tie_word_embeddings
    # parameter count from the cost model's weights: ~135M (tied), ~8.0B, ~70.6B
    for model, params in ((SMOLLM2_135M, 134.5e6), (LLAMA3_8B, 8.03e9), (LLAMA3_70B, 70.55e9)):
        block = node_cost(model, "block", phase="decode", tokens=1, context=0).weight_bytes / model.dtype_bytes
        head = model.vocab_size * model.hidden_size
        embed = 0 if model.tie_word_embeddings else head
        assert model.num_hidden_layers * block + head + embed == pytest.approx(params, rel=0.01)


def test_attention_prefill_is_quadratic_and_decode_linear_in_context():
    def attn_core(tokens):
        full = node_cost(SMOLLM2_135M, "attn", phase="prefill", tokens=tokens, context=0).flops
        return full - tokens * node_cost(SMOLLM2_135M, "attn", phase="prefill", tokens=1, context=0).flops
    assert attn_core(2000) / attn_core(1000) == pytest.approx(4.0, rel=0.01)
    d1 = node_cost(SMOLLM2_135M, "attn", phase="decode", tokens=1, context=1000)
    d2 = node_cost(SMOLLM2_135M, "attn", phase="decode", tokens=1, context=2000)
    assert d2.other_bytes > d1.other_bytes and d2.weight_bytes == d1.weight_bytes
    mlp = node_cost(SMOLLM2_135M, "mlp", phase="decode", tokens=1, context=5000)
    assert mlp.flops == 2 * 3 * 576 * 1536


def test_server_batch_amortises_weights_in_workload_not_in_latency():
    request = RequestShape(prompt_len=100, output_len=50, server_batch=1)
    alone = build_graph(LLAMA3_8B, request, client=PHONE, server=SERVER)
    batched = build_graph(LLAMA3_8B, RequestShape(100, 50, 32), client=PHONE, server=SERVER)
    assert batched.nodes[0].server_work < alone.nodes[0].server_work / 5  # decode is weight-bound
    assert batched.nodes[0].server_decode_s >= alone.nodes[0].server_decode_s
    assert batched.nodes[0].client_decode_s == alone.nodes[0].client_decode_s


def test_graph_shape_and_edges():
    graph = build_graph(SMOLLM2_135M, RequestShape(64, 8, 4), client=PHONE, server=SERVER, granularity="subblock")
    assert graph.num_nodes == 61 and graph.nodes[0].name == "layer0.attn" and graph.nodes[-1].name == "head"
    assert graph.prefill_edge_bytes[0] == 64 * 4 and graph.prefill_edge_bytes[1] == 64 * 576 * 2
    assert graph.prefill_edge_bytes[-2] == 576 * 2  # the head needs the last position only
    assert graph.decode_edge_bytes[5] == 576 * 2 and graph.num_output_tokens == 8
    block = build_graph(LLAMA3_70B, RequestShape(64, 8, 4), client=PHONE, server=SERVER, granularity="block")
    assert block.num_nodes == 81


def test_fit_efficiency_recovers_efficiency_and_overhead():
    predicted = [1e-4, 5e-4, 2e-3, 1e-2]
    measured = [p / 0.4 + 3e-5 for p in predicted]
    eff, overhead = fit_efficiency(predicted, measured)
    assert eff == pytest.approx(0.4, rel=1e-6) and overhead == pytest.approx(3e-5, rel=1e-4)
    with pytest.raises(ValueError, match="as many predictions as measurements .* 2 vs 1"):
        fit_efficiency([1.0, 2.0], [1.0])


def test_example_profile_calibrates_to_its_generating_devices():
    data = json.loads(EXAMPLE.read_text())
    profile = parse_profile(data)
    assert profile.example and profile.model.name == "SmolLM2-135M-Instruct"
    model, server, client = devices_from_profile(profile)
    assert server.efficiency == pytest.approx(0.35, rel=0.01) and server.node_overhead_s == pytest.approx(3e-5, rel=0.05)
    assert client.efficiency == pytest.approx(0.4, rel=0.01)
    assert calibrate_device(profile.device("client"), model) == client


def test_profile_schema_errors_name_the_field():
    data = json.loads(EXAMPLE.read_text())
    bad = copy.deepcopy(data)
    bad["schema"] = "other/9"
    with pytest.raises(ProfileError, match="profile.schema: expected 'vllm-split-profile/1', got 'other/9'"):
        parse_profile(bad)
    bad = copy.deepcopy(data)
    del bad["devices"][1]["measurements"][0]["seconds"]
    with pytest.raises(ProfileError, match=r"profile.devices\[1\].measurements\[0\]: missing field 'seconds'"):
        parse_profile(bad)
    bad = copy.deepcopy(data)
    bad["devices"][0]["role"] = "gpu"
    with pytest.raises(ProfileError, match=r"devices\[0\].role: expected 'server' or 'client', got 'gpu'"):
        parse_profile(bad)


def test_device_spec_rejects_bad_efficiency():
    with pytest.raises(ValueError, match=r"efficiency must be in \(0, 1\], got 1.5"):
        DeviceSpec("d", 1e12, 1e9, efficiency=1.5)
