"""Draft frames (issue 14): Open/Opened.max_drafts, Activation.draft_ids and the Tokens answer
round-trip; a frame without drafts is byte-identical to before; bad drafts are refused."""
import pytest
import torch

from vllm_split.wire import protocol as wire
from vllm_split.wire.drafts import MAX_DRAFTS, Tokens, accepted_drafts
from vllm_split.wire.errors import ProtocolError

ROWS = torch.arange(12, dtype=torch.float32).reshape(3, 4)


def roundtrip(msg):
    return wire.decode(wire.encode(msg))


def test_drafts_round_trip():
    act = wire.Activation.from_tensor(ROWS, start=40, draft_ids=(7, 9))
    got = roundtrip(act)
    assert got.draft_ids == (7, 9) and got.rows == 3 and torch.equal(got.to_tensor(), ROWS)
    assert roundtrip(wire.Open(model_fingerprint="f", split_layer=3, max_drafts=4)).max_drafts == 4
    opened = wire.Opened(session_id="s", split_layer=3, num_layers=30, hidden_size=4, dtype="float32",
                         max_frame_bytes=1024, max_drafts=2)
    assert roundtrip(opened).max_drafts == 2
    tokens = roundtrip(Tokens(index=5, token_ids=(7, 9, 11), finish_reason="length"))
    assert (tokens.index, tokens.token_ids, tokens.finish_reason, tokens.end) == (5, (7, 9, 11), "length", 8)


def test_frames_without_drafts_leave_the_fields_out():
    for msg in (wire.Activation.from_tensor(ROWS[:1], start=3), wire.Open(model_fingerprint="f", split_layer=3),
                wire.Opened(session_id="s", split_layer=3, num_layers=30, hidden_size=4, dtype="float32",
                            max_frame_bytes=1024)):
        assert b"draft" not in wire.encode(msg)  # an older peer takes them


@pytest.mark.parametrize("make,match", [
    (lambda: wire.Activation.from_tensor(ROWS, start=0, draft_ids=(7,)), "1 drafts need 2 rows"),
    (lambda: wire.Activation.from_tensor(ROWS, start=0, draft_ids=(7, -1)), "draft_ids"),
    (lambda: wire.Activation.from_tensor(ROWS, start=0, draft_ids=(7, 2 ** 31)), "2\\*\\*31"),
    (lambda: wire.Activation.from_tensor(ROWS, start=0, draft_ids=(7, 8), end_of_prompt=True), "not on a prompt"),
    (lambda: wire.Open(model_fingerprint="f", split_layer=3, max_drafts=MAX_DRAFTS + 1), "at most"),
    (lambda: Tokens(index=0, token_ids=()), "1 to"),
    (lambda: Tokens(index=0, token_ids=(1,) * (MAX_DRAFTS + 2)), "1 to"),
])
def test_bad_drafts_are_refused(make, match):
    with pytest.raises(ProtocolError, match=match):
        make()


def test_accepted_drafts_is_the_common_prefix_before_the_servers_token():
    assert accepted_drafts([7, 9, 4], (7, 9, 4, 2)) == 3  # all accepted, then the bonus token
    assert accepted_drafts([7, 9, 4], (7, 5)) == 1  # 9 rejected: 5 is the correction
    assert accepted_drafts([7, 9, 4], (3,)) == 0
    assert accepted_drafts([], (3,)) == 0
