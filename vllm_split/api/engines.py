"""The engines behind this API server, each addressable on its own (data parallelism).

Runs in the API server process. Under vLLM's internal load balancing of data parallelism
(``--data-parallel-size N``, vLLM's ``DPLBAsyncMPClient``) every DP rank is an independent
EngineCore with its own scheduler, so its own split scheduler, stored activations, step
records and KV pool. A split session must therefore live on one engine: its rows are
delivered to, its request added to, its rows released from, and its step records read from
that engine only. vLLM's ``call_utility_async`` on that client goes to *every* engine and
answers with the first one's result, so this module addresses one engine at a time:

* :meth:`EngineSet.call`: an EngineCore utility call to engine ``e`` only (vLLM's
  ``_call_utility_async(..., engine=core_engines[e])``, the identity its own router uses);
* :meth:`EngineSet.pin`: the ``generate`` keyword that runs a request on engine ``e``
  (``data_parallel_rank``, an index into the same ``core_engines``).

One engine (no DP, or an external load balancer giving this API server one engine:
``DPAsyncMPClient``) is engine 0 and the calls are vLLM's plain ones. The private names used
here are pinned in ``tests/unit/patches/test_patch_contracts.py``.
"""
from __future__ import annotations

from typing import Any


def _is_internal_lb(core: Any) -> bool:
    try:
        from vllm.v1.engine.core_client import DPLBAsyncMPClient
    except ImportError:  # pragma: no cover - a vLLM without it has no internal DP balancing
        return False
    return isinstance(core, DPLBAsyncMPClient)


class EngineSet:
    """The engines an API server's engine client reaches; ``e`` indexes :attr:`ranks`."""

    def __init__(self, engine_client: Any) -> None:
        self._core = engine_client.engine_core
        self._targeted = _is_internal_lb(self._core) and len(self._core.core_engines) > 1
        ranks = getattr(self._core, "engine_ranks_managed", None) if self._targeted else None
        self.ranks: tuple[int, ...] = tuple(ranks) if ranks else (0,)  # DP ranks, the metrics' ``engine`` label

    @property
    def count(self) -> int:
        return len(self.ranks)

    def label(self, e: int) -> str:
        return str(self.ranks[e])

    async def call(self, e: int, method: str, *args: Any) -> Any:
        """EngineCore utility ``method`` on engine ``e`` only; its answer."""
        if not self._targeted:
            return await self._core.call_utility_async(method, *args)
        return await self._core._call_utility_async(method, *args, engine=self._core.core_engines[e])

    def pin(self, e: int) -> dict[str, int]:
        """``generate`` keywords that run a request on engine ``e`` (none with one engine)."""
        return {"data_parallel_rank": e} if self._targeted else {}

    def api_server(self) -> tuple[int, int]:
        """(index, count) of this API server among the replica's (``--api-server-count``)."""
        return int(getattr(self._core, "client_index", 0)), max(1, int(getattr(self._core, "client_count", 1)))


def share(total: int, index: int, count: int) -> int:
    """API server ``index`` of ``count``'s share of a replica-wide limit ``total``: the
    shares differ by at most one and add up to ``total``."""
    if not 0 <= index < count:
        raise ValueError(f"share: API server index {index} out of range for {count} servers")
    return total // count + (index < total % count)
