"""Property-based tests of the wire decoder beyond "nothing but ProtocolError"
(test_protocol.py): what it accepts is canonical, limits hold, errors stay readable.

The coverage-guided counterpart is ``benchmarks/fuzz_decoder.py`` (atheris).
"""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.wire.test_protocol import SAMPLE_MESSAGES, _frame, _json_values, _FIELD_NAMES
from vllm_split.wire import protocol as wire

MAX_MESSAGE_CHARS = 2000  # an Error's message stays readable whatever the frame held


def _mutated(data) -> bytes:
    frame = bytearray(wire.encode(data.draw(st.sampled_from(SAMPLE_MESSAGES))))
    for _ in range(data.draw(st.integers(0, 3))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        i = data.draw(st.integers(0, len(frame) - 1))
        if op == "flip":
            frame[i] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            frame[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        elif len(frame) > 1:
            del frame[i]
    return bytes(frame)


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_what_decodes_is_canonical(data):
    """A frame that decodes re-encodes to a frame that decodes to the same message."""
    frame = _mutated(data)
    try:
        msg = wire.decode(frame)
    except wire.ProtocolError as exc:
        assert 0 < len(str(exc)) <= MAX_MESSAGE_CHARS
        return
    assert wire.decode(wire.encode(msg)) == msg


@settings(max_examples=300, deadline=None)
@given(st.data(), st.integers(1, 200))
def test_no_frame_over_the_limit_is_accepted(data, limit):
    frame = _mutated(data)
    try:
        wire.decode(frame, max_frame_bytes=limit)
    except wire.ProtocolError:
        return
    assert len(frame) <= limit


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(wire._KINDS)), st.dictionaries(st.sampled_from(_FIELD_NAMES) | st.text(max_size=300),
                                                             _json_values, max_size=7))
def test_error_messages_stay_bounded(kind, meta):
    """Even with long unknown field names or values, the message names the problem briefly."""
    try:
        wire.decode(_frame(kind, meta))
    except wire.ProtocolError as exc:
        assert 0 < len(str(exc)) <= MAX_MESSAGE_CHARS


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8), st.integers(1, 64), st.sampled_from(sorted(wire.TENSOR_DTYPES)))
def test_activation_payload_matches_its_declared_shape(rows, hidden, dtype):
    """Any declared shape: accepted only with exactly rows * hidden * itemsize bytes."""
    need = rows * hidden * wire.TENSOR_DTYPES[dtype]
    meta = {"start": 0, "dtype": dtype, "shape": [rows, hidden]}
    for size in (need - 1, need + 1, need):
        if size < 0:
            continue
        try:
            msg = wire.decode(_frame(wire.Activation.KIND, meta, b"\0" * size))
        except wire.ProtocolError:
            assert size != need
            continue
        assert size == need and tuple(msg.to_tensor().shape) == (rows, hidden)
