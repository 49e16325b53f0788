"""Client-drafted speculative decoding on the wire: the ``Tokens`` frame and the draft checks.

A session granted drafts (``Opened.max_drafts > 0``; the client asked with ``Open.max_drafts``)
sends, after each answer, the layer-``k`` rows of its last token *and* of up to
``max_drafts`` draft tokens in one ``Activation`` (``draft_ids``: the drafts' ids, one row
each after the first); the server verifies them in one engine step (vLLM's rejection
sampler) and answers with one ``Tokens`` frame: the accepted drafts and the next token.
Sessions without drafts keep ``Token`` frames. ``Open.request_type`` labels the kind of
request (the server plans a drafted session with the tokens per round trip it measured for
that type). Imports without vLLM or torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vllm_split.wire.errors import ProtocolError, _check_int, _check_reason, _list

MAX_DRAFTS = 16  # draft tokens per activation, at most (the server grants at most its own K)
MAX_REQUEST_TYPE_CHARS = 32  # Open.request_type


def check_draft_ids(draft_ids, *, rows: int) -> tuple[int, ...]:
    """``Activation.draft_ids``: token ids (int32 range), at most ``MAX_DRAFTS``, one row each
    after the first (the row of the last accepted token)."""
    ids = tuple(_list("draft_ids", draft_ids))
    if len(ids) > MAX_DRAFTS:
        raise ProtocolError(f"draft_ids: expected at most {MAX_DRAFTS} drafts, got {len(ids)}")
    for tid in ids:
        _check_int("draft_ids[]", tid, low=0)
        if tid >= 1 << 31:
            raise ProtocolError(f"draft_ids[]: expected < 2**31, got {tid}")
    if ids and rows != 1 + len(ids):
        raise ProtocolError(f"draft_ids: {len(ids)} drafts need {1 + len(ids)} rows (the last token's and one per "
                            f"draft), got {rows}")
    return ids


def check_max_drafts(value: int) -> None:
    _check_int("max_drafts", value, low=0)
    if value > MAX_DRAFTS:
        raise ProtocolError(f"max_drafts: expected at most {MAX_DRAFTS}, got {value}")


def check_request_type(value) -> None:
    """``Open.request_type``: the client's label for the kind of request ("code", "chat"; ""
    none), by which the server measures acceptance of drafts: 0 to 32 printable characters."""
    if not isinstance(value, str) or len(value) > MAX_REQUEST_TYPE_CHARS or not value.isprintable():
        raise ProtocolError(f"request_type: expected 0 to {MAX_REQUEST_TYPE_CHARS} printable characters, "
                            f"got {value!r:.60}")


@dataclass(frozen=True, slots=True)
class Tokens:
    """Server -> client, sessions granted drafts: the tokens of one verification step, output
    indices ``[index, index + len(token_ids))``: the client's drafts the server accepted (a
    prefix of them, in order), then the server's own next token (the correction of the first
    rejected draft, or the bonus token after all were accepted); cut at a stop, where
    ``finish_reason`` is set. The client's KV beyond the last accepted draft is stale."""

    KIND: ClassVar[int] = 12
    index: int
    token_ids: tuple[int, ...]
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        _check_int("index", self.index, low=0)
        ids = tuple(_list("token_ids", self.token_ids))
        if not 1 <= len(ids) <= MAX_DRAFTS + 1:
            raise ProtocolError(f"token_ids: expected 1 to {MAX_DRAFTS + 1} tokens, got {len(ids)}")
        for tid in ids:
            _check_int("token_ids[]", tid, low=0)
        object.__setattr__(self, "token_ids", ids)
        if self.finish_reason is not None:
            _check_reason(self.finish_reason)

    @property
    def end(self) -> int:
        """The output index after the last token."""
        return self.index + len(self.token_ids)


def accepted_drafts(drafts: list[int] | tuple[int, ...], token_ids: tuple[int, ...]) -> int:
    """How many of ``drafts`` an answer's ``token_ids`` accepted: the common prefix, at most
    ``len(token_ids) - 1`` (the last token is the server's own, unless a stop cut the answer)."""
    n = 0
    for d, t in zip(drafts, token_ids[:-1]):
        if d != t:
            break
        n += 1
    return n
