"""8-bit activation frames in the wire protocol: round trips, the negotiation fields, what one
row costs, and the refusal of a frame whose scales are NaN, zero, missing or the wrong size
(each with a message naming what was expected and what arrived)."""
from __future__ import annotations

import json
import re
import struct

import pytest
import torch

from tests.unit.wire.test_protocol import _frame
from vllm_split.wire import protocol as wire
from vllm_split.wire import quant

EIGHT_BIT = tuple(quant.FORMATS)
HIDDEN = 16


def _rows(rows: int = 3, hidden: int = HIDDEN) -> torch.Tensor:
    x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(1))
    x[:, 5] *= 20.0  # an outlier channel, as LLM residual streams have
    return x


def _meta(dtype: str = "int8_row", shape=(2, HIDDEN)) -> dict:
    return {"start": 0, "dtype": dtype, "shape": list(shape), "end_of_prompt": True}


def _int8_row_frame(scales: bytes, shape=(2, HIDDEN)) -> bytes:
    """An int8_row Activation frame whose codes are all 1 and whose scales are ``scales``."""
    return _frame(wire.Activation.KIND, _meta("int8_row", shape), b"\x01" * (shape[0] * shape[1]) + scales)


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("fmt", [f for f in EIGHT_BIT if quant.can_encode(f)])
def test_an_8bit_activation_round_trips_and_decodes_as_the_codec_does(fmt):
    x = _rows()
    msg = wire.Activation.from_tensor(x, start=7, end_of_prompt=True, wire_dtype=fmt)
    assert (msg.dtype, msg.shape, msg.start, msg.end_of_prompt) == (fmt, (3, HIDDEN), 7, True)
    assert len(msg.data) == 3 * wire.row_bytes(fmt, HIDDEN)
    back = wire.decode(wire.encode(msg))
    assert back == msg
    assert torch.equal(back.to_tensor(), quant.roundtrip(x, fmt))  # float32 by default
    half = back.to_tensor(dtype=torch.bfloat16)  # the server decodes into the model's dtype
    assert half.dtype == torch.bfloat16 and torch.equal(half, quant.roundtrip(x, fmt).to(torch.bfloat16))


def test_int8_mixed_keeps_a_massive_value_exact_on_the_wire():
    x = _rows()
    x[0, 3] = 24_000.0
    out = wire.decode(wire.encode(wire.Activation.from_tensor(x, start=0, wire_dtype="int8_mixed"))).to_tensor()
    assert out[0, 3] == 24_000.0 and (out - x).abs().max() < 0.2


@pytest.mark.parametrize("fmt", ["float32", "float16", "bfloat16"])
def test_a_float_wire_dtype_casts_the_tensor(fmt):
    msg = wire.Activation.from_tensor(_rows(), start=0, wire_dtype=fmt)
    assert msg.dtype == fmt and msg.to_tensor().dtype == getattr(torch, fmt)
    assert torch.equal(msg.to_tensor(dtype=torch.float32), _rows().to(getattr(torch, fmt)).float())


def test_without_a_wire_dtype_the_tensor_goes_in_its_own_dtype_as_before():
    x = _rows().to(torch.bfloat16)
    msg = wire.Activation.from_tensor(x, start=0)
    assert msg.dtype == "bfloat16" and torch.equal(msg.to_tensor(), x)


def test_a_value_that_overflows_float16_is_refused_when_sending():
    x = _rows()
    x[1, 2] = 70_000.0
    with pytest.raises(wire.ProtocolError, match="tensor: a value of magnitude 70000 overflows float16; choose a "
                                                 "wider wire dtype"):
        wire.Activation.from_tensor(x, start=0, wire_dtype="float16")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rows_cannot_be_sent_in_8bit(bad):
    x = _rows()
    x[2, 0] = bad
    with pytest.raises(wire.ProtocolError, match="tensor: expected finite values, got NaN or Inf"):
        wire.Activation.from_tensor(x, start=0, wire_dtype="int8_mixed")


def test_an_unknown_wire_dtype_is_refused_by_name():
    with pytest.raises(wire.ProtocolError, match=r"wire_dtype: expected one of \['float32', 'float16', 'bfloat16', "
                                                 r"'int8_row', 'int8_mixed', 'fp8_e4m3'\], got 'int4'"):
        wire.Activation.from_tensor(_rows(), start=0, wire_dtype="int4")


# ---------------------------------------------------------------- bytes per row
@pytest.mark.parametrize(("dtype", "expected"), [("float32", 2304), ("float16", 1152), ("bfloat16", 1152),
                                                 ("int8_row", 580), ("fp8_e4m3", 580), ("int8_mixed", 628)])
def test_row_bytes_is_what_a_row_costs_on_the_wire(dtype, expected):
    assert wire.row_bytes(dtype, 576) == expected  # SmolLM2-135M: the README's bytes per token


def test_row_bytes_refuses_unknown_dtypes_and_sizes():
    with pytest.raises(wire.ProtocolError, match=r"dtype: expected one of \[.*\], got 'float64'"):
        wire.row_bytes("float64", 576)
    with pytest.raises(wire.ProtocolError, match="hidden_size: expected >= 1, got 0"):
        wire.row_bytes("float16", 0)
    with pytest.raises(wire.ProtocolError, match=r"int8_mixed: hidden_size expected <= 65536"):
        wire.row_bytes("int8_mixed", 70_000)


# ---------------------------------------------------------------- the "must show" refusals
@pytest.mark.parametrize(("scale", "shown"), [(float("nan"), "nan"), (0.0, "0.0"), (-0.0, "-0.0"), (-1.0, "-1.0"),
                                              (float("inf"), "inf")])
def test_a_frame_with_a_nan_zero_or_negative_scale_is_refused_as_it_decodes(scale, shown):
    frame = _int8_row_frame(struct.pack("<2f", 0.5, scale))
    with pytest.raises(wire.ProtocolError, match=re.escape(
            f"scales[1]: expected a finite float32 in (0, 2.68e+36] (an all-zero row is sent with scale 1.0), "
            f"got {shown}")):
        wire.decode(frame)


def test_a_frame_without_its_scales_is_refused():
    with pytest.raises(wire.ProtocolError, match=re.escape(
            "payload: shape [2, 16] in int8_row needs 40 bytes (32 of 8-bit payload + 8 of float32 scales, one per "
            "row), got 32")):
        wire.decode(_int8_row_frame(b""))


@pytest.mark.parametrize("num_scales", [1, 3])
def test_a_frame_whose_scales_do_not_match_its_rows_is_refused(num_scales):
    with pytest.raises(wire.ProtocolError, match=re.escape(
            f"payload: shape [2, 16] in int8_row needs 40 bytes (32 of 8-bit payload + 8 of float32 scales, one per "
            f"row), got {32 + 4 * num_scales}")):
        wire.decode(_int8_row_frame(struct.pack(f"<{num_scales}f", *[1.0] * num_scales)))


def test_a_frame_whose_declared_shape_does_not_match_its_bytes_is_refused():
    good = wire.encode(wire.Activation.from_tensor(_rows(2), start=0, wire_dtype="int8_mixed"))
    payload = good[-2 * wire.row_bytes("int8_mixed", HIDDEN):]
    with pytest.raises(wire.ProtocolError, match=re.escape(
            "payload: shape [3, 16] in int8_mixed needs 204 bytes (192 of 8-bit payload + 12 of float32 scales, one "
            "per row), got 136")):
        wire.decode(_frame(wire.Activation.KIND, _meta("int8_mixed", (3, HIDDEN)), payload))
    assert wire.decode(_frame(wire.Activation.KIND, _meta("int8_mixed", (2, HIDDEN)), payload)).rows == 2


def test_bad_contents_beyond_the_scales_are_refused_when_decoded():
    msg = wire.Activation.from_tensor(_rows(1), start=0, wire_dtype="int8_mixed")
    n = quant.MIXED_OUTLIERS
    data = bytearray(msg.data)
    struct.pack_into("<H", data, HIDDEN + 2 * (n - 1), 60_000)  # last outlier channel out of range
    bad = wire.decode(_frame(wire.Activation.KIND, _meta("int8_mixed", (1, HIDDEN)), bytes(data)))
    with pytest.raises(wire.ProtocolError, match=rf"outlier index \[0, {n - 1}\]: expected a channel < hidden_size "
                                                 rf"{HIDDEN}, got 60000"):
        bad.to_tensor()


def test_an_8bit_format_is_refused_for_a_hidden_size_it_cannot_index():
    with pytest.raises(wire.ProtocolError, match=r"int8_mixed: hidden_size expected <= 65536 .*got 70000"):
        wire.decode(_frame(wire.Activation.KIND, _meta("int8_mixed", (1, 70_000)), b""))


# ---------------------------------------------------------------- negotiation fields
def test_open_offers_wire_dtypes_in_order_and_a_json_list_becomes_a_tuple():
    msg = wire.decode(_frame(wire.Open.KIND, {"model_fingerprint": "fp", "split_layer": 2,
                                              "wire_dtypes": ["int8_mixed", "float16", "int4_future"]}))
    assert msg.wire_dtypes == ("int8_mixed", "float16", "int4_future")  # unknown names: the server skips them
    assert wire.Open(model_fingerprint="fp", split_layer=2).wire_dtypes == ()  # default: as before


@pytest.mark.parametrize(("offered", "match"), [
    ("int8_mixed", r"wire_dtypes: expected a list, got 'int8_mixed'"),
    (["float16", "float16"], r"wire_dtypes: expected distinct names, got \['float16', 'float16'\]"),
    ([""], r"wire_dtypes\[\]: expected a name of 1 to 32 characters, got ''"),
    ([3], r"wire_dtypes\[\]: expected a name of 1 to 32 characters, got 3"),
    (["x" * 33], r"wire_dtypes\[\]: expected a name of 1 to 32 characters, got 'xxxx"),
    ([f"f{i}" for i in range(17)], r"wire_dtypes: expected at most 16 names, got 17"),
])
def test_bad_offers_are_refused(offered, match):
    with pytest.raises(wire.ProtocolError, match=match):
        wire.decode(_frame(wire.Open.KIND, {"model_fingerprint": "fp", "split_layer": 2, "wire_dtypes": offered}))


def test_opened_names_a_known_wire_dtype_or_none():
    base = dict(session_id="s", split_layer=1, num_layers=4, hidden_size=8, dtype="float32", max_frame_bytes=1024)
    assert wire.Opened(**base).wire_dtype is None
    assert wire.Opened(**base, wire_dtype="fp8_e4m3").wire_dtype == "fp8_e4m3"
    with pytest.raises(wire.ProtocolError, match=r"wire_dtype: expected one of \[.*\], got 'int4'"):
        wire.Opened(**base, wire_dtype="int4")


def test_the_new_fields_are_left_out_unless_used_so_older_peers_read_the_frames():
    def meta(msg) -> dict:
        frame = wire.encode(msg)
        (meta_len,) = struct.unpack_from("<I", frame, 6)
        return json.loads(frame[wire.HEADER_SIZE: wire.HEADER_SIZE + meta_len])

    base = dict(session_id="s", split_layer=1, num_layers=4, hidden_size=8, dtype="float32", max_frame_bytes=1024)
    assert "wire_dtypes" not in meta(wire.Open(model_fingerprint="fp", split_layer=2))
    assert "wire_dtype" not in meta(wire.Opened(**base))
    assert meta(wire.Open(model_fingerprint="fp", split_layer=2, wire_dtypes=("int8_row",)))["wire_dtypes"] == [
        "int8_row"]
    assert meta(wire.Opened(**base, wire_dtype="float16"))["wire_dtype"] == "float16"
