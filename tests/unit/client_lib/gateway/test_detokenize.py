"""The gateway's text: incremental detokenisation equals decoding everything at once, and
stop strings are found across token boundaries with nothing after them released."""
from __future__ import annotations

import random

import pytest

from client_lib.gateway.detokenize import IncrementalDetokenizer, StopStrings


def _stream(tokenizer, prompt_ids, ids, **kw) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, **kw)
    out = [detok.add(t) for t in ids]
    out[-1] += detok.flush()
    return out


def test_incremental_text_equals_the_whole_decode_with_multibyte_characters(tiny_tokenizer):
    text = "Hello world! café ☕ naïve. The answer is 42."
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = _stream(tiny_tokenizer, tiny_tokenizer("Hi")["input_ids"], ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # a character split over tokens is held back, not broken
    assert "" in pieces  # ... which happens here: ☕ is three byte tokens


def test_random_token_streams_equal_the_whole_decode(tiny_tokenizer):
    rng = random.Random(0)
    vocab = len(tiny_tokenizer)
    for _ in range(50):
        ids = [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 30))]
        whole = tiny_tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert "".join(_stream(tiny_tokenizer, [5, 6], ids)) == whole


def test_special_tokens_are_skipped_or_kept(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    ids = tiny_tokenizer("Hello", add_special_tokens=False)["input_ids"] + [eos]
    assert "".join(_stream(tiny_tokenizer, [], ids)) == "Hello"
    assert "".join(_stream(tiny_tokenizer, [], ids, skip_special_tokens=False)) == "Hello<|im_end|>"


def _feed(stops: StopStrings, pieces: list[str]) -> list[str]:
    out = []
    for i, piece in enumerate(pieces):
        out.append(stops.feed(piece, final=i == len(pieces) - 1))
        if stops.matched:
            break
    return out


def test_a_stop_string_spanning_pieces_ends_the_text_before_it():
    stops = StopStrings(["END"])
    out = _feed(stops, ["The answer is 4", "2. E", "N", "D of story"])
    assert stops.matched == "END"
    assert "".join(out) == "The answer is 42. " == stops.text
    assert out == ["The answer is", " 42.", " ", ""]  # 2 characters (len("END") - 1) held back at each step


def test_the_stop_string_is_kept_with_include_in_output_and_nothing_is_held_back():
    stops = StopStrings(["END"], include_in_output=True)
    out = _feed(stops, ["The answer is 4", "2. E", "ND of story"])
    assert out == ["The answer is 4", "2. E", "ND"] and stops.matched == "END"


def test_the_earliest_stop_string_wins_and_text_without_one_is_released_at_the_end():
    stops = StopStrings(["story", "answer"])
    assert "".join(_feed(stops, ["The ans", "wer is 42. END of story"])) == "The "
    assert stops.matched == "answer"
    plain = StopStrings(["zzz"])
    assert "".join(_feed(plain, ["The answer ", "is zz"])) == "The answer is zz" and plain.matched is None
    none = StopStrings([])
    assert _feed(none, ["a", "b"]) == ["a", "b"]


@pytest.mark.parametrize("seed", range(20))
def test_stop_strings_agree_with_searching_the_whole_text(seed):
    rng = random.Random(seed)
    text = "".join(rng.choice("ab c") for _ in range(60))
    stop = "".join(rng.choice("ab c") for _ in range(rng.randrange(2, 5)))
    cuts = sorted(rng.sample(range(1, len(text)), 10))
    pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
    stops = StopStrings([stop])
    released = "".join(_feed(stops, pieces))
    index = text.find(stop)
    assert released == (text if index == -1 else text[:index])
    assert stops.matched == (None if index == -1 else stop)
