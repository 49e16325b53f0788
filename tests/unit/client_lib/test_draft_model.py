"""The draft-model drafter (issue 14): a tiny random Llama's proposals equal its greedy
continuation computed from scratch (no cache) for fresh contexts, after rejected drafts (the KV
cache cropped to the common prefix), past accepted drafts and on unrelated contexts; loading
from a local directory and ``make_drafter``'s choices; a drafting session against the fake
server of ``test_drafts_session`` gets the script exactly."""
from __future__ import annotations

import random

import pytest
import torch

from client_lib import LocalLayers
from client_lib.drafts import DraftModel, PromptLookup, check_vocab, make_drafter
from tests.unit.client_lib.test_drafts_session import PROMPT, DraftServer, _generate

VOCAB = 64


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    torch.manual_seed(14)
    return LlamaForCausalLM(config).eval()


def greedy_reference(model, context: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``context``, each from a full forward without a cache."""
    tokens = list(context)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0, -1]
            tokens.append(int(logits.argmax()))
    return tokens[len(context):]


def _check(drafter: DraftModel, model, context: list[int], limit: int) -> list[int]:
    drafts = drafter.propose(context, limit)
    assert drafts == greedy_reference(model, context, min(limit, drafter.k)), context
    held = drafter._cache.get_seq_length()  # the invariant: the cache holds exactly the tokens fed
    assert held == len(drafter._tokens) == len(context) + len(drafts) - 1
    assert drafter._tokens == context + drafts[:-1]
    return drafts


def _contexts(rng: random.Random):
    yield [rng.randrange(VOCAB) for _ in range(12)]
    yield [rng.randrange(VOCAB) for _ in range(40)]
    yield [3]
    yield [rng.randrange(8) for _ in range(25)]


def test_proposals_equal_the_greedy_reference(model):
    rng = random.Random(0)
    contexts = list(_contexts(rng))
    references = [greedy_reference(model, c, 6) for c in contexts]
    assert len({tuple(r) for r in references}) == len(references)  # the model's guesses depend on the context
    shared = DraftModel(model, k=6)  # one drafter across unrelated contexts: no common prefix, shorter ones
    for context in [*contexts, *reversed(contexts)]:
        assert DraftModel(model, k=6).propose(context, 6) == greedy_reference(model, context, 6)
        _check(shared, model, context, 6)
    assert _check(shared, model, contexts[0], 2) == references[0][:2]  # limit below k
    assert _check(shared, model, contexts[0], 9) == references[0]  # limit above k: k drafts


@pytest.mark.parametrize("k", [1, 4])
def test_a_session_of_rejections_and_acceptances_keeps_matching_the_reference(model, k):
    rng = random.Random(k)
    drafter = DraftModel(model, k=k)
    context = [rng.randrange(VOCAB) for _ in range(10)]
    num_cases = {"rejected": 0, "accepted": 0, "past": 0}
    for step in range(24):
        drafts = _check(drafter, model, context, k)
        case = ("rejected", "accepted", "past")[step % 3]
        num_cases[case] += 1
        if case == "rejected":  # the server accepts j drafts, then answers a token of its own that differs
            j = rng.randrange(len(drafts))
            context += drafts[:j] + [(drafts[j] + 1 + rng.randrange(VOCAB - 1)) % VOCAB]
        elif case == "accepted":  # every draft and the server's own token
            context += drafts + [rng.randrange(VOCAB)]
        else:  # the context runs several tokens past the drafts (the drafter was not asked for a while)
            context += drafts + [rng.randrange(VOCAB) for _ in range(rng.randrange(2, 6))]
    assert min(num_cases.values()) == 8
    # a shorter context: a prefix of the one held, cut inside it
    _check(drafter, model, context[:7], k)
    # a new sequence sharing nothing, then one sharing a first token only
    _check(drafter, model, [(t + 1) % VOCAB for t in context[:15]], k)
    _check(drafter, model, [(context[0] + 1) % VOCAB, 5, 6, 7], k)
    drafter.reset()
    assert drafter._cache is None and drafter._tokens == []
    _check(drafter, model, context, k)


def test_no_proposal_without_a_limit_or_a_context_nor_past_max_positions(model):
    drafter = DraftModel(model, k=4)
    assert drafter.propose([1, 2, 3], 0) == [] and drafter._tokens == []  # nothing is run
    assert drafter.propose([], 4) == []
    assert len(drafter.propose([1, 2, 3])) == 4  # no limit: k
    long = list(range(VOCAB)) * 4 + [1]  # 257 tokens; the model's max_position_embeddings is 256
    assert drafter.propose(long, 4) == []
    for n, num_drafts in ((256, 1), (255, 2), (253, 4)):  # never a position past 256 fed
        assert drafter.propose(long[:n], 4) == greedy_reference(model, long[:n], num_drafts)


@pytest.mark.parametrize("k", [0, -1, True, 2.0, "4"])
def test_k_is_checked(model, k):
    with pytest.raises(ValueError, match="k: expected an int >= 1"):
        DraftModel(model, k=k)


def test_load_from_a_local_directory(model, tmp_path):
    model.save_pretrained(tmp_path / "draft")
    loaded = DraftModel.load(tmp_path / "draft", k=3)
    assert loaded.k == 3 and loaded.vocab_size == VOCAB and next(loaded.model.parameters()).dtype == torch.float32
    context = [5, 9, 2, 33, 17, 4]
    assert loaded.propose(context, 3) == greedy_reference(model, context, 3)
    assert next(DraftModel.load(str(tmp_path / "draft"), dtype="bfloat16").model.parameters()).dtype == torch.bfloat16
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"draft model '{tmp_path / 'empty'}': no config.json"):
        DraftModel.load(tmp_path / "empty")
    with pytest.raises(ValueError, match=f"draft model '{tmp_path / 'missing'}': not a directory"):
        DraftModel.load(tmp_path / "missing")
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text((tmp_path / "draft" / "config.json").read_text())
    with pytest.raises(ValueError, match=f"draft model '{tmp_path / 'no_weights'}': cannot load a causal LM"):
        DraftModel.load(tmp_path / "no_weights")
    with pytest.raises(ValueError, match="dtype: expected a torch dtype or its name"):
        DraftModel.load(tmp_path / "draft", dtype="float33")


def test_make_drafter_takes_a_model_directory(model, tmp_path):
    model.save_pretrained(tmp_path)
    drafter = make_drafter(str(tmp_path), 5, vocab_size=VOCAB)
    assert isinstance(drafter, DraftModel) and drafter.k == 5
    assert isinstance(make_drafter(tmp_path, 2), DraftModel)
    assert isinstance(make_drafter("ngram", 4), PromptLookup) and make_drafter("none", 4) is None
    with pytest.raises(ValueError, match="expected 'ngram', 'none', a local model directory or a Drafter, got 'ngarm'"):
        make_drafter("ngarm", 4)
    with pytest.raises(ValueError, match="expected 'ngram', 'none', a local model directory or a Drafter"):
        make_drafter(str(tmp_path / "missing"), 4)
    with pytest.raises(ValueError, match="draft model vocabulary 64 differs from the served model's 65"):
        make_drafter(str(tmp_path), 4, vocab_size=VOCAB + 1)
    with pytest.raises(ValueError, match="draft model vocabulary 64 differs from the served model's 65"):
        make_drafter(drafter, 4, vocab_size=VOCAB + 1)
    assert make_drafter(drafter, 4, vocab_size=VOCAB) is drafter
    check_vocab(VOCAB, VOCAB)


async def test_a_session_drafting_with_a_draft_model(tiny_chat_model):
    """The served "model" is the draft model itself: a script of its greedy continuation gets every
    draft accepted; the same script with tokens changed gets rejections, and still exact output."""
    reference = DraftModel.load(tiny_chat_model, k=4)
    greedy = reference.propose(PROMPT, 4)
    while len(greedy) < 17:
        greedy += reference.propose(PROMPT + greedy, 4)
    greedy = greedy[:17]
    server = DraftServer(script=greedy)
    events, session = await _generate(server, LocalLayers(tiny_chat_model, split_layer=2), max_tokens=len(greedy),
                                      draft=str(tiny_chat_model), num_drafts=4, server_decode=False)
    assert [e.token_id for e in events] == greedy
    assert session.drafts_accepted == session.drafts_sent == len(greedy) - session.round_trips
    assert session.round_trips == 1 + -(-(len(greedy) - 1) // 5)  # the prompt's answer, then 5 tokens per trip
    edited = list(greedy)
    for i in (3, 9, 10):
        edited[i] = (edited[i] + 1) % 300
    server = DraftServer(script=edited)
    events, session = await _generate(server, LocalLayers(tiny_chat_model, split_layer=2), max_tokens=len(edited),
                                      draft=str(tiny_chat_model), num_drafts=4, server_decode=False)
    assert [e.token_id for e in events] == edited
    assert 0 < session.drafts_accepted < session.drafts_sent
    fresh = LocalLayers(tiny_chat_model, split_layer=2).forward(PROMPT + edited)[: server.rows.shape[0]]
    assert torch.allclose(server.rows, fresh, atol=1e-4)  # the rejected drafts' rows were dropped on both sides
