"""``Open.request_type`` on the wire (issue 14): it round-trips, is left out of the frame when
empty (older servers take the frame), and is checked: 0 to 32 printable characters."""
from __future__ import annotations

import json
import struct

import pytest

from vllm_split.wire import protocol as wire


def _frame(meta: dict) -> bytes:
    raw = json.dumps(meta).encode()
    return struct.pack("<4sBBI", wire.MAGIC, wire.PROTOCOL_VERSION, wire.Open.KIND, len(raw)) + raw


def test_the_type_round_trips_and_is_left_out_when_empty():
    msg = wire.Open(model_fingerprint="fp", split_layer=None, max_drafts=4, request_type="code edit")
    assert wire.decode(wire.encode(msg)) == msg and b'"request_type":"code edit"' in wire.encode(msg)
    assert b"request_type" not in wire.encode(wire.Open(model_fingerprint="fp", split_layer=None))
    assert wire.decode(_frame({"model_fingerprint": "fp", "split_layer": 3})).request_type == ""  # an older client


@pytest.mark.parametrize("bad", ["x" * 33, "code\n", "tab\there", "\x00", 7, None])
def test_a_bad_type_is_a_protocol_error(bad):
    with pytest.raises(wire.ProtocolError, match=r"request_type: expected 0 to 32 printable characters, got "):
        wire.decode(_frame({"model_fingerprint": "fp", "split_layer": None, "request_type": bad}))


def test_the_longest_type_is_taken():
    assert wire.decode(_frame({"model_fingerprint": "fp", "split_layer": 3, "request_type": "é" * 32})).request_type \
        == "é" * 32
