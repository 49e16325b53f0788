"""patches/cpu_range_metadata.py: which builders may share one metadata build, and the copy."""
import torch
from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata, CPUAttentionMetadataBuilder

from vllm_split.patches import cpu_range_metadata as patch

SHAPE = dict(num_heads=9, num_kv_heads=3, head_dim=64, window_size=-1, block_size=32, isa="vec",
             dtype=torch.float32, kv_cache_dtype="auto", is_cross_attention=False, is_encoder_only_attention=False)


def _builder(**over):
    b = object.__new__(CPUAttentionMetadataBuilder)  # the fields the patch reads, without a VllmConfig
    for name, value in {**SHAPE, **over}.items():
        setattr(b, name, value)
    return b


class _Group:
    def __init__(self, *builders):
        self.metadata_builders = list(builders)


def test_equal_cpu_builders_of_range_groups_share_and_others_are_left_alone():
    groups = [[_Group(_builder())] for _ in range(6)]
    assert patch.apply(groups) == 6
    assert all(g[0].metadata_builders[0].supports_update_block_table for g in groups)
    assert CPUAttentionMetadataBuilder.supports_update_block_table is False  # instances only, not vLLM's class

    assert patch.why_not_shared([_builder()]) == "a single attention metadata builder"
    assert "differ" in patch.why_not_shared([_builder(), _builder(num_heads=8)])
    assert "differ" in patch.why_not_shared([_builder(), _builder(window_size=128)])
    assert "encoder-only" in patch.why_not_shared([_builder(), _builder(is_encoder_only_attention=True)])
    assert "not the CPU attention builder" in patch.why_not_shared([_builder(), object()])
    mixed = [[_Group(_builder())], [_Group(_builder(num_kv_heads=1))]]
    assert patch.apply(mixed) == 0 and not mixed[0][0].metadata_builders[0].__dict__.get("supports_update_block_table")


def test_update_swaps_block_table_and_slot_mapping_only():
    md = CPUAttentionMetadata(num_actual_tokens=3, max_query_len=1, query_start_loc=torch.arange(4), max_seq_len=70,
                              seq_lens=torch.tensor([70, 65, 66]), block_table=torch.zeros(3, 4, dtype=torch.int32),
                              slot_mapping=torch.tensor([5, 6, 7]), scheduler_metadata=torch.ones(8))
    table, slots = torch.ones(3, 4, dtype=torch.int32), torch.tensor([37, 38, 39])
    new = patch.update_block_table(md, table, slots)
    assert new.block_table is table and new.slot_mapping is slots
    assert new.scheduler_metadata is md.scheduler_metadata and new.seq_lens is md.seq_lens
    assert md.slot_mapping.tolist() == [5, 6, 7] and int(md.block_table.sum()) == 0  # the build it came from is kept
