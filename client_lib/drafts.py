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

:class:`DraftModel` runs a small Hugging Face causal LM that the client holds (same vocabulary as
the served model) and proposes its greedy continuation: it costs the draft model's forward passes
on the client every round trip, and can help where the output does not copy its input. It keeps
its own KV cache and crops it back to the context's common prefix, so rejected drafts' KV goes.
torch and transformers are imported only when a draft model is built.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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


NGRAM = {"min_n": 1, "max_n": 4, "per_token": 2}  # make_drafter("ngram")'s PromptLookup (see its docstring)


class PromptLookup(Drafter):
    """Prompt lookup: find the most recent earlier occurrence of the context's last ``n`` tokens
    (the longest ``n`` in ``[min_n, max_n]`` that has one; the suffix itself does not count) and
    propose the ``k`` tokens that followed it.

    Where the copy reaches the end of the context it goes on from its own drafts (an overlapping
    copy, as in LZ77): a sequence repeating with period ``q`` then gets ``k`` drafts, not ``q``.

    ``per_token`` (None: no cap) caps the drafts at ``per_token`` per matched token: a match of
    ``n`` tokens proposes at most ``per_token * n``. Short matches are weak evidence; this lets a
    drafter look for one-token matches (``min_n=1``) and draft long copies (``k=8``) without
    paying for long drafts on every weak match. :data:`NGRAM` (``make_drafter("ngram")``) uses
    ``min_n=1, max_n=4, per_token=2``, chosen offline on the model's greedy outputs
    (``benchmarks/draft_lookup.py``, ``results/draft_lookup.json``): against ``min_n=2``
    without a cap, more tokens per round trip on held-out prompts of every request type at
    γ = 4 (summaries 1.88 -> 1.96, code edits 3.12 -> 3.25, code 1.31 -> 1.37, chat 1.11 ->
    1.17), for 0.2-0.6 more rows per round trip; at γ = 8 more on every type but code edits
    (4.12 -> 3.98), for about as many rows.

    Cost: one dict per ``n``, mapping an n-gram to the start of its latest occurrence; each new
    context token adds ``max_n - min_n + 1`` entries, and a proposal is at most that many
    lookups plus the copy. vLLM's proposer takes the *earliest* occurrence; the latest is
    usually the better guess for edits and summaries, which follow the text they copy.
    """

    def __init__(self, min_n: int = 2, max_n: int = 4, k: int = 4, per_token: int | None = None) -> None:
        for name, value in (("min_n", min_n), ("max_n", max_n), ("k", k), ("per_token", per_token)):
            if name == "per_token" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if max_n < min_n:
            raise ValueError(f"max_n {max_n} is below min_n {min_n}")
        self.min_n, self.max_n, self.k, self.per_token = min_n, max_n, k, per_token
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
            for j in range(want if self.per_token is None else min(want, self.per_token * n)):
                src = end + j - offset
                drafts.append(tokens[src] if src < end else drafts[src - end])
            return drafts
        return []


def prompt_lookup_reference(context: Sequence[int], *, min_n: int, max_n: int, k: int,
                            per_token: int | None = None) -> list[int]:
    """:class:`PromptLookup`'s answer by brute force (tests): for ``n`` from ``max_n`` down to
    ``min_n``, the latest ``i < len - n`` with ``context[i:i+n]`` equal to the last ``n`` tokens,
    then ``k`` (at most ``per_token * n``) tokens copied from ``i + n`` on, running into the
    copy itself past the end."""
    tokens = list(context)
    end = len(tokens)
    for n in range(max_n, min_n - 1, -1):
        if end < n + 1:
            continue
        suffix = tokens[end - n:]
        for i in range(end - n - 1, -1, -1):
            if tokens[i:i + n] == suffix:
                out = tokens[:]
                for j in range(k if per_token is None else min(k, per_token * n)):
                    out.append(out[i + n + j])
                return out[end:]
    return []


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k!r}")
    return k


class DraftModel(Drafter):
    """Greedy drafts from a small causal LM held by the client (``model``: a transformers
    ``*ForCausalLM``, e.g. from :meth:`load`), ``k`` per proposal at most.

    The drafter keeps a KV cache of exactly the tokens it fed the model (``_tokens``). ``propose`` crops
    it to the longest common prefix of those tokens and the context (a rejected draft's KV is
    dropped; a context that shares nothing starts over), feeds the unseen context tokens in one
    forward, then takes the argmax and feeds each draft but the last, one token per forward:
    ``d`` forwards for ``d`` drafts. ``accept`` is not needed (``propose`` syncs from the
    context). No position past the model's ``max_position_embeddings`` is fed (fewer drafts).
    """

    def __init__(self, model: Any, k: int = 4) -> None:
        import inspect

        self.k = _check_k(k)
        self.model = model.eval()
        config = model.config
        self.vocab_size: int = int(config.vocab_size)
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None)
        # logits of the last row only, where the model takes the argument (a long context's full logits are large)
        self._last_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.reset()

    @classmethod
    def load(cls, path: str | os.PathLike, *, k: int = 4, dtype: Any = "float32") -> "DraftModel":
        """The causal LM in the local directory ``path`` (config.json and weights; never
        downloads), in ``dtype`` (a torch dtype or its name; float32 by default) on the CPU."""
        import torch
        from transformers import AutoModelForCausalLM

        _check_k(k)
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"draft model {str(path)!r}: not a directory (expected a local Hugging Face model directory)")
        if not (path / "config.json").is_file():
            raise ValueError(f"draft model {str(path)!r}: no config.json (expected a Hugging Face model directory)")
        torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"dtype: expected a torch dtype or its name ('float32', 'bfloat16'), got {dtype!r}")
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"draft model {str(path)!r}: cannot load a causal LM from it: {exc}") from exc
        return cls(model, k=k)

    def reset(self) -> None:
        self._cache: Any = None  # transformers cache of exactly self._tokens; None: empty
        self._tokens: list[int] = []

    def _crop(self, keep: int) -> None:
        from client_lib.local_layers import truncate_cache

        if keep == 0:
            self.reset()
        else:
            truncate_cache(self._cache, len(self._tokens), keep)
            del self._tokens[keep:]

    def _feed(self, token_ids: list[int]):
        """Run the model on ``token_ids`` after the cached tokens; the last row's logits."""
        import torch

        kwargs = {"logits_to_keep": 1} if self._last_logits else {}
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([token_ids], device=self.model.device),
                             past_key_values=self._cache, use_cache=True, **kwargs)
        self._cache = out.past_key_values
        self._tokens.extend(token_ids)
        return out.logits[0, -1]

    def propose(self, context: Sequence[int], limit: int | None = None) -> list[int]:
        want = self.k if limit is None else min(self.k, limit)
        if self.max_positions is not None:
            want = min(want, self.max_positions + 1 - len(context))  # the last draft is never fed
        if want <= 0 or not context:
            return []
        context = [int(t) for t in context]
        keep = 0
        for held, tid in zip(self._tokens, context):
            if held != tid:
                break
            keep += 1
        keep = min(keep, len(context) - 1)  # feed at least the last token: its logits give the first draft
        self._crop(keep)
        logits = self._feed(context[keep:])
        drafts = [int(logits.argmax())]
        while len(drafts) < want:
            drafts.append(int(self._feed(drafts[-1:]).argmax()))
        return drafts


def check_vocab(draft_vocab_size: int, target_vocab_size: int) -> None:
    """Drafts are token ids of the served model: a draft model must share its vocabulary."""
    if draft_vocab_size != target_vocab_size:
        raise ValueError(f"draft model vocabulary {draft_vocab_size} differs from the served model's "
                         f"{target_vocab_size}: drafts must be token ids of the served model (use a draft "
                         f"model with the same tokenizer)")


def make_drafter(draft: "str | os.PathLike | Drafter | None", num_drafts: int, *,
                 vocab_size: int | None = None) -> Drafter | None:
    """``SplitSession``'s ``draft`` option: ``"none"`` (or None) -> no drafter, ``"ngram"`` ->
    :class:`PromptLookup` proposing ``num_drafts``, a local model directory ->
    :class:`DraftModel` proposing ``num_drafts``, a :class:`Drafter` as is. ``vocab_size``
    (the served model's, when known) is checked against a draft model's."""
    if draft is None or draft == "none":
        return None
    if draft == "ngram":
        return PromptLookup(k=num_drafts, **NGRAM)
    if isinstance(draft, (str, os.PathLike)) and Path(draft).is_dir():
        draft = DraftModel.load(draft, k=num_drafts)
    if isinstance(draft, DraftModel) and vocab_size is not None:
        check_vocab(draft.vocab_size, vocab_size)
    if isinstance(draft, Drafter):
        return draft
    raise ValueError(f"draft: expected 'ngram', 'none', a local model directory or a Drafter, got {draft!r}")
