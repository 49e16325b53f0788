"""Model-runner wrapper: feeds each step's client activations into the forward pass.

The scheduler puts ``split_inputs`` (request id -> rows and split layer) on the
``SchedulerOutput``; this mixin reads them in ``execute_model`` and, in the documented
``_model_forward`` override point, runs the split forward instead of the model's own loop.
Steps without split requests (and vLLM's dummy runs) take the unchanged path.

Compute saving (``compact_forward``): ``_may_reorder_batch`` sorts the batch by split layer
(ordinary requests first, as ``k = 0``), ``_build_attention_metadata`` additionally builds,
through the runner's own builders, the attention metadata of each request prefix that is
active at some layer, and ``_model_forward`` installs per layer the prefix's metadata and
slot mapping in the forward context. Where that is not possible (backends that reorder the
batch themselves, non-CPU builders not yet validated) the exact but non-saving
``exact_forward`` runs instead.

Pipeline parallelism: every stage sorts its batch alike (each worker gets the same scheduler
output) and runs the compact forward over its own layers only (``compact_forward.run_stage``):
the rows of requests whose split layer is below the stage's first layer arrive in the
previous stage's ``IntermediateTensors`` (a prefix of the batch), the others enter at their
layer or, above the stage, do not run here; a stage before the last sends its active rows
padded with zeros to the step's token count. Only the stage's attention layers get prefix
metadata. U-shaped requests stay single-stage (refused at Open under pipeline parallelism).

Whole graph (``SplitConfig.whole_graph``, on by default in vLLM's compiled mode): a step whose
rows all enter at layer 0 (ordinary requests, split sessions at ``k = 0``) saves no layer, so
it runs vLLM's own compiled model, not the split layer bodies: the worker turns on the model
runner's embeddings input (``ModelConfig.enable_prompt_embeds``, in the worker's config only;
the API server keeps refusing prompt embeddings from clients), vLLM embeds the token ids of
every step outside its graph, and ``_model_forward`` writes the split rows over their
placeholders' embeddings. Single-worker engines (each replica of data parallelism is one)
and tensor parallelism (every rank gets the same split rows, so all ranks take the same path);
not yet validated under pipeline parallelism, whose split steps take the split layer bodies as
before.
"""
from __future__ import annotations

import bisect
from typing import Any

import torch
from vllm.config import CompilationMode
from vllm.distributed import get_pp_group
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors

from vllm_split.engine.activations import SplitInput
from vllm_split.config import SplitConfig
from vllm_split.patches import cpu_range_metadata, min_layer
from vllm_split.engine.compact_forward import Entry, compact_forward, eager_layers, run_stage, stage_prefixes
from vllm_split.engine.compiled_layers import (GUARDED_ABOVE_ROWS, CompiledLayers, compiled_graphs,
                                                unsupported_reason)
from vllm_split.engine.exact_forward import SplitRows, check_supported, exact_forward
from vllm_split.engine.subset_metadata import install_per_layer
from vllm_split.engine.ushape_runner import UShapeRunnerMixin

logger = init_logger(f"vllm.{__name__}")  # under "vllm": uses vLLM's log handlers
WHOLE_GRAPH_LOG = "vllm-split: split rows all at layer 0 ran in vLLM's own compiled model (whole-graph step)"


class SplitRunnerMixin(UShapeRunnerMixin):
    _split_inputs: dict[str, SplitInput] = {}
    # split layer per request in batch order, and {num_active_requests: (num_tokens, metadata)}
    _split_prefix_md: tuple[list[int], dict[int, tuple[int, dict]]] | None = None
    _split_layers: CompiledLayers | None = None  # compiled layer bodies (None: eager layers)
    _split_layer_rows: int | None = None  # rows x decoder layers this worker ran in the step (None: not known)
    _split_whole_graph: bool = False  # steps of rows all entering at layer 0 run vLLM's compiled model
    _split_whole_step: bool = False  # this step does (set once per step in execute_model)

    def __init__(self, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        config = SplitConfig.from_additional_config(vllm_config.additional_config)
        parallel = vllm_config.parallel_config
        whole = (config.whole_graph == "on" and vllm_config.compilation_config.mode != CompilationMode.NONE
                 # validated under tensor parallelism (every rank gets the same split rows and decides
                 # alike); not yet under pipeline parallelism: its split steps as before
                 and parallel.pipeline_parallel_size == 1
                 and config.min_layer == 0)  # a server without layer 0 never has a step of rows all at layer 0
        if whole:  # before the runner sizes its buffers: it then keeps an embeddings input for the model
            vllm_config.model_config.enable_prompt_embeds = True
        super().__init__(vllm_config, *args, **kwargs)
        self._split_whole_graph = whole

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        config = SplitConfig.from_additional_config(self.vllm_config.additional_config)
        min_layer.apply(config.min_layer, num_hidden_layers=self.model_config.get_total_num_hidden_layers(),
                        pp_size=self.vllm_config.parallel_config.pipeline_parallel_size)
        super().load_model(*args, **kwargs)
        inner = check_supported(self.get_model())
        if getattr(self, "use_aux_hidden_state_outputs", False):
            raise RuntimeError("vllm-split does not support EAGLE-3 auxiliary hidden states")
        self._split_inner = inner
        if not self._split_compact_ok():
            logger.warning("vllm-split: split steps take the EXACT forward, which runs every decoder layer on every "
                           "row and saves no server compute (%s); see docs/server_savings.md, 'GPU plan'",
                           self._split_compact_why())
        else:
            pp = get_pp_group()
            logger.info("vllm-split: split steps take the COMPACT forward on this stage's layers [%d, %d) "
                        "(pipeline stage %d of %d): each layer runs only on the rows that have entered",
                        inner.start_layer, inner.end_layer, pp.rank_in_group, pp.world_size)
        self._split_layers = self._split_compiled_layers(inner)
        self._split_u_wrap_logits()
        logger.info("vllm-split: resuming %s at per-request split layers (%d layers; this server holds "
                    "layers [%d, %d))", type(inner).__name__, len(inner.layers), inner.start_layer, inner.end_layer)

    def initialize_metadata_builders(self, *args: Any, **kwargs: Any) -> None:
        super().initialize_metadata_builders(*args, **kwargs)
        if SplitConfig.from_additional_config(self.vllm_config.additional_config).kv_ranges > 1:
            cpu_range_metadata.apply(self.attn_groups)  # one build per step for all range groups

    def _split_compiled_layers(self, inner: torch.nn.Module) -> CompiledLayers | None:
        """The compiled layer bodies when vLLM compiles the model, else None (eager layers)."""
        if self.vllm_config.compilation_config.mode == CompilationMode.NONE:
            logger.info("vllm-split: --enforce-eager: split steps run the decoder layers eagerly, like plain steps")
            return None
        layers = [inner.layers[i] for i in range(inner.start_layer, inner.end_layer)]
        why = unsupported_reason(layers)
        if why is not None or not self._split_compact_ok():
            logger.warning("vllm-split: split steps run EAGER decoder layers while plain steps run compiled (%s); "
                           "start with --enforce-eager for equal kernels", why or "not the single-stage CPU path")
            return None
        max_rows = self.scheduler_config.max_num_batched_tokens
        compiled = CompiledLayers(inner, skip_guards=max_rows <= GUARDED_ABOVE_ROWS,
                                  options=dict(self.vllm_config.compilation_config.inductor_compile_config))
        graphs = compiled_graphs()
        seconds = compiled.warm_up(dtype=self.model_config.dtype, device=self.device, max_rows=max_rows)
        logger.info("vllm-split: compiled the split layer bodies in %.1f s (%d graphs for all %d layers and up to "
                    "%d rows; guards %s; %s; %s)", seconds, compiled_graphs() - graphs, len(layers), max_rows,
                    "skipped" if compiled.skip_guards else "kept",
                    "called directly" if compiled.direct else f"called through dynamo: {compiled.direct_why}",
                    "post and pre fused" if compiled.fused else f"post and pre not fused: {compiled.fused_why}")
        return compiled

    def _split_compact_ok(self) -> bool:
        return self._split_compact_why() is None

    def _split_compact_why(self) -> str | None:
        """Why the compute-saving compact path cannot run here, or None."""
        if not current_platform.is_cpu():
            return f"the {current_platform.device_name} attention builders are not validated for row prefixes yet"
        if getattr(self, "reorder_batch_threshold", None) is not None:
            return "the attention backend reorders the batch itself"
        return None

    def _split_u_why(self) -> str | None:
        """Why U-shaped requests cannot run here, or None (``vllm_split.api.ushape.u_shape_unsupported``
        refuses them at Open for the same reasons)."""
        if get_pp_group().world_size != 1:
            return "pipeline parallelism (U-shaped rows leave the forward pass on a single stage only)"
        return self._split_compact_why()

    def execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any):
        self._split_inputs = getattr(scheduler_output, "split_inputs", None) or {}
        self._split_prefix_md = self._split_u_md = self._split_u_logit_rows = None
        self._split_layer_rows = None
        self._split_whole_step = self._split_whole_graph_step()
        try:
            return super().execute_model(scheduler_output, *args, **kwargs)
        finally:
            self._split_inputs = {}
            self._split_whole_step = False
            self._split_prefix_md = self._split_u_md = None

    # ---------------------------------------------------------------- batch order
    def _split_layers_in_batch(self) -> list[int]:
        return [item.split_layer if (item := self._split_inputs.get(r)) is not None else 0
                for r in self.input_batch.req_ids]

    def _split_whole_graph_step(self) -> bool:
        """Whether this step runs vLLM's own compiled model: the whole-graph option is on and
        every split row enters at layer 0 (none U-shaped)."""
        return self._split_whole_graph and all(item.split_layer == 0 and item.return_layer is None
                                               for item in self._split_inputs.values())

    def _may_reorder_batch(self, scheduler_output: Any) -> None:
        super()._may_reorder_batch(scheduler_output)
        if not self._split_inputs or not self._split_compact_ok() or self._split_whole_step:
            return
        ks = self._split_layers_in_batch()
        order = sorted(range(len(ks)), key=lambda i: (ks[i], i))
        want = [self.input_batch.req_ids[i] for i in order]
        for pos, req_id in enumerate(want):  # stable sort by split layer via swaps
            cur = self.input_batch.req_id_to_index[req_id]
            if cur != pos:
                self.input_batch.swap_states(pos, cur)

    # ---------------------------------------------------------------- attention prefixes
    def _build_attention_metadata(self, *args: Any, **kwargs: Any):
        result = super()._build_attention_metadata(*args, **kwargs)
        if (not self._split_inputs or not self._split_compact_ok() or kwargs.get("ubatch_slices") is not None
                or kwargs.get("for_cudagraph_capture") or self._split_whole_step):
            return result
        ks = self._split_layers_in_batch()
        if ks != sorted(ks):
            return result
        if self._split_has_u():
            if self._split_u_why() is None:
                self._split_u_build_metadata(self._split_entries(self.device), kwargs["slot_mappings"])
            return result
        starts = self.query_start_loc.np
        slot_mappings = kwargs["slot_mappings"]
        prefixes: dict[int, tuple[int, dict]] = {}
        for num_active in stage_prefixes(ks, self._split_inner.start_layer, self._split_inner.end_layer):
            num_tokens = int(starts[num_active])
            max_query_len = int((starts[1 : num_active + 1] - starts[:num_active]).max())
            md, _ = super()._build_attention_metadata(
                num_tokens=num_tokens, num_reqs=num_active, max_query_len=max_query_len,
                slot_mappings={gid: sm[:num_tokens] for gid, sm in slot_mappings.items()},
            )
            prefixes[num_active] = (num_tokens, md)
        self._split_prefix_md = (ks, prefixes)
        return result

    def _install_prefix_metadata(self) -> tuple[Any, Any]:
        ks, prefixes = self._split_prefix_md

        def pick(layer: int):
            prefix = prefixes.get(bisect.bisect_right(ks, layer))
            return None if prefix is None else (prefix[1], slice(None, prefix[0]))

        return install_per_layer(pick)

    # ---------------------------------------------------------------- forward
    def _split_entries(self, device: torch.device) -> list[Entry]:
        starts = self.query_start_loc.np
        entries = []
        for i, req_id in enumerate(self.input_batch.req_ids):
            item = self._split_inputs.get(req_id)
            begin, end = int(starts[i]), int(starts[i + 1])
            if item is None:
                entries.append(Entry(split_layer=0, begin=begin, end=end, hidden=None))
            else:
                assert end - begin == item.hidden.shape[0], f"{req_id}: {end - begin} tokens, {item.hidden.shape[0]} rows"
                entries.append(Entry(split_layer=item.split_layer, begin=begin, end=end, hidden=item.hidden.to(device),
                                     return_layer=item.return_layer))
        return entries

    def _split_groups(self, device: torch.device) -> list[SplitRows]:
        """The client rows of the batch grouped by split layer (for ``exact_forward``)."""
        by_layer: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for e in self._split_entries(device):
            if e.hidden is None:
                continue
            idx, rows = by_layer.setdefault(e.split_layer, ([], []))
            idx.append(torch.arange(e.begin, e.end, dtype=torch.long, device=device))
            rows.append(e.hidden)
        return [SplitRows(split_layer=layer, index=torch.cat(idx), hidden=torch.cat(rows))
                for layer, (idx, rows) in sorted(by_layer.items())]

    def _model_forward(self, input_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                       intermediate_tensors: Any = None, inputs_embeds: torch.Tensor | None = None,
                       **model_kwargs: Any) -> Any:
        num_tokens = positions.shape[-1]
        whole = self._split_whole_step
        if whole and self._split_inputs and get_pp_group().is_first_rank:
            if inputs_embeds is None:
                raise RuntimeError("vllm-split: a whole-graph step got no input embeddings: vLLM's model runner "
                                   "did not take the enable_prompt_embeds path")
            for e in self._split_entries(positions.device):
                if e.hidden is not None:  # over the embeddings of the split request's placeholder ids
                    inputs_embeds[e.begin:e.end].copy_(e.hidden)
            logger.info_once(WHOLE_GRAPH_LOG, scope="process")  # every rank: tests count them
        if whole or not self._split_inputs:  # no split rows, or (whole graph) all at layer 0: vLLM's own model
            self._split_layer_rows = num_tokens * (self._split_inner.end_layer - self._split_inner.start_layer)
            return super()._model_forward(input_ids=input_ids, positions=positions,
                                          intermediate_tensors=intermediate_tensors,
                                          inputs_embeds=inputs_embeds, **model_kwargs)
        if self._split_has_u() and (why := self._split_u_why()) is not None:
            raise RuntimeError(f"vllm-split: U-shaped split requests cannot run here: {why}")
        if self._split_u_md is not None:
            out = self._split_u_forward(self._split_entries(positions.device),
                                        input_ids=input_ids, positions=positions, inputs_embeds=inputs_embeds)
            return _pad_rows(out, num_tokens)
        if self._split_has_u():
            raise RuntimeError("vllm-split: U-shaped split requests need the compact forward; here: unsorted batch")
        if self._split_prefix_md is not None:
            return self._split_compact_stage(input_ids=input_ids, positions=positions, inputs_embeds=inputs_embeds,
                                             intermediate_tensors=intermediate_tensors, **model_kwargs)
        self._split_layer_rows = num_tokens * (self._split_inner.end_layer - self._split_inner.start_layer)
        groups = self._split_groups(positions.device)
        return exact_forward(self._split_inner, groups=groups, input_ids=input_ids, positions=positions,
                             intermediate_tensors=intermediate_tensors, inputs_embeds=inputs_embeds,
                             **model_kwargs)

    def _split_compact_stage(self, *, input_ids: torch.Tensor | None, positions: torch.Tensor,
                             inputs_embeds: torch.Tensor | None, intermediate_tensors: Any,
                             **model_kwargs: Any) -> torch.Tensor | IntermediateTensors:
        """This stage's compact forward: the final hidden states (last stage) or the tensors for
        the next stage, padded to the step's token count either way."""
        last = get_pp_group().is_last_rank
        received = None if intermediate_tensors is None else (intermediate_tensors["hidden_states"],
                                                              intermediate_tensors["residual"])
        self._split_layer_rows = 0
        inner, layers = self._split_inner, self._split_layers

        run = layers if layers is not None else eager_layers(inner, **model_kwargs)

        def run_layers(start: int, end: int, pos: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None):
            self._split_layer_rows += h.shape[0] * (end - start)
            return run(start, end, pos, h, residual)

        saved = self._install_prefix_metadata()
        try:
            out = (compact_forward if last else run_stage)(
                inner, entries=self._split_entries(positions.device), input_ids=input_ids, positions=positions,
                inputs_embeds=inputs_embeds, run_layers=run_layers, received=received)
        finally:
            fc = get_forward_context()
            fc.attn_metadata, fc.slot_mapping = saved
        num_tokens = positions.shape[-1]
        if last:
            return _pad_rows(out, num_tokens)
        h, residual = out
        if h is None:  # no row active on this stage yet: the next stage reads none of these
            h = torch.zeros((num_tokens, self.model_config.get_hidden_size()), dtype=self.model_config.dtype,
                            device=positions.device)
        residual = torch.zeros_like(h) if residual is None else residual
        return IntermediateTensors({"hidden_states": _pad_rows(h, num_tokens),
                                    "residual": _pad_rows(residual, num_tokens)})


def _pad_rows(t: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``t`` with zero rows appended up to ``num_rows`` (the step's padded token count)."""
    pad = num_rows - t.shape[0]
    return t if pad == 0 else torch.cat([t, t.new_zeros((pad, *t.shape[1:]))])
