"""vllm-split client: run layers ``[0, split_layer)`` locally, the rest on a vLLM server
(U-shaped, with a :class:`TailLayers`: also ``[return_layer, L)``, the LM head and sampling).

Installs and imports without vLLM (``pip install vllm-split[client]``).
"""
from client_lib.drafts import Drafter, PromptLookup
from client_lib.local_layers import LocalLayers, LocalLayersError
from client_lib.session import GenerationStats, PrivacyFloorError, ServerError, SplitSession, TokenEvent
from client_lib.tail_layers import TailLayers
from vllm_split.wire.protocol import SamplingOptions

__all__ = ["LocalLayers", "LocalLayersError", "SplitSession", "ServerError", "PrivacyFloorError", "TokenEvent",
           "GenerationStats", "SamplingOptions", "TailLayers", "Drafter", "PromptLookup"]
