"""Time limits of a split session: idle clients and overall lifetime.

A client that stops sending while the server waits on it (for ``Open``, a prompt chunk, or
the activation for the token just sent) would otherwise hold its KV blocks and a session
slot forever; so would a session that never ends. :func:`run_with_limits` runs a session
beside a :class:`SessionDeadlines` watchdog; when a limit passes, the session's task is
cancelled (which aborts its engine request and frees its KV blocks) and the client gets a
fatal ``Error`` naming the limit. The size limits (frame, prompt, tokens, sessions) are
checked where the frames are read (``protocol.py``, ``session.py``, ``endpoint.py``).
"""
from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Hashable

from vllm.logger import init_logger

from vllm_split.config import SplitConfig
from vllm_split.wire.contract import ErrorCode
from vllm_split.api.session import ServerSession, SessionError, run_session

logger = init_logger(f"vllm.{__name__}")
MAX_TICK_S = 0.25  # how often the watchdog looks at its session


def waiting_for(session: ServerSession) -> str:
    """What the server is waiting for from the client, for error messages."""
    if session.open is None:
        return "the Open frame"
    if session.expected_start is None:
        return f"the prompt chunk at position {session.num_prompt_rows}"
    return (f"the activation for position {session.expected_start} "
            f"(token {session.num_output_tokens - 1} was sent)")


class SessionDeadlines:
    """Decides when a session has outlived a limit; pure (the clock is passed in).

    ``observe(progress, awaiting_client, now)`` is called periodically with a value that
    changes whenever the client moves the session forward; the idle clock runs only while
    the server waits on the client and restarts on every change of ``progress``.
    """

    def __init__(self, config: SplitConfig, *, now: float) -> None:
        self.idle_timeout_s = config.idle_timeout_s
        self.lifetime_s = config.session_lifetime_s
        self.started = now
        self._progress: Hashable = object()
        self._idle_since: float | None = None

    def observe(self, progress: Hashable, awaiting_client: bool, now: float) -> str | None:
        """None, or which limit has passed: ``"idle_timeout"`` or ``"session_lifetime"``."""
        if self.lifetime_s and now - self.started >= self.lifetime_s:
            return "session_lifetime"
        if not awaiting_client:
            self._idle_since = None
        elif progress != self._progress or self._idle_since is None:
            self._idle_since = now
        self._progress = progress
        if self.idle_timeout_s and self._idle_since is not None and now - self._idle_since >= self.idle_timeout_s:
            return "idle_timeout"
        return None


def _progress(session: ServerSession) -> Hashable:
    return (session.open is not None, session.num_prompt_rows, session.expected_start, session.num_output_tokens)


def limit_error(limit: str, session: ServerSession, config: SplitConfig) -> SessionError:
    tail = "the session is aborted and its KV cache freed"
    if limit == "idle_timeout":
        return SessionError(ErrorCode.IDLE_TIMEOUT, f"no frame within the idle limit of {config.idle_timeout_s} s while the "
                                            f"server waited for {waiting_for(session)}; {tail}", fatal=True)
    return SessionError(ErrorCode.SESSION_LIFETIME, f"the session lifetime limit of {config.session_lifetime_s} s was reached "
                                            f"after {session.num_output_tokens} tokens; {tail}", fatal=True)


async def watch(session: ServerSession, *, clock: Callable[[], float] = time.monotonic) -> SessionError:
    """Returns the error of the first limit the session passes (never returns if none)."""
    config = session.config
    deadlines = SessionDeadlines(config, now=clock())
    enabled = [s for s in (config.idle_timeout_s, config.session_lifetime_s) if s]
    if not enabled:
        await asyncio.Event().wait()  # no time limits: wait until cancelled
    tick = min(MAX_TICK_S, min(enabled) / 8)
    while True:
        limit = deadlines.observe(_progress(session), session.awaiting_client, clock())
        if limit is not None:
            return limit_error(limit, session, config)
        await asyncio.sleep(tick)


async def run_with_limits(*, session: ServerSession, receive: Callable[[], Awaitable[bytes | str | None]]) -> None:
    """:func:`run_session` under the time limits: raises the limit's (sent) SessionError."""
    run = asyncio.create_task(run_session(session=session, receive=receive))
    dog = asyncio.create_task(watch(session))
    try:
        await asyncio.wait({run, dog}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        run.cancel()
        dog.cancel()
        raise
    if run.done():
        dog.cancel()
        return run.result()
    error = dog.result()
    run.cancel()  # aborts the engine request (run_session cancels generate)
    try:
        await run
    except (asyncio.CancelledError, Exception):
        pass
    logger.info("vllm-split: session %s aborted: %s", session.session_id[:8], error.code)
    await session.send(error.to_frame())
    error.sent = True
    raise error
