"""The tensor codec of the wire format: how an activation's rows travel as bytes.

Owns the wire dtypes (:data:`WIRE_DTYPES`): raw little-endian float tensors (float32,
float16, bfloat16: :data:`TENSOR_DTYPES`, bytes per element) and the 8-bit formats of
:mod:`vllm_split.wire.quant` (the codes, then one float32 scale per row). For them it gives
the names, what a row costs (:func:`row_bytes`), and encode/decode of a 2-D float tensor
(:func:`encode_tensor`, :func:`decode_tensor`; the 8-bit ones through :mod:`quant`, its
errors raised as :class:`~vllm_split.wire.errors.ProtocolError`). No pickle, no
``torch.load``: tensors are rebuilt from raw bytes with ``torch.frombuffer``. Imports
without torch (each function imports it when called) and without vLLM;
:mod:`vllm_split.wire.protocol` uses it for ``Activation`` and re-exports its public names.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from vllm_split.wire import quant
from vllm_split.wire.errors import ProtocolError, _check_int

if TYPE_CHECKING:
    import torch

# dtype name -> bytes per element; the server casts whatever arrives to the model's dtype.
TENSOR_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}
# every dtype an Activation may carry: the float formats, then the 8-bit ones (wire/quant.py)
WIRE_DTYPES = (*TENSOR_DTYPES, *quant.FORMATS)


def encode_tensor(tensor: "torch.Tensor") -> tuple[str, tuple[int, int], bytes]:
    """(dtype name, shape, raw little-endian bytes) of a 2-D float tensor."""
    import torch

    name = str(tensor.dtype).removeprefix("torch.")
    if name not in TENSOR_DTYPES:
        raise ProtocolError(f"tensor dtype {name} is not supported: expected one of {sorted(TENSOR_DTYPES)}")
    if tensor.dim() != 2:
        raise ProtocolError(f"tensor: expected 2 dimensions [rows, hidden], got shape {list(tensor.shape)}")
    flat = tensor.detach().to("cpu").contiguous()
    if flat.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    return name, (int(tensor.shape[0]), int(tensor.shape[1])), flat.numpy().tobytes()


def row_bytes(dtype: str, hidden_size: int) -> int:
    """Bytes one row (one position's hidden state) costs on the wire in ``dtype``: a float
    format's element size times ``hidden_size``; an 8-bit one's codes and scale
    (:func:`quant.bytes_per_row`)."""
    _check_wire_dtype("dtype", dtype)
    _check_int("hidden_size", hidden_size, low=1)
    if dtype in TENSOR_DTYPES:
        return hidden_size * TENSOR_DTYPES[dtype]
    return _quant_call(quant.bytes_per_row, dtype, hidden_size)


def _cast(tensor: "torch.Tensor", dtype: str) -> "torch.Tensor":
    """``tensor`` in the float ``dtype``; refuses finite values that the cast would overflow."""
    import torch

    out = tensor.to(getattr(torch, dtype))
    if tensor.dtype != out.dtype and tensor.is_floating_point():
        overflow = torch.isinf(out) & torch.isfinite(tensor)
        if bool(overflow.any()):
            raise ProtocolError(f"tensor: a value of magnitude {float(tensor[overflow].abs().max()):.6g} overflows "
                                f"{dtype}; choose a wider wire dtype")
    return out


def _quant_call(fn, *args, **kwargs):
    """``fn(...)`` of :mod:`quant`, its QuantFormatError raised as a ProtocolError."""
    try:
        return fn(*args, **kwargs)
    except quant.QuantFormatError as exc:
        raise ProtocolError(str(exc)) from None


def decode_tensor(dtype: str, shape: tuple[int, int], data: bytes) -> "torch.Tensor":
    """Rebuild a tensor from raw bytes (a copy: the frame buffer is not kept)."""
    import torch

    if dtype not in TENSOR_DTYPES:
        raise ProtocolError(f"dtype: expected one of {sorted(TENSOR_DTYPES)}, got {dtype!r}")
    if len(data) != math.prod(shape) * TENSOR_DTYPES[dtype]:
        raise ProtocolError(f"payload: {len(data)} bytes do not match shape {list(shape)} in {dtype}")
    return torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype)).reshape(shape)


def _check_wire_dtype(name: str, value: Any) -> None:
    if not isinstance(value, str) or value not in WIRE_DTYPES:
        raise ProtocolError(f"{name}: expected one of {list(WIRE_DTYPES)}, got {value!r:.40}")


# ---------------------------------------------------------------- frames of rows (Activation, Hidden)
def check_rows(dtype: Any, shape: Any, data: bytes) -> tuple[int, int]:
    """A rows frame's ``dtype``, ``shape`` ([rows, hidden]) and payload agree; returns the
    shape as a tuple. An 8-bit payload's scales are checked too."""
    _check_wire_dtype("dtype", dtype)
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (list, tuple)):
        raise ProtocolError(f"shape: expected a list, got {type(shape).__name__}")
    shape = tuple(shape)
    if len(shape) != 2:
        raise ProtocolError(f"shape: expected [rows, hidden_size], got {list(shape)}")
    for dim in shape:
        _check_int("shape[]", dim, low=1)
    if dtype in TENSOR_DTYPES:
        expected, what = shape[0] * shape[1] * TENSOR_DTYPES[dtype], ""
    else:
        codes, scales = _quant_call(quant.frame_sizes, dtype, *shape)
        expected, what = codes + scales, f" ({codes} of 8-bit payload + {scales} of float32 scales, one per row)"
    if len(data) != expected:
        raise ProtocolError(f"payload: shape {list(shape)} in {dtype} needs {expected} bytes{what}, got {len(data)}")
    if what:
        rows_quantized(dtype, shape, data)  # checks the scales
    return shape


def rows_quantized(dtype: str, shape: tuple[int, int], data: bytes) -> quant.QuantizedTensor:
    """An 8-bit rows payload's codes and scales (views of ``data``, not copies)."""
    if dtype in TENSOR_DTYPES:
        raise ProtocolError(f"dtype: {dtype} is not an 8-bit format (expected one of {list(quant.FORMATS)})")
    codes, _ = quant.frame_sizes(dtype, *shape)
    view = memoryview(data)
    return _quant_call(quant.QuantizedTensor, dtype, shape, view[:codes], view[codes:])


def rows_to_tensor(dtype: str, shape: tuple[int, int], data: bytes, out: "torch.dtype | None" = None) -> "torch.Tensor":
    """The rows as a tensor in ``out`` (None: the wire dtype, float32 for an 8-bit one)."""
    if dtype in TENSOR_DTYPES:
        tensor = decode_tensor(dtype, shape, data)
        return tensor if out is None else tensor.to(out)
    return _quant_call(quant.decode, rows_quantized(dtype, shape, data), dtype=out)


def rows_payload(tensor: "torch.Tensor", wire_dtype: str | None) -> tuple[str, tuple[int, int], bytes]:
    """(dtype, shape, payload) of a 2-D float tensor sent in ``wire_dtype`` (None: its own dtype)."""
    if wire_dtype is not None and wire_dtype not in TENSOR_DTYPES:
        _check_wire_dtype("wire_dtype", wire_dtype)
        q = _quant_call(quant.encode, tensor, wire_dtype)
        return wire_dtype, q.shape, q.payload + q.scales
    return encode_tensor(tensor if wire_dtype is None else _cast(tensor, wire_dtype))
