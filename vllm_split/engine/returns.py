"""Layer-``m`` rows of U-shaped requests on their way back to the API server (EngineCore).

Runs in the EngineCore process, owned by the scheduler (:mod:`vllm_split.engine.scheduler`).
The worker returns, per step, each U request's hidden states at its return layer for the
positions it computed (``ModelRunnerOutput.split_returned``). A step that ends a prefill
chunk without sampling produces no engine output for the request, so rows wait here until
the next output of that request leaves; they then ride on that ``EngineCoreOutput``, in the
``kv_transfer_params`` field (:data:`RETURN_KEY`), which vLLM carries unchanged to the API
server's ``RequestOutput`` of the same step (the field is free: split servers run no KV
connector). Rows of positions already sent (a preempted request recomputes its prompt) are
dropped, so the client gets every position once and in order.
"""
from __future__ import annotations

import torch

from vllm_split.wire.contract import RETURN_KEY
from vllm_split.wire.tensors import encode_tensor


class ReturnBuffer:
    """Rows per request id, contiguous from the first position not yet sent."""

    def __init__(self) -> None:
        self._rows: dict[str, list[torch.Tensor]] = {}
        self._start: dict[str, int] = {}  # first position held (or next to send)
        self._end: dict[str, int] = {}  # one past the last position held or sent
        self._retired: dict[str, dict] = {}  # request id -> its last rows, for its final output

    def add(self, req_id: str, start: int, rows: torch.Tensor) -> None:
        """Rows for positions ``[start, start + len(rows))``; those already held or sent are skipped."""
        end = self._end.get(req_id, 0)
        if start > end:
            raise ValueError(f"request {req_id}: returned rows start at position {start}, expected <= {end}")
        fresh = rows[end - start :]
        if fresh.shape[0] == 0:
            return
        self._rows.setdefault(req_id, []).append(fresh)
        self._start.setdefault(req_id, end)
        self._end[req_id] = start + rows.shape[0]

    def take(self, req_id: str) -> dict | None:
        """The rows held for ``req_id`` as the output's payload ({start, rows, dtype, data}), or None."""
        parts = self._rows.pop(req_id, None)
        if not parts:
            return None
        dtype, shape, data = encode_tensor(torch.cat(parts))
        return {"start": self._start.pop(req_id), "rows": shape[0], "dtype": dtype, "data": data}

    def attach(self, outputs) -> None:
        """Put the rows held for each output's request on it (``kv_transfer_params``); rows of
        requests retired since the last call go on their final output, or are dropped."""
        for out in outputs:
            payload = None
            if out.request_id in self._retired:
                payload = self._retired.pop(out.request_id)
            elif out.request_id in self._end and out.new_token_ids:
                payload = self.take(out.request_id)
            if payload is not None:
                out.kv_transfer_params = {RETURN_KEY: payload}
        self._retired.clear()

    def retire(self, req_id: str) -> None:
        """The request ends (its last output is being made, or it was aborted): its held rows
        wait for :meth:`attach`, everything else is forgotten."""
        payload = self.take(req_id)
        if payload is not None:
            self._retired[req_id] = payload
        self._start.pop(req_id, None)
        self._end.pop(req_id, None)

    def __bool__(self) -> bool:
        return bool(self._end or self._retired)
