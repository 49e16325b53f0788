"""KV per layer range on vLLM's own KV cache manager (no engine): the grouping patch cuts a
uniform full-attention model into range groups, the range managers leave split requests
without blocks below their split layer, and prefix caching, freeing and preemption hold."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core import kv_cache_utils  # noqa: E402
from vllm.v1.core.kv_cache_coordinator import HybridKVCacheCoordinator  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheManager  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, SlidingWindowSpec  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

from vllm_split.engine import kv_range_manager  # noqa: E402
from vllm_split.engine.kv_ranges import KVRangeError, blocks_needed, layer_ranges  # noqa: E402
from vllm_split.patches import kv_range_groups  # noqa: E402

BLOCK = 16
LAYERS = 30
POOL = 241  # blocks, the null block included


def _spec(sliding_window: int | None = None) -> dict:
    make = (lambda: FullAttentionSpec(block_size=BLOCK, num_kv_heads=3, head_size=64, dtype=torch.float32)) \
        if sliding_window is None else \
        (lambda: SlidingWindowSpec(block_size=BLOCK, num_kv_heads=3, head_size=64, dtype=torch.float32,
                                   sliding_window=sliding_window))
    return {f"model.layers.{i}.self_attn.attn": make() for i in range(LAYERS)}


def _vllm_config(kv_ranges: int, pp: int = 1) -> SimpleNamespace:
    return SimpleNamespace(additional_config={"vllm_split": {"kv_ranges": kv_ranges}},
                           parallel_config=SimpleNamespace(pipeline_parallel_size=pp),
                           scheduler_config=SimpleNamespace(disable_hybrid_kv_cache_manager=False),
                           attention_config=SimpleNamespace(hisparse_config=None))


def _groups(kv_ranges: int) -> list:
    kv_range_groups.apply()
    return kv_cache_utils.get_kv_cache_groups(_vllm_config(kv_ranges), _spec())


class Engine:
    """vLLM's KVCacheManager over range groups, as the split scheduler sets it up."""

    def __init__(self, kv_ranges: int, *, caching: bool = True) -> None:
        config = KVCacheConfig(num_blocks=POOL, kv_cache_tensors=[], kv_cache_groups=_groups(kv_ranges))
        self.manager = KVCacheManager(config, max_model_len=2048, scheduler_block_size=BLOCK,
                                      hash_block_size=BLOCK, enable_caching=caching)
        self.split_layers: dict[str, int] = {}
        self.ranges = kv_range_manager.install(self.manager, lambda rid: self.split_layers.get(rid, 0),
                                               num_ranges=kv_ranges)
        kv_cache_utils.init_none_hash(sha256)
        self.hasher = kv_cache_utils.get_request_block_hasher(BLOCK, sha256)

    def request(self, rid: str, num_tokens: int, *, split_layer: int = 0, first_token: int = 1) -> Request:
        salt = None
        if split_layer:  # split sessions salt their hashes (vllm_split/api/session.py)
            self.split_layers[rid] = split_layer
            salt = f"session-{rid}"
        return Request(rid, list(range(first_token, first_token + num_tokens)), SamplingParams(max_tokens=64), None,
                       block_hasher=self.hasher, cache_salt=salt)

    def admit(self, request: Request) -> int:
        """Allocate the prompt like the scheduler does; returns the prefix-cache hit (tokens)."""
        blocks, num_hit, _ = self.manager.get_computed_blocks(request)
        out = self.manager.allocate_slots(request, request.num_tokens - num_hit, num_hit, blocks,
                                          full_sequence_must_fit=True)
        assert out is not None, request.request_id
        request.num_computed_tokens = request.num_tokens
        return num_hit

    def decode(self, request: Request, num_steps: int) -> None:
        for _ in range(num_steps):
            request.append_output_token_ids(7)
            assert self.manager.allocate_slots(request, 1) is not None
            request.num_computed_tokens = request.num_tokens

    @property
    def used(self) -> int:
        return POOL - 1 - self.manager.block_pool.get_num_free_blocks()


def test_grouping_patch_cuts_contiguous_ranges_and_is_off_by_default():
    assert len(_groups(1)) == 1  # vLLM's own layout
    groups = _groups(3)
    assert [[int(n.split(".")[2]) for n in g.layer_names] for g in groups] == \
        [list(range(0, 10)), list(range(10, 20)), list(range(20, 30))]
    assert all(g.kv_cache_spec == _spec()["model.layers.0.self_attn.attn"] for g in groups)


def test_grouping_patch_refuses_what_it_cannot_cut():
    kv_range_groups.apply()
    with pytest.raises(KVRangeError, match="pipeline parallel size 2"):
        kv_cache_utils.get_kv_cache_groups(_vllm_config(2, pp=2), _spec())
    with pytest.raises(KVRangeError, match="SlidingWindowSpec"):
        kv_cache_utils.get_kv_cache_groups(_vllm_config(2), _spec(sliding_window=64))


@pytest.mark.parametrize("kv_ranges", [2, 3, 6, 10])
@pytest.mark.parametrize("split_layer", [0, 1, 7, 15, 22, 29])
def test_a_request_holds_blocks_only_in_the_ranges_it_runs(kv_ranges, split_layer):
    engine = Engine(kv_ranges)
    assert isinstance(engine.manager.coordinator, HybridKVCacheCoordinator)
    r = engine.request("r", 100, split_layer=split_layer)
    engine.admit(r)
    assert engine.used == blocks_needed(engine.ranges, split_layer=split_layer, num_tokens=100, block_size=BLOCK)
    for ids, rng in zip(engine.manager.get_block_ids("r"), engine.ranges):
        assert len(ids) == 7  # every group's table covers the tokens: the worker's slot mapping stays in range
        if rng.end <= split_layer:
            assert ids == [0] * 7  # the null block: writes there land in no live block
        else:
            assert 0 not in ids
    engine.decode(r, 40)  # 140 tokens: 9 blocks per held range
    assert engine.used == blocks_needed(engine.ranges, split_layer=split_layer, num_tokens=140, block_size=BLOCK)
    engine.manager.free(r)
    assert engine.used == 0


def test_memory_per_token_of_an_ordinary_request_is_unchanged():
    """G groups of L/G layers: a block holds 1/G of the bytes, an ordinary request G blocks per
    block of tokens. The capacity vLLM reports (blocks x tokens / blocks per request) is equal."""
    one, two = Engine(1), Engine(2)
    for e in (one, two):
        e.admit(e.request("r", 100))
    assert two.used == 2 * one.used


def test_admission_counts_the_real_memory():
    """The full-sequence gate admits twice as many k = 15 requests as ordinary ones (G = 2)."""
    def admitted(split_layer: int) -> int:
        engine = Engine(2)
        n = 0
        while True:
            r = engine.request(f"r{n}", 160, split_layer=split_layer, first_token=1000 * n + 1)  # no shared prefix
            blocks, hit, _ = engine.manager.get_computed_blocks(r)
            if engine.manager.allocate_slots(r, r.num_tokens - hit, hit, blocks, full_sequence_must_fit=True) is None:
                return n
            n += 1

    assert admitted(0) == (POOL - 1) // 20  # 10 blocks per group per request
    assert admitted(15) == (POOL - 1) // 10
    assert admitted(14) == admitted(0)  # k inside the first range: every range is held


def test_prefix_caching_still_serves_ordinary_requests_and_isolates_split_ones():
    engine = Engine(3)
    a = engine.request("a", 100)
    assert engine.admit(a) == 0
    a_ids = engine.manager.get_block_ids("a")
    engine.manager.free(a)
    b = engine.request("b", 100)  # same prompt, ordinary: hits 6 full blocks in every group
    assert engine.admit(b) == 96
    assert [ids[:6] for ids in engine.manager.get_block_ids("b")] == [ids[:6] for ids in a_ids]
    s = engine.request("s", 100, split_layer=15)  # same tokens, salted: no hit
    assert engine.admit(s) == 0
    engine.manager.free(s)
    s2 = engine.request("s", 100, split_layer=15)  # the same split request again (a preemption's re-admission)
    assert engine.admit(s2) == 0  # its range [0, 10) was never cached, so no hit needing every group
    assert engine.used == 3 * 7 + 2 * 7  # b: every range; s: [10, 20) and [20, 30)


def test_preemption_frees_and_reallocates_at_the_same_split_layer():
    engine = Engine(2, caching=False)
    r = engine.request("r", 50, split_layer=20)
    engine.admit(r)
    engine.decode(r, 20)
    held = engine.used
    engine.manager.free(r)  # what Scheduler._preempt_request does, before resetting num_computed_tokens
    assert engine.used == 0
    r.num_computed_tokens = 0
    engine.admit(r)  # resumed: prompt + generated tokens recomputed, same ranges
    assert engine.used == held == blocks_needed(engine.ranges, split_layer=20, num_tokens=70, block_size=BLOCK)
    assert engine.manager.get_block_ids("r")[0] == [0] * 5


def test_install_refuses_a_layout_the_patch_did_not_make():
    config = KVCacheConfig(num_blocks=POOL, kv_cache_tensors=[], kv_cache_groups=_groups(1))
    manager = KVCacheManager(config, max_model_len=2048, scheduler_block_size=BLOCK, hash_block_size=BLOCK)
    with pytest.raises(RuntimeError, match="kv_ranges 2 but the engine has 1 KV cache group"):
        kv_range_manager.install(manager, lambda rid: 0, num_ranges=2)


def test_ranges_of_a_min_layer_server():
    assert layer_ranges(list(range(15, 30)), 3)[0].start == 15
