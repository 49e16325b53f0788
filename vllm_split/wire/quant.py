"""8-bit activation codecs: the hidden state at the split layer in one byte per value.

Runs on both sides: the client encodes the rows it sends, the server decodes them into the
model's dtype. Imports without vLLM and without torch (torch is imported by the tensor
functions only), so the planner can ask :func:`bytes_per_row` without either.

Every format is row-wise: each row ``[hidden]`` is coded on its own, with one float32 scale
per row. A frame's bytes therefore do not depend on how the client cuts the prompt into
frames, a decode step (one row) is coded like a prompt row, and decoding one row never
reads another. Formats (``N`` = :data:`MIXED_OUTLIERS`):

``int8_row``
    symmetric int8, ``scale = absmax / 127``: ``hidden + 4`` bytes per row.
``int8_mixed``
    ``int8_row`` of the row with its ``N`` largest-magnitude values taken out and sent
    exactly (uint16 channel index + float32 value each): ``hidden + 4 + 6N`` bytes per row.
    LLM residual streams carry a few outlier channels (SmolLM2-135M: channel 507 is ~10x
    a row's RMS on every token and ~24,000 on the first token from layer 4 on), and a
    per-row int8 scale set by one such value spends the 8 bits on it. Chosen by
    ``benchmarks/bench_wire_precision.py`` (SmolLM2-135M, 24 prompts x 64 greedy tokens,
    k in {1, 7, 15, 29}; results/bench_wire_precision*.json): KL(float32 || format) of
    the next-token distribution 4e-5..6e-5 and greedy token match 0.87..0.94, against
    ``int8_row``'s 4e-4..3e-2 and 0.15..0.77 (at k=15 every prompt diverges, at median
    token 5) and bfloat16's 3e-6..1.4e-5 and 0.93..0.98, for 628 bytes per row against
    580 (float16: 1,152). ``N = 8``: mean KL 2.3e-4, 7.8e-5, 4.6e-5, 2.7e-5 for N = 2,
    4, 8, 16; 4 -> 8 costs 24 bytes a row and also raised the worst teacher-forced top-1
    agreement over k from 0.989 to 0.995; 8 -> 16 costs 48 more and raised neither that
    nor the prompts free of divergence. The values go as float32: a massive activation
    can pass float16's 65,504.
``fp8_e4m3``
    float8 e4m3fn codes of ``row / scale``, ``scale = absmax / 448``: ``hidden + 4`` bytes
    per row. Encoding needs ``torch.float8_e4m3fn``; decoding uses a 256-entry table and
    works with any torch. Its 3 mantissa bits cost more than ``int8_mixed``'s rounding:
    KL 5e-4..1e-3, greedy match 0.60..0.72 in the same runs.

Layout (little endian): ``payload`` = the codes ``[rows, hidden]`` (int8, or fp8 bit
patterns), then for ``int8_mixed`` the outliers' channel indices ``uint16 [rows, N]``
(strictly ascending in each row) and their values ``float32 [rows, N]``; ``scales`` =
``float32 [rows]``. A scale is always finite and > 0: an all-zero row is sent with scale
1.0 and zero codes (a zero scale is refused, so a sender cannot hide a NaN behind it), and
a tiny nonzero row gets at least the smallest normal float32. :class:`QuantizedTensor`
refuses, without torch (so the wire module refuses such a frame as it decodes it): an
unknown format, sizes that do not match the shape, a NaN/Inf/zero/negative scale or one
whose codes would overflow float32. :func:`decode` refuses the rest of a bad frame's
contents: an fp8 NaN code, an outlier index out of range or repeated, a non-finite outlier
value. Each with :class:`QuantFormatError`, naming what was expected and what arrived. No
pickle: everything is rebuilt from raw bytes (``numpy.frombuffer``, ``struct``).
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MIXED_OUTLIERS = 8  # values per row that int8_mixed sends exactly
_FLOAT32_MAX = struct.unpack("<f", b"\xff\xff\x7f\x7f")[0]
_FLOAT32_TINY = 2.0 ** -126  # smallest normal float32: the floor of a nonzero row's scale
_SCALE_BYTES = 4  # float32 per row
_INDEX_BYTES, _VALUE_BYTES = 2, 4  # an int8_mixed outlier: uint16 channel + float32 value
_E4M3_NAN_CODES = (0x7F, 0xFF)
_MAX_INDEXED_HIDDEN = 1 << 16  # int8_mixed's channel indices are uint16


class QuantFormatError(ValueError):
    """An 8-bit activation frame (or a tensor to encode) that this codec cannot take."""


@dataclass(frozen=True, slots=True)
class _Spec:
    code: str  # "int8" (two's complement) or "fp8" (e4m3fn bit patterns)
    max_code: float  # the largest code magnitude: a row's absmax maps to it
    num_outliers: int  # values per row sent exactly (int8_mixed), 0 otherwise


FORMATS: dict[str, _Spec] = {
    "int8_row": _Spec(code="int8", max_code=127.0, num_outliers=0),
    "int8_mixed": _Spec(code="int8", max_code=127.0, num_outliers=MIXED_OUTLIERS),
    "fp8_e4m3": _Spec(code="fp8", max_code=448.0, num_outliers=0),
}


def _spec(fmt: str) -> _Spec:
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise QuantFormatError(f"format: expected one of {sorted(FORMATS)}, got {fmt!r}")
    return FORMATS[fmt]


def _num_outliers(spec: _Spec, hidden: int) -> int:
    return min(spec.num_outliers, hidden)


def frame_sizes(fmt: str, rows: int, hidden_size: int) -> tuple[int, int]:
    """(payload bytes, scales bytes) of ``rows`` rows of ``hidden_size`` values in ``fmt``."""
    spec = _spec(fmt)
    n = _num_outliers(spec, hidden_size)
    if n and hidden_size > _MAX_INDEXED_HIDDEN:
        raise QuantFormatError(f"{fmt}: hidden_size expected <= {_MAX_INDEXED_HIDDEN} (uint16 channel indices), "
                               f"got {hidden_size}")
    return rows * (hidden_size + n * (_INDEX_BYTES + _VALUE_BYTES)), rows * _SCALE_BYTES


def bytes_per_row(fmt: str, hidden_size: int) -> int:
    """Bytes one row (one token's hidden state) costs on the wire in ``fmt``, scales included."""
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
        raise QuantFormatError(f"hidden_size: expected an integer >= 1, got {hidden_size!r}")
    return sum(frame_sizes(fmt, 1, hidden_size))


def can_encode(fmt: str) -> bool:
    """Whether this process's torch can encode ``fmt`` (every format decodes everywhere)."""
    import torch

    return _spec(fmt).code != "fp8" or hasattr(torch, "float8_e4m3fn")


@dataclass(frozen=True, slots=True)
class QuantizedTensor:
    """A ``[rows, hidden]`` tensor in an 8-bit format; the constructor checks the sizes
    (no torch), :func:`decode` the contents."""

    format: str
    shape: tuple[int, int]
    payload: bytes = field(repr=False)
    scales: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _spec(self.format)
        shape = tuple(self.shape) if isinstance(self.shape, (tuple, list)) else None
        bad_dim = shape is None or len(shape) != 2 or any(isinstance(d, bool) or not isinstance(d, int)
                                                          for d in shape)
        if bad_dim or shape[0] < 0 or shape[1] < 1:
            raise QuantFormatError(f"shape: expected [rows >= 0, hidden_size >= 1], got {self.shape!r}")
        object.__setattr__(self, "shape", shape)
        payload_len, scales_len = frame_sizes(self.format, *shape)
        if len(self.payload) != payload_len:
            raise QuantFormatError(f"payload: shape {list(shape)} in {self.format} needs {payload_len} bytes, "
                                   f"got {len(self.payload)}")
        if len(self.scales) != scales_len:
            raise QuantFormatError(f"scales: {shape[0]} rows need {shape[0]} float32 scales ({scales_len} bytes), "
                                   f"got {len(self.scales)} bytes")
        _check_scales(self.scales, shape[0], _spec(self.format).max_code)

    @property
    def num_bytes(self) -> int:
        return len(self.payload) + len(self.scales)


def encode(tensor: "torch.Tensor", fmt: str) -> QuantizedTensor:
    """Code a finite 2-D float tensor ``[rows, hidden]`` row by row in ``fmt``."""
    import torch

    spec = _spec(fmt)
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or not tensor.is_floating_point():
        got = (f"{tensor.dtype} shape {list(tensor.shape)}" if isinstance(tensor, torch.Tensor)
               else type(tensor).__name__)
        raise QuantFormatError(f"tensor: expected a 2-D float tensor [rows, hidden], got {got}")
    if tensor.shape[1] < 1:
        raise QuantFormatError(f"tensor: expected hidden >= 1, got shape {list(tensor.shape)}")
    if not can_encode(fmt):
        raise QuantFormatError(f"{fmt}: this torch {torch.__version__} has no float8_e4m3fn to encode with")
    x = tensor.detach().to("cpu", torch.float32).contiguous()
    if not torch.isfinite(x).all():
        raise QuantFormatError("tensor: expected finite values, got NaN or Inf")
    extra = b""
    n = _num_outliers(spec, x.shape[1])
    if n:
        idx = x.abs().topk(n, dim=1).indices.sort(dim=1).values
        values = x.gather(1, idx)
        x = x.scatter(1, idx, 0.0)
        extra = idx.numpy().astype("<u2").tobytes() + _le_bytes(values)
    absmax = x.abs().amax(dim=1)
    scale = torch.where(absmax > 0, (absmax / spec.max_code).clamp(min=_FLOAT32_TINY), torch.ones_like(absmax))
    scaled = (x / scale[:, None]).clamp(-spec.max_code, spec.max_code)
    if spec.code == "fp8":
        codes = scaled.to(torch.float8_e4m3fn).view(torch.uint8)
    else:
        codes = scaled.round().to(torch.int8)
    return QuantizedTensor(fmt, (int(x.shape[0]), int(x.shape[1])), codes.numpy().tobytes() + extra,
                           _le_bytes(scale))


def decode(q: QuantizedTensor, *, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
    """The ``[rows, hidden]`` tensor that ``q`` codes, in ``dtype`` (default float32); a
    copy (the frame's buffer is not kept). Refuses bad contents (see the module docstring)."""
    import torch

    spec = _spec(q.format)
    rows, hidden = q.shape
    scale = _float32s(q.scales, 0, rows)  # checked by QuantizedTensor
    codes = torch.from_numpy(_read(q.payload, "<u1", 0, rows * hidden)).reshape(rows, hidden)
    if spec.code == "fp8":
        nan = (codes == _E4M3_NAN_CODES[0]) | (codes == _E4M3_NAN_CODES[1])
        if nan.any():
            r, c = (int(v) for v in nan.nonzero()[0])
            raise QuantFormatError(f"payload[{r}, {c}]: expected an fp8_e4m3 number, got the NaN code "
                                   f"0x{int(codes[r, c]):02x}")
        out = _e4m3_table()[codes.long()]
    else:
        out = codes.view(torch.int8).to(torch.float32)
    out.mul_(scale[:, None])
    n = _num_outliers(spec, hidden)
    if n and rows:
        _put_outliers(out, q.payload, rows * hidden, n)
    return out if dtype is None else out.to(dtype)


def roundtrip(tensor: "torch.Tensor", fmt: str) -> "torch.Tensor":
    """``decode(encode(tensor, fmt))`` in ``tensor``'s dtype: what the server receives."""
    return decode(encode(tensor, fmt), dtype=tensor.dtype)


def _check_scales(scales: bytes, rows: int, max_code: float) -> None:
    """Every scale finite and in ``(0, FLOAT32_MAX / max_code]`` (its codes stay finite); no torch."""
    limit = _FLOAT32_MAX / max_code
    for i, s in enumerate(struct.unpack(f"<{rows}f", scales)):
        if not 0.0 < s <= limit:  # NaN fails the comparison too
            raise QuantFormatError(f"scales[{i}]: expected a finite float32 in (0, {limit:.3g}] "
                                   f"(an all-zero row is sent with scale 1.0), got {s}")


def _put_outliers(out: "torch.Tensor", payload: bytes, offset: int, n: int) -> None:
    import torch

    rows, hidden = out.shape
    idx = torch.from_numpy(_read(payload, "<u2", offset, rows * n).astype("int64")).reshape(rows, n)
    if bool((idx >= hidden).any()):
        r, j = (int(v) for v in (idx >= hidden).nonzero()[0])
        raise QuantFormatError(f"outlier index [{r}, {j}]: expected a channel < hidden_size {hidden}, "
                               f"got {int(idx[r, j])}")
    if n > 1 and bool((idx[:, 1:] <= idx[:, :-1]).any()):
        r = int((idx[:, 1:] <= idx[:, :-1]).any(dim=1).nonzero()[0, 0])
        raise QuantFormatError(f"outlier indices of row {r}: expected strictly ascending channels, "
                               f"got {idx[r].tolist()}")
    values = _float32s(payload, offset + rows * n * _INDEX_BYTES, rows * n).reshape(rows, n)
    if not bool(torch.isfinite(values).all()):
        r = int((~torch.isfinite(values)).any(dim=1).nonzero()[0, 0])
        raise QuantFormatError(f"outlier values of row {r}: expected finite float32, got {values[r].tolist()}")
    out.scatter_(1, idx, values)


def _read(data: bytes, dtype: str, offset: int, count: int):
    """``count`` little-endian ``dtype`` values at ``offset`` as a native numpy array (a copy)."""
    import numpy as np

    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).astype(dtype[1:])


def _float32s(data: bytes, offset: int, count: int) -> "torch.Tensor":
    import torch

    return torch.from_numpy(_read(data, "<f4", offset, count))


def _le_bytes(t: "torch.Tensor") -> bytes:
    """float32 little-endian bytes of ``t``."""
    import torch

    return t.to(torch.float32).contiguous().numpy().astype("<f4").tobytes()


_E4M3_TABLE: "torch.Tensor | None" = None


def _e4m3_table() -> "torch.Tensor":
    """float32 value of each fp8 e4m3fn bit pattern (sign, 4-bit exponent with bias 7,
    3-bit mantissa; subnormals at exponent 0; no infinities; NaN codes map to NaN)."""
    global _E4M3_TABLE
    if _E4M3_TABLE is None:
        import torch

        values = []
        for code in range(256):
            sign = -1.0 if code & 0x80 else 1.0
            exp, man = (code >> 3) & 0xF, code & 0x7
            if code in _E4M3_NAN_CODES:
                values.append(math.nan)
            elif exp == 0:
                values.append(sign * man / 8 * 2.0 ** -6)
            else:
                values.append(sign * (1 + man / 8) * 2.0 ** (exp - 7))
        _E4M3_TABLE = torch.tensor(values, dtype=torch.float32)
    return _E4M3_TABLE
