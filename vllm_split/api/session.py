"""One split session on the API server: its phase, its rules, one engine request.

Runs in the API server process, on its event loop. A session is: ``Open`` -> ``Opened``;
``Activation`` chunks for the prompt (the last one marked ``end_of_prompt``); then, per
sampled token, a ``Token`` frame and the client's ``Activation`` for that token (one row,
at position ``prompt_len + index``) until the token that carries a ``finish_reason``; then
``Finished``. A session placed at ``k = 0`` whose client offered it is *server decoded*
(``Opened.server_decode``): its prompt comes as token ids (one ``PromptTokens`` frame) and it
runs in the engine as an ordinary request, tokens streamed without an activation per token.
A privacy floor (the server's ``privacy_floor`` option, the client's ``Open.privacy_floor``;
:mod:`vllm_split.control.privacy_floor`) refuses a fixed split layer below it at Open and
rules server decoding out.
Client drafts (docs/design/issue14_drafts.md): a session granted them (``Opened.max_drafts``:
the client's ``Open.max_drafts``, at most the server's ``drafts`` option; none for U-shaped
or server-decoded sessions) sends with each decode activation the rows of up to that many
draft tokens and their ids; the engine verifies them in one step and the session answers
each engine output with one ``Tokens`` frame (the accepted drafts, then the engine's token)
instead of ``Token`` frames. It counts its answers and the decode rows it was delivered; at
release the admission controller learns the session's tokens per round trip (for the next
sessions of its ``Open.request_type``) and the rows it cost, rejected drafts included.
The activations' wire dtype is negotiated at Open (:meth:`ServerSession._choose_wire_dtype`):
the first of the client's ``Open.wire_dtypes`` that this server accepts; 8-bit rows are
decoded into the model's dtype, and a row in another dtype than the negotiated one is refused.
How far it got is one explicit :class:`~vllm_split.api.session_phase.SessionPhase`
(OPENING, [PROBING], [ADMITTING], PROMPTING, PREFILLING, DECODING, FINISHED), changed only
by :meth:`ServerSession._enter`, which checks the transition; code outside reads ``phase``,
``awaiting`` and ``progress``. The driver (:mod:`vllm_split.api.session_driver`) reads the
frames, owns the deadlines and sends every ``Error`` through :meth:`ServerSession.send_error`.
:meth:`ServerSession.release` frees the admission slot and the scheduler's copy of the rows.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Hashable

import torch
from vllm.exceptions import VLLMClientError
from vllm.inputs import TokensPrompt
from vllm.logger import init_logger
from vllm.sampling_params import RequestOutputKind, SamplingParams

from vllm_split.wire import protocol as wire
from vllm_split.api.admission import AdmissionController, AdmissionRefused, granted_drafts, request_from_open
from vllm_split.api.engines import EngineSet
from vllm_split.config import SplitConfig
from vllm_split.control.admission_records import AdmissionInputError
from vllm_split.control.privacy_floor import effective_floor, floor_violation
from vllm_split.api.net_probe import UNPROBED, ProbeFailed, measure_network
from vllm_split.api.session_phase import SessionPhase
from vllm_split.api.ushape import check_fixed_u, hidden_frames, stop_ids_problem, u_sampling_params
from vllm_split.wire.contract import EXTRA_ARGS_KEY, UTILITY_DELIVER, UTILITY_RELEASE, ErrorCode

if TYPE_CHECKING:
    from vllm_split.api.admission import Admission
    from vllm_split.planner import NetworkSpec

logger = init_logger(f"vllm.{__name__}")  # under "vllm": uses vLLM's log handlers
PLACEHOLDER_TOKEN_ID = 0  # prompt ids the engine never embeds (rows are replaced)


class SessionError(Exception):
    """A frame or request the session rejects: ``code`` and a message for the client."""

    def __init__(self, code: str, message: str, *, fatal: bool = False, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.fatal = fatal
        self.retry_after_s = retry_after_s

    def to_frame(self) -> wire.Error:
        return wire.Error(code=self.code, message=str(self), fatal=self.fatal, retry_after_s=self.retry_after_s)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    fingerprint: str
    num_layers: int
    hidden_size: int
    dtype: torch.dtype
    max_model_len: int
    vocab_size: int | None = None  # token ids of a server-decoded prompt must be below it
    u_shape_unsupported: str | None = None  # why this server cannot run U-shaped sessions (None: it can)


class ServerSession:
    """State and rules of one session; I/O goes through ``send`` and ``engine``."""

    def __init__(self, *, engine: Any, model: ModelInfo, config: SplitConfig,
                 send: Callable[[wire.Message], Awaitable[None]],
                 controller: AdmissionController | None = None, engines: EngineSet | None = None,
                 engine_index: int = 0) -> None:
        self.engine = engine
        self._engines = engines
        self.engine_index = engine_index  # the engine (DP rank index) the session runs on; the controller's choice
        self.model = model
        self.config = config
        self.send = send
        self.controller = controller
        self.session_id = secrets.token_urlsafe(18)
        self._phase = SessionPhase.OPENING
        self.open: wire.Open | None = None
        self.split_layer = 0
        self.return_layer: int | None = None  # U-shaped (api/ushape.py): the server runs [split_layer, return_layer)
        self.tpot_bound_s: float | None = None  # the TPOT the session is held to (the scheduler composes steps by it)
        self.server_decode = False  # k = 0 and decoded on the server: token ids in, no activations
        self.wire_dtype: str | None = None  # negotiated at Open; None: any float format
        self.max_drafts = 0  # drafts granted per decode activation (0: none, Token frames)
        self.prompt_ids: list[int] = []
        self.prompt_rows: list[torch.Tensor] = []
        self.num_prompt_rows = 0
        self.expected_start: int | None = None  # DECODING: position of the activation we wait for
        self.num_output_tokens = 0
        self.num_answers = 0  # Tokens frames sent (a session granted drafts: one per engine step)
        self.num_decode_rows = 0  # rows of the decode activations delivered (1 + drafts each)
        self._opened_at: float | None = None
        self._token_times: list[float] = []
        # what release() gives back (resources, not phases)
        self._holds_slot = False  # admitted by the controller
        self._rows_in_engine = False  # the scheduler keeps a copy of our activations

    @property
    def engines(self) -> EngineSet:
        if self._engines is None:
            self._engines = EngineSet(self.engine)
        return self._engines

    # ---------------------------------------------------------------- phase
    @property
    def phase(self) -> SessionPhase:
        return self._phase

    def _enter(self, phase: SessionPhase) -> None:
        """The only place the phase changes."""
        assert self._phase.may_enter(phase), f"session {self.session_id[:8]}: no transition {self._phase.name} -> {phase.name}"
        self._phase = phase

    def finish(self) -> None:
        """Enter FINISHED (the session is over, whatever it was doing); safe twice."""
        if self._phase is not SessionPhase.FINISHED:
            self._enter(SessionPhase.FINISHED)
            self.expected_start = None

    @property
    def awaiting(self) -> str | None:
        """What the server waits for from the client now (for messages), or None while the
        client owes nothing (admission queue, engine computing, finished)."""
        phase = self._phase
        if phase is SessionPhase.OPENING:
            return "the Open frame"
        if phase is SessionPhase.PROBING:
            return "a ProbeReply"
        if phase is SessionPhase.PROMPTING:
            return "the prompt's token ids" if self.server_decode else f"the prompt chunk at position {self.num_prompt_rows}"
        if phase is SessionPhase.DECODING and self.expected_start is not None:
            return f"the activation for position {self.expected_start} (token {self.num_output_tokens - 1} was sent)"
        return None

    @property
    def progress(self) -> Hashable:
        """A value that changes whenever the session moves forward (refused frames do not move it)."""
        return self._phase, self.num_prompt_rows, self.expected_start, self.num_output_tokens

    async def send_error(self, error: SessionError) -> None:
        """The one place an ``Error`` leaves for the client; a fatal one ends the session."""
        if error.fatal:
            self.finish()
        await self.send(error.to_frame())

    # ---------------------------------------------------------------- open
    async def handle_open(self, msg: wire.Message,
                          receive: Callable[[], Awaitable[wire.Message | None]] | None = None) -> None:
        """OPENING -> [PROBING] -> [ADMITTING] -> PROMPTING: check the Open, probe the network
        (a client that asks to be planned, or sends its profile, answers probes; not where the
        placement cannot depend on it, :meth:`_admit_unprobed`), admit, answer Opened."""
        if not isinstance(msg, wire.Open):
            raise SessionError(ErrorCode.OUT_OF_TURN, f"expected Open as the first frame, got {type(msg).__name__}", fatal=True)
        if msg.protocol_version != wire.PROTOCOL_VERSION:
            raise SessionError(ErrorCode.PROTOCOL_VERSION, f"client speaks protocol {msg.protocol_version}, server speaks {wire.PROTOCOL_VERSION}", fatal=True)
        if msg.model_fingerprint != self.model.fingerprint:
            raise SessionError(ErrorCode.FINGERPRINT_MISMATCH, f"client model fingerprint {msg.model_fingerprint} does not match the server's {self.model.fingerprint}: both sides must hold the same weights", fatal=True)
        if msg.split_layer is not None:
            self._check_split_layer(msg.split_layer, client_floor=msg.privacy_floor)
        if msg.u_shape and self.model.u_shape_unsupported:
            raise SessionError(ErrorCode.BAD_REQUEST, f"U-shaped sessions are not served here: "
                                                      f"{self.model.u_shape_unsupported}", fatal=True)
        if msg.u_shape:
            problem = (stop_ids_problem(msg) if msg.return_layer is None else
                       check_fixed_u(msg, num_layers=self.model.num_layers, min_layer=self.config.min_layer))
            if problem is not None:
                raise SessionError(ErrorCode.SPLIT_LAYER, problem, fatal=True)
        cap = self.config.max_tokens_per_session
        if msg.sampling.max_tokens > cap:
            raise SessionError(ErrorCode.MAX_TOKENS, f"max_tokens {msg.sampling.max_tokens} exceeds this server's limit of {cap} tokens per session", fatal=True)
        self.open = msg
        self._check_sampling()
        self.wire_dtype = self._choose_wire_dtype(msg)
        floor = effective_floor(min_layer=self.config.min_layer, server_floor=self.config.privacy_floor,
                                client_floor=msg.privacy_floor)
        admission = network = None
        if receive is not None and (msg.split_layer is None or msg.client is not None):
            admission = await self._admit_unprobed(msg, floor)
            if admission is None:
                self._enter(SessionPhase.PROBING)
                try:
                    network = await measure_network(self.send, receive)
                except ProbeFailed as exc:
                    raise SessionError(ErrorCode.PROBE, f"network probe failed: {exc}", fatal=True) from None
        if admission is None:
            admission = await self._admit(msg, network)
        self.split_layer = msg.split_layer if admission is None else admission.split_layer
        self.return_layer = msg.return_layer if admission is None else admission.return_layer
        sla = admission.sla if admission is not None else None
        self.tpot_bound_s = sla.tpot_s if sla is not None else msg.sla.tpot_s if msg.sla is not None else None
        self.server_decode = floor == 0 and self.return_layer is None and (  # the token ids go to the server only without a floor
            admission.server_decode if admission is not None else
            msg.server_decode and msg.split_layer == 0 and bool(self.config.server_decode))
        self.max_drafts = self._grant_drafts(msg)
        self._enter(SessionPhase.PROMPTING)
        await self.send(wire.Opened(
            session_id=self.session_id, split_layer=self.split_layer, num_layers=self.model.num_layers,
            hidden_size=self.model.hidden_size, dtype=str(self.model.dtype).removeprefix("torch."),
            max_frame_bytes=self.config.max_frame_bytes,
            placement=admission.placement if admission else "fixed",
            predicted_ttft_s=admission.predicted_ttft_s if admission else None,
            predicted_tpot_s=admission.predicted_tpot_s if admission else None,
            server_decode=self.server_decode, wire_dtype=self.wire_dtype, return_layer=self.return_layer,
            max_drafts=self.max_drafts,
        ))
        self._opened_at = time.perf_counter()

    def _grant_drafts(self, msg: wire.Open) -> int:
        """Drafts per decode activation: what the client asked for, at most the server's K;
        none where the engine does not sample the session's tokens from its rows (U-shaped:
        the client samples) or gets no rows (server decoded)."""
        if self.return_layer is not None or self.server_decode:
            return 0
        return granted_drafts(msg, self.config.drafts)  # what the admission policy planned with

    def _check_split_layer(self, split_layer: int, *, client_floor: int) -> None:
        """A fixed split layer is one this server holds and at or above both privacy floors
        (checked before the probe and admission: no activation shallower than a floor)."""
        low, n = self.config.min_layer, self.model.num_layers
        if not low <= split_layer <= n:
            why = f" (this server holds no layers below {low})" if low else ""
            raise SessionError(ErrorCode.SPLIT_LAYER, f"split_layer {split_layer} out of range: expected {low} <= split_layer <= {n}{why}", fatal=True)
        below = floor_violation(split_layer, server_floor=self.config.privacy_floor, client_floor=client_floor)
        if below is not None:
            raise SessionError(ErrorCode.SPLIT_LAYER, below, fatal=True)

    async def _admit_unprobed(self, msg: wire.Open, floor: int) -> Admission | None:
        """An ``auto`` session the server would decode itself whatever its network, admitted
        before the probe (:meth:`AdmissionController.admit_unprobed`; saves the probe's round
        trips on its TTFT); None: probe and admit as usual. ``floor``: the session's effective
        privacy floor (server decoding needs none). Still OPENING: no queue here."""
        if (self.controller is None or msg.split_layer is not None or msg.u_shape or floor > 0
                or not (msg.server_decode and self.config.server_decode)):
            return None
        try:
            request = self._admission_request(msg, UNPROBED)
        except AdmissionInputError:
            return None  # admit() gives the reason, after the probe
        admission = await self.controller.admit_unprobed(self.session_id, request)
        if admission is not None:
            self._took_slot()
        return admission

    def _admission_request(self, msg: wire.Open, network: NetworkSpec | None):
        """The admission policy's description of ``msg`` on ``network`` (as measured, or assumed)."""
        return request_from_open(msg, network, server_decode_allowed=bool(self.config.server_decode),
                                 wire_dtype=self.wire_dtype, hidden_size=self.model.hidden_size,
                                 server_drafts=self.config.drafts)

    def _took_slot(self) -> None:
        """The controller admitted this session: it holds a slot (released at the end) on its engine."""
        self._holds_slot = True
        self.engine_index = self.controller.engine_of(self.session_id)

    async def _admit(self, msg: wire.Open, network: NetworkSpec | None) -> Admission | None:
        """The admission controller's placement (None: no controller, the client's split_layer).
        ADMITTING while queued: waiting there is not the client idling. Refusal: fatal SessionError."""
        if self.controller is None:
            if msg.split_layer is None:
                raise SessionError(ErrorCode.SPLIT_LAYER, "this server has no admission controller: give split_layer", fatal=True)
            return None
        self._enter(SessionPhase.ADMITTING)
        try:
            admission = await self.controller.admit(self.session_id, self._admission_request(msg, network))
        except AdmissionRefused as exc:
            raise SessionError(exc.reason, str(exc), fatal=True, retry_after_s=exc.retry_after_s) from None
        self._took_slot()
        return admission

    def _choose_wire_dtype(self, msg: wire.Open) -> str | None:
        """The first of the client's offered wire dtypes this server accepts (``wire_dtypes``
        option); None when it offered none. An offer with none accepted is refused."""
        if not msg.wire_dtypes:
            return None
        accepted = self.config.accepted_wire_dtypes
        chosen = next((name for name in msg.wire_dtypes if name in accepted), None)
        if chosen is None:
            raise SessionError(ErrorCode.WIRE_DTYPE, f"none of the wire dtypes offered {list(msg.wire_dtypes)} is "
                                                     f"accepted: this server takes {list(accepted)}", fatal=True)
        return chosen

    def _check_sampling(self) -> None:
        """vLLM's own checks of the sampling values (ranges, vocabulary) at Open, not after the prompt."""
        try:
            params = self.sampling_params()
            vllm_config = getattr(self.engine, "vllm_config", None)
            if vllm_config is not None:
                params.verify(vllm_config.model_config, vllm_config.speculative_config,
                              vllm_config.structured_outputs_config, None)
        except (ValueError, VLLMClientError) as exc:
            raise SessionError(ErrorCode.SAMPLING, f"sampling options refused: {exc}", fatal=True) from exc

    # ---------------------------------------------------------------- activations
    def _rows(self, msg: wire.Activation) -> torch.Tensor:
        if msg.shape[1] != self.model.hidden_size:
            raise SessionError(ErrorCode.HIDDEN_SIZE, f"activation has hidden size {msg.shape[1]}, the model's is {self.model.hidden_size}")
        self._check_wire_dtype(msg)
        try:
            rows = msg.to_tensor()  # an 8-bit frame: float32 (its contents checked), cast below
        except wire.ProtocolError as exc:
            raise SessionError(ErrorCode.PROTOCOL, f"activation at position {msg.start}: {exc}") from None
        if not bool(torch.isfinite(rows).all()):
            bad = int((~torch.isfinite(rows)).sum())
            raise SessionError(ErrorCode.NON_FINITE, f"activation at position {msg.start} has {bad} NaN or Inf value(s)")
        return rows.to(self.model.dtype)

    def _check_wire_dtype(self, msg: wire.Activation) -> None:
        if self.wire_dtype is not None and msg.dtype != self.wire_dtype:
            raise SessionError(ErrorCode.WIRE_DTYPE, f"activation at position {msg.start} is in {msg.dtype}, but this "
                                                     f"session negotiated {self.wire_dtype} (Opened.wire_dtype)")
        if self.wire_dtype is None and msg.dtype not in wire.TENSOR_DTYPES:
            raise SessionError(ErrorCode.WIRE_DTYPE, f"activation at position {msg.start} is in {msg.dtype}, but this "
                                                     f"session negotiated no wire dtype: it takes "
                                                     f"{list(wire.TENSOR_DTYPES)} (offer {msg.dtype} in Open.wire_dtypes)")

    def accept_prompt_chunk(self, msg: wire.Message) -> bool:
        """PROMPTING: take one prompt chunk (a server-decoded session: its PromptTokens); True
        (and PREFILLING) when the prompt is complete."""
        if self.server_decode:
            return self._accept_prompt_ids(msg)
        if not isinstance(msg, wire.Activation):
            raise SessionError(ErrorCode.OUT_OF_TURN, f"expected a prompt Activation, got {type(msg).__name__}")
        if msg.start != self.num_prompt_rows:
            raise SessionError(ErrorCode.OUT_OF_TURN, f"prompt chunk starts at position {msg.start}, expected {self.num_prompt_rows}")
        if msg.draft_ids:
            raise SessionError(ErrorCode.BAD_REQUEST, f"prompt chunk at position {msg.start} carries draft_ids: drafts "
                                                      f"ride on decode activations only")
        total = self.num_prompt_rows + msg.rows
        self._check_prompt_length(total)
        self.prompt_rows.append(self._rows(msg))
        self.num_prompt_rows = total
        if msg.end_of_prompt:
            self._enter(SessionPhase.PREFILLING)
        return msg.end_of_prompt

    def _check_prompt_length(self, total: int) -> None:
        limit = min(self.config.max_prompt_tokens, self.model.max_model_len - 1)
        if total > limit:
            raise SessionError(ErrorCode.PROMPT_TOO_LONG, f"prompt of {total} tokens exceeds the limit of {limit} tokens", fatal=True)

    def _accept_prompt_ids(self, msg: wire.Message) -> bool:
        """PROMPTING, server decoded: the whole prompt's token ids in one frame."""
        if not isinstance(msg, wire.PromptTokens):
            raise SessionError(ErrorCode.OUT_OF_TURN, f"this session is decoded on the server (Opened.server_decode): "
                                                      f"expected the prompt as PromptTokens, got {type(msg).__name__}")
        self._check_prompt_length(msg.num_tokens)
        try:
            ids = msg.token_ids()
        except wire.ProtocolError as exc:
            raise SessionError(ErrorCode.PROTOCOL, str(exc)) from None
        vocab = self.model.vocab_size
        if vocab is not None and max(ids) >= vocab:
            raise SessionError(ErrorCode.PROTOCOL, f"token id {max(ids)} is out of the model's vocabulary "
                                                   f"(expected ids < {vocab})")
        self.prompt_ids = ids
        self.num_prompt_rows = len(ids)
        self._enter(SessionPhase.PREFILLING)
        return True

    async def accept_decode(self, msg: wire.Message) -> None:
        """PREFILLING or DECODING: the client's activation for the token it was sent last."""
        if not isinstance(msg, wire.Activation):
            raise SessionError(ErrorCode.OUT_OF_TURN, f"expected an Activation, got {type(msg).__name__}")
        if msg.draft_ids:
            self._check_drafts(msg)
        if self.expected_start is None or msg.start != self.expected_start or msg.rows != 1 + len(msg.draft_ids):
            rows = "1 row" if not self.max_drafts else f"1 to {1 + self.max_drafts} rows (1 + drafts)"
            want = "no activation now (waiting for the next token)" if self.expected_start is None else f"{rows} at position {self.expected_start}"
            raise SessionError(ErrorCode.OUT_OF_TURN, f"activation of {msg.rows} row(s) at position {msg.start}: expected {want}")
        rows = self._rows(msg)
        self.expected_start = None
        self.num_decode_rows += msg.rows
        turnaround = time.perf_counter() - self._token_times[-1] if self._token_times else None
        await self._deliver(msg.start, rows, turnaround, msg.draft_ids)

    def _check_drafts(self, msg: wire.Activation) -> None:
        """A decode activation's drafts: granted at Open, at most that many, in the vocabulary."""
        if not self.max_drafts:
            raise SessionError(ErrorCode.BAD_REQUEST, f"activation at position {msg.start} carries "
                                                      f"{len(msg.draft_ids)} draft(s), but this session was granted "
                                                      f"none (Opened.max_drafts = 0): send 1 row and no draft_ids")
        if len(msg.draft_ids) > self.max_drafts:
            raise SessionError(ErrorCode.BAD_REQUEST, f"activation at position {msg.start} carries "
                                                      f"{len(msg.draft_ids)} drafts, this session was granted at most "
                                                      f"{self.max_drafts} (Opened.max_drafts)")
        vocab = self.model.vocab_size
        if vocab is not None and max(msg.draft_ids) >= vocab:
            raise SessionError(ErrorCode.BAD_REQUEST, f"draft token id {max(msg.draft_ids)} is out of the model's "
                                                      f"vocabulary (expected ids < {vocab})")

    async def _deliver(self, start: int, rows: torch.Tensor, turnaround_s: float | None = None,
                       draft_ids: tuple[int, ...] = ()) -> None:
        _, _, data = wire.encode_tensor(rows)
        self._rows_in_engine = True
        extra = (tuple(draft_ids),) if draft_ids else ()  # the utility's optional last argument
        err = await self.engines.call(self.engine_index, UTILITY_DELIVER, self.session_id, start, rows.shape[0],
                                      data, turnaround_s, *extra)
        if err:
            raise SessionError(ErrorCode.DELIVERY, err, fatal=True)

    # ---------------------------------------------------------------- generation
    def sampling_params(self) -> SamplingParams:
        s = self.open.sampling
        if self.open.u_shape:  # the client samples; the engine computes placeholder tokens
            return u_sampling_params(max_tokens=s.max_tokens, extra_args={EXTRA_ARGS_KEY: {
                "session": self.session_id, "split_layer": self.split_layer, "tpot_s": self.tpot_bound_s,
                "return_layer": self.return_layer}})
        return SamplingParams(
            n=1, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else 0, seed=s.seed, stop_token_ids=list(s.stop_token_ids),
            ignore_eos=s.ignore_eos, detokenize=False, output_kind=RequestOutputKind.DELTA,
            extra_args=None if self.server_decode else {
                EXTRA_ARGS_KEY: {"session": self.session_id, "split_layer": self.split_layer,
                                 "tpot_s": self.tpot_bound_s}},
        )

    async def generate(self) -> None:
        """PREFILLING -> DECODING -> FINISHED: deliver the prompt, run the request, stream tokens.
        A server-decoded session is an ordinary request of its token ids (prefix caching as
        for any ordinary request); a split one's prompt ids are placeholders for its rows."""
        n = self.num_prompt_rows
        if self.server_decode:
            tokens_prompt = TokensPrompt(prompt_token_ids=self.prompt_ids)
        else:
            prompt = torch.cat(self.prompt_rows)
            self.prompt_rows = []
            await self._deliver(0, prompt)
            tokens_prompt = TokensPrompt(prompt_token_ids=[PLACEHOLDER_TOKEN_ID] * n, cache_salt=self.session_id)
        reason = None
        async for out in self.engine.generate(tokens_prompt, self.sampling_params(), request_id=f"split-{self.session_id}",
                                              **self.engines.pin(self.engine_index)):
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            if out.finished and not ids:  # the engine ended it without a token: its reason, else an abort
                reason = completion.finish_reason or "abort"
                break
            if self.max_drafts:
                reason = await self._send_tokens(ids, n=n, finished=out.finished,
                                                 finish_reason=completion.finish_reason)
                if out.finished:
                    break
                continue
            for j, token_id in enumerate(ids):
                last = out.finished and j == len(ids) - 1
                reason = (completion.finish_reason or "stop") if last else None
                index = self.num_output_tokens
                if index == 0:
                    self._enter(SessionPhase.DECODING)
                self.num_output_tokens += 1
                if reason is None and not self.server_decode:
                    self.expected_start = n + index
                if self.return_layer is None:
                    await self.send(wire.Token(index=index, token_id=int(token_id), finish_reason=reason))
                else:
                    await self._send_hidden(out, index=index, end=n + index, finish_reason=reason)
                self._token_times.append(time.perf_counter())
            if out.finished:
                break
        self.finish()
        await self.send(wire.Finished(finish_reason=reason or "abort", num_prompt_tokens=n,
                                      num_output_tokens=self.num_output_tokens))

    async def _send_tokens(self, ids: list[int], *, n: int, finished: bool, finish_reason: str | None) -> str | None:
        """A session granted drafts: one engine output (one verification step: the accepted
        drafts and the engine's next token) as one ``Tokens`` frame; the client's next
        activation starts at the last token's position. Returns the finish reason."""
        reason = (finish_reason or "stop") if finished else None
        if not ids:
            return None
        index = self.num_output_tokens
        if index == 0:
            self._enter(SessionPhase.DECODING)
        self.num_output_tokens += len(ids)
        if reason is None:
            self.expected_start = n + self.num_output_tokens - 1
        await self.send(wire.Tokens(index=index, token_ids=tuple(int(t) for t in ids), finish_reason=reason))
        self.num_answers += 1
        self._token_times.extend([time.perf_counter()] * len(ids))  # TPOT: the mean gap per token
        return reason

    async def _send_hidden(self, out: Any, *, index: int, end: int, finish_reason: str | None) -> None:
        """A U-shaped session's answer for output ``index``: its layer-m rows, never the token."""
        try:
            frames = hidden_frames(out, index=index, end=end, finish_reason=finish_reason, wire_dtype=self.wire_dtype,
                                   max_frame_bytes=self.config.max_frame_bytes)
        except ValueError as exc:
            raise SessionError(ErrorCode.INTERNAL, f"U-shaped session: {exc}", fatal=True) from None
        for frame in frames:
            await self.send(frame)

    def measured_latencies(self) -> tuple[float | None, float | None]:
        """(TTFT, TPOT) as the client sees them: from Opened (the client starts its prefill
        when it arrives) to the first token, and the mean gap between tokens; the one-way
        delays of Opened and of a token cancel."""
        times = self._token_times
        ttft = times[0] - self._opened_at if times and self._opened_at is not None else None
        tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
        return ttft, tpot

    async def release(self) -> None:
        """Give back what the session holds (its admission slot, the engine's copy of its rows); safe twice."""
        if self._holds_slot:
            self._holds_slot = False
            ttft, tpot = self.measured_latencies()
            drafted = dict(answers=self.num_answers, decode_rows=self.num_decode_rows) if self.max_drafts else {}
            await self.controller.release(self.session_id, prompt_tokens=self.num_prompt_rows,
                                          output_tokens=self.num_output_tokens, ttft_s=ttft, tpot_s=tpot, **drafted)
        if self._rows_in_engine:
            self._rows_in_engine = False
            try:
                await self.engines.call(self.engine_index, UTILITY_RELEASE, self.session_id)
            except Exception:  # engine shutting down: nothing left to release
                logger.debug("vllm-split: release of a session failed", exc_info=True)
