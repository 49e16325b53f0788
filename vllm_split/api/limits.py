"""Time limits of a split session: when an idle client or a too-long session must end.

Runs in the API server process, inside the session driver
(:mod:`vllm_split.api.session_driver`), which owns the deadlines of the session it runs and
sends the ``Error`` that names the limit. This module is only the arithmetic: pure, the
clock passed in, no access to a session. A client that stops sending while the server waits
on it (for ``Open``, a probe reply, a prompt chunk, or the activation for the token just
sent) would otherwise hold its KV blocks and a session slot forever; so would a session that
never ends. The size limits (frame, prompt, tokens, sessions) are checked where the frames
are read (``protocol.py``, ``session.py``, ``endpoint.py``).
"""
from __future__ import annotations

from typing import Hashable

from vllm_split.config import SplitConfig
from vllm_split.wire.contract import ErrorCode


class SessionDeadlines:
    """Decides when a session has outlived a limit; pure (the clock is passed in).

    ``observe(progress, awaiting_client, now)`` is called periodically with a value that
    changes whenever the client moves the session forward; the idle clock runs only while
    the server waits on the client and restarts on every change of ``progress``. ``0``
    switches a limit off.
    """

    def __init__(self, config: SplitConfig, *, now: float) -> None:
        self.idle_timeout_s = config.idle_timeout_s
        self.lifetime_s = config.session_lifetime_s
        self.started = now
        self._progress: Hashable = object()
        self._idle_since: float | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.idle_timeout_s or self.lifetime_s)

    def tick_s(self, *, max_tick_s: float) -> float:
        """How often to observe: often enough to end a session within 1/8 of its shortest limit."""
        if not self.enabled:
            raise ValueError("no time limit to observe: idle_timeout_s and session_lifetime_s are both 0")
        return min(max_tick_s, min(s for s in (self.idle_timeout_s, self.lifetime_s) if s) / 8)

    def observe(self, progress: Hashable, awaiting_client: bool, now: float) -> str | None:
        """None, or the code of the limit that has passed: ``ErrorCode.IDLE_TIMEOUT``
        (``"idle_timeout"``) or ``ErrorCode.SESSION_LIFETIME`` (``"session_lifetime"``)."""
        if self.lifetime_s and now - self.started >= self.lifetime_s:
            return ErrorCode.SESSION_LIFETIME
        if not awaiting_client:
            self._idle_since = None
        elif progress != self._progress or self._idle_since is None:
            self._idle_since = now
        self._progress = progress
        if self.idle_timeout_s and self._idle_since is not None and now - self._idle_since >= self.idle_timeout_s:
            return ErrorCode.IDLE_TIMEOUT
        return None
