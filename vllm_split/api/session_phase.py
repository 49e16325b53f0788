"""The phases of one split session on the API server, and which phase may follow which.

Runs in the API server process (imported by :mod:`vllm_split.api.session`, whose
``ServerSession._enter`` is the only place a session's phase changes, and by the driver in
:mod:`vllm_split.api.session_driver`, which reads it). Pure: no I/O, no vLLM::

    OPENING -> [PROBING] -> [ADMITTING] -> PROMPTING -> PREFILLING -> DECODING -> FINISHED

PROBING only when the client asks to be planned (or sends its profile) and a connection
can carry probes; ADMITTING only on a server with an admission controller. A session the
controller admits before the probe (its placement cannot depend on the network: the server
decodes it) goes from OPENING to PROMPTING. Every phase may
go to FINISHED (a fatal ``Error``, the client leaving, a time limit); FINISHED is final.
"""
from __future__ import annotations

import enum


class SessionPhase(enum.Enum):
    """Where a session is. The comment says who the server waits on in that phase."""

    OPENING = "opening"  # the client: its Open frame
    PROBING = "probing"  # the client: its ProbeReply frames (network measurement)
    ADMITTING = "admitting"  # the admission controller's queue (not the client)
    PROMPTING = "prompting"  # the client: its next prompt chunk (Opened was sent)
    PREFILLING = "prefilling"  # the engine: the prompt is delivered, the first token computes
    DECODING = "decoding"  # the client for the last token's activation, else the engine
    FINISHED = "finished"  # nobody: Finished or a fatal Error was sent, or the client left

    def may_enter(self, phase: SessionPhase) -> bool:
        """Whether a session in this phase may move to ``phase``."""
        return phase in _NEXT[self]


_P = SessionPhase
_NEXT: dict[SessionPhase, frozenset[SessionPhase]] = {
    _P.OPENING: frozenset({_P.PROBING, _P.ADMITTING, _P.PROMPTING, _P.FINISHED}),
    _P.PROBING: frozenset({_P.ADMITTING, _P.PROMPTING, _P.FINISHED}),
    _P.ADMITTING: frozenset({_P.PROMPTING, _P.FINISHED}),
    _P.PROMPTING: frozenset({_P.PREFILLING, _P.FINISHED}),
    _P.PREFILLING: frozenset({_P.DECODING, _P.FINISHED}),
    _P.DECODING: frozenset({_P.FINISHED}),
    _P.FINISHED: frozenset(),
}
