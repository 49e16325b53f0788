"""The names both sides of every process boundary must agree on (no vLLM, no torch).

* client <-> API server: the WebSocket route and the ``Error`` codes;
* API server <-> EngineCore: the ``SamplingParams.extra_args`` key that marks a split
  request, the EngineCore utility methods (``patches/engine_core_utility.py``) and the
  step record the engine returns through one of them.

The frames themselves are :mod:`vllm_split.wire.protocol`'s.
"""
from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Iterable

# The split-session WebSocket route (under /v1, so vLLM's --api-key guards it).
SESSION_PATH = "/v1/split/session"

# SamplingParams.extra_args[EXTRA_ARGS_KEY] = {"session": id, "split_layer": k, "tpot_s":
# bound or None} marks a split request for the scheduler (the bound: its session's TPOT SLA).
EXTRA_ARGS_KEY = "vllm_split"

# A U-shaped request's extra_args entry also has "return_layer": m. Its layer-m rows come back
# on the step's RequestOutput.kv_transfer_params[RETURN_KEY] = {"start", "rows", "dtype",
# "data"} (raw little-endian bytes in the model's dtype; engine/returns.py).
RETURN_KEY = "vllm_split_returned"

# EngineCore utility methods (call_utility_async names) the plugin adds.
# (session_id, start, num_rows, data, turnaround_s[, draft_ids]) -> error or None; turnaround_s:
# for a decode row, seconds from its session's token leaving the API server to this row
# arriving; draft_ids (optional, a session granted drafts): the draft tokens whose rows
# follow the first (num_rows = 1 + len(draft_ids))
UTILITY_DELIVER = "vllm_split_deliver"
UTILITY_RELEASE = "vllm_split_release"  # (session_id) -> bool
UTILITY_STEP_STATS = "vllm_split_step_stats"  # (since_seq) -> {"records": [...], ...} or None


class ErrorCode:
    """``Error.code`` values the server sends (the message says the rest)."""

    PROTOCOL = "protocol"  # a frame that does not decode
    OUT_OF_TURN = "out_of_turn"  # a valid frame at the wrong time or position
    PROTOCOL_VERSION = "protocol_version"
    FINGERPRINT_MISMATCH = "fingerprint_mismatch"
    SPLIT_LAYER = "split_layer"
    MAX_TOKENS = "max_tokens"
    SAMPLING = "sampling"
    PROBE = "probe"
    HIDDEN_SIZE = "hidden_size"
    NON_FINITE = "non_finite"
    WIRE_DTYPE = "wire_dtype"  # no offered wire dtype is accepted, or an activation not in the negotiated one
    PROMPT_TOO_LONG = "prompt_too_long"
    DELIVERY = "delivery"
    IDLE_TIMEOUT = "idle_timeout"
    SESSION_LIFETIME = "session_lifetime"
    TOO_MANY_SESSIONS = "too_many_sessions"
    SLA_UNREACHABLE = "sla_unreachable"
    SERVER_BUSY = "server_busy"
    BAD_REQUEST = "bad_request"
    INTERNAL = "internal"
    # client-side only (never sent by the server)
    CLOSED = "closed"  # the connection closed before Finished
    ABORTED = "aborted"  # Finished(abort): the server aborted the request
    TLS = "tls"  # the TLS handshake failed: certificate not verified, or not a TLS server
    PRIVACY_FLOOR = "privacy_floor"  # the server placed the session below the client's privacy floor


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One engine step, as the split scheduler records it and the controller reads it."""

    seq: int
    wall_time: float  # time.time() at the end of the step
    exec_s: float  # schedule() returned -> update_from_output() called
    layer_calls: int  # decoder layers that ran (a layer with no active row is skipped)
    layer_rows: int  # sum over layers of the rows that ran through it
    num_reqs: int
    num_tokens: int

    def to_list(self) -> list:
        return list(astuple(self))

    @classmethod
    def from_list(cls, values: Iterable) -> "StepRecord":
        return cls(*values)
