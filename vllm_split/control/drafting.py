"""How a session's client drafts change what admission plans for it (pure; issue 14).

Process: the API server (the admission policy, :mod:`vllm_split.control.policy`, and the
request graph, :mod:`vllm_split.control.request_graph`). No asyncio, no vLLM.

A session granted ``γ`` drafts (``Opened.max_drafts``) sends with each decode activation the
row of its last token and up to ``γ`` draft rows; the server verifies them in one engine step
and answers with the accepted drafts and one token of its own. So its decode pass is a
*round trip*, not a token: the client runs its layers once over ``r = 1 + γ`` rows, ``r``
rows cross the uplink, the server's step carries ``r`` rows for it (rejected ones are server
work too) and the answer brings ``E`` tokens on average (the expected tokens per round trip,
measured per request type by the admission controller: :func:`expected_tokens_per_round_trip`).
The planner's graph then describes one round trip (``Drafting`` passed to ``request_graph``)
and everything that compares it with a per-token bound goes through the helpers here, the one
place the scaling lives: :func:`per_round_trip` (a TPOT bound ``b`` per token holds iff the
round trip takes at most ``E * b``) and :func:`per_token` (a round trip's time over ``E``).
``r`` is the most rows the client may send (``1 + γ``): the client sends fewer when its
drafter proposes fewer, so the costs are an upper bound and ``E`` is measured, never assumed.
"""
from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, replace

from vllm_split.planner import SLA

TOKENS_PER_ROUND_TRIP_QUANTILE = 0.25  # of the recent sessions' measurements: most sessions do at least as well
TOKENS_PER_ROUND_TRIP_MIN_SAMPLES = 3  # fewer: nothing measured yet, plan as without drafts


class DraftingError(ValueError):
    """A ``Drafting`` the planner cannot work with (the message names the field and the value)."""


@dataclass(frozen=True, slots=True)
class Drafting:
    """One drafted session's round trip: ``num_drafts`` (γ, granted) draft rows beside its
    last token's, and ``tokens_per_round_trip`` (E) tokens per answer, ``1 <= E <= 1 + γ``."""

    num_drafts: int
    tokens_per_round_trip: float

    def __post_init__(self) -> None:
        g, e = self.num_drafts, self.tokens_per_round_trip
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise DraftingError(f"Drafting.num_drafts: expected an int >= 1, got {g!r}")
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not 1 <= e <= g + 1:
            raise DraftingError(f"Drafting.tokens_per_round_trip: expected a number in [1, {g + 1}] (1 + num_drafts "
                                f"{g}), got {e!r}")

    @property
    def rows(self) -> int:
        """Rows per round trip: the last token's and one per draft."""
        return 1 + self.num_drafts

    def decode_round_trips(self, num_output_tokens: int) -> float:
        """Expected round trips after the first token: ``(n - 1) / E``."""
        return (num_output_tokens - 1) / self.tokens_per_round_trip


def rows_of(drafting: Drafting | None) -> int:
    """Rows one decode pass carries: ``1 + γ`` drafted, else 1."""
    return 1 if drafting is None else drafting.rows


def answer_bytes(token_bytes: int, drafting: Drafting | None) -> int:
    """Bytes of one answer: one token, or ``E`` (rounded up: graph edges are whole bytes)."""
    return token_bytes if drafting is None else math.ceil(token_bytes * drafting.tokens_per_round_trip)


def graph_output_tokens(num_output_tokens: int, drafting: Drafting | None) -> int:
    """The graph's ``num_output_tokens``, so that the planner's ``e2e = ttft + (n - 1) * tpot``
    is TTFT plus one (round-trip) TPOT per round trip: ``1 + ceil((n - 1) / E)``."""
    if drafting is None:
        return num_output_tokens
    return 1 + math.ceil(drafting.decode_round_trips(num_output_tokens) - 1e-9)


def per_round_trip(sla: SLA, drafting: Drafting | None) -> SLA:
    """``sla`` for a graph of round trips: the TPOT bound times ``E`` (TTFT and e2e as they are)."""
    if drafting is None or sla.tpot_s is None:
        return sla
    return replace(sla, tpot_s=sla.tpot_s * drafting.tokens_per_round_trip)


def per_token(round_trip_s: float, drafting: Drafting | None) -> float:
    """A round trip's time as a time per output token: over ``E``."""
    return round_trip_s if drafting is None else round_trip_s / drafting.tokens_per_round_trip


def expected_tokens_per_round_trip(samples: Collection[float]) -> float | None:
    """What to plan a newcomer of a request type with, from its type's recent sessions'
    measured tokens per round trip: their :data:`TOKENS_PER_ROUND_TRIP_QUANTILE` quantile
    (a low one: most sessions do at least as well), at least 1; None with fewer than
    :data:`TOKENS_PER_ROUND_TRIP_MIN_SAMPLES` (nothing measured: never promise a gain)."""
    values = sorted(s for s in samples if s >= 1)
    if len(values) < TOKENS_PER_ROUND_TRIP_MIN_SAMPLES:
        return None
    return values[int(TOKENS_PER_ROUND_TRIP_QUANTILE * len(values))]


def measured_tokens_per_round_trip(*, output_tokens: int, answers: int) -> float | None:
    """A finished drafted session's tokens per decode round trip: the tokens after the first
    over the answers after the first (the prompt's answer brings one token whatever the
    drafts); None with fewer than two answers (no decode round trip to measure)."""
    if answers < 2 or output_tokens < answers:
        return None
    return (output_tokens - 1) / (answers - 1)
