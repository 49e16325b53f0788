"""KV memory in admission: whole sequences reserved, split sessions counted at their ranges."""
from dataclasses import replace

from tests.unit.control.test_policy import IDLE, decide, policy, request
from vllm_split.control.kv_budget import KVState, Promise, growth_to_come, kv_wait
from vllm_split.control.policy import Admission, InFlight, Wait

SIX = (5, 10, 15, 20, 25, 30)  # --split-kv-ranges 6 over 30 layers
BS = 32


def pool(free: int, *, total: int = 600, ends=SIX, measured_at: float = 10.0) -> KVState:
    return KVState(block_size=BS, total_blocks=total, free_blocks=free, range_ends=ends, measured_at=measured_at)


def test_a_session_at_k_counts_only_the_ranges_above_k():
    kv = pool(600)
    assert [kv.ranges_held(k) for k in (0, 1, 5, 14, 15, 22, 29, 30)] == [6, 6, 5, 4, 3, 2, 1, 0]
    assert kv.blocks_for(100, 0) == 4 * 6 and kv.blocks_for(100, 15) == 4 * 3  # half of an ordinary one at L/2
    assert kv.blocks_for(100, 22) == 4 * 2  # a third at about 3L/4
    one = pool(600, ends=(30,))  # one range (the default): every session holds all of it
    assert one.blocks_for(100, 0) == one.blocks_for(100, 29) == 4


def test_admitted_sessions_reserve_their_output_and_a_fresh_one_its_prompt_too():
    kv = pool(100, measured_at=10.0)
    measured = Promise(prompt_tokens=64, total_tokens=64 + 64, split_layer=15, admitted_at=9.0)
    fresh = Promise(prompt_tokens=64, total_tokens=64 + 64, split_layer=15, admitted_at=11.0)  # after the report
    assert growth_to_come(kv, [measured]) == 2 * 3  # its 64 output tokens in 3 ranges
    assert growth_to_come(kv, [measured, fresh]) == 2 * 3 + 4 * 3


def test_a_newcomer_waits_until_its_whole_sequence_fits_beside_the_promises():
    promises = [Promise(64, 64 + 256, 0, 0.0)]  # growth 8 blocks x 6 ranges = 48
    # 100 tokens + 60 out = 160 tokens: 5 blocks per range
    assert kv_wait(pool(78), total_tokens=160, split_layer=0, promises=promises) is None  # 30 + 48 <= 78
    why = kv_wait(pool(77), total_tokens=160, split_layer=0, promises=promises)
    assert why == "the KV cache cannot hold its 160 tokens yet: 30 blocks (6 of 6 KV ranges at k = 0) needed, 29 " \
                  "free beyond what admitted sessions will take"
    assert kv_wait(pool(77), total_tokens=160, split_layer=15, promises=promises) is None  # 15 blocks at k = 15
    assert kv_wait(None, total_tokens=10 ** 6, split_layer=0, promises=promises) is None  # nothing reported
    assert kv_wait(pool(0, total=20), total_tokens=10 ** 4, split_layer=0, promises=()) is None  # never fits: vLLM's call


def test_stats_round_trip_from_the_schedulers_report():
    kv = KVState.from_stats({"block_size": 16, "total_blocks": 1455, "free_blocks": 1400, "range_ends": [30]}, now=5.0)
    assert kv == KVState(16, 1455, 1400, (30,), 5.0)
    assert KVState.from_stats(None, now=1.0) is None


def test_the_policy_waits_for_kv_at_the_split_layer_it_chose():
    p = policy()
    req = request(prompt_tokens=200, expected_output_tokens=56)  # 256 tokens: 8 blocks per range
    assert decide(p, req, IDLE).split_layer == 0  # an idle server runs it all (k = 0, every range)
    short = replace(IDLE, kv=pool(8 * 6 - 1))
    got = decide(p, req, short)
    assert isinstance(got, Wait) and got.why.startswith("the KV cache cannot hold its 256 tokens yet: 48 blocks")
    assert isinstance(decide(p, req, replace(IDLE, kv=pool(8 * 6))), Admission)
    # the same room holds it at k = 15 (3 of 6 ranges), and an admitted session's output counts against it
    assert p.kv_held(req, 15, short, []) is None
    admitted = InFlight(request(prompt_tokens=32, expected_output_tokens=32 * 4), Admission(15, "dp", 0.1, 0.05),
                        admitted_at=0.0)  # measured: its 4 output blocks in 3 ranges are to come
    assert admitted.promise() == Promise(32, 32 * 5, 15, 0.0)
    assert p.kv_held(req, 15, replace(IDLE, kv=pool(8 * 3 + 12)), [admitted]) is None
    assert p.kv_held(req, 15, replace(IDLE, kv=pool(8 * 3 + 11)), [admitted]) is not None
