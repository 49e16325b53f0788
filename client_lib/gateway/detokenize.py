"""The gateway's text of a generation: incremental detokenisation and stop strings.

Runs in the gateway (client process); pure Python over a tokenizer's ``decode``. The server
sends token ids only, so the gateway makes the text, as vLLM's own detokenizer does:

* :class:`IncrementalDetokenizer`: each new token is decoded together with the token(s)
  before it (a few prompt tokens before the first), and the new text is the difference, so
  tokenizers that drop a leading space at the start of a decode keep it; text whose bytes
  end inside a UTF-8 character is held back until the character is complete.
* :class:`StopStrings`: OpenAI ``stop`` strings matched on that text, including strings
  that span tokens. Text is released only when no stop string can still begin in it (the
  last ``max(len(stop)) - 1`` characters are held back, as vLLM does); on a match the text
  ends before the stop string (or after it, ``include_stop_str_in_output``).
"""
from __future__ import annotations

from typing import Any, Sequence

CONTEXT_TOKENS = 5  # prompt tokens decoded before the first output token (vLLM's initial offset)
REPLACEMENT_CHAR = "\ufffd"  # what a decode shows for bytes that end inside a character


class IncrementalDetokenizer:
    """Text deltas of a growing list of generated token ids."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self._prefix = 0  # ids[prefix:read] is the context already turned into text
        self._read = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens,
                                      clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """The new text that ``token_id`` completes ("" while a character is incomplete)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back at the end of the generation (incomplete characters and all)."""
        return self._advance(final=True) if self._read < len(self._ids) else ""

    def _advance(self, *, final: bool) -> str:
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith(REPLACEMENT_CHAR)):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before):]
        return ""


class StopStrings:
    """Which text may be released, and where a stop string ended the generation."""

    def __init__(self, stops: Sequence[str], *, include_in_output: bool = False) -> None:
        self.stops = tuple(s for s in stops if s)
        self.include_in_output = include_in_output
        longest = max((len(s) for s in self.stops), default=0)
        self._hold = 0 if include_in_output or not self.stops else longest - 1
        self._longest = longest
        self._text = ""  # all text seen (up to the stop string, once matched)
        self._released = 0  # characters of _text already released
        self.matched: str | None = None  # the stop string that ended the generation

    @property
    def text(self) -> str:
        """The released text so far."""
        return self._text[: self._released]

    def feed(self, new_text: str, *, final: bool = False) -> str:
        """Add newly detokenised text; return what can be released now. ``final``: the
        generation ended here, release everything held back."""
        if self.matched is not None:
            return ""
        start = max(0, len(self._text) - self._longest + 1)  # a match may begin in the held-back text
        self._text += new_text
        hit = self._first_match(start)
        if hit is not None:
            index, stop = hit
            self.matched = stop
            self._text = self._text[: index + len(stop) if self.include_in_output else index]
            end = len(self._text)
        else:
            end = len(self._text) if final else max(self._released, len(self._text) - self._hold)
        out = self._text[self._released:end]
        self._released = end
        return out

    def _first_match(self, start: int) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self.stops:
            index = self._text.find(stop, start)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        return best
