"""Client activations held by the scheduler, per session (EngineCore process).

Every row a client sent for a live request is kept until the request ends: a preempted
request is recomputed from scratch, so its prompt and decode activations must still be
here. Rows are appended in position order; the scheduler asks how many have arrived and
slices the ones a step needs. Rows of client drafts that the engine rejected are cut off
(:meth:`ActivationStore.truncate`) before the client sends the next ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class DeliveryError(ValueError):
    """A delivery that does not continue its session's activations (message says why)."""


@dataclass(slots=True)
class SplitInput:
    """What the model runner needs for one split request in one step."""

    split_layer: int  # the layer the rows enter at
    hidden: torch.Tensor  # [num_scheduled_tokens, hidden_size], model dtype
    start: int = 0  # position of the first row
    return_layer: int | None = None  # U-shaped: the rows leave at this layer and go back; None: not U


class ActivationStore:
    """Activations per session id, in position order."""

    def __init__(self, *, hidden_size: int, dtype: torch.dtype, initial_rows: int = 64) -> None:
        self.hidden_size = hidden_size
        self.dtype = dtype
        self._initial_rows = initial_rows
        self._buffers: dict[str, torch.Tensor] = {}
        self._num_rows: dict[str, int] = {}

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._num_rows

    def __len__(self) -> int:
        return len(self._num_rows)

    def num_rows(self, session_id: str) -> int:
        return self._num_rows.get(session_id, 0)

    def append(self, session_id: str, *, start: int, rows: torch.Tensor) -> None:
        """Add ``rows`` for positions ``[start, start + len(rows))``."""
        have = self._num_rows.get(session_id, 0)
        if start != have:
            raise DeliveryError(
                f"session {session_id}: activation starts at position {start}, expected {have}"
            )
        if rows.dim() != 2 or rows.shape[1] != self.hidden_size:
            raise DeliveryError(
                f"session {session_id}: rows of shape {list(rows.shape)}, expected [n, {self.hidden_size}]"
            )
        need = have + rows.shape[0]
        buf = self._buffers.get(session_id)
        if buf is None or buf.shape[0] < need:
            capacity = max(need, self._initial_rows, 2 * (buf.shape[0] if buf is not None else 0))
            grown = torch.empty((capacity, self.hidden_size), dtype=self.dtype)
            if buf is not None:
                grown[:have] = buf[:have]
            buf = self._buffers[session_id] = grown
        buf[have:need] = rows.to(self.dtype)
        self._num_rows[session_id] = need

    def rows(self, session_id: str, *, start: int, count: int) -> torch.Tensor:
        have = self._num_rows.get(session_id, 0)
        assert start + count <= have, f"{session_id}: rows [{start}, {start + count}) of {have}"
        return self._buffers[session_id][start : start + count].clone()

    def truncate(self, session_id: str, num_rows: int) -> None:
        """Keep the rows of positions ``[0, num_rows)`` (client drafts: drop rejected ones, so
        the next delivery continues at ``num_rows``); no-op for a session with no more rows."""
        if num_rows < 0:
            raise ValueError(f"{session_id}: cannot keep {num_rows} rows")
        have = self._num_rows.get(session_id)
        if have is not None and num_rows < have:
            self._num_rows[session_id] = num_rows

    def release(self, session_id: str) -> bool:
        self._buffers.pop(session_id, None)
        return self._num_rows.pop(session_id, None) is not None
