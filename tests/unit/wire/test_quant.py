"""8-bit activation codecs: error bounds a sender can rely on, the exact byte layout, and a
clear refusal of every malformed frame (what was expected, what arrived)."""
from __future__ import annotations

import struct
import subprocess
import sys

import pytest
import torch

from vllm_split.wire import quant
from vllm_split.wire.quant import QuantFormatError, QuantizedTensor, bytes_per_row, decode, encode

HIDDEN = 64
N = quant.MIXED_OUTLIERS


def _activations(rows: int = 6, hidden: int = HIDDEN, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with LLM-like outliers: one channel ~10x every row, one huge value in row 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g) * 2.0
    x[:, 7] *= 10.0
    x[0, 3] = 24_000.0
    return x


def _row_scale(x: torch.Tensor, max_code: float) -> torch.Tensor:
    return x.abs().amax(dim=1) / max_code


def _with(q: QuantizedTensor, **changes) -> QuantizedTensor:
    fields = {"format": q.format, "shape": q.shape, "payload": q.payload, "scales": q.scales, **changes}
    return QuantizedTensor(**fields)


def _put_f32(data: bytes, index: int, value: float) -> bytes:
    return data[: 4 * index] + struct.pack("<f", value) + data[4 * index + 4:]


# ---------------------------------------------------------------- round trips
def test_int8_row_error_is_within_half_a_step_of_each_rows_scale():
    x = _activations()
    y = decode(encode(x, "int8_row"))
    step = _row_scale(x, 127.0)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert ((y - x).abs() <= step[:, None] * 0.5 * (1 + 1e-5)).all()


def test_int8_mixed_sends_the_largest_values_exactly_and_the_rest_within_half_a_step():
    x = _activations()
    y = decode(encode(x, "int8_mixed"))
    idx = x.abs().topk(N, dim=1).indices
    assert torch.equal(y.gather(1, idx), x.gather(1, idx))  # outliers bit-exact, even 24,000
    rest = x.scatter(1, idx, 0.0)
    step = _row_scale(rest, 127.0)
    assert ((y - x).abs() <= step[:, None] * 0.5 * (1 + 1e-5)).all()
    # the point of the format: row 0's small values survive its 24,000 outlier
    assert (y[0] - x[0]).abs().max() < 0.05 * (decode(encode(x, "int8_row"))[0] - x[0]).abs().max()


def test_int8_mixed_outliers_beyond_float16_range_are_exact():
    x = _activations()
    x[2, 10] = -3.0e6
    assert decode(encode(x, "int8_mixed"))[2, 10] == -3.0e6


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="torch without float8_e4m3fn")
def test_fp8_e4m3_error_is_within_half_an_fp8_step():
    x = _activations()
    y = decode(encode(x, "fp8_e4m3"))
    scale = _row_scale(x, 448.0)[:, None]
    # normal range: half a unit in the last place = 2^-4 of the value; subnormals: 2^-10 of the scale
    bound = torch.maximum(x.abs() * 2.0 ** -4, scale * 2.0 ** -10) * (1 + 1e-5)
    assert ((y - x).abs() <= bound).all()
    assert torch.equal(y.abs().amax(dim=1), x.abs().amax(dim=1))  # each row's absmax is a code exactly


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="torch without float8_e4m3fn")
def test_fp8_decode_table_matches_torch_for_every_code():
    codes = torch.arange(256, dtype=torch.uint8)
    ok = (codes != 0x7F) & (codes != 0xFF)
    assert torch.equal(quant._e4m3_table()[ok], codes.view(torch.float8_e4m3fn).float()[ok])


@pytest.mark.parametrize("fmt", sorted(quant.FORMATS))
def test_decode_returns_the_requested_dtype_and_shape(fmt):
    x = _activations(rows=3)
    y = quant.roundtrip(x.to(torch.bfloat16), fmt)
    assert y.dtype == torch.bfloat16 and y.shape == (3, HIDDEN)
    assert decode(encode(x, fmt), dtype=torch.float16).dtype == torch.float16


@pytest.mark.parametrize("fmt", sorted(quant.FORMATS))
def test_zero_rows_encode_to_empty_frames_and_back(fmt):
    q = encode(torch.zeros(0, HIDDEN), fmt)
    assert q.shape == (0, HIDDEN) and q.payload == b"" and q.scales == b""
    assert decode(q).shape == (0, HIDDEN)


@pytest.mark.parametrize("fmt", sorted(quant.FORMATS))
def test_an_all_zero_row_is_sent_with_scale_one_and_decodes_to_exact_zeros(fmt):
    x = _activations(rows=3)
    x[1] = 0.0
    q = encode(x, fmt)
    assert struct.unpack_from("<f", q.scales, 4)[0] == 1.0
    assert torch.equal(decode(q)[1], torch.zeros(HIDDEN))


@pytest.mark.parametrize("fmt", sorted(quant.FORMATS))
def test_a_subnormal_row_gets_a_positive_scale_and_stays_finite(fmt):
    x = torch.full((1, HIDDEN), 1e-44)
    q = encode(x, fmt)
    assert struct.unpack("<f", q.scales)[0] >= 2.0 ** -126
    assert torch.isfinite(decode(q)).all() and (decode(q) - x).abs().max() < 1e-37


# ---------------------------------------------------------------- sizes and layout
@pytest.mark.parametrize(("fmt", "expected"), [("int8_row", 576 + 4), ("fp8_e4m3", 576 + 4),
                                               ("int8_mixed", 576 + 4 + 6 * N)])
def test_bytes_per_row_is_what_an_encoded_frame_costs(fmt, expected):
    assert bytes_per_row(fmt, 576) == expected
    assert encode(torch.randn(5, 576), fmt).num_bytes == 5 * expected


def test_bytes_per_row_refuses_unknown_formats_and_bad_sizes():
    with pytest.raises(QuantFormatError, match=r"format: expected one of \['fp8_e4m3', 'int8_mixed', 'int8_row'\], "
                                               r"got 'float16'"):
        bytes_per_row("float16", 576)
    with pytest.raises(QuantFormatError, match="hidden_size: expected an integer >= 1, got 0"):
        bytes_per_row("int8_row", 0)
    with pytest.raises(QuantFormatError, match=r"int8_mixed: hidden_size expected <= 65536 \(uint16 channel "
                                               r"indices\), got 65537"):
        bytes_per_row("int8_mixed", 65537)
    assert bytes_per_row("int8_row", 65537) == 65537 + 4


def test_int8_row_layout_is_codes_then_little_endian_float32_scales():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 4.0]])
    q = encode(x, "int8_row")
    assert q.payload == bytes([64, 129, 32, 0, 0, 127])  # round(x / (absmax / 127)) as int8
    assert q.scales == struct.pack("<2f", 2.0 / 127, 4.0 / 127)


def test_int8_mixed_layout_appends_ascending_uint16_channels_and_float32_values():
    x = torch.arange(1.0, 2 * N + 1).reshape(1, 2 * N)  # the N largest are channels N .. 2N-1
    q = encode(x, "int8_mixed")
    codes, channels, values = q.payload[: 2 * N], q.payload[2 * N: 4 * N], q.payload[4 * N:]
    assert codes[N:] == bytes(N)  # the outliers' own codes are zero
    assert list(codes[:N]) == [round(v * 127 / N) for v in range(1, N + 1)]
    assert channels == struct.pack(f"<{N}H", *range(N, 2 * N))
    assert values == struct.pack(f"<{N}f", *range(N + 1, 2 * N + 1))
    assert q.scales == struct.pack("<f", N / 127)


def test_int8_mixed_with_fewer_channels_than_outliers_sends_every_value_exactly():
    x = torch.tensor([[3.0, -1.5]])
    q = encode(x, "int8_mixed")
    assert q.num_bytes == bytes_per_row("int8_mixed", 2) == 2 + 4 + 6 * 2
    assert torch.equal(decode(q), x)


# ---------------------------------------------------------------- refusals
def test_unknown_format_is_refused_by_name():
    with pytest.raises(QuantFormatError, match=r"format: expected one of .*, got 'int4'"):
        QuantizedTensor("int4", (1, 4), b"\0" * 4, b"\0" * 4)
    with pytest.raises(QuantFormatError, match="got 'int4'"):
        encode(torch.ones(1, 4), "int4")


def test_payload_that_does_not_match_the_shape_is_refused():
    q = encode(_activations(rows=2), "int8_row")
    with pytest.raises(QuantFormatError, match=rf"payload: shape \[2, {HIDDEN}\] in int8_row needs {2 * HIDDEN} "
                                               rf"bytes, got {2 * HIDDEN - 1}"):
        _with(q, payload=q.payload[:-1])
    with pytest.raises(QuantFormatError, match=r"payload: shape \[3, 64\] in int8_row needs 192 bytes, got 128"):
        _with(q, shape=(3, HIDDEN), scales=q.scales + bytes(4))


@pytest.mark.parametrize("scales", [b"", bytes(4), bytes(12)])
def test_scales_that_do_not_match_the_rows_are_refused(scales):
    q = encode(_activations(rows=2), "int8_row")
    with pytest.raises(QuantFormatError, match=rf"scales: 2 rows need 2 float32 scales \(8 bytes\), "
                                               rf"got {len(scales)} bytes"):
        _with(q, scales=scales)


@pytest.mark.parametrize("shape", [(2,), (2, 0), (-1, 4), (2.0, 4), "2x4", (True, 4)])
def test_bad_shapes_are_refused(shape):
    with pytest.raises(QuantFormatError, match=r"shape: expected \[rows >= 0, hidden_size >= 1\]"):
        QuantizedTensor("int8_row", shape, b"", b"")


@pytest.mark.parametrize("fmt", sorted(quant.FORMATS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, -1.0, 3.0e38])
def test_a_nan_inf_zero_negative_or_overflowing_scale_is_refused(fmt, bad):
    q = encode(_activations(rows=3), fmt)
    with pytest.raises(QuantFormatError, match=r"scales\[1\]: expected a finite float32 in \(0, .*\] "
                                               r"\(an all-zero row is sent with scale 1.0\), got"):
        _with(q, scales=_put_f32(q.scales, 1, bad))  # refused on construction: no frame holds it


@pytest.mark.parametrize("code", [0x7F, 0xFF])
def test_an_fp8_nan_code_is_refused(code):
    q = encode(torch.ones(2, 4), "fp8_e4m3") if hasattr(torch, "float8_e4m3fn") else \
        QuantizedTensor("fp8_e4m3", (2, 4), bytes([0x38] * 8), struct.pack("<2f", 1.0, 1.0))
    payload = bytearray(q.payload)
    payload[6] = code
    with pytest.raises(QuantFormatError, match=rf"payload\[1, 2\]: expected an fp8_e4m3 number, got the NaN "
                                               rf"code 0x{code:02x}"):
        decode(_with(q, payload=bytes(payload)))


def _outliers(q: QuantizedTensor, *, channels=None, values=None) -> QuantizedTensor:
    rows, hidden = q.shape
    head, index_end = rows * hidden, rows * hidden + rows * N * 2
    idx = q.payload[head:index_end] if channels is None else struct.pack(f"<{len(channels)}H", *channels)
    val = q.payload[index_end:] if values is None else struct.pack(f"<{len(values)}f", *values)
    return _with(q, payload=q.payload[:head] + idx + val)


def test_an_outlier_channel_out_of_range_is_refused():
    q = encode(_activations(rows=1), "int8_mixed")
    with pytest.raises(QuantFormatError, match=rf"outlier index \[0, {N - 1}\]: expected a channel < hidden_size "
                                               rf"{HIDDEN}, got 65535"):
        decode(_outliers(q, channels=[*range(N - 1), 65535]))


def test_repeated_or_unsorted_outlier_channels_are_refused():
    q = encode(_activations(rows=2), "int8_mixed")
    row1 = [5, 5, *range(6, 6 + N - 2)]
    with pytest.raises(QuantFormatError, match=r"outlier indices of row 1: expected strictly ascending channels, "
                                               rf"got \[5, 5, 6"):
        decode(_outliers(q, channels=[*range(N), *row1]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_outlier_value_is_refused(bad):
    q = encode(_activations(rows=2), "int8_mixed")
    with pytest.raises(QuantFormatError, match="outlier values of row 1: expected finite float32, got"):
        decode(_outliers(q, values=[1.0] * N + [2.0, bad] + [3.0] * (N - 2)))


@pytest.mark.parametrize("tensor", [torch.ones(4), torch.ones(2, 3, 4), torch.ones(2, 4, dtype=torch.int64),
                                    torch.ones(2, 0), [[1.0]]])
def test_encode_refuses_what_is_not_a_2d_float_tensor(tensor):
    with pytest.raises(QuantFormatError, match=r"tensor: expected (a 2-D float tensor|hidden >= 1)"):
        encode(tensor, "int8_row")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_encode_refuses_non_finite_values(bad):
    x = _activations(rows=2)
    x[1, 5] = bad
    with pytest.raises(QuantFormatError, match="tensor: expected finite values, got NaN or Inf"):
        encode(x, "int8_mixed")


def test_without_float8_fp8_cannot_be_encoded_but_still_decodes(monkeypatch):
    q = QuantizedTensor("fp8_e4m3", (1, 3), bytes([0x38, 0xB8, 0x00]), struct.pack("<f", 2.0))
    monkeypatch.delattr(torch, "float8_e4m3fn", raising=False)
    assert not quant.can_encode("fp8_e4m3") and quant.can_encode("int8_row")
    with pytest.raises(QuantFormatError, match="fp8_e4m3: this torch .* has no float8_e4m3fn"):
        encode(torch.ones(1, 3), "fp8_e4m3")
    assert decode(q).tolist() == [[2.0, -2.0, 0.0]]  # 0x38 = +1.0, 0xB8 = -1.0, times the scale


def test_sizes_and_scales_are_checked_without_torch():
    code = ("import sys, struct; sys.modules['torch'] = None\n"
            "from vllm_split.wire.quant import bytes_per_row, QuantizedTensor, QuantFormatError\n"
            "QuantizedTensor('int8_row', (1, 8), bytes(8), struct.pack('<f', 1.0))\n"
            "try:\n"
            "    QuantizedTensor('int8_row', (1, 8), bytes(8), struct.pack('<f', float('nan')))\n"
            "except QuantFormatError as exc:\n"
            "    print(exc)\n"
            "print(bytes_per_row('int8_mixed', 4096))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    refused, size = out.stdout.strip().splitlines()
    assert refused.startswith("scales[0]: expected a finite float32 in (0, ") and refused.endswith("got nan")
    assert size == str(4096 + 4 + 6 * N)
