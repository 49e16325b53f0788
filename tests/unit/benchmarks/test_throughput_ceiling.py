"""The placement ceiling (benchmarks/throughput_ceiling.py): pure arithmetic on the step model."""
import pytest

from benchmarks.throughput_ceiling import ceiling, deepest_k, expected_step, placement_ceiling
from vllm_split.engine.composition import RooflineCost

COST = RooflineCost(fixed_s=0.01, layer_s=0.002, row_s=0.0001)
NET = {"name": "lan", "weight": 1.0, "rtt_s": 0.01, "uplink_bps": 8e6, "downlink_bps": 8e6}  # 1 MB/s up
TYPE = {"name": "chat", "weight": 1.0, "prompt_tokens": 10, "sla": {"ttft_s": 1.0, "tpot_s": 0.1}}


def _device(**kw):
    return {"name": "d", "weight": 1.0, "decode_multiple": 1.0, "prefill_multiple": 1.0, "max_layers": 30, **kw}


def test_deepest_k_is_the_deepest_layer_within_the_sla_and_memory():
    kw = dict(layer_decode_s=0.01, layer_prefill_s_per_token=0.001, step_s=0.02, num_layers=30, row_bytes=1000)
    # TPOT: 0.01 k + 0.01 rtt + 0.001 upload + 0.02 step <= 0.1  ->  k <= 6.9; TTFT: 0.01 k + 0.01 + 0.01 + 0.02 <= 1
    assert deepest_k(_device(), TYPE, NET, **kw) == 6
    assert deepest_k(_device(max_layers=4), TYPE, NET, **kw) == 4
    assert deepest_k(_device(decode_multiple=100.0), TYPE, NET, **kw) == 0  # one layer takes a second
    # TTFT-bound: the 10-token prompt takes 0.1 s per layer -> k <= 9.6 (TPOT would allow all 30)
    slow_prefill = _device(prefill_multiple=10.0, decode_multiple=0.1)
    assert deepest_k(slow_prefill, TYPE, NET, **kw) == 9
    assert deepest_k(_device(decode_multiple=100.0), TYPE, NET, **kw, memory_only=True) == 30


def test_expected_step_reads_a_layer_unless_every_row_is_above_it():
    L, b = 30, 4
    plain = COST.fixed_s + L * (COST.layer_s + b * COST.row_s)
    assert expected_step([(1.0, 0, "d")], b, L, COST) == pytest.approx(plain)
    # every row at k = 10: the step skips 10 layers for all
    assert expected_step([(1.0, 10, "d")], b, L, COST) == pytest.approx(COST.fixed_s + 20 * (COST.layer_s + b * COST.row_s))
    # half the rows at 0, half at 10: layers 0-9 run unless all four rows are at 10 (1/16)
    mixed = expected_step([(0.5, 0, "a"), (0.5, 10, "b")], b, L, COST)
    want = COST.fixed_s + COST.layer_s * (20 + 10 * (1 - 0.5 ** b)) + COST.row_s * b * (0.5 * 30 + 0.5 * 20)
    assert mixed == pytest.approx(want)


def test_ceiling_is_plain_over_the_expected_split_step():
    w = {"request_types": [TYPE], "networks": [NET],
         "device_classes": [_device(name="fast", weight=0.5, max_layers=10), _device(name="none", weight=0.5, max_layers=0)]}
    server = {"decode_s": 0.001, "prefill_s_per_token": 0.0001}
    c = ceiling(w, server, 30, 1000, COST, occupancies=(2,))
    e = c["by_occupancy"]["2"]
    plain = COST.fixed_s + 30 * (COST.layer_s + 2 * COST.row_s)
    split = COST.fixed_s + COST.layer_s * (20 + 10 * 0.75) + COST.row_s * 2 * 25
    assert e["plain_step_s"] == pytest.approx(plain)
    assert e["sla"]["rate_ratio"] == pytest.approx(plain / split)
    assert e["sla"]["mean_k_by_device"] == {"fast": 10, "none": 0} and e["sla"]["share_at_k0"] == pytest.approx(0.5)
    assert e["memory_only"]["rate_ratio"] == pytest.approx(e["sla"]["rate_ratio"])  # the SLA does not bind here
    slower = ceiling(w, server, 30, 1000, COST, occupancies=(2,), speed_scale=50.0)["by_occupancy"]["2"]["sla"]
    assert slower["mean_k"] < 5 and slower["rate_ratio"] < e["sla"]["rate_ratio"]
    report = placement_ceiling(w, server, 30, 1000)
    assert set(report["sla_rate_ratio_by_speed_scale"]) == {"0.25", "0.5", "1", "2", "4"}
