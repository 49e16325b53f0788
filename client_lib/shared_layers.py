"""One set of local layers shared by concurrent sessions, each with its own KV cache.

Runs in the client's process (the OpenAI gateway, ``client_lib/gateway``). A
:class:`~client_lib.local_layers.LocalLayers` keeps one KV cache, so two sessions on one
instance would overwrite each other's context. :class:`SharedLayers` holds one loaded
``LocalLayers`` (weights loaded once) and gives each session a :class:`LayerView`: its own
KV cache, position count and split layer over the shared weights. A view has what
:class:`~client_lib.session.SplitSession` uses of ``LocalLayers`` (``fingerprint``,
``auto``, ``max_layers``, ``split_layer``, ``use_split_layer``, ``reset``, ``truncate``, ``forward``)
plus ``aforward``, which the session prefers.

Forward passes are serialised: ``aforward`` waits its turn on an ``asyncio.Lock`` (first
come, first served) and runs the pass on a one-thread executor, so the event loop keeps
serving while torch computes. A view at split layer ``k`` runs the shared model with its
first ``k`` layers only (set for the duration of its pass, under a thread lock).
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from client_lib.local_layers import LocalLayers, LocalLayersError, truncate_cache


class SharedLayers:
    """The weights of one :class:`LocalLayers`, lent to any number of :class:`LayerView`."""

    def __init__(self, layers: LocalLayers) -> None:
        self.layers = layers
        self.num_loaded = len(layers.model.layers)  # the decoder layers in memory
        self._all_layers = layers.model.layers
        self._thread_lock = threading.Lock()
        self._turn = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-split-layers")

    def view(self) -> "LayerView":
        """A new session's view: ``auto`` when the layers were loaded with ``split_layer="auto"``
        (the server chooses ``k``), else at the layers' fixed split layer."""
        return LayerView(self, auto=self.layers.auto, split_layer=self.layers.split_layer)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def run(self, *, view: "LayerView", token_ids: list[int]) -> torch.Tensor:
        """``view``'s forward pass, in turn with every other view's, off the event loop."""
        async with self._turn:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self.run_sync, view, token_ids)

    @torch.inference_mode()
    def run_sync(self, view: "LayerView", token_ids: list[int]) -> torch.Tensor:
        """Hidden states at ``view.split_layer`` for the view's next tokens, with its cache."""
        layers = self.layers
        ids = torch.tensor([token_ids], dtype=torch.long, device=layers.device)
        with self._thread_lock:
            model = layers.model
            if view.split_layer == 0:
                hidden = model.embed_tokens(ids)
            else:
                if view.cache is None:
                    from transformers import DynamicCache

                    view.cache = DynamicCache()
                saved = model.layers, model.config.num_hidden_layers
                model.layers = self._all_layers[: view.split_layer]
                model.config.num_hidden_layers = view.split_layer
                try:
                    hidden = model(input_ids=ids, past_key_values=view.cache, use_cache=True).last_hidden_state
                finally:
                    model.layers, model.config.num_hidden_layers = saved
        view.num_positions += len(token_ids)
        return hidden[0].to("cpu")


class LayerView:
    """One session's use of :class:`SharedLayers`: its own KV cache and split layer."""

    def __init__(self, shared: SharedLayers, *, auto: bool, split_layer: int) -> None:
        self._shared = shared
        layers = shared.layers
        self.auto = auto
        self.fingerprint = layers.fingerprint
        self.max_layers = layers.max_layers
        self.num_layers = layers.num_layers
        self.hidden_size = layers.hidden_size
        self.vocab_size = layers.vocab_size
        self.device = layers.device
        self.dtype = layers.dtype
        self.split_layer = split_layer
        self.cache = None
        self.num_positions = 0

    def use_split_layer(self, split_layer: int) -> None:
        """Run layers ``[0, split_layer)`` from now on (the server's choice for an ``auto`` view)."""
        loaded = self._shared.num_loaded
        if isinstance(split_layer, bool) or not isinstance(split_layer, int) or not 0 <= split_layer <= loaded:
            bound = f", max_layers {self.max_layers}" if self.max_layers is not None else ""
            raise LocalLayersError(f"split layer {split_layer} needs layers this client did not load (it has "
                                   f"{loaded}{bound})")
        self.split_layer = split_layer
        self.reset()

    def reset(self) -> None:
        """Forget this view's KV cache (start a new sequence)."""
        self.cache = None
        self.num_positions = 0

    def truncate(self, num_positions: int) -> None:
        """Keep this view's first ``num_positions`` KV positions (drop rejected drafts' rows).
        No pass of this view runs meanwhile: its session awaits each ``aforward``."""
        self.num_positions = truncate_cache(self.cache, self.num_positions, num_positions)

    def forward(self, token_ids: list[int]) -> torch.Tensor:
        """Blocking forward pass (waits for any other view's pass to end)."""
        return self._shared.run_sync(self, token_ids)

    async def aforward(self, token_ids: list[int]) -> torch.Tensor:
        """The forward pass in turn with the other views', off the event loop."""
        return await self._shared.run(view=self, token_ids=token_ids)
