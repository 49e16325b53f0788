"""Async client session: open, stream tokens, close (usable as ``async with``).

    layers = LocalLayers(model_dir, split_layer="auto")   # or a fixed k, e.g. 7
    async with await SplitSession.create("http://host:8000", layers,
                                         sampling=SamplingOptions(max_tokens=64),
                                         sla=RequestSLA(ttft_s=2.0, tpot_s=0.2)) as session:
        async for token in session.generate(prompt_ids):
            print(token.token_id)

With ``split_layer="auto"`` the server's admission controller chooses ``k`` when the
session opens (in ``generate``, once the prompt length is known): the client sends its
measured per-layer times (``client_lib.client_profile``, cached per device and model), the
most layers it holds (``LocalLayers(max_layers=...)``; the server chooses no ``k`` above
it) and its SLA, and answers the server's network probes.

One session runs one generation. Per step the client computes the hidden state at its
split layer for the new token(s) locally and posts it; the server answers with the next
token. Placed at ``k = 0`` (the client's work would be the embedding lookup alone) the
session is decoded on the server by default (``server_decode=True``): the client sends the
prompt's token ids once and receives the tokens, with no round trip per token. Errors from
the server raise :class:`ServerError` with the server's message.

Privacy floor (``privacy_floor=F``): the hidden state at a shallow layer can be inverted back
to the tokens (at ``k = 0`` it is the token embedding), so a client may refuse to send any
shallower than layer ``F``. The floor goes in ``Open.privacy_floor``; the client then offers
no server decoding (its token ids would go), and it checks the server's answer: an
``Opened`` below the floor (a misbehaving or older server) closes the session with a
:class:`ServerError` of code ``privacy_floor`` before any activation or token id is sent. A
fixed split layer, or an ``auto`` client's memory bound (``max_layers``), below the floor
raises :class:`PrivacyFloorError` before connecting.

The rows' wire dtype (``wire_dtype``): None (default) sends the tensor's own dtype (float32,
exact); a name offers that format alone; ``"auto"`` offers the smallest formats whose
measured agreement with float32 on this model reaches ``min_agreement``
(:mod:`client_lib.wire_policy`). The server answers the one it takes (``Opened.wire_dtype``)
and every row, prompt chunks and decode rows alike, goes in it.

TLS: an ``https://`` URL connects over ``wss://`` (a server started with vLLM's
``--ssl-keyfile``/``--ssl-certfile``). The server's certificate is verified by default,
against the system's CAs; ``ssl=`` takes the path of a CA bundle (or of a self-signed
certificate) to trust instead, or an ``ssl.SSLContext``. ``ssl=False`` turns verification
off: for tests only, never the default. A certificate that does not verify, or a server that
does not speak TLS, raises :class:`ServerError` with code ``tls`` naming the URL.

Drafts (``draft="ngram"``, a draft model's directory or a :class:`~client_lib.drafts.Drafter`,
``num_drafts=γ``; issue 14):
the client asks for up to γ draft tokens per activation (``Open.max_drafts``). A server that
grants them (``Opened.max_drafts = g > 0``) answers with ``Tokens`` frames; after each answer
the client drops its KV cache's positions past the accepted tokens (``layers.truncate``), asks
its drafter for up to ``g`` tokens (prompt lookup: n-gram matches over the prompt and output so
far), runs its layers on the last token and the drafts in one pass and sends the ``1 + d`` rows
in one ``Activation`` (``draft_ids``). The server verifies them in one engine step and answers
with the drafts it accepted and one token of its own, so greedy output is unchanged and a round
trip can bring several tokens. Each token is still one :class:`TokenEvent`, in order. A server
granting none (``0``: no ``--split-drafts``, server decoding) gets the usual one row per token;
an older server refuses the ``Open`` (unknown field ``max_drafts``), raised as a
:class:`ServerError` that says to open with ``draft="none"``. ``drafts_sent``,
``drafts_accepted`` and ``round_trips`` count them (``GenerationStats``). Only ``generate``
drafts (it has the prompt's ids); ``stream`` needs ``token_ids=`` for it. ``request_type``
(e.g. ``"code"``, ``"chat"``; ``Open.request_type``) labels the kind of request: the server's
admission plans a drafted session with the tokens per round trip it measured for the type.
"""
from __future__ import annotations

import os
import ssl as ssl_lib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator

import aiohttp

from client_lib.drafts import Drafter, make_drafter
from client_lib.wire_policy import DEFAULT_MIN_AGREEMENT, offered_wire_dtypes
from vllm_split.wire import protocol as wire
from vllm_split.wire.drafts import MAX_DRAFTS, accepted_drafts, check_request_type
from vllm_split.wire.contract import SESSION_PATH, ErrorCode

if TYPE_CHECKING:
    import torch

DEFAULT_CHUNK_ROWS = 512
# ``ssl=``: None verifies against the system CAs; a path: the CA bundle or self-signed
# certificate to trust; an SSLContext as is; False: no verification (tests only)
SSLOption = ssl_lib.SSLContext | str | os.PathLike | bool | None


class PrivacyFloorError(ValueError):
    """A privacy floor this client cannot keep with its own options (a fixed split layer or a
    memory bound below it), or not an int >= 0; raised before connecting."""


class ServerError(RuntimeError):
    """The server rejected a frame or the session (``code`` is machine-readable;
    ``retry_after_s``: when the server said retrying later may succeed, how much later).
    The client raises it too, with the client-side codes of ``ErrorCode`` (``closed``,
    ``aborted``, ``tls``, ``privacy_floor``)."""

    def __init__(self, code: str, message: str, fatal: bool, retry_after_s: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.fatal = fatal
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class TokenEvent:
    index: int
    token_id: int
    finish_reason: str | None
    local_seconds: float  # client compute for the activation that produced this token
    round_trip_seconds: float  # from sending that activation to receiving this token


@dataclass(slots=True)
class GenerationStats:
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    time_to_first_token: float | None = None  # from Opened to the first token
    events: list[TokenEvent] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    round_trips: int = 0  # answers received (Token or Tokens frames): the prompt's, then one per activation
    drafts_sent: int = 0  # draft tokens sent (rows beyond the first of each decode activation)
    drafts_accepted: int = 0  # of those, the ones the server accepted

    @property
    def tokens_per_round_trip(self) -> float | None:
        return len(self.events) / self.round_trips if self.round_trips else None

    @property
    def time_per_output_token(self) -> float | None:
        t = self.token_times
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None


class SplitSession:
    def __init__(self, *, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse, layers: Any,
                 sampling: wire.SamplingOptions, sla: wire.RequestSLA | None, profile: wire.ClientProfile | None,
                 expected_output_tokens: int | None, link: Any = None, server_decode: bool = True,
                 wire_dtypes: tuple[str, ...] = (), privacy_floor: int = 0, tail: Any = None,
                 drafter: Drafter | None = None, num_drafts: int = 0, request_type: str = "") -> None:
        self._http = http
        self._ws = ws
        self.layers = layers
        self.sampling = sampling
        self.sla = sla
        self.profile = profile
        self.expected_output_tokens = expected_output_tokens
        self.link = link  # harness.emulation.EmulatedLink: delays as on a slower network
        self.server_decode = server_decode  # offered at Open: at k = 0 the server may decode alone
        self.wire_dtypes = wire_dtypes  # offered at Open, preferred first; () : the tensor's own dtype
        self.privacy_floor = privacy_floor  # sent at Open: no split layer below it is accepted from the server
        self.tail = tail  # U-shaped (client_lib/ushape.py): the client's layers [m, L), norm and LM head
        self.drafter = drafter  # proposes draft tokens (client_lib/drafts.py); None: no drafts
        self.num_drafts = num_drafts if drafter is not None else 0  # asked at Open (Open.max_drafts)
        self.request_type = request_type  # sent at Open: the server measures drafts' acceptance per type
        self.opened: wire.Opened | None = None
        self.stats = GenerationStats()
        self._closed = False

    @classmethod
    async def create(cls, url: str, layers: Any, *, sampling: wire.SamplingOptions | None = None,
                     api_key: str | None = None, max_frame_bytes: int = 64 * 1024 * 1024,
                     sla: wire.RequestSLA | None = None, profile: wire.ClientProfile | None = None,
                     expected_output_tokens: int | None = None, link: Any = None,
                     server_decode: bool = True, wire_dtype: str | None = None,
                     min_agreement: float = DEFAULT_MIN_AGREEMENT, ssl: SSLOption = None,
                     privacy_floor: int = 0, tail: Any = None, draft: str | Drafter | None = "none",
                     num_drafts: int = 4, request_type: str = "") -> "SplitSession":
        """Connect; open the session now at a fixed ``layers.split_layer``, or, for
        ``split_layer="auto"``, in :meth:`generate` (planning needs the prompt length).
        ``profile`` defaults to this device's measured one when the server chooses; a
        profile sent carries the layers' memory bound (``layers.max_layers``) too.
        ``server_decode``: offer the server to decode alone when the session is at ``k = 0``
        (False: send activations even then, e.g. to replay kept rows). ``wire_dtype`` (None,
        ``"auto"`` or a name) and ``min_agreement``: the rows' wire dtype (module docstring).
        ``ssl``: how a ``wss://`` server's certificate is verified (module docstring).
        ``privacy_floor``: no split layer below it; above 0 no server decoding is offered
        (module docstring; :func:`check_privacy_floor` runs first). ``tail``: a U-shaped
        session (:mod:`client_lib.ushape`): the client also runs the tail's layers
        ``[m, L)``, the norm, the LM head and sampling, and no token id goes to the server.
        ``draft`` (``"none"``, ``"ngram"``, a draft model's local directory, or a
        :class:`~client_lib.drafts.Drafter`; a draft model must have the layers' ``vocab_size``) and
        ``num_drafts`` (γ, 1 to 16): draft tokens per activation (module docstring).
        ``request_type``: the kind of request, 0 to 32 printable characters (module docstring)."""
        check_privacy_floor(layers, privacy_floor)
        check_request_type(request_type)  # before connecting
        drafter = make_drafter(draft, check_num_drafts(num_drafts), vocab_size=getattr(layers, "vocab_size", None))
        if drafter is not None and not callable(getattr(layers, "truncate", None)):
            raise ValueError(f"draft: {type(layers).__name__} has no truncate(num_positions): drafting needs layers "
                             f"whose KV cache can drop rejected drafts (LocalLayers, a SharedLayers view)")
        if drafter is not None and tail is not None:
            raise ValueError("draft: a U-shaped session (tail) cannot draft: the client samples, so there is nothing "
                             "for the server to verify; use draft='none'")
        if tail is not None:
            from client_lib.ushape import check_u_layers

            check_u_layers(layers, tail)
        server_decode = server_decode and privacy_floor == 0 and tail is None
        ws_url = url.rstrip("/").replace("http://", "ws://").replace("https://", "wss://") + SESSION_PATH
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        ssl_context = client_ssl(ssl)
        auto = getattr(layers, "auto", False)
        wire_dtypes = offered_wire_dtypes(layers.fingerprint, wire_dtype, min_agreement=min_agreement)
        if profile is not None or auto:
            from client_lib.client_profile import client_profile, with_bound

            bound = getattr(layers, "max_layers", None)
            profile = client_profile(layers) if profile is None else with_bound(profile, bound)
        http = aiohttp.ClientSession()
        try:
            try:
                ws = await http.ws_connect(ws_url, headers=headers, max_msg_size=max_frame_bytes, ssl=ssl_context)
            except aiohttp.ClientSSLError as exc:
                raise tls_error(ws_url, exc) from exc
            session = cls(http=http, ws=ws, layers=layers, sampling=sampling or wire.SamplingOptions(), sla=sla,
                          profile=profile, expected_output_tokens=expected_output_tokens, link=link,
                          server_decode=server_decode, wire_dtypes=wire_dtypes, privacy_floor=privacy_floor, tail=tail,
                          drafter=drafter, num_drafts=num_drafts, request_type=request_type)
            if not auto:
                await session._open(prompt_tokens=None)
        except BaseException:
            await http.close()
            raise
        return session

    async def _open(self, prompt_tokens: int | None) -> wire.Opened:
        auto = getattr(self.layers, "auto", False)
        u_shape = self.tail is not None
        await self._send(wire.Open(
            model_fingerprint=self.layers.fingerprint, split_layer=None if auto else self.layers.split_layer,
            # a U session samples on the client: only the server's limit leaves (no stop token ids)
            sampling=wire.SamplingOptions(max_tokens=self.sampling.max_tokens) if u_shape else self.sampling,
            sla=self.sla, client=self.profile,
            expected_output_tokens=self.expected_output_tokens, prompt_tokens=prompt_tokens,
            server_decode=self.server_decode, wire_dtypes=self.wire_dtypes, privacy_floor=self.privacy_floor,
            u_shape=u_shape, return_layer=None if auto or not u_shape else self.tail.return_layer,
            max_drafts=self.num_drafts, request_type=self.request_type))
        while True:  # answer the server's network probes until it decides
            try:
                msg = await self._recv()
            except ServerError as exc:
                refused = open_refused(exc, num_drafts=self.num_drafts, request_type=self.request_type)
                if refused is not exc:
                    raise refused from exc
                raise
            if isinstance(msg, wire.Probe):
                await self._send(wire.ProbeReply(nonce=msg.nonce, data=bytes(msg.reply_bytes)))
                continue
            if not isinstance(msg, wire.Opened):
                raise ServerError("protocol", f"expected Opened, got {type(msg).__name__}", True)
            break
        if msg.wire_dtype not in (self.wire_dtypes or (None,)):
            offered = f"not one of the offered {list(self.wire_dtypes)}" if self.wire_dtypes else "none was offered"
            raise ServerError("protocol", f"the server chose wire dtype {msg.wire_dtype!r}, {offered}", True)
        if self.privacy_floor and (msg.split_layer < self.privacy_floor or msg.server_decode):
            await self.close()  # before any activation or token id leaves
            how = f"split layer {msg.split_layer}" + (", decoded on the server" if msg.server_decode else "")
            raise ServerError(ErrorCode.PRIVACY_FLOOR, f"the server placed this session at {how}, below this client's "
                                                       f"privacy floor {self.privacy_floor} (expected split_layer >= "
                                                       f"{self.privacy_floor}, no server decoding); the session is "
                                                       f"closed before any activation or token id was sent", True)
        if u_shape:
            from client_lib.ushape import accept_u_opened

            await accept_u_opened(self, msg)
        if auto:
            self.layers.use_split_layer(msg.split_layer)
        self.opened = msg
        return msg

    async def __aenter__(self) -> "SplitSession":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection (aborts a running generation). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._ws.closed:
                await self._ws.close()
        finally:
            await self._http.close()

    async def _send(self, msg: wire.Message) -> None:
        frame = wire.encode(msg)
        if self.link is not None:
            await self.link.uplink(len(frame))
        await self._ws.send_bytes(frame)

    async def _recv(self) -> wire.Message:
        msg = await _recv(self._ws)
        if self.link is not None:
            await self.link.downlink(len(wire.encode(msg)))
        return msg

    @property
    def granted_drafts(self) -> int:
        """Draft tokens per activation: what the server granted (``Opened.max_drafts``), at most
        what this client asked; 0 before the session opened, without a drafter or when refused."""
        if self.opened is None or self.drafter is None:
            return 0
        return min(self.opened.max_drafts, self.num_drafts)

    @property
    def round_trips(self) -> int:
        return self.stats.round_trips

    @property
    def drafts_sent(self) -> int:
        return self.stats.drafts_sent

    @property
    def drafts_accepted(self) -> int:
        return self.stats.drafts_accepted

    async def _forward(self, token_ids: list[int]):
        aforward = getattr(self.layers, "aforward", None)  # emulated clients compute asynchronously
        return await aforward(token_ids) if aforward is not None else self.layers.forward(token_ids)

    async def generate(self, prompt_ids: list[int], *, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> AsyncIterator[TokenEvent]:
        """Run the prompt through the local layers, then stream tokens until finished.

        The prompt's activations go in chunks of at most ``chunk_rows`` rows, fewer if the
        server's frame limit (``Opened.max_frame_bytes``) requires it.
        """
        if not prompt_ids:
            raise ValueError("prompt_ids is empty: at least one token is needed")
        if self.opened is None:
            await self._open(prompt_tokens=len(prompt_ids))
        if self.tail is not None:
            from client_lib.ushape import u_generate

            async for event in u_generate(self, list(prompt_ids), chunk_rows=chunk_rows):
                yield event
            return
        if self.opened.server_decode:  # k = 0, decoded on the server: the ids go, tokens come
            t_start = time.perf_counter()
            await self._send(wire.PromptTokens.from_ids(prompt_ids))
            async for event in self._tokens(len(prompt_ids), t_start=t_start, local=0.0, decode_locally=False):
                yield event
            return
        self.layers.reset()
        t_start = time.perf_counter()
        hidden = await self._forward(list(prompt_ids))
        async for event in self.stream(hidden, chunk_rows=chunk_rows, t_start=t_start, token_ids=prompt_ids):
            yield event

    async def stream(self, hidden: "torch.Tensor", *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                     t_start: float | None = None, token_ids: list[int] | None = None) -> AsyncIterator[TokenEvent]:
        """Send prompt rows already computed (``hidden``, the hidden states at the split
        layer of every prompt position, with ``self.layers``' cache holding them), then
        stream tokens, computing each token's row with ``self.layers``. The resume path
        (``client_lib/resume.py``) uses this to replay the rows it kept. ``token_ids``: the
        ids of those positions, which a drafter needs (None: no drafts are sent)."""
        if self.opened.server_decode:
            raise ValueError("this session is decoded on the server (Opened.server_decode): it takes the prompt's "
                             "token ids (generate), not rows; open it with server_decode=False to send rows")
        if token_ids is not None and len(token_ids) != hidden.shape[0]:
            raise ValueError(f"token_ids: {len(token_ids)} ids for {hidden.shape[0]} rows")
        t_start = time.perf_counter() if t_start is None else t_start
        local = time.perf_counter() - t_start
        await self._send_prompt(hidden, chunk_rows=chunk_rows)
        async for event in self._tokens(hidden.shape[0], t_start=t_start, local=local, decode_locally=True,
                                        context=None if token_ids is None else list(token_ids)):
            yield event

    async def _send_prompt(self, hidden: "torch.Tensor", *, chunk_rows: int) -> None:
        """The prompt's rows in chunks that fit the server's frame limit, in the session's wire dtype."""
        n, fmt = hidden.shape[0], self.opened.wire_dtype
        row_bytes = hidden.shape[1] * hidden.element_size() if fmt is None else wire.row_bytes(fmt, hidden.shape[1])
        chunk_rows = max(1, min(chunk_rows, (self.opened.max_frame_bytes - 4096) // row_bytes))
        for begin in range(0, n, chunk_rows):
            end = min(begin + chunk_rows, n)
            await self._send(wire.Activation.from_tensor(hidden[begin:end], start=begin, end_of_prompt=end == n,
                                                         wire_dtype=fmt))

    async def _tokens(self, n: int, *, t_start: float, local: float, decode_locally: bool,
                      context: list[int] | None = None) -> AsyncIterator[TokenEvent]:
        """The tokens after a prompt of ``n`` positions went; with ``decode_locally`` each
        answer's last token's row is computed and sent back (a split session), with drafts
        when the session was granted them and ``context`` (the prompt's ids) is known; else
        the server decodes. An answer is a ``Token`` or, for a session granted drafts, a
        ``Tokens`` frame (the accepted drafts, then the server's own token).

        The next activation leaves before the answer's tokens are handed to the caller, so
        what the caller does with a token (print it, stream it on) overlaps the server's next
        step instead of lengthening every round trip. Should computing or sending it fail, the
        tokens already received are still handed over, then the error is raised."""
        sent_at = time.perf_counter()
        self.stats.num_prompt_tokens = n
        granted = self.granted_drafts if context is not None else 0
        if granted:
            self.drafter.reset()
        drafts: list[int] = []  # the drafts of the activation in flight
        while True:
            msg = await self._recv()
            if isinstance(msg, wire.Finished):
                self.stats.finish_reason = msg.finish_reason
                self.stats.num_output_tokens = msg.num_output_tokens
                return
            if isinstance(msg, wire.Token):
                index, ids = msg.index, (msg.token_id,)
            elif isinstance(msg, wire.Tokens):
                index, ids = msg.index, msg.token_ids
            else:
                raise ServerError("protocol", f"expected Token, Tokens or Finished, got {type(msg).__name__}", True)
            if granted:
                self._check_answer(index, ids, drafts)
            now = time.perf_counter()
            self.stats.round_trips += 1
            if self.stats.time_to_first_token is None:
                self.stats.time_to_first_token = now - t_start
            events = []
            for i, token_id in enumerate(ids):
                self.stats.token_times.append(now)
                last = i == len(ids) - 1
                events.append(TokenEvent(index=index + i, token_id=token_id,
                                         finish_reason=msg.finish_reason if last else None,
                                         local_seconds=local, round_trip_seconds=now - sent_at))
            self.stats.events.extend(events)
            failure = None
            if msg.finish_reason is None and decode_locally:
                try:
                    drafts, local = await self._send_next(n, index + len(ids) - 1, ids, granted=granted,
                                                          context=context)
                except Exception as exc:  # noqa: BLE001  (raised below, once the tokens are out)
                    failure = exc
                sent_at = time.perf_counter()
            else:
                sent_at = now  # server decoded: the next token's wait starts now
            for event in events:
                yield event
            if failure is not None:
                raise failure

    async def _send_next(self, n: int, index_last: int, ids: tuple[int, ...], *, granted: int,
                         context: list[int] | None) -> tuple[list[int], float]:
        """Compute and send the activation of an answer's last token (output ``index_last``,
        after ``n`` prompt positions) with its drafts: (the drafts sent, the local seconds)."""
        position = n + index_last  # the last token's; the KV cache is valid before it
        drafts: list[int] = []
        t0 = time.perf_counter()
        if granted:
            context.extend(ids)
            self.drafter.accept(ids)
            self.layers.truncate(position)
            # at most what the server granted, and no draft past max_tokens (its own token comes on top)
            cap = max(0, min(granted, self.sampling.max_tokens - (index_last + 1) - 1))
            drafts = [int(d) for d in self.drafter.propose(context, cap)][:cap] if cap else []
        rows = await self._forward([ids[-1], *drafts])
        local = time.perf_counter() - t0
        await self._send(wire.Activation.from_tensor(rows, start=position, wire_dtype=self.opened.wire_dtype,
                                                     draft_ids=tuple(drafts)))
        self.stats.drafts_sent += len(drafts)
        return drafts, local

    def _check_answer(self, index: int, ids: tuple[int, ...], drafts: list[int]) -> None:
        """A drafting session's answer continues the output where it stands and accepts a prefix
        of the drafts sent: the server's rejection sampler emits a draft only where it accepted
        it, so any other answer is a server (or protocol) fault, and this client's KV cache and
        positions would go wrong."""
        if index != len(self.stats.events):
            raise ServerError("protocol", f"expected the answer for output index {len(self.stats.events)}, got index "
                                          f"{index}", True)
        accepted = accepted_drafts(drafts, ids)
        if accepted != len(ids) - 1:
            raise ServerError("protocol", f"the answer at output index {index} has tokens {list(ids)}: expected the "
                                          f"first {len(ids) - 1} of the drafts sent {drafts} then the server's own "
                                          f"token, but draft {accepted} differs (only {accepted} accepted)", True)
        self.stats.drafts_accepted += accepted


def check_num_drafts(num_drafts: int) -> int:
    """``num_drafts``: an int in [1, MAX_DRAFTS]."""
    if isinstance(num_drafts, bool) or not isinstance(num_drafts, int) or not 1 <= num_drafts <= MAX_DRAFTS:
        raise ValueError(f"num_drafts: expected an int from 1 to {MAX_DRAFTS}, got {num_drafts!r}")
    return num_drafts


def open_refused(exc: ServerError, *, num_drafts: int, request_type: str) -> ServerError:
    """An Open refused for a field this client sent that the server does not know (an older
    server): the error saying what to leave out; ``exc`` itself for any other refusal."""
    unknown = str(exc).split("; expected", 1)[0]  # the fields named unknown, not the list of known ones
    if num_drafts and "max_drafts" in unknown:
        return drafts_refused(exc)
    if request_type and "request_type" in unknown:
        return ServerError(exc.code, f"{exc} -- this server does not take request types (Open.request_type; it "
                                     f"predates them): open the session without one (request_type='')", exc.fatal,
                           exc.retry_after_s)
    return exc


def drafts_refused(exc: ServerError) -> ServerError:
    """The error for an Open with ``max_drafts`` that the server refused: an older server that
    does not know the field (or one that refuses drafts outright)."""
    return ServerError(exc.code, f"{exc} -- this server does not take client drafts (Open.max_drafts; it predates "
                                 f"them): open the session with draft='none' (--draft none)", exc.fatal,
                       exc.retry_after_s)


def check_privacy_floor(layers: Any, privacy_floor: int) -> None:
    """Before connecting: ``privacy_floor`` is an int >= 0 that ``layers`` can keep (a fixed
    split layer at or above it; for ``auto``, a memory bound ``max_layers`` at or above it).
    Raises :class:`PrivacyFloorError` otherwise."""
    if isinstance(privacy_floor, bool) or not isinstance(privacy_floor, int) or privacy_floor < 0:
        raise PrivacyFloorError(f"privacy_floor: expected an int >= 0, got {privacy_floor!r}")
    if privacy_floor == 0:
        return
    if privacy_floor > layers.num_layers:
        raise PrivacyFloorError(f"privacy_floor {privacy_floor} is above the model's {layers.num_layers} decoder "
                                f"layers: no split layer can keep it")
    bound = getattr(layers, "max_layers", None)
    if getattr(layers, "auto", False) and bound is not None and bound < privacy_floor:
        raise PrivacyFloorError(f"privacy_floor {privacy_floor} is above this client's memory bound: it holds at most "
                                f"{bound} decoder layers (max_layers), so no split layer at or above the floor fits; "
                                f"hold at least {privacy_floor} layers or lower the floor")
    if not getattr(layers, "auto", False) and layers.split_layer < privacy_floor:
        raise PrivacyFloorError(f"split_layer {layers.split_layer} is below privacy_floor {privacy_floor}: expected "
                                f"split_layer >= {privacy_floor} or 'auto'")


def client_ssl(option: SSLOption) -> ssl_lib.SSLContext | bool:
    """aiohttp's ``ssl=`` for a session's ``ssl`` option (module docstring)."""
    if option is None or option is True:
        return True  # aiohttp's default: verify against the system CAs
    if option is False or isinstance(option, ssl_lib.SSLContext):
        return option
    if isinstance(option, (str, os.PathLike)):
        return ssl_lib.create_default_context(cafile=os.fspath(option))
    raise TypeError(f"ssl: expected an SSLContext, a CA file path, a bool or None, got {type(option).__name__}")


def tls_error(url: str, exc: aiohttp.ClientSSLError) -> ServerError:
    """The client error for a TLS handshake with ``url`` that failed."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cause = exc.certificate_error
        what = (f"certificate verification failed ({getattr(cause, 'verify_message', None) or cause}); "
                f"trust its CA with ssl=PATH (vllm-split-client --ca-file, gateway --server-ca-file)")
    else:
        what = f"TLS handshake failed ({exc}); is it a TLS server?"
    return ServerError(ErrorCode.TLS, f"{url}: {what}", True)


async def _recv(ws: aiohttp.ClientWebSocketResponse) -> wire.Message:
    msg = await ws.receive()
    if msg.type != aiohttp.WSMsgType.BINARY:
        raise ServerError(ErrorCode.CLOSED, f"connection closed ({msg.type.name}, code {ws.close_code}, {msg.extra!r})", True)
    out = wire.decode(msg.data)
    if isinstance(out, wire.Error):
        raise ServerError(out.code, out.message, out.fatal, out.retry_after_s)
    return out
