"""``Open.privacy_floor`` on the wire: it round-trips, is left out of the frame at 0 (older
servers take the frame), is checked, and a server that does not know the field refuses a
frame carrying it: the right failure for a privacy request."""
from __future__ import annotations

import dataclasses
import json
import struct

import pytest

from vllm_split.wire import protocol as wire


def _meta(msg: wire.Message) -> dict:
    frame = wire.encode(msg)
    (meta_len,) = struct.unpack_from("<I", frame, 6)
    return json.loads(frame[wire.HEADER_SIZE: wire.HEADER_SIZE + meta_len])


def _frame(meta: dict) -> bytes:
    raw = json.dumps(meta).encode()
    return struct.pack("<4sBBI", wire.MAGIC, wire.PROTOCOL_VERSION, wire.Open.KIND, len(raw)) + raw


def test_the_floor_round_trips_and_is_left_out_at_zero():
    msg = wire.Open(model_fingerprint="fp", split_layer=None, privacy_floor=12)
    assert wire.decode(wire.encode(msg)) == msg and _meta(msg)["privacy_floor"] == 12
    assert "privacy_floor" not in _meta(wire.Open(model_fingerprint="fp", split_layer=None))
    assert wire.decode(_frame({"model_fingerprint": "fp", "split_layer": 3})).privacy_floor == 0  # an older client


@pytest.mark.parametrize("bad, expected", [(-1, r"privacy_floor: expected >= 0, got -1"),
                                           (True, r"privacy_floor: expected an integer, got True"),
                                           (2.5, r"privacy_floor: expected an integer, got 2.5"),
                                           ("12", r"privacy_floor: expected an integer, got '12'")])
def test_a_bad_floor_is_a_protocol_error(bad, expected):
    with pytest.raises(wire.ProtocolError, match=expected):
        wire.decode(_frame({"model_fingerprint": "fp", "split_layer": None, "privacy_floor": bad}))


def test_a_server_that_does_not_know_the_field_refuses_a_frame_carrying_it(monkeypatch):
    # an older server's Open: every field but privacy_floor, decoded by the same strict decoder
    older = dataclasses.make_dataclass("Open", [
        (f.name, f.type, dataclasses.field(default=f.default, default_factory=f.default_factory))
        for f in dataclasses.fields(wire.Open) if f.name != "privacy_floor"])
    monkeypatch.setitem(wire._KINDS, wire.Open.KIND, older)
    floored = wire.encode(wire.Open(model_fingerprint="fp", split_layer=None, privacy_floor=12))
    with pytest.raises(wire.ProtocolError, match=r"Open: unknown field\(s\) \['privacy_floor'\]"):
        wire.decode(floored)
    assert isinstance(wire.decode(wire.encode(wire.Open(model_fingerprint="fp", split_layer=None))), older)
