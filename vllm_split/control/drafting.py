"""How a session's client drafts change what admission plans for it (pure; issue 14).

Process: the API server (the admission policy, :mod:`vllm_split.control.policy`, and the
request graph, :mod:`vllm_split.control.request_graph`). No asyncio, no vLLM.

A session granted ``γ`` drafts (``Opened.max_drafts``) sends with each decode activation the
row of its last token and up to ``γ`` draft rows; the server verifies them in one engine step
and answers with the accepted drafts and one token of its own. So its decode pass is a
*round trip*, not a token: the client runs its layers once over the rows it sends, they cross
the uplink, the server's step carries them (rejected ones are server work too) and the answer
brings ``E`` tokens on average. Both are measured per request type by the admission
controller: ``E`` (:func:`expected_tokens_per_round_trip`, a low quantile: no gain promised
beyond what most sessions got) and the mean rows per round trip ``r̄``
(:func:`expected_rows_per_round_trip`, a high quantile: more rows are more work), ``1 <= r̄ <=
1 + γ``: a client sends fewer drafts when its drafter has no guess (prompt lookup finds no
match) or near its ``max_tokens``. Before ``r̄`` is measured it is planned at ``1 + γ``, the
most a session may send. The planner's graph then describes one round trip (``Drafting``
passed to ``request_graph``) and everything that compares it with a per-token bound goes
through the helpers here, the one place the scaling lives: :func:`per_round_trip` (a TPOT
bound ``b`` per token holds iff the round trip takes at most ``E * b``) and :func:`per_token`
(a round trip's time over ``E``). The TPOT a session is held to is its mean gap per token,
so a round trip is planned at its mean: costs linear in rows (the uplink, the server's rows)
at ``r̄``, the client's pass at the mean pass (``ClientCosts.round_trip_pass_s``).
"""
from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, replace

from vllm_split.planner import SLA

TOKENS_PER_ROUND_TRIP_QUANTILE = 0.25  # of the recent sessions' measurements: most sessions do at least as well
TOKENS_PER_ROUND_TRIP_MIN_SAMPLES = 3  # fewer: nothing measured yet, plan as without drafts
ROWS_PER_ROUND_TRIP_QUANTILE = 0.75  # of the same sessions' share of drafts sent: most send at most as many


class DraftingError(ValueError):
    """A ``Drafting`` the planner cannot work with (the message names the field and the value)."""


@dataclass(frozen=True, slots=True)
class Drafting:
    """One drafted session's round trip: at most ``num_drafts`` (γ, granted) draft rows beside
    its last token's, ``tokens_per_round_trip`` (E) tokens per answer, ``1 <= E <= 1 + γ``, and
    ``rows_per_round_trip`` (r̄) rows per activation on average, ``E <= r̄ <= 1 + γ`` (an answer
    brings at most one token per row sent); None: not measured, planned at ``1 + γ``."""

    num_drafts: int
    tokens_per_round_trip: float
    rows_per_round_trip: float | None = None

    def __post_init__(self) -> None:
        g, e, r = self.num_drafts, self.tokens_per_round_trip, self.rows_per_round_trip
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise DraftingError(f"Drafting.num_drafts: expected an int >= 1, got {g!r}")
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not 1 <= e <= g + 1:
            raise DraftingError(f"Drafting.tokens_per_round_trip: expected a number in [1, {g + 1}] (1 + num_drafts "
                                f"{g}), got {e!r}")
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not e <= r <= g + 1):
            raise DraftingError(f"Drafting.rows_per_round_trip: expected None or a number in [{e}, {g + 1}] "
                                f"(tokens_per_round_trip to 1 + num_drafts), got {r!r}")

    @property
    def max_rows(self) -> int:
        """The most rows a round trip carries: the last token's and one per granted draft."""
        return 1 + self.num_drafts

    @property
    def rows(self) -> float:
        """Rows per round trip as planned: the measured mean ``r̄``, else :attr:`max_rows`."""
        return float(self.max_rows if self.rows_per_round_trip is None else self.rows_per_round_trip)

    @property
    def draft_fill(self) -> float:
        """The share of the granted drafts sent per round trip as planned: ``(r̄ - 1) / γ``."""
        return (self.rows - 1) / self.num_drafts

    def decode_round_trips(self, num_output_tokens: int) -> float:
        """Expected round trips after the first token: ``(n - 1) / E``."""
        return (num_output_tokens - 1) / self.tokens_per_round_trip


def rows_of(drafting: Drafting | None) -> float:
    """Rows one decode pass carries as planned: ``r̄`` (``1 + γ`` unmeasured) drafted, else 1."""
    return 1.0 if drafting is None else drafting.rows


def activation_bytes(row_bytes: int, drafting: Drafting | None) -> int:
    """Bytes of one decode activation: one row, or ``r̄`` rows (rounded up: graph edges are whole bytes)."""
    return row_bytes if drafting is None else math.ceil(row_bytes * drafting.rows)


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


def measured_draft_fill(*, decode_rows: int, answers: int, num_drafts: int) -> float | None:
    """A finished drafted session's share of its ``num_drafts`` granted drafts it sent, in
    [0, 1]: its decode rows per decode round trip, less the last token's, over ``γ``. Each
    answer after the prompt's follows one activation of ``1 + d`` rows, so the round trips
    are the answers after the first (an activation still unanswered when it ended counts
    too: a little more rows, never fewer). None with fewer than two answers."""
    if answers < 2 or num_drafts < 1:
        return None
    return min(max((decode_rows / (answers - 1) - 1) / num_drafts, 0.0), 1.0)


def expected_rows_per_round_trip(fills: Collection[float], num_drafts: int) -> float | None:
    """The mean rows per round trip to plan a newcomer granted ``num_drafts`` with, from its
    type's recent sessions' shares of drafts sent (:func:`measured_draft_fill`): ``1 + γ q``
    with ``q`` their :data:`ROWS_PER_ROUND_TRIP_QUANTILE` quantile (a high one: more rows are more
    work), in ``[1, 1 + γ]``; None with fewer than :data:`TOKENS_PER_ROUND_TRIP_MIN_SAMPLES`
    (plan at ``1 + γ``). Kept as a share, not as rows, because the sessions of a type may
    have been granted other ``γ`` (``min(asked, --split-drafts)``): a type whose sessions sent
    every one of 2 drafts would otherwise plan a newcomer granted 8 at 3 rows."""
    values = sorted(f for f in fills if 0 <= f <= 1)
    if len(values) < TOKENS_PER_ROUND_TRIP_MIN_SAMPLES:
        return None
    return 1.0 + num_drafts * values[len(values) - 1 - int((1 - ROWS_PER_ROUND_TRIP_QUANTILE) * len(values))]
