"""The admission policy's records (pure): what it knows of a request, and its decisions.

Process: the API server. :mod:`vllm_split.control.policy` decides over these;
:mod:`vllm_split.api.admission` builds :class:`AdmissionRequest` from a client's ``Open``
and keeps :class:`InFlight` per admitted session. No asyncio, no vLLM, no wire frames.
"""
from __future__ import annotations

from dataclasses import dataclass

from vllm_split.control.drafting import Drafting
from vllm_split.control.kv_budget import Promise
from vllm_split.control.request_graph import ClientCosts, check_max_layers
from vllm_split.planner import SLA, NetworkSpec


class AdmissionInputError(ValueError):
    """A request description or policy option the policy cannot work with (the message
    names the field, what was expected and what arrived)."""


@dataclass(frozen=True, slots=True)
class ClientFlops:
    """A client's declared speed, turned into one layer's times with the served model's
    analytic FLOPs (:meth:`AdmissionPolicy.client_costs`), and how many layers it can hold."""

    flops_per_s: float
    max_layers: int | None = None  # layers [max_layers, N) cannot run on the client; None: no bound

    def __post_init__(self) -> None:
        if not isinstance(self.flops_per_s, (int, float)) or not 0 < self.flops_per_s < float("inf"):
            raise AdmissionInputError(f"ClientFlops.flops_per_s: expected a finite number > 0, "
                                      f"got {self.flops_per_s!r}")
        check_max_layers("ClientFlops", self.max_layers, AdmissionInputError)


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    """What the policy knows of one session's request (the controller builds it from the
    client's ``Open`` and the network it measured)."""

    prompt_tokens: int  # length of the prompt to come
    expected_output_tokens: int  # tokens the client expects (its max_tokens when it states none)
    sla: SLA | None = None  # the client's bounds; None: the server's default (or none at a fixed k)
    client: ClientCosts | ClientFlops | None = None  # the client's speed; None: no profile sent
    network: NetworkSpec | None = None  # measured on the session's connection; None: not probed
    split_layer: int | None = None  # fixed by the client; None: the server chooses
    server_decode: bool = False  # at k = 0 the server may decode it (the client offered, the server allows)
    row_bytes: int | None = None  # one row on the wire in its negotiated wire dtype; None: the policy's hidden_bytes
    privacy_floor: int = 0  # the client's: no split layer below it, no server decoding when > 0
    u_shape: bool = False  # the client also runs [m, L) and the head (control/ushape_policy.py)
    return_layer: int | None = None  # a U request's m, fixed with split_layer; None: the server chooses
    num_drafts: int = 0  # drafts per activation it is granted unless server decoded (0: none; never for U)
    request_type: str = ""  # the client's label (Open.request_type): its acceptance is measured per type
    # tokens per round trip to plan it with: its type's measured (the controller's); None: not
    # measured yet, planned as without drafts
    tokens_per_round_trip: float | None = None
    # mean rows per round trip to plan it with: its type's measured, for its num_drafts (the
    # controller's); None: not measured yet, planned at 1 + num_drafts
    rows_per_round_trip: float | None = None

    def __post_init__(self) -> None:
        g = self.num_drafts
        if isinstance(g, bool) or not isinstance(g, int) or g < 0 or (g and self.u_shape):
            raise AdmissionInputError(f"AdmissionRequest.num_drafts: expected an int >= 0, and 0 for a U request "
                                      f"(the client samples), got {g!r} (u_shape {self.u_shape})")
        for name in ("tokens_per_round_trip", "rows_per_round_trip"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value):
                raise AdmissionInputError(f"AdmissionRequest.{name}: expected None or a number >= 1, got {value!r}")
        if not isinstance(self.request_type, str):
            raise AdmissionInputError(f"AdmissionRequest.request_type: expected a string, got {self.request_type!r}")
        if self.return_layer is not None and (not self.u_shape or self.split_layer is None
                                              or not self.split_layer < self.return_layer):
            raise AdmissionInputError(f"AdmissionRequest.return_layer {self.return_layer!r}: expected a U request "
                                      f"(u_shape) with a split_layer below it, got split_layer {self.split_layer!r}")
        for name in ("prompt_tokens", "expected_output_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AdmissionInputError(f"AdmissionRequest.{name}: expected an int >= 1, got {value!r}")
        k = self.split_layer
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise AdmissionInputError(f"AdmissionRequest.split_layer: expected None or an int >= 0, got {k!r}")
        b = self.row_bytes
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise AdmissionInputError(f"AdmissionRequest.row_bytes: expected None or an int >= 1, got {b!r}")
        f = self.privacy_floor
        if isinstance(f, bool) or not isinstance(f, int) or f < 0:
            raise AdmissionInputError(f"AdmissionRequest.privacy_floor: expected an int >= 0, got {f!r}")

    @property
    def drafting(self) -> Drafting | None:
        """Its round trip as planned when it is not server decoded: its granted drafts, its
        type's measured tokens per round trip (at most ``1 + num_drafts``) and rows per round
        trip (:meth:`step_rows`); None without drafts or before its type's acceptance is
        measured (planned as one token per round trip)."""
        if not self.num_drafts or self.tokens_per_round_trip is None:
            return None
        e = min(float(self.tokens_per_round_trip), 1.0 + self.num_drafts)
        return Drafting(self.num_drafts, e, None if self.rows_per_round_trip is None else self.step_rows())

    def step_rows(self, *, server_decode: bool = False) -> float:
        """Rows it adds to each decode step it is in: 1 server decoded or without drafts;
        granted drafts, its type's measured mean rows per round trip (at least its tokens per
        round trip, at most ``1 + num_drafts``), or before that is measured the most it may
        send, ``1 + num_drafts``, whether or not its acceptance is measured yet (the cost to the
        others is the rows it may send)."""
        if server_decode or not self.num_drafts:
            return 1.0
        top = 1.0 + self.num_drafts
        if self.rows_per_round_trip is None:
            return top
        return min(max(float(self.rows_per_round_trip), float(self.tokens_per_round_trip or 1.0)), top)


@dataclass(frozen=True, slots=True)
class Admission:
    """Decision: admit at ``split_layer``."""

    split_layer: int
    placement: str  # "dp", "greedy", "least_offload", "server_only" or "fixed"
    predicted_ttft_s: float | None  # None: a fixed k without the client's profile or network
    predicted_tpot_s: float | None
    server_work: float | None = None  # engine seconds the request is predicted to cost
    sla: SLA | None = None  # the bounds the session is held to (None: it stated none at a fixed k)
    server_decode: bool = False  # k = 0, decoded on the server: no activation, no round trip per token
    return_layer: int | None = None  # U-shaped: the server runs [split_layer, return_layer) only


@dataclass(frozen=True, slots=True)
class Wait:
    """Decision: not now; it could be admitted when the load, the slots or the admitted
    sessions' bounds allow."""

    why: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """Decision: refuse (``code`` is an :class:`ErrorCode`); waiting would not help."""

    code: str
    message: str
    retry_after_s: float | None = None


@dataclass(frozen=True, slots=True)
class InFlight:
    """An admitted session, as the policy weighs it against a newcomer."""

    request: AdmissionRequest
    admission: Admission
    admitted_at: float  # time.monotonic() at admission

    def promise(self) -> Promise:
        """Its KV, as the admission budget counts it."""
        r = self.request
        return Promise(prompt_tokens=r.prompt_tokens, total_tokens=r.prompt_tokens + r.expected_output_tokens,
                       split_layer=self.admission.split_layer, admitted_at=self.admitted_at)
