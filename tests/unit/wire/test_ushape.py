"""The U-shaped session's wire extension: Open.u_shape / return_layer, Opened.return_layer,
the Hidden frame (round trips are in test_protocol's SAMPLE_MESSAGES), its refusals, and
that a frame without the extension is byte-identical to before (old servers take it)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.unit.wire.test_protocol import _frame, _open_meta
from vllm_split.wire import protocol as wire
from vllm_split.wire.ushape import u_layers_problem


def _meta(frame: bytes) -> dict:
    return json.loads(frame[wire.HEADER_SIZE:])


def test_the_u_fields_are_sent_only_when_used():
    plain = _meta(wire.encode(wire.Open(model_fingerprint="fp", split_layer=3)))
    assert "u_shape" not in plain and "return_layer" not in plain
    u = _meta(wire.encode(wire.Open(model_fingerprint="fp", split_layer=3, u_shape=True, return_layer=9)))
    assert (u["u_shape"], u["return_layer"]) == (True, 9)
    opened = _meta(wire.encode(wire.Opened(session_id="s", split_layer=3, num_layers=30, hidden_size=4, dtype="float32",
                                           max_frame_bytes=1 << 20)))
    assert "return_layer" not in opened


def test_an_old_server_refuses_a_u_open_as_an_unknown_field():
    """What a server without the extension does with a U Open: its decoder knows only the
    old fields, so the frame is a ProtocolError (an Error frame), never a prefix session."""
    frame = wire.encode(wire.Open(model_fingerprint="fp", split_layer=3, u_shape=True, return_layer=9))
    old_fields = set(_open_meta()) | {"sampling", "protocol_version", "sla", "client", "expected_output_tokens",
                                      "prompt_tokens"}
    unknown = sorted(set(_meta(frame)) - old_fields)
    assert unknown == ["return_layer", "u_shape"]


@pytest.mark.parametrize("over, match", [
    ({"u_shape": True}, r"a U-shaped session with split_layer 3 needs return_layer \(m > 3\)"),
    ({"u_shape": True, "return_layer": 3}, r"return_layer 3 must be above split_layer 3"),
    ({"u_shape": True, "return_layer": 2}, r"return_layer 2 must be above split_layer 3"),
    ({"return_layer": 9}, r"return_layer 9: expected u_shape true"),
    ({"u_shape": True, "return_layer": 9, "split_layer": None}, r"fixes both layers or neither"),
    ({"u_shape": True, "return_layer": 0}, r"return_layer: expected >= 1, got 0"),
    ({"u_shape": "yes"}, r"u_shape: expected true or false"),
])
def test_bad_u_opens_are_refused(over, match):
    with pytest.raises(wire.ProtocolError, match=match):
        wire.decode(_frame(1, _open_meta(**over)))


def test_u_open_letting_the_server_choose_both_layers():
    msg = wire.decode(_frame(1, _open_meta(split_layer=None, u_shape=True)))
    assert msg.u_shape and msg.return_layer is None and msg.split_layer is None


@pytest.mark.parametrize("k, m, n, low, match", [
    (3, 3, 30, 0, r"expected 0 <= split_layer < return_layer <= 30"),
    (3, 31, 30, 0, r"return_layer 31\) out of range"),
    (2, 9, 30, 4, r"this server holds no layers below 4"),
])
def test_the_server_refuses_u_layers_it_cannot_run(k, m, n, low, match):
    assert u_layers_problem(3, 9, 30) is None
    assert u_layers_problem(0, 30, 30) is None
    import re

    assert re.search(match, u_layers_problem(k, m, n, min_layer=low))


def test_hidden_frames_check_their_payload():
    h = wire.Hidden.from_tensor(torch.randn(3, 4), index=0, start=0, wire_dtype="int8_mixed")
    back = wire.decode(wire.encode(h))
    assert back.end == 3 and back.to_tensor().shape == (3, 4)
    meta = {"index": 0, "start": 0, "dtype": "float32", "shape": [2, 4]}
    with pytest.raises(wire.ProtocolError, match=r"payload: shape \[2, 4\] in float32 needs 32 bytes, got 8"):
        wire.decode(_frame(11, meta, b"\0" * 8))
    with pytest.raises(wire.ProtocolError, match=r"finish_reason: expected one of"):
        wire.decode(_frame(11, {**meta, "finish_reason": "done"}, b"\0" * 32))
    with pytest.raises(wire.ProtocolError, match=r"Hidden: unknown field\(s\) \['token_id'\]"):
        wire.decode(_frame(11, {**meta, "token_id": 5}, b"\0" * 32))
