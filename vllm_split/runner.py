"""Model-runner wrapper: feeds each step's client activations into the forward pass.

The scheduler puts ``split_inputs`` (request id -> rows and split layer) on the
``SchedulerOutput``; this mixin reads them in ``execute_model``, maps each request's rows
to its tokens in the flattened batch (``input_batch.req_ids`` order, ``query_start_loc``)
and, in the documented ``_model_forward`` override point, runs :func:`split_forward`
instead of the model's own loop. Steps without split requests (and vLLM's dummy runs) take
the unchanged path.
"""
from __future__ import annotations

from typing import Any

import torch
from vllm.logger import init_logger

from vllm_split.activations import SplitInput
from vllm_split.split_forward import SplitRows, check_supported, split_forward

logger = init_logger(__name__)


class SplitRunnerMixin:
    _split_inputs: dict[str, SplitInput] = {}

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)
        inner = check_supported(self.get_model())
        if getattr(self, "use_aux_hidden_state_outputs", False):
            raise RuntimeError("vllm-split does not support EAGLE-3 auxiliary hidden states")
        self._split_inner = inner
        logger.info(
            "vllm-split: resuming %s at per-request split layers (%d layers)",
            type(inner).__name__, len(inner.layers),
        )

    def execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any):
        self._split_inputs = getattr(scheduler_output, "split_inputs", None) or {}
        try:
            return super().execute_model(scheduler_output, *args, **kwargs)
        finally:
            self._split_inputs = {}

    def _split_groups(self, num_tokens: int, device: torch.device) -> list[SplitRows]:
        starts = self.query_start_loc.np
        by_layer: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for i, req_id in enumerate(self.input_batch.req_ids):
            item = self._split_inputs.get(req_id)
            if item is None:
                continue
            begin, end = int(starts[i]), int(starts[i + 1])
            assert end - begin == item.hidden.shape[0], (
                f"{req_id}: {end - begin} scheduled tokens, {item.hidden.shape[0]} rows"
            )
            idx, rows = by_layer.setdefault(item.split_layer, ([], []))
            idx.append(torch.arange(begin, end, dtype=torch.long))
            rows.append(item.hidden)
        groups = []
        for layer, (idx, rows) in sorted(by_layer.items()):
            index = torch.cat(idx).to(device)
            assert int(index.max()) < num_tokens
            groups.append(SplitRows(split_layer=layer, index=index, hidden=torch.cat(rows).to(device)))
        return groups

    def _model_forward(
        self,
        input_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        **model_kwargs: Any,
    ) -> Any:
        if not self._split_inputs:
            return super()._model_forward(
                input_ids=input_ids,
                positions=positions,
                intermediate_tensors=intermediate_tensors,
                inputs_embeds=inputs_embeds,
                **model_kwargs,
            )
        groups = self._split_groups(positions.shape[-1], positions.device)
        return split_forward(
            self._split_inner,
            groups=groups,
            input_ids=input_ids,
            positions=positions,
            intermediate_tensors=intermediate_tensors,
            inputs_embeds=inputs_embeds,
            **model_kwargs,
        )
