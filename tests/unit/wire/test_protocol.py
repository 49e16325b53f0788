"""The wire format: every message round-trips exactly; every malformed frame is a ProtocolError."""
from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_split.wire import protocol as wire

REPO_ROOT = Path(__file__).resolve().parents[3]
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# integer views used to compare tensors bit for bit (NaN payloads, -0.0, subnormals included)
INT_VIEWS = {"float32": torch.int32, "float16": torch.int16, "bfloat16": torch.int16}


def _frame(kind: int, meta: dict | bytes, payload: bytes = b"", *, magic: bytes = wire.MAGIC,
           version: int = wire.PROTOCOL_VERSION, meta_len: int | None = None) -> bytes:
    m = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    n = len(m) if meta_len is None else meta_len
    return struct.pack("<4sBBI", magic, version, kind, n) + m + payload


def _activation_meta(**over) -> dict:
    return {"start": 0, "dtype": "float32", "shape": [2, 4], "end_of_prompt": False, **over}


def _open_meta(**over) -> dict:
    return {"model_fingerprint": "fp1-abc", "split_layer": 3, **over}


# ---------------------------------------------------------------- round trips
SAMPLE_MESSAGES = [
    wire.Open(model_fingerprint="fp1-abc", split_layer=7),
    wire.Open(model_fingerprint="fp1-abc", split_layer=0,
              sampling=wire.SamplingOptions(max_tokens=5, temperature=0.7, top_p=0.9, top_k=40, seed=1234,
                                            stop_token_ids=(2, 3), ignore_eos=True)),
    wire.Activation.from_tensor(torch.arange(12, dtype=torch.float32).reshape(3, 4), start=5, end_of_prompt=True),
    wire.Close(),
    wire.Opened(session_id="s-1", split_layer=7, num_layers=30, hidden_size=576, dtype="float32",
                max_frame_bytes=8 << 20),
    wire.Token(index=0, token_id=42),
    wire.Token(index=9, token_id=2, finish_reason="stop"),
    wire.Finished(finish_reason="length", num_prompt_tokens=12, num_output_tokens=8),
    wire.Error(code="protocol", message="bad frame", fatal=True),
    wire.Open(model_fingerprint="fp1-abc", split_layer=None, sla=wire.RequestSLA(ttft_s=2.0, tpot_s=0.1),
              client=wire.ClientProfile(layer_prefill_s_per_token=1e-5, layer_decode_s=4e-4),
              expected_output_tokens=32, prompt_tokens=100),
    wire.Open(model_fingerprint="fp1-abc", split_layer=None, sla=wire.RequestSLA(tpot_s=0.1),
              client=wire.ClientProfile(flops_per_s=2e12)),
    wire.Open(model_fingerprint="fp1-abc", split_layer=None, sla=wire.RequestSLA(tpot_s=0.1),
              client=wire.ClientProfile(layer_prefill_s_per_token=1e-5, layer_decode_s=4e-4, max_layers=6)),
    wire.Open(model_fingerprint="fp1-abc", split_layer=None, sla=wire.RequestSLA(tpot_s=0.1),
              client=wire.ClientProfile(max_layers=0)),
    wire.Opened(session_id="s-2", split_layer=12, num_layers=30, hidden_size=576, dtype="float32",
                max_frame_bytes=8 << 20, placement="dp", predicted_ttft_s=0.4, predicted_tpot_s=0.09),
    wire.Open(model_fingerprint="fp1-abc", split_layer=0, server_decode=True),
    wire.Opened(session_id="s-3", split_layer=0, num_layers=30, hidden_size=576, dtype="float32",
                max_frame_bytes=8 << 20, placement="server_only", server_decode=True),
    wire.PromptTokens.from_ids([1, 0, 49151, 7]),
    wire.Open(model_fingerprint="fp1-abc", split_layer=3, u_shape=True, return_layer=20),
    wire.Open(model_fingerprint="fp1-abc", split_layer=None, u_shape=True, sla=wire.RequestSLA(tpot_s=0.1),
              client=wire.ClientProfile(flops_per_s=2e12)),
    wire.Opened(session_id="s-4", split_layer=3, num_layers=30, hidden_size=576, dtype="float32",
                max_frame_bytes=8 << 20, return_layer=20),
    wire.Hidden.from_tensor(torch.arange(8, dtype=torch.float32).reshape(2, 4), index=0, start=0),
    wire.Hidden.from_tensor(torch.ones(1, 4), index=3, start=9, wire_dtype="float16", finish_reason="length"),
    wire.Probe(nonce=3, reply_bytes=65536),
    wire.ProbeReply(nonce=3, data=b"x" * 100),
    wire.Error(code="server_busy", message="retry", fatal=True, retry_after_s=1.5),
    wire.Open(model_fingerprint="fp1-abc", split_layer=7, wire_dtypes=("int8_mixed", "float16", "float32")),
    wire.Opened(session_id="s-4", split_layer=7, num_layers=30, hidden_size=576, dtype="bfloat16",
                max_frame_bytes=8 << 20, wire_dtype="int8_mixed"),
    wire.Activation.from_tensor(torch.arange(24, dtype=torch.float32).reshape(2, 12) - 11, start=3,
                                wire_dtype="int8_mixed"),
    wire.Activation.from_tensor(torch.linspace(-1, 1, 12).reshape(3, 4), start=0, wire_dtype="int8_row"),
    wire.Activation(start=1, dtype="fp8_e4m3", shape=(1, 4),
                    data=bytes([0x38, 0xB8, 0, 0x40]) + struct.pack("<f", 2.0)),
]


@pytest.mark.parametrize("msg", SAMPLE_MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_kind_round_trips(msg):
    frame = wire.encode(msg)
    assert frame[:4] == wire.MAGIC and frame[4] == wire.PROTOCOL_VERSION and frame[5] == msg.KIND
    back = wire.decode(frame)
    assert type(back) is type(msg) and back == msg


def test_message_kinds_are_distinct():
    kinds = [cls.KIND for cls in (wire.Open, wire.Opened, wire.Activation, wire.Token, wire.Finished,
                                  wire.Error, wire.Close, wire.Probe, wire.ProbeReply, wire.PromptTokens)]
    assert sorted(kinds) == list(range(1, 11))


def test_prompt_tokens_carry_int32_ids_in_the_payload():
    msg = wire.PromptTokens.from_ids([5, 0, 2**31 - 1])
    frame = wire.encode(msg)
    assert frame.endswith(struct.pack("<3i", 5, 0, 2**31 - 1))
    assert wire.decode(frame).token_ids() == [5, 0, 2**31 - 1]


@pytest.mark.parametrize("ids, message", [([], "num_tokens: expected >= 1"), ([-1], "token_ids[]: expected >= 0"),
                                          ([2**31], "expected < 2**31"), ([True], "expected an integer")])
def test_prompt_tokens_refuse_bad_ids(ids, message):
    with pytest.raises(wire.ProtocolError, match=re.escape(message)):
        wire.PromptTokens.from_ids(ids)


def test_prompt_tokens_refuse_a_payload_of_the_wrong_length_or_negative_ids():
    with pytest.raises(wire.ProtocolError, match="2 token ids in int32 need 8 bytes, got 4"):
        wire.decode(_frame(wire.PromptTokens.KIND, {"num_tokens": 2}, b"\0" * 4))
    negative = wire.decode(_frame(wire.PromptTokens.KIND, {"num_tokens": 1}, struct.pack("<i", -3)))
    with pytest.raises(wire.ProtocolError, match="expected ids >= 0, got -3"):
        negative.token_ids()


def test_decode_accepts_bytearray_and_memoryview():
    frame = wire.encode(SAMPLE_MESSAGES[2])
    assert wire.decode(bytearray(frame)) == SAMPLE_MESSAGES[2]
    assert wire.decode(memoryview(frame)) == SAMPLE_MESSAGES[2]


@st.composite
def _raw_tensors(draw):
    dtype = draw(st.sampled_from(sorted(wire.TENSOR_DTYPES)))
    rows, hidden = draw(st.integers(1, 6)), draw(st.integers(1, 48))
    size = rows * hidden * wire.TENSOR_DTYPES[dtype]
    data = draw(st.binary(min_size=size, max_size=size))  # any bit pattern: NaNs, infs, -0.0, subnormals
    tensor = torch.frombuffer(bytearray(data), dtype=TORCH_DTYPES[dtype]).reshape(rows, hidden)
    return dtype, tensor


@FAST
@given(_raw_tensors(), st.integers(0, 2**40), st.booleans())
def test_activation_tensors_round_trip_bit_exactly(dtype_tensor, start, end_of_prompt):
    dtype, tensor = dtype_tensor
    msg = wire.Activation.from_tensor(tensor, start=start, end_of_prompt=end_of_prompt)
    assert (msg.dtype, msg.shape, msg.rows) == (dtype, tuple(tensor.shape), tensor.shape[0])
    back = wire.decode(wire.encode(msg))
    assert back == msg
    out = back.to_tensor()
    assert out.dtype == tensor.dtype and out.shape == tensor.shape
    assert torch.equal(out.view(INT_VIEWS[dtype]), tensor.view(INT_VIEWS[dtype]))


def test_activation_from_a_non_contiguous_view_keeps_values():
    base = torch.randn(8, 6, dtype=torch.bfloat16)
    view = base.t()[:, 1:5]  # [6, 4], strided
    back = wire.decode(wire.encode(wire.Activation.from_tensor(view, start=0))).to_tensor()
    assert torch.equal(back, view)


def test_decoded_tensor_does_not_alias_the_frame():
    frame = bytearray(wire.encode(wire.Activation.from_tensor(torch.ones(1, 4), start=0)))
    out = wire.decode(frame).to_tensor()
    frame[-4:] = b"\x00\x00\x00\x00"
    assert torch.equal(out, torch.ones(1, 4))


def test_unsupported_tensors_are_refused_by_the_codec():
    with pytest.raises(wire.ProtocolError, match=r"tensor dtype float64 is not supported: expected one of "
                                                 r"\['bfloat16', 'float16', 'float32'\]"):
        wire.Activation.from_tensor(torch.zeros(2, 2, dtype=torch.float64), start=0)
    with pytest.raises(wire.ProtocolError, match=r"expected 2 dimensions \[rows, hidden\], got shape \[1, 2, 3\]"):
        wire.Activation.from_tensor(torch.zeros(1, 2, 3), start=0)


_sampling = st.builds(
    wire.SamplingOptions,
    max_tokens=st.integers(1, 1 << 20),
    temperature=st.floats(0.0, 1e6, allow_nan=False, allow_infinity=False),
    top_p=st.floats(0.0, 1.0, exclude_min=True),
    top_k=st.integers(0, 1 << 20),
    seed=st.none() | st.integers(0, 2**63 - 1),
    stop_token_ids=st.lists(st.integers(0, 1 << 20), max_size=5).map(tuple),
    ignore_eos=st.booleans(),
)


@FAST
@given(_sampling, st.integers(0, 200), st.text(min_size=1, max_size=20))
def test_sampling_options_round_trip(sampling, split_layer, fingerprint):
    msg = wire.Open(model_fingerprint=fingerprint, split_layer=split_layer, sampling=sampling)
    back = wire.decode(wire.encode(msg))
    assert back == msg and back.sampling == sampling
    assert isinstance(back.sampling.stop_token_ids, tuple)


def test_sampling_from_json_list_becomes_a_tuple():
    msg = wire.decode(_frame(wire.Open.KIND, _open_meta(sampling={"stop_token_ids": [5, 6]})))
    assert msg.sampling == wire.SamplingOptions(stop_token_ids=(5, 6))
    assert msg.sampling.temperature == 0.0 and msg.sampling.max_tokens == 64  # defaults fill the rest


def test_a_client_profile_without_max_layers_decodes_as_unbounded():
    """An older client's profile has no max_layers field: it decodes with no bound."""
    msg = wire.decode(_frame(wire.Open.KIND, _open_meta(client={"layer_prefill_s_per_token": 1e-5,
                                                               "layer_decode_s": 4e-4})))
    assert msg.client == wire.ClientProfile(layer_prefill_s_per_token=1e-5, layer_decode_s=4e-4)
    assert msg.client.max_layers is None
    bounded = wire.decode(_frame(wire.Open.KIND, _open_meta(client={"flops_per_s": 1e12, "max_layers": 4})))
    assert bounded.client.max_layers == 4


# ---------------------------------------------------------------- malformed frames
MALFORMED = [
    ("short header", b"VSPL\x01", r"frame of 5 bytes is shorter than the 10-byte header"),
    ("empty", b"", r"frame of 0 bytes is shorter than the 10-byte header"),
    ("bad magic", _frame(1, _open_meta(), magic=b"XSPL"), r"bad magic: expected b'VSPL', got b'XSPL'"),
    ("wrong version", _frame(1, _open_meta(), version=2),
     r"protocol version 2 is not supported: this side speaks version 1"),
    ("unknown kind", _frame(99, {}), r"unknown message kind 99: expected one of \[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12\]"),
    ("meta longer than frame", _frame(1, b"{}", meta_len=100),
     r"declared metadata length 100 does not fit: frame has 2 bytes after the header"),
    ("meta over limit", _frame(1, b"{}", meta_len=wire.MAX_META_BYTES + 1),
     rf"declared metadata length {wire.MAX_META_BYTES + 1} does not fit: .*\(limit {wire.MAX_META_BYTES}\)"),
    ("non-JSON meta", _frame(1, b"{not json"), r"metadata is not valid UTF-8 JSON: "),
    ("non-UTF-8 meta", _frame(1, b'{"a":"\xff"}'), r"metadata is not valid UTF-8 JSON: .*utf-8"),
    ("JSON list", _frame(1, b"[1, 2]"), r"metadata: expected a JSON object, got list"),
    ("JSON string", _frame(7, b'"x"'), r"metadata: expected a JSON object, got str"),
    ("unknown field", _frame(1, _open_meta(colour="red")),
     r"Open: unknown field\(s\) \['colour'\]; expected a subset of "
     r"\['client', 'expected_output_tokens', 'max_drafts', 'model_fingerprint', 'privacy_floor', 'prompt_tokens', "
     r"'protocol_version', 'request_type', 'return_layer', 'sampling', 'server_decode', 'sla', 'split_layer', "
     r"'u_shape', 'wire_dtypes'\]"),
    ("unknown sampling field", _frame(1, _open_meta(sampling={"temp": 1})),
     r"sampling: unknown field\(s\) \['temp'\]"),
    ("missing field", _frame(1, {"model_fingerprint": "fp"}),
     r"Open: .*missing 1 required positional argument: 'split_layer'"),
    ("SLA without bounds", _frame(1, _open_meta(split_layer=None, sla={})),
     r"sla: expected at least one of ttft_s, tpot_s"),
    ("negative SLA", _frame(1, _open_meta(sla={"tpot_s": -1})), r"sla.tpot_s: expected a value in \(0.0, 3600.0\]"),
    ("half a client profile", _frame(1, _open_meta(client={"layer_decode_s": 0.001})),
     r"client: give both layer_prefill_s_per_token and layer_decode_s, or neither"),
    ("empty client profile", _frame(1, _open_meta(client={})), r"client: expected layer times"),
    ("client profile not an object", _frame(1, _open_meta(client=[1])), r"client: expected an object, got list"),
    ("negative max_layers", _frame(1, _open_meta(client={"flops_per_s": 1e12, "max_layers": -1})),
     r"client.max_layers: expected >= 0, got -1"),
    ("float max_layers", _frame(1, _open_meta(client={"flops_per_s": 1e12, "max_layers": 2.5})),
     r"client.max_layers: expected an integer, got 2\.5"),
    ("no speed with a layer bound", _frame(1, _open_meta(client={"max_layers": 3})),
     r"client: expected layer times .*only a client holding no layer, max_layers=0, may omit both"),
    ("zero expected tokens", _frame(1, _open_meta(expected_output_tokens=0)), r"expected_output_tokens: expected >= 1"),
    ("huge probe", _frame(8, {"nonce": 1, "reply_bytes": 1 << 30}), r"reply_bytes: expected <= 1048576"),
    ("missing activation fields", _frame(3, {"start": 0}),
     r"Activation: .*missing 2 required .*'dtype' and 'shape'"),
    ("bool where int", _frame(1, _open_meta(split_layer=True)), r"split_layer: expected an integer, got True"),
    ("string where int", _frame(3, _activation_meta(start="0"), bytes(32)), r"start: expected an integer, got '0'"),
    ("float where int", _frame(1, _open_meta(sampling={"max_tokens": 1.5})),
     r"max_tokens: expected an integer, got 1\.5"),
    ("bool where int in list", _frame(1, _open_meta(sampling={"stop_token_ids": [1, False]})),
     r"stop_token_ids\[\]: expected an integer, got False"),
    ("int where bool", _frame(3, _activation_meta(end_of_prompt=1), bytes(32)),
     r"end_of_prompt: expected true or false, got 1"),
    ("empty fingerprint", _frame(1, _open_meta(model_fingerprint="")),
     r"model_fingerprint: expected a non-empty string, got ''"),
    ("sampling not an object", _frame(1, _open_meta(sampling=[1])), r"sampling: expected an object, got list"),
    ("negative start", _frame(3, _activation_meta(start=-1), bytes(32)), r"start: expected >= 0, got -1"),
    ("negative split layer", _frame(1, _open_meta(split_layer=-2)), r"split_layer: expected >= 0, got -2"),
    ("unknown dtype", _frame(3, _activation_meta(dtype="float64"), bytes(64)),
     r"dtype: expected one of \['float32', 'float16', 'bfloat16', 'int8_row', 'int8_mixed', 'fp8_e4m3'\], "
     r"got 'float64'"),
    ("1-D shape", _frame(3, _activation_meta(shape=[8]), bytes(32)),
     r"shape: expected \[rows, hidden_size\], got \[8\]"),
    ("3-D shape", _frame(3, _activation_meta(shape=[1, 2, 4]), bytes(32)),
     r"shape: expected \[rows, hidden_size\], got \[1, 2, 4\]"),
    ("shape not a list", _frame(3, _activation_meta(shape=8), bytes(32)), r"shape: expected a list, got 8"),
    ("zero rows", _frame(3, _activation_meta(shape=[0, 4])), r"shape\[\]: expected >= 1, got 0"),
    ("zero hidden", _frame(3, _activation_meta(shape=[2, 0])), r"shape\[\]: expected >= 1, got 0"),
    ("short payload", _frame(3, _activation_meta(), bytes(31)),
     r"payload: shape \[2, 4\] in float32 needs 32 bytes, got 31"),
    ("long payload", _frame(3, _activation_meta(dtype="bfloat16"), bytes(17)),
     r"payload: shape \[2, 4\] in bfloat16 needs 16 bytes, got 17"),
    ("payload on Token", _frame(4, {"index": 0, "token_id": 1}, b"abc"),
     r"Token carries no payload, got 3 extra bytes"),
    ("payload on Close", _frame(7, {}, b"\x00"), r"Close carries no payload, got 1 extra bytes"),
    ("NaN temperature", _frame(1, b'{"model_fingerprint":"fp","split_layer":1,"sampling":{"temperature":NaN}}'),
     r"temperature: expected a finite number, got nan"),
    ("infinite temperature", _frame(1, b'{"model_fingerprint":"fp","split_layer":1,"sampling":{"temperature":1e999}}'),
     r"temperature: expected a finite number, got inf"),
    ("negative temperature", _frame(1, _open_meta(sampling={"temperature": -0.5})),
     r"temperature: expected a value in \[0\.0, inf\], got -0\.5"),
    ("top_p zero", _frame(1, _open_meta(sampling={"top_p": 0.0})),
     r"top_p: expected a value in \(0\.0, 1\.0\], got 0\.0"),
    ("top_p above one", _frame(1, _open_meta(sampling={"top_p": 1.5})),
     r"top_p: expected a value in \(0\.0, 1\.0\], got 1\.5"),
    ("string top_p", _frame(1, _open_meta(sampling={"top_p": "0.5"})), r"top_p: expected a finite number, got '0\.5'"),
]


@pytest.mark.parametrize("frame, match", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_frames_raise_protocol_error(frame, match):
    with pytest.raises(wire.ProtocolError, match=match):
        wire.decode(frame)


def test_frames_over_the_limit_are_refused_before_parsing():
    frame = wire.encode(wire.Activation.from_tensor(torch.zeros(4, 8), start=0))
    assert wire.decode(frame, max_frame_bytes=len(frame)).rows == 4
    limit = len(frame) - 1
    with pytest.raises(wire.ProtocolError, match=rf"frame of {len(frame)} bytes exceeds the limit of {limit} bytes"):
        wire.decode(frame, max_frame_bytes=limit)
    # the limit applies before the header is even looked at
    with pytest.raises(wire.ProtocolError, match=r"frame of 20 bytes exceeds the limit of 10 bytes"):
        wire.decode(b"garbage" * 2 + b"\x00" * 6, max_frame_bytes=10)


@pytest.mark.parametrize("frame, what", [("VSPL", "a text frame"), (None, "NoneType"), (42, "int")])
def test_non_binary_frames_are_refused(frame, what):
    with pytest.raises(wire.ProtocolError, match=rf"expected a binary frame, got {what}"):
        wire.decode(frame)


def test_invalid_values_cannot_be_constructed_either():
    """The same checks guard the sending side: a bad message is never encoded."""
    with pytest.raises(wire.ProtocolError, match=r"temperature: expected a finite number, got nan"):
        wire.SamplingOptions(temperature=float("nan"))
    with pytest.raises(wire.ProtocolError, match=r"top_p: expected a value in \(0\.0, 1\.0\], got 0"):
        wire.SamplingOptions(top_p=0)
    with pytest.raises(wire.ProtocolError, match=r"seed: expected >= 0, got -1"):
        wire.SamplingOptions(seed=-1)
    with pytest.raises(wire.ProtocolError, match=r"payload: shape \[1, 2\] in float16 needs 4 bytes, got 8"):
        wire.Activation(start=0, dtype="float16", shape=(1, 2), data=bytes(8))


def test_protocol_error_is_a_value_error():
    assert issubclass(wire.ProtocolError, ValueError)


# ---------------------------------------------------------------- fuzz: nothing but ProtocolError
def _decode_or_protocol_error(frame: bytes) -> None:
    try:
        msg = wire.decode(frame)
    except wire.ProtocolError:
        return
    assert type(msg) in wire._KINDS.values()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_decode_or_raise_protocol_error(data):
    _decode_or_protocol_error(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.integers(0, 255))
def test_random_bytes_behind_a_valid_header_decode_or_raise_protocol_error(data, kind):
    _decode_or_protocol_error(struct.pack("<4sBBI", wire.MAGIC, 1, kind, min(len(data), 255)) + data)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_corrupted_valid_frames_decode_or_raise_protocol_error(data):
    frame = bytearray(wire.encode(data.draw(st.sampled_from(SAMPLE_MESSAGES))))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(frame)))
    _decode_or_protocol_error(bytes(frame[:cut]))
    _decode_or_protocol_error(bytes(frame))


_FIELD_NAMES = sorted({f for cls in (wire.Open, wire.Activation, wire.PromptTokens, wire.Opened, wire.Token, wire.Finished, wire.Error,
                                     wire.SamplingOptions) for f in cls.__dataclass_fields__})
_json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
                 | st.text(max_size=8) | st.sampled_from(wire.WIRE_DTYPES))
_json_values = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=4)
                            | st.dictionaries(st.sampled_from(_FIELD_NAMES), inner, max_size=4), max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(wire._KINDS)), st.dictionaries(st.sampled_from(_FIELD_NAMES), _json_values, max_size=7),
       st.binary(max_size=64))
def test_random_field_values_decode_or_raise_protocol_error(kind, meta, payload):
    """Well-formed JSON with the real field names and values of any type."""
    _decode_or_protocol_error(_frame(kind, meta, payload))


# json.loads raises RecursionError on deep nesting and ValueError on integers over 4300
# digits; both fit in MAX_META_BYTES and must come out as ProtocolError.
def test_deeply_nested_meta_raises_protocol_error():
    with pytest.raises(wire.ProtocolError):
        wire.decode(_frame(wire.Open.KIND, b"[" * 30000 + b"]" * 30000))


def test_huge_integer_in_meta_raises_protocol_error():
    with pytest.raises(wire.ProtocolError):
        wire.decode(_frame(wire.Open.KIND, b'{"model_fingerprint":"fp","split_layer":' + b"9" * 5000 + b"}"))


def test_token_with_wrong_field_types_raises_protocol_error():
    with pytest.raises(wire.ProtocolError, match=r"index: expected an integer"):
        wire.decode(_frame(wire.Token.KIND, {"index": "a", "token_id": None}))


# ---------------------------------------------------------------- import isolation
def test_protocol_and_client_import_without_vllm():
    code = "import sys, vllm_split.wire.protocol, client_lib; assert 'vllm' not in sys.modules, 'vllm was imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
