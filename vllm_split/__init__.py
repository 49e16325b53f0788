"""vllm-split: split (collaborative) LLM inference between a vLLM server and its clients.

A client runs the first ``split_layer`` decoder layers of the model and sends the hidden
state at that layer; the server resumes the forward pass from there inside its normal
continuous batch. Importing this package does not import vLLM: the client library uses
:mod:`vllm_split.wire.protocol` and :mod:`vllm_split.wire.fingerprint` without it.
"""
from vllm_split.version import SUPPORTED_VLLM

__all__ = ["SUPPORTED_VLLM", "register"]
PLUGIN_NAME = "vllm_split"


def register() -> None:
    """``vllm.general_plugins`` entry point, run once in every vLLM process.

    Cheap and idempotent. It does nothing unless the plugin is enabled (named in
    ``VLLM_PLUGINS``), so a vLLM without the plugin enabled behaves exactly as before;
    when enabled it checks the vLLM version loudly.
    """
    import os

    if PLUGIN_NAME in os.environ.get("VLLM_PLUGINS", "").split(","):
        from vllm_split.version import check_vllm_version

        check_vllm_version()
        from vllm_split.patches import kv_range_groups

        kv_range_groups.apply()  # a no-op unless the kv_ranges option is above 1
