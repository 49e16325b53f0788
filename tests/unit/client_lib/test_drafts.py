"""Client drafts (issue 14), without a server: prompt lookup against its brute-force reference,
and the local layers' KV truncation (``truncate``) on a tiny random Llama: rows after a
truncation equal a fresh pass over the kept sequence, and a pass over ``[x, d1..dγ]`` equals
those tokens one at a time."""
from __future__ import annotations

import asyncio
import random

import pytest
import torch

from client_lib import LocalLayers
from client_lib.drafts import Drafter, PromptLookup, make_drafter, prompt_lookup_reference
from client_lib.shared_layers import SharedLayers
from harness.emulation import ReplayLayers
from tests.unit.client_lib.conftest import NUM_LAYERS
from vllm_split.wire import protocol as wire

ATOL = 1e-4


def _sequences():
    rng = random.Random(14)
    yield [rng.randrange(5) for _ in range(300)]  # small alphabet: many matches of every n
    yield [rng.randrange(1000) for _ in range(200)]  # large alphabet: few matches
    base = [rng.randrange(50) for _ in range(20)]
    yield base * 5 + [7, 7, 7, 7, 7, 7] + base[:9] + [1, 2, 1, 2, 1, 2, 1]  # repeats, short periods
    text = [rng.randrange(30) for _ in range(40)]
    edited = list(text)
    for _ in range(6):  # a copy with a few edits: the code-edit / summary case
        edited[rng.randrange(len(edited))] = rng.randrange(30)
    yield text + [99] + edited


@pytest.mark.parametrize("min_n, max_n, k, per_token", [(2, 4, 4, None), (1, 3, 6, None), (3, 3, 2, None),
                                                        (2, 5, 16, None), (1, 4, 8, 2), (1, 2, 5, 1)])
def test_prompt_lookup_equals_the_brute_force_reference_on_every_prefix(min_n, max_n, k, per_token):
    proposed = []
    for seq in _sequences():
        # one drafter per sequence: incremental indexing
        drafter = PromptLookup(min_n=min_n, max_n=max_n, k=k, per_token=per_token)
        proposed.append(0)
        for end in range(len(seq) + 1):
            got = drafter.propose(seq[:end], k)
            want = prompt_lookup_reference(seq[:end], min_n=min_n, max_n=max_n, k=k, per_token=per_token)
            assert got == want, (seq[:end], got)
            proposed[-1] += bool(got)
    assert proposed[0] > 0 and proposed[2] > 0 and proposed[3] > 0, proposed  # the large alphabet may have none


def test_prompt_lookup_examples():
    drafter = PromptLookup(min_n=2, max_n=4, k=4)
    # suffix [1, 2, 3] (n=3) last seen at 4, followed by 9, 8; the copy then runs into itself
    assert drafter.propose([1, 2, 3, 7, 1, 2, 3, 9, 8, 0, 1, 2, 3]) == [9, 8, 0, 1]
    assert drafter.propose([1, 2, 3, 7, 1, 2, 3, 9, 8, 0, 1, 2, 3], limit=2) == [9, 8]
    assert PromptLookup(k=5).propose([4, 4, 4]) == [4, 4, 4, 4, 4]  # period 1
    assert PromptLookup(k=3).propose([1, 2, 3, 4]) == []  # no repeat
    assert PromptLookup(k=3).propose([1, 2]) == [] and PromptLookup(k=3).propose([]) == []
    assert PromptLookup(k=3).propose([1, 2, 5, 1, 2], limit=0) == []
    # per_token: a one-token match drafts at most 2, a two-token match at most 4 (of k = 8)
    capped = PromptLookup(min_n=1, max_n=4, k=8, per_token=2)
    assert capped.propose([5, 6, 7, 8, 9, 1, 2, 3, 4, 5]) == [6, 7]
    assert capped.propose([5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6]) == [7, 8, 9, 1]
    assert PromptLookup(min_n=1, max_n=4, k=8).propose([5, 6, 7, 8, 9, 1, 2, 3, 4, 5]) == [6, 7, 8, 9, 1, 2, 3, 4]
    # the most recent occurrence wins (vLLM's proposer takes the earliest)
    assert PromptLookup(min_n=2, max_n=2, k=1).propose([1, 2, 3, 1, 2, 4, 1, 2]) == [4]


def test_prompt_lookup_starts_over_on_a_new_sequence():
    drafter = PromptLookup(k=2)
    assert drafter.propose([1, 2, 3, 1, 2]) == [3, 1]
    assert drafter.propose([9, 8, 7, 9, 8]) == [7, 9]  # not an extension: re-indexed
    assert drafter.propose([9, 8]) == []  # shorter: re-indexed
    drafter.reset()
    assert drafter.propose([5, 6, 5]) == [] and drafter.propose([5, 6, 5, 6]) == [5, 6]


def test_drafter_options():
    for bad in (dict(min_n=0), dict(k=0), dict(max_n=1, min_n=2), dict(k=True), dict(per_token=0)):
        with pytest.raises(ValueError):
            PromptLookup(**bad)
    assert make_drafter("none", 4) is None and make_drafter(None, 4) is None
    ngram = make_drafter("ngram", 3)
    assert isinstance(ngram, PromptLookup) and (ngram.k, ngram.min_n, ngram.max_n, ngram.per_token) == (3, 1, 4, 2)
    custom = Drafter()
    assert make_drafter(custom, 4) is custom
    with pytest.raises(ValueError, match="expected 'ngram', 'none', a local model directory or a Drafter"):
        make_drafter("eagle", 4)


# ---------------------------------------------------------------- KV truncation
PROMPT, TOKENS, DRAFTS = [5, 6, 7, 8, 9], [10, 11], [40, 41, 42]


def _report(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    delta = (got - want).abs().max().item() if got.numel() else 0.0
    print(f"{what}: torch.equal={torch.equal(got, want)} max|Δ|={delta:.3g}")
    assert got.shape == want.shape and torch.allclose(got, want, atol=ATOL), (what, delta)


@pytest.mark.parametrize("k", [0, 1, NUM_LAYERS])
def test_truncate_then_forward_equals_a_fresh_pass(tiny_chat_model, k):
    layers = LocalLayers(tiny_chat_model, split_layer=k)
    layers.forward(PROMPT)
    layers.forward([TOKENS[0], *DRAFTS])  # the last token and three drafts, all rejected
    assert layers.num_positions == len(PROMPT) + 1 + len(DRAFTS)
    layers.truncate(len(PROMPT) + 1)  # keep the last token's position
    assert layers.num_positions == len(PROMPT) + 1
    if k:
        assert layers.cache.get_seq_length() == len(PROMPT) + 1
    after = layers.forward([TOKENS[1], 12, 13])  # the server's token and new drafts
    fresh = LocalLayers(tiny_chat_model, split_layer=k).forward(PROMPT + [TOKENS[0], TOKENS[1], 12, 13])
    _report(f"k={k} truncate+forward vs fresh", after, fresh[-3:])
    layers.truncate(layers.num_positions)  # nothing to drop
    layers.truncate(0)
    _report(f"k={k} truncate(0)+forward vs fresh", layers.forward(PROMPT), fresh[: len(PROMPT)])
    with pytest.raises(ValueError, match="truncate: expected 0 <= num_positions <= 5"):
        layers.truncate(6)


@pytest.mark.parametrize("k", [1, NUM_LAYERS])
def test_a_pass_over_the_token_and_its_drafts_equals_one_token_at_a_time(tiny_chat_model, k):
    together = LocalLayers(tiny_chat_model, split_layer=k)
    together.forward(PROMPT)
    rows = together.forward([TOKENS[0], *DRAFTS])
    apart = LocalLayers(tiny_chat_model, split_layer=k)
    apart.forward(PROMPT)
    single = torch.cat([apart.forward([t]) for t in [TOKENS[0], *DRAFTS]])
    _report(f"k={k} [x, d1..d3] vs one at a time", rows, single)


async def test_shared_views_truncate_their_own_cache(tiny_chat_model):
    shared = SharedLayers(LocalLayers(tiny_chat_model))
    try:
        a, b = shared.view(), shared.view()
        a.use_split_layer(2)
        b.use_split_layer(3)
        await asyncio.gather(a.aforward(PROMPT), b.aforward(PROMPT))
        await a.aforward([TOKENS[0], *DRAFTS])
        await b.aforward([TOKENS[0]])
        a.truncate(len(PROMPT) + 1)
        assert (a.num_positions, b.num_positions) == (len(PROMPT) + 1, len(PROMPT) + 1)
        got = await a.aforward([TOKENS[1]])
        assert b.cache.get_seq_length() == len(PROMPT) + 1  # untouched
    finally:
        shared.close()
    fresh = LocalLayers(tiny_chat_model, split_layer=2).forward(PROMPT + TOKENS)
    _report("shared view k=2 truncate+forward vs fresh", got, fresh[-1:])


async def test_replay_layers_truncate_and_take_drafts():
    states = torch.arange(3 * 8 * 2, dtype=torch.float32).reshape(3, 8, 2)  # 2 layers, 8 positions
    profile = wire.ClientProfile(layer_prefill_s_per_token=0.0, layer_decode_s=0.0)
    script = [1, 2, 3, 4, 5, 6, 7, 8]
    layers = ReplayLayers(states, script, profile=profile, fingerprint="fp", split_layer=1)
    await layers.aforward([1, 2, 3])
    rows = await layers.aforward([4, 99, 6])  # a wrong draft (99) is no script mismatch
    assert torch.equal(rows, states[1, 3:6]) and layers.mismatch is None
    layers.truncate(5)
    rows = await layers.aforward([6, 7, 8, 9])  # past the script: zero rows
    assert torch.equal(rows[:3], states[1, 5:8]) and torch.equal(rows[3], torch.zeros(2))
    assert layers.mismatch is None
    layers.truncate(4)
    await layers.aforward([0, 6])  # the token itself must match
    assert layers.mismatch == "position 4: got tokens [0], the script has [5]"
    with pytest.raises(ValueError):
        layers.truncate(7)
