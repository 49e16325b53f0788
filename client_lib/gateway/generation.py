"""One OpenAI request run as one split session.

Runs in the gateway. A :class:`SplitGeneration` takes a tokenised prompt and the sampling
options, opens a :class:`~client_lib.session.SplitSession` to the split server with its own
:class:`~client_lib.shared_layers.LayerView` (its own KV cache over the gateway's shared
layers), and turns the tokens the server sends into text deltas: detokenised by the gateway,
cut at the first stop string (the session is then closed, which aborts the request on the
server). When it ends, ``outcome`` says how and ``placement`` where it ran. Failures leave as
:class:`~client_lib.gateway.errors.APIError`: the server's refusals mapped to their HTTP
status, an unreachable server as 502.

Drafts (``Upstream.draft="ngram"``, docs/drafts.md): every session drafts by prompt lookup with
a drafter of its own (the gateway has each prompt's token ids); an answer may then bring several
tokens, still one delta each. No draft model here: its drafter holds one sequence's state, and
the gateway runs sessions concurrently. Request type: ``Upstream.request_type`` for every
session when set; else, when drafting, the endpoint's kind (``"chat"``, ``"completion"``); else
none (an older server refuses the field).
"""
from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator

import aiohttp

from client_lib.gateway.detokenize import IncrementalDetokenizer, StopStrings
from client_lib.gateway.errors import APIError, from_server_error, unreachable
from client_lib.gateway.responses import Outcome, Placement
from client_lib.local_layers import LocalLayersError
from client_lib.session import ServerError, SplitSession, SSLOption, TokenEvent, check_num_drafts
from client_lib.shared_layers import SharedLayers
from vllm_split.wire import protocol as wire
from vllm_split.wire.drafts import check_request_type

GATEWAY_DRAFTS = ("none", "ngram")  # the drafters a gateway session can use (no draft model: see above)


def check_gateway_draft(draft: str) -> str:
    """``draft`` if a gateway session can draft with it, else ValueError (why no draft model)."""
    if draft not in GATEWAY_DRAFTS:
        raise ValueError(f"draft: the gateway drafts with 'ngram' or 'none', got {draft!r} (a draft model keeps "
                         f"one sequence's state; the gateway runs concurrent sessions)")
    return draft


@dataclass(frozen=True, slots=True)
class Upstream:
    """The split server and what every session to it shares."""

    url: str
    layers: SharedLayers
    profile: wire.ClientProfile | None  # this device's measured speed, sent when the server chooses k
    sla: wire.RequestSLA | None
    api_key: str | None = None  # the split server's --api-key
    ssl: SSLOption = None  # an https:// server: how its certificate is verified (SplitSession.create's ssl)
    privacy_floor: int = 0  # no split layer below it, no server decoding (SplitSession.create's privacy_floor)
    draft: str = "none"  # "ngram": every session drafts by prompt lookup (SplitSession.create's draft)
    num_drafts: int = 4  # drafts per activation asked at Open (SplitSession.create's num_drafts)
    request_type: str | None = None  # every session's; None: the endpoint's kind when drafting, else none

    def __post_init__(self) -> None:
        check_gateway_draft(self.draft)
        check_num_drafts(self.num_drafts)
        if self.request_type is not None:
            check_request_type(self.request_type)

    def request_type_for(self, kind: str) -> str:
        """The request type of a session for an endpoint of ``kind`` ("chat", "completion")."""
        if self.request_type is not None:
            return self.request_type
        return kind if self.draft != "none" else ""


@dataclass(frozen=True, slots=True)
class Delta:
    """New text (possibly empty: held back, or a special token) and the token(s) behind it."""

    text: str
    token_ids: tuple[int, ...]


class SplitGeneration:
    def __init__(self, upstream: Upstream, tokenizer: Any, *, prompt_ids: list[int], sampling: wire.SamplingOptions,
                 stop: tuple[str, ...] = (), include_stop_str_in_output: bool = False,
                 skip_special_tokens: bool = True, request_type: str = "") -> None:
        self.upstream = upstream
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.request_type = request_type  # sent at Open (SplitSession.create's request_type)
        self.token_ids: list[int] = []
        self.outcome: Outcome | None = None
        self.placement: Placement | None = None
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
        self._stops = StopStrings(stop, include_in_output=include_stop_str_in_output)

    @property
    def text(self) -> str:
        """The text released so far (all of it, once the generation ended)."""
        return self._stops.text

    async def deltas(self) -> AsyncIterator[Delta]:
        """One delta per token the server sends, until the generation ends."""
        up = self.upstream
        view = up.layers.view()
        try:
            async with await SplitSession.create(up.url, view, sampling=self.sampling, api_key=up.api_key, sla=up.sla,
                                                 profile=up.profile if view.auto else None, ssl=up.ssl,
                                                 expected_output_tokens=self.sampling.max_tokens,
                                                 privacy_floor=up.privacy_floor, draft=up.draft,
                                                 num_drafts=up.num_drafts, request_type=self.request_type) as session:
                async with aclosing(session.generate(self.prompt_ids)) as events:
                    async for event in events:
                        delta = self._take(event, session)
                        yield delta
                        if self._stops.matched is not None:
                            break  # closing the session aborts the request on the server
                if self.placement is not None:
                    stats = session.stats
                    self.placement = replace(self.placement, measured_ttft_s=stats.time_to_first_token,
                                             measured_tpot_s=stats.time_per_output_token)
        except ServerError as exc:
            raise from_server_error(exc.code, str(exc).removeprefix(f"{exc.code}: "), exc.retry_after_s) from exc
        except LocalLayersError as exc:
            raise APIError(502, f"the split server chose a split layer this gateway cannot run: {exc}") from exc
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise unreachable(up.url, exc) from exc

    def _take(self, event: TokenEvent, session: SplitSession) -> Delta:
        if self.placement is None:
            opened = session.opened
            self.placement = Placement(split_layer=opened.split_layer, num_layers=opened.num_layers,
                                       placement=opened.placement, predicted_ttft_s=opened.predicted_ttft_s,
                                       predicted_tpot_s=opened.predicted_tpot_s)
        self.token_ids.append(event.token_id)
        reason = event.finish_reason
        if reason in ("abort", "error"):
            raise APIError(502, f"the split server ended the request early (finish_reason {reason!r}) after "
                                f"{len(self.token_ids)} token(s)")
        text = self._detokenizer.add(event.token_id)
        if reason is not None:
            text += self._detokenizer.flush()
        text = self._stops.feed(text, final=reason is not None)
        if self._stops.matched is not None:
            self._end("stop", self._stops.matched)
        elif reason is not None:
            stop_token = reason == "stop" and event.token_id in self.sampling.stop_token_ids
            self._end(reason, event.token_id if stop_token else None)
        return Delta(text=text, token_ids=(event.token_id,))

    def _end(self, finish_reason: str, stop_reason: int | str | None) -> None:
        self.outcome = Outcome(finish_reason=finish_reason, stop_reason=stop_reason,
                               num_prompt_tokens=len(self.prompt_ids), num_output_tokens=len(self.token_ids))
