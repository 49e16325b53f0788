"""The U-shaped session's part of the wire format: the ``Hidden`` frame and the Open checks.

A U-shaped session (``Open.u_shape``) keeps both ends of the model on the client: it runs
the embedding and layers ``[0, k)``, sends the layer-``k`` rows as in a prefix split, and
the server runs only ``[k, m)`` (``m``: ``Open.return_layer``, answered in
``Opened.return_layer``) and sends back the hidden state at layer ``m`` in :class:`Hidden`
frames instead of ``Token`` frames. The client runs ``[m, L)``, the final norm, the LM head
and sampling, so no token id ever crosses the network:

* at prefill, the layer-``m`` rows of *every* prompt position (the client's layers
  ``[m, L)`` need them for their own KV cache), in one or more frames;
* then one row per decode step, at position ``prompt_len + index - 1`` for output
  ``index``: the client samples token ``index`` from it and answers with the layer-``k``
  row of that token at position ``prompt_len + index`` (an ``Activation``, as in a prefix
  split), or ends the session with ``Close`` (its own stop condition or ``max_tokens``).

The server still enforces its limits: the last row it will compute carries
``finish_reason`` (``length``: its max tokens or max model length) and ``Finished``
follows. Frames carry rows in the session's wire dtype (``Opened.wire_dtype``; None: the
model's float dtype), with the tensor codec of :mod:`vllm_split.wire.tensors`.

Negotiation: the new ``Open`` fields are left out of the frame unless used, and a server
that does not know them refuses an ``Open`` carrying them (an unknown field), so an old
server answers a U request with a clean ``Error``, never with tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from vllm_split.wire.errors import ProtocolError, _check_bool, _check_int, _check_reason, _list
from vllm_split.wire.tensors import check_rows, rows_payload, rows_to_tensor

if TYPE_CHECKING:
    import torch

def check_u_open(msg: Any) -> None:
    """The U fields of an ``Open``: ``u_shape`` a bool; ``return_layer`` None or an int >= 1,
    given only with ``u_shape`` and exactly when ``split_layer`` is given (a U session fixes
    both layers or lets the server choose both), above ``split_layer``."""
    _check_bool("u_shape", msg.u_shape)
    m, k = msg.return_layer, msg.split_layer
    if m is None:
        if msg.u_shape and k is not None:
            raise ProtocolError(f"return_layer: a U-shaped session with split_layer {k} needs return_layer (m > {k}); "
                                "give neither to let the server choose both")
        return
    _check_int("return_layer", m, low=1)
    if not msg.u_shape:
        raise ProtocolError(f"return_layer {m}: expected u_shape true with a return_layer")
    if k is None:
        raise ProtocolError(f"return_layer {m} with split_layer null: a U-shaped session fixes both layers or neither")
    if isinstance(k, int) and not isinstance(k, bool) and m <= k:
        raise ProtocolError(f"return_layer {m} must be above split_layer {k}: the server runs layers "
                            f"[split_layer, return_layer), at least one")


def u_layers_problem(split_layer: int, return_layer: int, num_layers: int, *, min_layer: int = 0) -> str | None:
    """Why the server cannot run ``[split_layer, return_layer)`` of ``num_layers`` (holding no
    layer below ``min_layer``), or None."""
    if not min_layer <= split_layer < return_layer <= num_layers:
        held = f"; this server holds no layers below {min_layer}" if min_layer else ""
        return (f"U shape (split_layer {split_layer}, return_layer {return_layer}) out of range: expected "
                f"{min_layer} <= split_layer < return_layer <= {num_layers}{held}")
    return None


@dataclass(frozen=True, slots=True)
class Hidden:
    """Server -> client, U-shaped sessions: the hidden state at layer ``m`` (the residual
    stream, before any norm) for positions ``[start, start + rows)``, computed for output
    ``index``. ``finish_reason`` is set on the last frame of the last output the server
    computes (its limits); the client samples that token and the session ends."""

    KIND: ClassVar[int] = 11
    index: int
    start: int
    dtype: str
    shape: tuple[int, int]
    data: bytes = field(repr=False)
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        _check_int("index", self.index, low=0)
        _check_int("start", self.start, low=0)
        object.__setattr__(self, "shape", check_rows(self.dtype, _list("shape", self.shape), self.data))
        if self.finish_reason is not None:
            _check_reason(self.finish_reason)

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def end(self) -> int:
        return self.start + self.shape[0]

    @classmethod
    def from_tensor(cls, tensor: "torch.Tensor", *, index: int, start: int, wire_dtype: str | None = None,
                    finish_reason: str | None = None) -> "Hidden":
        dtype, shape, data = rows_payload(tensor, wire_dtype)
        return cls(index=index, start=start, dtype=dtype, shape=shape, data=data, finish_reason=finish_reason)

    def to_tensor(self, *, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
        return rows_to_tensor(self.dtype, self.shape, self.data, dtype)
