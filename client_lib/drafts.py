"""Client drafters for speculative decoding (issue 14): guesses of the next tokens that the
server verifies in one engine step (``SplitSession(draft=...)``, ``--draft ngram``).

A session granted drafts (``Opened.max_drafts > 0``) asks its drafter, after each answer, for up
to ``limit`` tokens that may follow ``context`` (the prompt's ids and every output token so far),
runs its layers on the last token and the drafts in one forward and sends the rows together; the
server answers with the drafts it accepted and one token of its own. Wrong drafts cost rows on
both sides but never change the output (the server's rejection sampler decides).

:class:`PromptLookup` is prompt lookup (n-gram matching over the context): free, and strong where
the output copies its input (code edits, summaries, retrieval answers). Pure Python, no vLLM, no
numpy: vLLM's own matcher (``v1/spec_decode/ngram_proposer.py``) needs numba and a ``VllmConfig``.
A small draft model would be another :class:`Drafter`.
"""
from __future__ import annotations

from collections.abc import Sequence


class Drafter:
    """What a session asks of a drafter. ``propose`` gets the whole context each time (a stateful
    drafter syncs itself with the tokens it has not seen yet); ``accept`` tells it the tokens
    each answer brought (the accepted drafts and the server's own token), for a drafter that
    keeps state the answer invalidates (a draft model's KV cache); ``reset`` starts a new
    sequence. A drafter with state serves one session at a time."""

    def propose(self, context: Sequence[int], limit: int) -> list[int]:
        """At most ``limit`` token ids that may follow ``context`` ([] : no guess)."""
        raise NotImplementedError

    def accept(self, token_ids: Sequence[int]) -> None:
        """The tokens of one answer, appended to the context (default: nothing to do)."""

    def reset(self) -> None:
        """A new sequence starts (default: nothing to do)."""


class PromptLookup(Drafter):
    """Prompt lookup: find the most recent earlier occurrence of the context's last ``n`` tokens
    (the longest ``n`` in ``[min_n, max_n]`` that has one; the suffix itself does not count) and
    propose the ``k`` tokens that followed it.

    Where the copy reaches the end of the context it goes on from its own drafts (an overlapping
    copy, as in LZ77): a sequence repeating with period ``q`` then gets ``k`` drafts, not ``q``.

    Cost: one dict per ``n``, mapping an n-gram to the start of its latest occurrence; each new
    context token adds ``max_n - min_n + 1`` entries, and a proposal is at most that many
    lookups plus the copy. vLLM's proposer takes the *earliest* occurrence; the latest is
    usually the better guess for edits and summaries, which follow the text they copy.
    """

    def __init__(self, min_n: int = 2, max_n: int = 4, k: int = 4) -> None:
        for name, value in (("min_n", min_n), ("max_n", max_n), ("k", k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if max_n < min_n:
            raise ValueError(f"max_n {max_n} is below min_n {min_n}")
        self.min_n, self.max_n, self.k = min_n, max_n, k
        self.reset()

    def reset(self) -> None:
        self._tokens: list[int] = []
        # n -> {n-gram: start of its latest occurrence that ends before the last token}
        self._index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(self.min_n, self.max_n + 1)}

    def _sync(self, context: Sequence[int]) -> None:
        """Index the context's tokens not seen yet; start over on a context that is not an
        extension of the one indexed (a new sequence; checked on the last indexed token)."""
        have = len(self._tokens)
        if len(context) < have or (have and context[have - 1] != self._tokens[-1]):
            self.reset()
            have = 0
        tokens = self._tokens
        for tid in context[have:]:
            # the n-grams ending at the current last token become findable (they end before the
            # new last token, so they are never the suffix a proposal looks up)
            end = len(tokens)
            for n, index in self._index.items():
                if end >= n:
                    index[tuple(tokens[end - n:end])] = end - n
            tokens.append(int(tid))

    def propose(self, context: Sequence[int], limit: int | None = None) -> list[int]:
        self._sync(context)
        want = self.k if limit is None else min(self.k, limit)
        tokens = self._tokens
        end = len(tokens)
        if want <= 0:
            return []
        for n in range(min(self.max_n, end - 1), self.min_n - 1, -1):
            start = self._index[n].get(tuple(tokens[end - n:]))
            if start is None:
                continue
            offset = end - n - start  # how far back the match is; the copy repeats with this period
            drafts: list[int] = []
            for j in range(want):
                src = end + j - offset
                drafts.append(tokens[src] if src < end else drafts[src - end])
            return drafts
        return []


def prompt_lookup_reference(context: Sequence[int], *, min_n: int, max_n: int, k: int) -> list[int]:
    """:class:`PromptLookup`'s answer by brute force (tests): for ``n`` from ``max_n`` down to
    ``min_n``, the latest ``i < len - n`` with ``context[i:i+n]`` equal to the last ``n`` tokens,
    then ``k`` tokens copied from ``i + n`` on, running into the copy itself past the end."""
    tokens = list(context)
    end = len(tokens)
    for n in range(max_n, min_n - 1, -1):
        if end < n + 1:
            continue
        suffix = tokens[end - n:]
        for i in range(end - n - 1, -1, -1):
            if tokens[i:i + n] == suffix:
                out = tokens[:]
                for j in range(k):
                    out.append(out[i + n + j])
                return out[end:]
    return []


def make_drafter(draft: "str | Drafter | None", num_drafts: int) -> Drafter | None:
    """``SplitSession``'s ``draft`` option: ``"none"`` (or None) -> no drafter, ``"ngram"`` ->
    :class:`PromptLookup` proposing ``num_drafts``, a :class:`Drafter` as is."""
    if draft is None or draft == "none":
        return None
    if draft == "ngram":
        return PromptLookup(k=num_drafts)
    if isinstance(draft, Drafter):
        return draft
    raise ValueError(f"draft: expected 'ngram', 'none' or a Drafter, got {draft!r}")
