"""The OpenAI-compatible gateway: an unchanged OpenAI app gets split inference by changing
its base URL to this device (``vllm-split-client serve``, docs/gateway.md).

Runs in the client's process. ``app`` (routes) -> ``openai_requests`` (bodies checked into
typed requests) -> ``generation`` (one request as one split session over ``SharedLayers``,
text made by ``detokenize``) -> ``responses`` / ``streaming`` (OpenAI answers); ``errors``
owns the OpenAI-shaped errors and how server refusals map to HTTP statuses.
"""
