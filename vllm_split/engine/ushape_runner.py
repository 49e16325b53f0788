"""The model runner's part of U-shaped split requests (a mixin under ``SplitRunnerMixin``).

Runs in the worker. A step with U-shaped rows (``SplitInput.return_layer`` set) takes
:func:`vllm_split.engine.ushape_forward.ushape_forward` instead of the prefix-only compact
forward; the rest of the runner is unchanged for steps without them:

* **metadata**: for every distinct set of requests active at some layer (not the whole
  batch), the attention metadata of that subset (:mod:`vllm_split.engine.subset_metadata`),
  installed per attention layer with the matching rows of the slot mapping;
* **returned rows**: each U request's layer-``m`` rows for the step's positions travel back
  to the scheduler on the ``ModelRunnerOutput`` (``split_returned``: request id ->
  (start position, rows on the CPU)), which vLLM pickles from the worker to EngineCore as it
  is (a plain dataclass: an extra attribute goes with it);
* **no LM head for U rows**: the model's ``compute_logits`` is wrapped so that the rows of
  U requests get a zero logits row instead of the LM head's; their sampling params are
  greedy, so the sampler picks a placeholder token (id 0) for the engine's bookkeeping, which
  the API server never forwards.
"""
from __future__ import annotations

from typing import Any

import torch
from vllm.forward_context import get_forward_context

from vllm_split.engine.activations import SplitInput
from vllm_split.engine.compact_forward import Entry
from vllm_split.engine.subset_metadata import install_per_layer, subset_attention_metadata
from vllm_split.engine.ushape_forward import active_sets, ushape_forward


class UShapeRunnerMixin:
    _split_inputs: dict[str, SplitInput] = {}
    # per layer: the active request set; {set: (token rows, {layer name: metadata})}
    _split_u_md: tuple[list[tuple[int, ...]], dict[tuple[int, ...], tuple[torch.Tensor, dict]]] | None = None
    _split_u_logit_rows: list[int] | None = None  # logits rows (one per request) of U requests this step
    _split_returned: dict[str, tuple[int, torch.Tensor]] = {}

    def _split_has_u(self) -> bool:
        return any(item.return_layer is not None for item in self._split_inputs.values())

    def _split_u_wrap_logits(self) -> None:
        """Install the ``compute_logits`` wrapper that skips the LM head for U rows."""
        model = self.get_model()
        original = model.compute_logits

        def compute_logits(hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
            skip = self._split_u_logit_rows
            if not skip or hidden_states.shape[0] != len(self.input_batch.req_ids):
                return original(hidden_states, *args, **kwargs)
            skipped = set(skip)
            keep = [i for i in range(hidden_states.shape[0]) if i not in skipped]
            rows = original(hidden_states[keep] if keep else hidden_states[:1], *args, **kwargs)
            full = rows.new_zeros((hidden_states.shape[0], rows.shape[1]))
            if keep:
                full[keep] = rows
            return full

        model.compute_logits = compute_logits

    def _split_u_build_metadata(self, entries: list[Entry], slot_mappings: dict[int, torch.Tensor]) -> None:
        num_reqs = len(entries)
        sets = active_sets(entries, len(self._split_inner.layers))
        everyone = tuple(range(num_reqs))
        built = {}
        for key in dict.fromkeys(sets):
            if key and key != everyone:
                built[key] = subset_attention_metadata(self, num_reqs=num_reqs, req_idx=list(key),
                                                       slot_mappings=slot_mappings)
        self._split_u_md = (sets, built)

    def _split_u_install_metadata(self) -> tuple[Any, Any]:
        sets, built = self._split_u_md

        def pick(layer: int):
            subset = built.get(sets[layer]) if layer < len(sets) else None
            return None if subset is None else (subset[1], subset[0].to(self.device))

        return install_per_layer(pick)

    def _split_u_forward(self, entries: list[Entry], **kwargs: Any) -> torch.Tensor:
        saved = self._split_u_install_metadata()
        try:
            out, returned = ushape_forward(self._split_inner, entries=entries, run_layers=self._split_layers,
                                           **kwargs)
        finally:
            fc = get_forward_context()
            fc.attn_metadata, fc.slot_mapping = saved
        req_ids = self.input_batch.req_ids
        self._split_returned = {req_ids[i]: (self._split_inputs[req_ids[i]].start, rows.to("cpu"))
                                for i, rows in returned.items()}
        self._split_u_logit_rows = [i for i, e in enumerate(entries) if e.return_layer is not None]
        return out

    def sample_tokens(self, *args: Any, **kwargs: Any):
        try:
            out = super().sample_tokens(*args, **kwargs)
            if self._split_returned and out is not None:
                out.split_returned = self._split_returned
            return out
        finally:
            self._split_returned = {}
            self._split_u_logit_rows = None
