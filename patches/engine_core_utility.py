"""Patch: EngineCore utility methods that pass client activations to the split scheduler.

Target:  ``vllm.v1.engine.core.EngineCore`` (adds ``vllm_split_deliver``,
         ``vllm_split_release`` and ``vllm_split_step_stats``; changes no existing attribute).
Process: EngineCore, applied by ``SplitSchedulerMixin.__init__``, so only when the split
         scheduler is configured.
Why:     The API server reaches EngineCore through ``call_utility_async(name, *args)``,
         which calls ``getattr(engine_core, name)``. Activations must reach the scheduler,
         which lives in EngineCore, over that same ordered input queue (an activation sent
         before ``add_request`` must arrive before it), and the delivery must wake an
         EngineCore blocked on that queue.
Why not subclass: EngineCore (and its ``EngineCoreProc`` / DP subclasses) is instantiated by
         vLLM's process launcher with no class option; the scheduler class is the closest
         extension point and it cannot add utility methods to its owner.
Upstream: none yet; a generic "scheduler utility" passthrough would make this unnecessary.
Remove when: vLLM offers a way for a scheduler (or plugin) to register utility methods.
Pinned version: every version in ``vllm_split.version.SUPPORTED_VLLM`` (0.32.0, 0.33.0), one code path:
         the contracts it relies on are identical in both (``test_patch_contracts.py``).
"""
from __future__ import annotations

from typing import Any

from vllm_split.wire.contract import UTILITY_DELIVER as DELIVER
from vllm_split.wire.contract import UTILITY_RELEASE as RELEASE
from vllm_split.wire.contract import UTILITY_STEP_STATS as STEP_STATS


def _deliver(self: Any, session_id: str, start: int, num_rows: int, data: bytes,
             turnaround_s: float | None = None, draft_ids: tuple[int, ...] | list[int] = ()) -> str | None:
    scheduler = self.scheduler
    if not hasattr(scheduler, "split_deliver"):
        return "vllm-split: the engine does not run the split scheduler"
    if draft_ids:
        return scheduler.split_deliver(session_id, start, num_rows, data, turnaround_s, tuple(draft_ids))
    return scheduler.split_deliver(session_id, start, num_rows, data, turnaround_s)


def _release(self: Any, session_id: str) -> bool:
    scheduler = self.scheduler
    return bool(hasattr(scheduler, "split_release") and scheduler.split_release(session_id))


def _step_stats(self: Any, since: int) -> dict | None:
    scheduler = self.scheduler
    return scheduler.split_step_stats(since) if hasattr(scheduler, "split_step_stats") else None


def apply() -> None:
    """Idempotent."""
    from vllm.v1.engine.core import EngineCore

    if getattr(EngineCore, DELIVER, None) is not _deliver:
        setattr(EngineCore, DELIVER, _deliver)
        setattr(EngineCore, RELEASE, _release)
        setattr(EngineCore, STEP_STATS, _step_stats)
