"""The vllm-split wire format: the one module that owns it.

Every WebSocket message is one binary frame::

    magic "VSPL" | version u8 | kind u8 | meta_len u32 (little endian) | meta | payload

``meta`` is a UTF-8 JSON object with the message's fields; ``payload`` is raw bytes
(``Activation``: a tensor whose dtype and shape are in ``meta``; ``PromptTokens``: int32
token ids; ``ProbeReply``: filler). Decoding checks every field's type and range and raises
:class:`ProtocolError` naming what was wrong, what was expected and what arrived. No pickle,
no ``torch.load``: tensors are rebuilt from raw bytes with ``torch.frombuffer``. This module
imports without vLLM (the client uses it); torch is imported only by the tensor helpers
(:mod:`vllm_split.wire.tensors`).

The tensor codec lives in :mod:`vllm_split.wire.tensors` (raw little-endian float tensors
and the 8-bit formats of :mod:`vllm_split.wire.quant` on the wire: names, sizes,
encode/decode); :class:`ProtocolError` and the scalar field checks in
:mod:`vllm_split.wire.errors`. This module re-exports their public names
(:func:`encode_tensor`, :func:`decode_tensor`, :func:`row_bytes`, :data:`TENSOR_DTYPES`,
:data:`WIRE_DTYPES`, :class:`ProtocolError`), so ``wire.encode_tensor`` and the rest keep
working.

Wire dtypes (:data:`WIRE_DTYPES`): an activation travels as float32, float16 or bfloat16
(raw values), or in one of the 8-bit formats of :mod:`vllm_split.wire.quant` (the payload is
the codes, then one float32 scale per row: :func:`quant.frame_sizes`). The client offers the
formats it can send at ``Open.wire_dtypes`` (its order of preference); the server answers
the one it takes in ``Opened.wire_dtype`` (None when the client offered nothing: any float
format, as before the 8-bit formats). :func:`row_bytes` is what one row costs in each.
"""
from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar, Union

from vllm_split.wire import quant
# re-exported, so wire.ProtocolError, wire.encode_tensor, wire.decode_tensor, wire.row_bytes,
# wire.TENSOR_DTYPES and wire.WIRE_DTYPES keep working for every caller
from vllm_split.wire.errors import ProtocolError
from vllm_split.wire.tensors import TENSOR_DTYPES, WIRE_DTYPES, decode_tensor, encode_tensor, row_bytes
# used here only
from vllm_split.wire.errors import FINISH_REASONS, _check_reason, _check_bool, _check_float, _check_int, _check_str, _list
from vllm_split.wire.tensors import _check_wire_dtype, check_rows, rows_payload, rows_quantized, rows_to_tensor
from vllm_split.wire.ushape import Hidden, check_u_open
from vllm_split.wire.drafts import Tokens, check_draft_ids, check_max_drafts, check_request_type

if TYPE_CHECKING:
    import torch

PROTOCOL_VERSION = 1
MAGIC = b"VSPL"
_HEADER = struct.Struct("<4sBBI")
HEADER_SIZE = _HEADER.size
MAX_META_BYTES = 64 * 1024
MAX_PROBE_BYTES = 1024 * 1024
MAX_WIRE_DTYPES_OFFERED = 16


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    """Sampling for a split request; greedy by default (temperature 0)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: disabled
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, low=1)
        _check_float("temperature", self.temperature, low=0.0)
        _check_float("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _check_int("top_k", self.top_k, low=0)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0)
        if not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", tuple(_list("stop_token_ids", self.stop_token_ids)))
        for tid in self.stop_token_ids:
            _check_int("stop_token_ids[]", tid, low=0)
        _check_bool("ignore_eos", self.ignore_eos)


@dataclass(frozen=True, slots=True)
class RequestSLA:
    """The latency the client wants: time to first token and time per output token."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    def __post_init__(self) -> None:
        if self.ttft_s is None and self.tpot_s is None:
            raise ProtocolError("sla: expected at least one of ttft_s, tpot_s")
        for name in ("ttft_s", "tpot_s"):
            if getattr(self, name) is not None:
                _check_float(f"sla.{name}", getattr(self, name), low=0.0, high=3600.0, low_open=True)


@dataclass(frozen=True, slots=True)
class ClientProfile:
    """How fast the client runs one decoder layer (measured times, or a declared FLOP/s),
    and how many it can hold.

    ``layer_prefill_s_per_token``: one layer's prefill time divided by the prompt length;
    ``layer_decode_s``: one layer's time for one decode step. Decoder layers are identical,
    so one figure stands for every layer. ``max_layers``: the most decoder layers the client
    can hold in memory (None: no bound); the server never places a split layer above it.
    A client holding none (``max_layers=0``) need not state a speed.
    """

    layer_prefill_s_per_token: float | None = None
    layer_decode_s: float | None = None
    flops_per_s: float | None = None
    max_layers: int | None = None

    def __post_init__(self) -> None:
        times = (self.layer_prefill_s_per_token, self.layer_decode_s)
        if (None in times) != all(t is None for t in times):
            raise ProtocolError("client: give both layer_prefill_s_per_token and layer_decode_s, or neither")
        if self.max_layers is not None:
            _check_int("client.max_layers", self.max_layers, low=0)
        if times[0] is None and self.flops_per_s is None and self.max_layers != 0:
            raise ProtocolError("client: expected layer times (layer_prefill_s_per_token, layer_decode_s) or "
                                "flops_per_s (only a client holding no layer, max_layers=0, may omit both)")
        for name in ("layer_prefill_s_per_token", "layer_decode_s"):
            if getattr(self, name) is not None:
                _check_float(f"client.{name}", getattr(self, name), low=0.0, high=60.0)
        if self.flops_per_s is not None:
            _check_float("client.flops_per_s", self.flops_per_s, low=0.0, high=1e18, low_open=True)


# ---------------------------------------------------------------- messages, client -> server
@dataclass(frozen=True, slots=True)
class Open:
    """First frame of a session: which model, where to split, how to sample.

    ``split_layer=None`` asks the server to choose (its admission controller plans the
    request from ``client``, ``sla``, ``prompt_tokens``, ``expected_output_tokens`` and the
    network it measures).

    ``server_decode``: the client accepts that, placed at ``split_layer = 0`` (where its only
    work would be the embedding lookup), it sends the prompt's token ids instead
    (:class:`PromptTokens`) and the server decodes without a round trip per token
    (``Opened.server_decode``). At ``k = 0`` the activations are the token embeddings, which
    identify the tokens exactly, so the server learns nothing it would not otherwise.

    ``privacy_floor``: the lowest split layer the client accepts (the hidden state at a
    shallow layer can be inverted back to the tokens): the server places the session at
    ``split_layer >= privacy_floor`` and, above 0, never decodes it, or refuses it. Left out
    of the frame at 0, so older servers take the frame; one that does not know the field
    refuses a frame carrying it (an unknown field), as a privacy request should be.
    """

    KIND: ClassVar[int] = 1
    # not sent unless used: older servers take the frame
    OMIT_DEFAULT: ClassVar[tuple[str, ...]] = ("server_decode", "wire_dtypes", "privacy_floor", "u_shape",
                                               "return_layer", "max_drafts", "request_type")
    model_fingerprint: str
    split_layer: int | None
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    protocol_version: int = PROTOCOL_VERSION
    sla: RequestSLA | None = None
    client: ClientProfile | None = None
    expected_output_tokens: int | None = None  # None: sampling.max_tokens
    prompt_tokens: int | None = None  # length of the prompt to come (needed for planning)
    server_decode: bool = False  # the client accepts server decoding when placed at k = 0
    # wire dtypes the client can send activations in, preferred first (names this side does
    # not know are skipped by the server); empty: float32, float16 or bfloat16 as it likes
    wire_dtypes: tuple[str, ...] = ()
    privacy_floor: int = 0  # the lowest split layer the client accepts (0: none); above 0 no server decoding
    # U shape (:mod:`vllm_split.wire.ushape`): the client also runs [return_layer, L), the
    # final norm, the LM head and sampling; the server returns the layer-m rows (Hidden)
    u_shape: bool = False
    return_layer: int | None = None  # m; None with u_shape and split_layer None: the server chooses
    # draft tokens the client may send per activation (:mod:`vllm_split.wire.drafts`); 0: none
    max_drafts: int = 0
    # the kind of request ("code", "chat"; 0 to 32 printable characters): the server plans
    # drafts with the tokens per round trip it measured for the type; "": no label
    request_type: str = ""

    def __post_init__(self) -> None:
        _check_str("model_fingerprint", self.model_fingerprint)
        check_u_open(self)
        check_max_drafts(self.max_drafts)
        check_request_type(self.request_type)
        _check_bool("server_decode", self.server_decode)
        _check_int("privacy_floor", self.privacy_floor, low=0)
        offered = tuple(_list("wire_dtypes", self.wire_dtypes))
        if len(offered) > MAX_WIRE_DTYPES_OFFERED:
            raise ProtocolError(f"wire_dtypes: expected at most {MAX_WIRE_DTYPES_OFFERED} names, got {len(offered)}")
        for name in offered:
            if not isinstance(name, str) or not 0 < len(name) <= 32:
                raise ProtocolError(f"wire_dtypes[]: expected a name of 1 to 32 characters, got {name!r:.40}")
        if len(set(offered)) != len(offered):
            raise ProtocolError(f"wire_dtypes: expected distinct names, got {list(offered)}")
        object.__setattr__(self, "wire_dtypes", offered)
        if self.split_layer is not None:
            _check_int("split_layer", self.split_layer, low=0)
        _check_int("protocol_version", self.protocol_version, low=0)
        _nested(self, "sampling", SamplingOptions, optional=False)
        _nested(self, "sla", RequestSLA, optional=True)
        _nested(self, "client", ClientProfile, optional=True)
        for name in ("expected_output_tokens", "prompt_tokens"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), low=1)


@dataclass(frozen=True, slots=True)
class Activation:
    """Hidden states at the split layer for positions [start, start + rows).

    ``end_of_prompt`` marks the last chunk of the prompt; decode steps send one row each.
    ``dtype`` is one of :data:`WIRE_DTYPES`; in an 8-bit format ``data`` is the codes, then
    the float32 scales (:meth:`quantized` splits them; a bad scale is refused here already).
    """

    KIND: ClassVar[int] = 3
    OMIT_DEFAULT: ClassVar[tuple[str, ...]] = ("draft_ids",)
    start: int
    dtype: str
    shape: tuple[int, int]
    data: bytes = field(repr=False)
    end_of_prompt: bool = False
    # a decode activation of a session granted drafts: the draft tokens whose rows follow the
    # first (the last token's), at positions start + 1, ...
    draft_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_int("start", self.start, low=0)
        object.__setattr__(self, "shape", check_rows(self.dtype, _list("shape", self.shape), self.data))
        _check_bool("end_of_prompt", self.end_of_prompt)
        object.__setattr__(self, "draft_ids", check_draft_ids(self.draft_ids, rows=self.shape[0]))
        if self.draft_ids and self.end_of_prompt:
            raise ProtocolError("draft_ids: drafts ride on decode activations, not on a prompt chunk")

    @property
    def rows(self) -> int:
        return self.shape[0]

    @classmethod
    def from_tensor(cls, tensor: "torch.Tensor", *, start: int, end_of_prompt: bool = False,
                    wire_dtype: str | None = None, draft_ids: tuple[int, ...] = ()) -> "Activation":
        """The rows of a 2-D float tensor, sent in ``wire_dtype`` (None: the tensor's own dtype)."""
        dtype, shape, data = rows_payload(tensor, wire_dtype)
        return cls(start=start, dtype=dtype, shape=shape, data=data, end_of_prompt=end_of_prompt,
                   draft_ids=tuple(draft_ids))

    def quantized(self) -> quant.QuantizedTensor:
        """An 8-bit activation's codes and scales (views of ``data``, not copies); a float
        one raises ProtocolError."""
        return rows_quantized(self.dtype, self.shape, self.data)

    def to_tensor(self, *, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
        """The rows as a tensor in ``dtype`` (None: the wire dtype, float32 for an 8-bit one);
        an 8-bit frame whose contents do not decode raises ProtocolError."""
        return rows_to_tensor(self.dtype, self.shape, self.data, dtype)


@dataclass(frozen=True, slots=True)
class PromptTokens:
    """The whole prompt as token ids, for a session the server decodes (``Opened.server_decode``):
    ``num_tokens`` little-endian int32 values in the payload."""

    KIND: ClassVar[int] = 10
    num_tokens: int
    data: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_int("num_tokens", self.num_tokens, low=1)
        if len(self.data) != 4 * self.num_tokens:
            raise ProtocolError(f"payload: {self.num_tokens} token ids in int32 need {4 * self.num_tokens} bytes, "
                                f"got {len(self.data)}")

    @classmethod
    def from_ids(cls, token_ids: "list[int] | tuple[int, ...]") -> "PromptTokens":
        ids = list(token_ids)
        for tid in ids:
            _check_int("token_ids[]", tid, low=0)
            if tid >= 1 << 31:
                raise ProtocolError(f"token_ids[]: expected < 2**31, got {tid}")
        return cls(num_tokens=len(ids), data=struct.pack(f"<{len(ids)}i", *ids))

    def token_ids(self) -> list[int]:
        ids = list(struct.unpack(f"<{self.num_tokens}i", self.data))
        bad = [t for t in ids if t < 0]
        if bad:
            raise ProtocolError(f"token_ids: expected ids >= 0, got {bad[0]}")
        return ids


@dataclass(frozen=True, slots=True)
class ProbeReply:
    """The client's immediate answer to a :class:`Probe`, ``reply_bytes`` of payload."""

    KIND: ClassVar[int] = 9
    nonce: int
    data: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        _check_int("nonce", self.nonce, low=0)


@dataclass(frozen=True, slots=True)
class Close:
    """The client ends the session (the request is aborted if still running)."""

    KIND: ClassVar[int] = 7


# ---------------------------------------------------------------- messages, server -> client
@dataclass(frozen=True, slots=True)
class Opened:
    """The server accepted the session."""

    KIND: ClassVar[int] = 2
    # not sent unless used: older clients take the frame
    OMIT_DEFAULT: ClassVar[tuple[str, ...]] = ("server_decode", "wire_dtype", "return_layer", "max_drafts")
    session_id: str
    split_layer: int
    num_layers: int
    hidden_size: int
    dtype: str
    max_frame_bytes: int
    placement: str = "fixed"  # "fixed" (the client's k), "dp", "least_offload" or "server_only"
    predicted_ttft_s: float | None = None
    predicted_tpot_s: float | None = None
    # the server decodes (the client offered it and was placed at k = 0): the client sends
    # PromptTokens instead of prompt activations and no activation per token
    server_decode: bool = False
    # the wire dtype the server takes activations in, one of Open.wire_dtypes; None: the
    # client offered none and sends float32, float16 or bfloat16
    wire_dtype: str | None = None
    # a U-shaped session's m: the server runs [split_layer, return_layer) and answers Hidden
    # frames instead of Token frames; None: not U-shaped
    return_layer: int | None = None
    # drafts granted per activation (Open.max_drafts, at most the server's own); 0: none, the
    # session gets Token frames, else Tokens frames
    max_drafts: int = 0

    def __post_init__(self) -> None:
        _check_str("session_id", self.session_id)
        check_max_drafts(self.max_drafts)
        if self.return_layer is not None:
            _check_int("return_layer", self.return_layer, low=1)
        _check_bool("server_decode", self.server_decode)
        if self.wire_dtype is not None:
            _check_wire_dtype("wire_dtype", self.wire_dtype)
        _check_str("dtype", self.dtype)
        _check_str("placement", self.placement)
        for name in ("split_layer", "num_layers", "hidden_size", "max_frame_bytes"):
            _check_int(name, getattr(self, name), low=0)
        for name in ("predicted_ttft_s", "predicted_tpot_s"):
            if getattr(self, name) is not None:
                _check_float(name, getattr(self, name), low=0.0)


@dataclass(frozen=True, slots=True)
class Probe:
    """Network measurement before planning: answer at once with ``reply_bytes`` of payload."""

    KIND: ClassVar[int] = 8
    nonce: int
    reply_bytes: int = 0

    def __post_init__(self) -> None:
        _check_int("nonce", self.nonce, low=0)
        _check_int("reply_bytes", self.reply_bytes, low=0)
        if self.reply_bytes > MAX_PROBE_BYTES:
            raise ProtocolError(f"reply_bytes: expected <= {MAX_PROBE_BYTES}, got {self.reply_bytes}")


@dataclass(frozen=True, slots=True)
class Token:
    """One sampled token; ``finish_reason`` is set on the last one."""

    KIND: ClassVar[int] = 4
    index: int
    token_id: int
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        _check_int("index", self.index, low=0)
        _check_int("token_id", self.token_id, low=0)
        if self.finish_reason is not None:
            _check_reason(self.finish_reason)


@dataclass(frozen=True, slots=True)
class Finished:
    """The last frame of a completed generation."""

    KIND: ClassVar[int] = 5
    finish_reason: str
    num_prompt_tokens: int
    num_output_tokens: int

    def __post_init__(self) -> None:
        _check_reason(self.finish_reason)
        _check_int("num_prompt_tokens", self.num_prompt_tokens, low=0)
        _check_int("num_output_tokens", self.num_output_tokens, low=0)


@dataclass(frozen=True, slots=True)
class Error:
    """A rejected frame or request. ``fatal``: the session is over."""

    KIND: ClassVar[int] = 6
    code: str
    message: str
    fatal: bool = False
    retry_after_s: float | None = None  # set when retrying later may succeed

    def __post_init__(self) -> None:
        _check_str("code", self.code)
        if not isinstance(self.message, str):
            raise ProtocolError(f"message: expected a string, got {self.message!r}")
        _check_bool("fatal", self.fatal)
        if self.retry_after_s is not None:
            _check_float("retry_after_s", self.retry_after_s, low=0.0)


Message = Union[Open, Activation, PromptTokens, ProbeReply, Close, Opened, Probe, Token, Finished, Error, Hidden,
                Tokens]
_KINDS: dict[int, type] = {cls.KIND: cls for cls in (Open, Activation, PromptTokens, ProbeReply, Close, Opened,
                                                     Probe, Token, Finished, Error, Hidden, Tokens)}
_PAYLOAD_KINDS = (Activation, PromptTokens, ProbeReply, Hidden)  # messages whose ``data`` field is the raw payload
_DEFAULTS = {(cls, f.name): f.default for cls in (Open, Opened, Activation) for f in fields(cls)
             if f.name in cls.OMIT_DEFAULT}


# ---------------------------------------------------------------- encode / decode
def encode(msg: Message) -> bytes:
    """Serialize a message to one binary frame."""
    payload = b""
    meta = asdict(msg)
    if isinstance(msg, _PAYLOAD_KINDS):
        payload = meta.pop("data")
    for name in getattr(msg, "OMIT_DEFAULT", ()):  # fields added in version 1, left out at their default
        if meta[name] == _DEFAULTS[type(msg), name]:
            del meta[name]
    meta_bytes = json.dumps(meta, separators=(",", ":"), allow_nan=False).encode()
    return _HEADER.pack(MAGIC, PROTOCOL_VERSION, msg.KIND, len(meta_bytes)) + meta_bytes + payload


def decode(frame: bytes, *, max_frame_bytes: int | None = None) -> Message:
    """Parse one binary frame; raises :class:`ProtocolError` on anything malformed."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        kind = "a text frame" if isinstance(frame, str) else type(frame).__name__
        raise ProtocolError(f"expected a binary frame, got {kind}")
    frame = bytes(frame)
    if max_frame_bytes is not None and len(frame) > max_frame_bytes:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the limit of {max_frame_bytes} bytes")
    if len(frame) < HEADER_SIZE:
        raise ProtocolError(f"frame of {len(frame)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, kind, meta_len = _HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic: expected {MAGIC!r}, got {magic!r}")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version} is not supported: this side speaks version {PROTOCOL_VERSION}"
        )
    cls = _KINDS.get(kind)
    if cls is None:
        raise ProtocolError(f"unknown message kind {kind}: expected one of {sorted(_KINDS)}")
    if meta_len > MAX_META_BYTES or HEADER_SIZE + meta_len > len(frame):
        raise ProtocolError(
            f"declared metadata length {meta_len} does not fit: frame has "
            f"{len(frame) - HEADER_SIZE} bytes after the header (limit {MAX_META_BYTES})"
        )
    try:
        meta = json.loads(frame[HEADER_SIZE : HEADER_SIZE + meta_len].decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8/JSON, huge ints, deep nesting
        raise ProtocolError(f"metadata is not valid UTF-8 JSON: {type(exc).__name__}: {exc}"[:300]) from exc
    if not isinstance(meta, dict):
        raise ProtocolError(f"metadata: expected a JSON object, got {type(meta).__name__}")
    payload = frame[HEADER_SIZE + meta_len :]
    if cls in _PAYLOAD_KINDS:
        meta["data"] = payload
    elif payload:
        raise ProtocolError(f"{cls.__name__} carries no payload, got {len(payload)} extra bytes")
    return _build(cls, meta, cls.__name__)


def _build(cls: type, meta: dict[str, Any], where: str):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(meta) - names)
    if unknown:
        raise ProtocolError(f"{where}: unknown field(s) {unknown}; expected a subset of {sorted(names)}")
    try:
        return cls(**meta)
    except ProtocolError:
        raise
    except TypeError as exc:  # a missing required field
        raise ProtocolError(f"{where}: {exc}") from exc


# ---------------------------------------------------------------- field checks (the scalar ones: wire/errors.py)
def _nested(msg: Any, name: str, cls: type, *, optional: bool) -> None:
    """Turn a nested JSON object into ``cls`` (in place on a frozen dataclass)."""
    value = getattr(msg, name)
    if value is None and optional:
        return
    if isinstance(value, dict):
        object.__setattr__(msg, name, _build(cls, value, name))
    elif not isinstance(value, cls):
        raise ProtocolError(f"{name}: expected an object, got {type(value).__name__}")
