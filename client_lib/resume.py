"""A generation that survives dropped connections and server restarts (opt-in).

    gen = ResumableGeneration("http://host:8000", layers, sampling=SamplingOptions(max_tokens=64))
    async for token in gen.generate(prompt_ids):
        print(token.token_id)
    print(gen.num_reconnects)

The client keeps every activation it has computed: the prompt's rows and one row per
generated token. When the connection drops (the server restarted, the network failed, the
server was full) it reconnects with exponential backoff and opens a new session whose
prompt is those kept rows (prompt + tokens so far) and whose ``max_tokens`` is what is left;
the local layers' own KV cache is kept, so nothing is recomputed on the client. Token
indices continue where they stopped. For greedy decoding the result equals an
uninterrupted run token for token (the server's KV for the replayed rows is recomputed
from the same activations). Seeded sampling cannot resume exactly: the server would
restart its random generator at the resumed position, so it is refused here.

Several replicas: give a list of server URLs (``ResumableGeneration([url_a, url_b], ...)``).
The first session opens on the first URL; after a drop, or a refused connection, the next
try goes to the next URL in turn (round robin, starting after the one that failed), at once,
and the backoff waits only after a whole round of URLs failed. A single URL, e.g. a router's
that sends each new connection to a live replica, behaves as before. Every replica must
serve the same weights: another model is refused (``fingerprint_mismatch``, not retried).
``servers_used`` lists the URL of every session the generation opened, in order.

Drafts (``draft="ngram"``, a draft model's directory or a :class:`~client_lib.drafts.Drafter`;
``num_drafts``, ``request_type``: as :meth:`SplitSession.create`'s, docs/drafts.md): every session
the generation opens drafts with one drafter (made once), and is given the ids of its prompt
(the prompt's, then every token so far) for it. The kept rows follow the local layers' KV cache:
when a session cuts the cache back past rejected drafts (``truncate``), the kept rows are cut at
the same position, and after a drop the rows of drafts sent but not yet answered are dropped, so
a resumed session's prompt is again exactly the prompt's and the output tokens' rows. Drafting
needs layers with ``truncate`` (``LocalLayers``, a ``SharedLayers`` view).
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Sequence

import aiohttp
import torch

from client_lib.drafts import Drafter, make_drafter
from client_lib.session import DEFAULT_CHUNK_ROWS, ServerError, SplitSession, SSLOption, TokenEvent, check_num_drafts
from vllm_split.wire.drafts import check_request_type
from vllm_split.wire import protocol as wire
from vllm_split.wire.contract import ErrorCode

logger = logging.getLogger(__name__)

# Server error codes after which a new session can go on: the connection is gone, the
# server is full, or its engine failed (e.g. shutting down for a restart).
RETRY_CODES = frozenset({ErrorCode.CLOSED, ErrorCode.TOO_MANY_SESSIONS, ErrorCode.INTERNAL, ErrorCode.ABORTED,
                         ErrorCode.SERVER_BUSY})


class ResumeError(RuntimeError):
    """The generation cannot be resumed (message says why)."""


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    max_reconnects: int = 8  # dropped connections tolerated in one generation
    initial_delay_s: float = 0.5  # first wait before reconnecting, doubled per failed try
    max_delay_s: float = 8.0
    give_up_after_s: float = 300.0  # per drop: stop trying to reconnect after this long
    retry_codes: frozenset[str] = RETRY_CODES


class _KeptRows:
    """``LocalLayers`` stand-in that keeps the row of every position in the layers' KV cache:
    each computed row is recorded, and :meth:`truncate` cuts the rows where it cuts the cache
    (rejected drafts), so ``num_rows()`` is always the layers' position count."""

    def __init__(self, layers: Any) -> None:
        self.layers = layers
        self.fingerprint = layers.fingerprint
        self.split_layer = layers.split_layer
        self.rows: list[torch.Tensor] = []

    def reset(self) -> None:
        self.layers.reset()
        self.rows = []

    def forward(self, token_ids: list[int]) -> torch.Tensor:
        out = self.layers.forward(token_ids)
        self.rows.append(out.detach().clone())
        return out

    def truncate(self, num_positions: int) -> None:
        """Keep the first ``num_positions`` positions: the layers' KV cache and the rows."""
        self.layers.truncate(num_positions)  # checks 0 <= num_positions <= the positions held
        excess = self.num_rows() - num_positions
        while excess > 0:
            last = self.rows[-1]
            if last.shape[0] <= excess:
                self.rows.pop()
                excess -= last.shape[0]
            else:
                self.rows[-1] = last[: last.shape[0] - excess]
                excess = 0

    def num_rows(self) -> int:
        return sum(r.shape[0] for r in self.rows)


class ResumableGeneration:
    """One generation over as many sessions as it takes (see module docstring)."""

    def __init__(self, url: str | Sequence[str], layers: Any, *, sampling: wire.SamplingOptions | None = None,
                 api_key: str | None = None, policy: ReconnectPolicy = ReconnectPolicy(),
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, ssl: SSLOption = None,
                 draft: str | Drafter | None = "none", num_drafts: int = 4, request_type: str = "") -> None:
        self.sampling = sampling or wire.SamplingOptions()
        if self.sampling.temperature > 0:
            raise ResumeError(f"resume is exact only for greedy decoding (temperature 0), got temperature "
                              f"{self.sampling.temperature}: a resumed request would restart the server's sampler")
        if getattr(layers, "auto", False):
            raise ResumeError("resume replays rows kept at one split layer: give LocalLayers a fixed split_layer, "
                              "not 'auto'")
        self.urls = (url,) if isinstance(url, str) else tuple(url)
        if not self.urls or not all(isinstance(u, str) and u for u in self.urls):
            raise ValueError(f"url: give a server URL or a non-empty list of them, got {url!r}")
        self._next = 0  # index in self.urls of the URL the next connection tries
        self.servers_used: list[str] = []  # the URL of every session opened, in order
        self.api_key, self.policy, self.chunk_rows = api_key, policy, chunk_rows
        self.ssl = ssl  # SplitSession.create's ssl: how a wss:// server's certificate is verified
        check_request_type(request_type)
        self.request_type = request_type  # SplitSession.create's: the kind of request, sent at every Open
        # one drafter for every session (a draft model loads once); each session resets it
        self.drafter = make_drafter(draft, check_num_drafts(num_drafts), vocab_size=getattr(layers, "vocab_size", None))
        self.num_drafts = num_drafts
        if self.drafter is not None and not callable(getattr(layers, "truncate", None)):
            raise ValueError(f"draft: {type(layers).__name__} has no truncate(num_positions): drafting needs layers "
                             f"whose KV cache can drop rejected drafts (LocalLayers, a SharedLayers view)")
        self.kept = _KeptRows(layers)
        self.num_reconnects = 0
        self.finish_reason: str | None = None
        self.events: list[TokenEvent] = []
        self.round_trips = self.drafts_sent = self.drafts_accepted = 0  # over every session (GenerationStats)
        self._session: SplitSession | None = None

    @property
    def url(self) -> str:
        """The URL the next connection tries."""
        return self.urls[self._next]

    def _rotate(self) -> None:
        """The next connection goes to the next URL (the same one when there is one)."""
        self._next = (self._next + 1) % len(self.urls)

    async def disconnect(self) -> None:
        """Drop the current connection (fault injection: the generation reconnects)."""
        if self._session is not None:
            await self._session._ws.close()

    async def generate(self, prompt_ids: list[int]) -> AsyncIterator[TokenEvent]:
        if not prompt_ids:
            raise ValueError("prompt_ids is empty: at least one token is needed")
        self.kept.reset()
        self.kept.forward(list(prompt_ids))
        num_prompt = len(prompt_ids)
        while True:
            done = len(self.events)
            sampling = replace(self.sampling, max_tokens=self.sampling.max_tokens - done)
            # the ids of the rows replayed: the prompt's, then the tokens so far (the drafter's context)
            token_ids = [*prompt_ids, *(e.token_id for e in self.events)] if self.drafter is not None else None
            try:
                self._session = await self._connect(sampling)
                try:
                    async for event in self._session.stream(torch.cat(self.kept.rows), chunk_rows=self.chunk_rows,
                                                            token_ids=token_ids):
                        event = replace(event, index=done + event.index)
                        self.events.append(event)
                        yield event
                finally:
                    await self._session.close()
                    self._count(self._session)
                reason = self._session.stats.finish_reason
                if reason == "abort" and len(self.events) < self.sampling.max_tokens:
                    # the server aborted the request (it is shutting down or restarting; this
                    # client did not ask for it): resume like after a dropped connection
                    raise ServerError(ErrorCode.ABORTED, "the server aborted the request", False)
                self.finish_reason = reason
                return
            except (ServerError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                if isinstance(exc, ServerError) and exc.code not in self.policy.retry_codes:
                    raise
                if self.events and self.events[-1].finish_reason is not None:
                    self.finish_reason = self.events[-1].finish_reason  # dropped before Finished: all tokens are here
                    return
                self.num_reconnects += 1
                if self.num_reconnects > self.policy.max_reconnects:
                    raise ResumeError(f"connection dropped {self.num_reconnects} times, more than the "
                                      f"{self.policy.max_reconnects} allowed: {exc}") from exc
                dropped = self.url
                self._rotate()
                logger.info("split session on %s dropped after %d tokens (%s); resuming on %s", dropped,
                            len(self.events), exc, self.url)
                self._catch_up(num_prompt)

    def _count(self, session: SplitSession) -> None:
        stats = session.stats
        self.round_trips += stats.round_trips
        self.drafts_sent += stats.drafts_sent
        self.drafts_accepted += stats.drafts_accepted

    def _catch_up(self, num_prompt: int) -> None:
        """Before the rows are replayed, exactly one row per prompt position and per received
        token is kept: the rows of drafts sent but not answered go (with their KV positions),
        and tokens received but not yet run through the layers get their rows."""
        num_rows = num_prompt + len(self.events)
        if self.kept.num_rows() > num_rows:
            self.kept.truncate(num_rows)
        while self.kept.num_rows() < num_rows:
            self.kept.forward([self.events[self.kept.num_rows() - num_prompt].token_id])

    async def _connect(self, sampling: wire.SamplingOptions) -> SplitSession:
        """Open a session on the current URL, else on the next ones in turn; back off after
        each round in which every URL failed."""
        delay = self.policy.initial_delay_s
        deadline = time.monotonic() + self.policy.give_up_after_s
        failed = 0
        while True:
            url = self.url
            try:
                session = await SplitSession.create(url, self.kept, sampling=sampling, api_key=self.api_key,
                                                    server_decode=False, ssl=self.ssl,  # it replays kept rows
                                                    draft=self.drafter, num_drafts=self.num_drafts,
                                                    request_type=self.request_type)
                self.servers_used.append(url)
                return session
            except (ServerError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                if isinstance(exc, ServerError) and exc.code not in self.policy.retry_codes:
                    raise
                self._rotate()
                failed += 1
                round_failed = failed % len(self.urls) == 0
                if time.monotonic() + (delay if round_failed else 0.0) > deadline:
                    where = self.urls[0] if len(self.urls) == 1 else f"any of {', '.join(self.urls)}"
                    raise ResumeError(f"could not reconnect to {where} within "
                                      f"{self.policy.give_up_after_s} s: {exc}") from exc
                if len(self.urls) > 1:
                    logger.info("could not open a session on %s (%s); trying %s", url, exc, self.url)
            if round_failed:
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(2 * delay, self.policy.max_delay_s)
