"""Runs one split session on the API server: frames in, phases forward, deadlines, errors out.

Runs in the API server process, on its event loop, one driver per connection (the route in
:mod:`vllm_split.api.endpoint` hands it a ``receive`` that returns the connection's frames as
bytes, None when the client is gone). Design: two tasks per session. The *flow* reads frames
and calls the session's rules in the order of its phases (Open, prompt chunks, then the
client's activations beside the engine's ``generate``); the *watch* owns the session's
deadlines (:class:`vllm_split.api.limits.SessionDeadlines`, an injected clock), reading only
``session.awaiting`` and ``session.progress``. Whichever ends first ends the session: when a
limit passes, the flow is cancelled (which aborts the engine request and frees its KV blocks).

Every ``Error`` the client gets goes through :meth:`ServerSession.send_error`: frames that do
not decode and refused frames (non-fatal: the session goes on), and, from one place in
:meth:`SessionDriver.run`, the fatal ones (a refused Open or admission, a time limit, a
failed delivery, an engine failure as ``internal``). ``run`` then raises that (already sent)
:class:`SessionError`, so the route only picks the close code.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

from vllm.logger import init_logger

from vllm_split.wire import protocol as wire
from vllm_split.api.limits import SessionDeadlines
from vllm_split.api.session import ServerSession, SessionError
from vllm_split.wire.contract import ErrorCode

logger = init_logger(f"vllm.{__name__}")  # under "vllm": uses vLLM's log handlers
MAX_TICK_S = 0.25  # how often the watch looks at its session (at most)
Receive = Callable[[], Awaitable[bytes | str | None]]


async def run_session(*, session: ServerSession, receive: Receive, clock: Callable[[], float] = time.monotonic) -> None:
    """Drive ``session`` to its end under its time limits; returns when it finished or the
    client left, raises the fatal :class:`SessionError` it sent otherwise."""
    await SessionDriver(session=session, receive=receive, clock=clock).run()


class SessionDriver:
    """Runs one :class:`ServerSession`: its flow of frames, its deadlines, its fatal error."""

    def __init__(self, *, session: ServerSession, receive: Receive, clock: Callable[[], float] = time.monotonic) -> None:
        self.session = session
        self.receive = receive
        self.clock = clock
        self.deadlines = SessionDeadlines(session.config, now=clock())

    async def run(self) -> None:
        """The flow beside the watch until one ends; then the session is FINISHED and a fatal
        error, if any, is sent (the one place) and raised."""
        session = self.session
        flow = asyncio.create_task(self._flow())
        watch = asyncio.create_task(self._watch())
        try:
            await asyncio.wait({flow, watch}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the connection's handler is cancelled (server shutdown)
            flow.cancel()
            watch.cancel()
            raise
        if flow.done():
            watch.cancel()
            error = self._error_of(flow)
        else:
            error = watch.result()  # built while the session still waited: its message says for what
            logger.info("vllm-split: session %s aborted while %s: %s", session.session_id[:8], session.phase.value, error.code)
            await _stop(flow)  # aborts the engine request (the flow cancels generate)
        session.finish()
        if error is not None:
            await session.send_error(error)
            raise error

    @staticmethod
    def _error_of(flow: asyncio.Task) -> SessionError | None:
        exc = flow.exception()
        if exc is None or isinstance(exc, SessionError):
            return exc
        logger.error("vllm-split: session failed", exc_info=exc)  # the engine failed this request; the server goes on
        error = SessionError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", fatal=True)
        error.__cause__ = exc
        return error

    # ---------------------------------------------------------------- deadlines
    async def _watch(self) -> SessionError:
        """Returns the error of the first limit the session passes (never returns if none)."""
        deadlines = self.deadlines
        if not deadlines.enabled:
            await asyncio.Event().wait()  # no time limits: wait until cancelled
        tick = deadlines.tick_s(max_tick_s=MAX_TICK_S)
        while True:
            awaiting = self.session.awaiting
            limit = deadlines.observe(self.session.progress, awaiting is not None, self.clock())
            if limit is not None:
                return self._limit_error(limit, awaiting=awaiting)
            await asyncio.sleep(tick)

    def _limit_error(self, limit: str, *, awaiting: str | None) -> SessionError:
        config = self.session.config
        tail = "the session is aborted and its KV cache freed"
        if limit == ErrorCode.IDLE_TIMEOUT:
            return SessionError(ErrorCode.IDLE_TIMEOUT, f"no frame within the idle limit of {config.idle_timeout_s} s while the "
                                                        f"server waited for {awaiting}; {tail}", fatal=True)
        return SessionError(ErrorCode.SESSION_LIFETIME, f"the session lifetime limit of {config.session_lifetime_s} s was "
                                                        f"reached after {self.session.num_output_tokens} tokens; {tail}", fatal=True)

    # ---------------------------------------------------------------- frames
    async def _next_message(self) -> wire.Message | None:
        """The next frame that decodes (None: the client is gone); the others are answered."""
        while True:
            frame = await self.receive()
            if frame is None:
                return None
            try:
                return wire.decode(frame, max_frame_bytes=self.session.config.max_frame_bytes)
            except wire.ProtocolError as exc:
                await self.session.send_error(SessionError(ErrorCode.PROTOCOL, str(exc)))

    async def _guarded(self, step: Callable[[wire.Message], Any], msg: wire.Message) -> Any:
        """``step(msg)``; a refused frame is answered and the session goes on (fatal: raised)."""
        try:
            result = step(msg)
            return await result if asyncio.iscoroutine(result) else result
        except SessionError as exc:
            if exc.fatal:
                raise
            await self.session.send_error(exc)
            return None

    async def _flow(self) -> None:
        """The session's frames in phase order; returns when it finished or the client left."""
        session = self.session
        msg = await self._next_message()
        if msg is None:
            return
        await session.handle_open(msg, self._next_message)  # OPENING -> ... -> PROMPTING
        while True:  # PROMPTING: prompt chunks
            msg = await self._next_message()
            if msg is None or isinstance(msg, wire.Close):
                return
            if await self._guarded(session.accept_prompt_chunk, msg):
                break
        gen = asyncio.create_task(session.generate())  # PREFILLING -> DECODING -> FINISHED
        recv = None
        try:
            while not gen.done():
                recv = asyncio.create_task(self._next_message())
                await asyncio.wait({gen, recv}, return_when=asyncio.FIRST_COMPLETED)
                if not recv.done():
                    break
                msg = recv.result()
                if msg is None or isinstance(msg, wire.Close):
                    return
                await self._guarded(session.accept_decode, msg)
            await gen  # surfaces engine errors
        finally:
            if recv is not None and not recv.done():
                recv.cancel()  # stop reading the socket
            await _stop(gen)  # AsyncLLM.generate aborts the request on cancellation


async def _stop(task: asyncio.Task) -> None:
    """Cancel ``task`` if it still runs and wait until it has unwound."""
    if not task.done():
        task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
