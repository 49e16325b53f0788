"""ProtocolError, and the checks of one field's type and range that raise it.

Shared by :mod:`vllm_split.wire.protocol` (the frames), :mod:`vllm_split.wire.ushape` (the
U-shaped session's frame) and :mod:`vllm_split.wire.tensors` (the tensor codec), which all
import it; it imports none of them. :mod:`protocol` re-exports
:class:`ProtocolError`, so callers keep catching ``wire.ProtocolError``.
"""
from __future__ import annotations

import math
from typing import Any


class ProtocolError(ValueError):
    """A frame that does not follow this protocol (the message says why)."""


FINISH_REASONS = ("stop", "length", "abort", "error")


def _check_reason(value: Any) -> None:
    if value not in FINISH_REASONS:
        raise ProtocolError(f"finish_reason: expected one of {list(FINISH_REASONS)}, got {value!r}")


def _check_int(name: str, value: Any, *, low: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{name}: expected an integer, got {value!r}")
    if low is not None and value < low:
        raise ProtocolError(f"{name}: expected >= {low}, got {value}")


def _check_float(name: str, value: Any, *, low: float, high: float | None = None, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(f"{name}: expected a finite number, got {value!r}")
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bound = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"
        raise ProtocolError(f"{name}: expected a value in {bound}, got {value}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ProtocolError(f"{name}: expected true or false, got {value!r}")


def _check_str(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{name}: expected a non-empty string, got {value!r}")


def _list(name: str, value: Any) -> list:
    if not isinstance(value, (list, tuple)):
        raise ProtocolError(f"{name}: expected a list, got {value!r}")
    return list(value)
