"""Cache groups (docs/design.md §12): with ``G = 2`` groups whose block tables and slots differ, every cache/attention
op given ``group=1`` reads row 1 of ``block_tables [G, B, nb]`` / ``slot_mapping [G, T]`` — exactly what the
same op computes from group 1's own 2-D table / 1-D slots — and an out-of-range group is a ``ValueError``.
CPU reference paths (the Triton launchers take one group's tables: the op selects the row before them)."""

import pytest
import torch

from swa_rewrite import ops
from swa_rewrite.ops import StepMetadata
from swa_rewrite.runtime import StepBatch, StepItem

R, P, H, PS, NUM_BLOCKS, WINDOW = 128, 16, 2, 4, 12, 5
SCALE = (R + P) ** -0.5


def two_group_step():
    """One step (a 6-token chunk after 3 cached, a decode after 8, 2 padding tokens) whose two cache groups
    map the same positions to different, shuffled blocks; returns the step's ``StepMetadata`` and each
    group's own one-group metadata."""
    blocks = torch.randperm(NUM_BLOCKS).tolist()
    tables = [[blocks[:3], blocks[3:6]], [blocks[6:9], blocks[9:12]]]     # group -> request -> blocks
    per_group = []
    for g in range(2):
        items = [StepItem(list(range(6)), 3, tables[g][0], True), StepItem([7], 8, tables[g][1], False)]
        per_group.append(StepBatch.build(items, PS, pad_to=9, max_blocks=3).meta)
    m0, m1 = per_group
    assert not torch.equal(m0.block_tables, m1.block_tables) and not torch.equal(m0.slot_mapping, m1.slot_mapping)
    both = StepMetadata(m0.positions, *m0.batch_tensors(),
                        block_tables=torch.cat([m0.block_tables, m1.block_tables]),
                        slot_mapping=torch.cat([m0.slot_mapping, m1.slot_mapping]))
    return both, m0, m1


def fp8_cache_of_random_latents():
    cache = torch.empty(NUM_BLOCKS, PS, ops.fp8_cache_bytes(R, P), dtype=torch.uint8)
    ops.write_fp8_cache(torch.randn(NUM_BLOCKS * PS, R + P), cache, torch.arange(NUM_BLOCKS * PS), rope_dim=P)
    return cache


@pytest.mark.parametrize("fp8", [False, True])
def test_cache_writes_use_their_groups_slots(fp8):
    both, m0, m1 = two_group_step()
    T = both.positions.shape[0]
    latent = torch.randn(T, R + P)
    if fp8:
        def write(slots, group=None):
            cache = torch.full((NUM_BLOCKS, PS, ops.fp8_cache_bytes(R, P)), 255, dtype=torch.uint8)
            kw = {} if group is None else {"group": group}
            ops.write_fp8_cache(latent, cache, slots, rope_dim=P, **kw)
            return cache
    else:
        def write(slots, group=None):
            cache = torch.full((NUM_BLOCKS, PS, R + P), float("nan"))
            ops.write_kv_cache(latent, cache, slots, **({} if group is None else {"group": group}))
            return cache.nan_to_num(nan=-7.0)
    for g, m in enumerate((m0, m1)):
        assert torch.equal(write(both.slot_mapping, group=g), write(m.slot_mapping[0]))
    assert not torch.equal(write(both.slot_mapping, group=1), write(both.slot_mapping, group=0))


def test_paged_mla_attention_reads_its_groups_table():
    both, m0, m1 = two_group_step()
    cache = torch.randn(NUM_BLOCKS, PS, R + P)
    q = torch.randn(both.positions.shape[0], H, R + P)
    run = lambda bt, **kw: ops.paged_mla_attention(q, cache, bt, *both.batch_tensors(), SCALE, rope_dim=P, **kw)
    for g, m in enumerate((m0, m1)):
        out, lse = run(both.block_tables, group=g)
        ref_out, ref_lse = run(m.block_tables[0])
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert not torch.equal(run(both.block_tables, group=1)[0], run(both.block_tables, group=0)[0])


def test_swa_ops_read_their_groups_table():
    both, m0, m1 = two_group_step()
    cache = fp8_cache_of_random_latents()
    q = torch.randn(both.positions.shape[0], H, R + P)
    attend = lambda bt, **kw: ops.swa_mla_attention(q, cache, bt, *both.batch_tensors(), SCALE, window=WINDOW,
                                                    rope_dim=P, **kw)
    index = lambda bt, **kw: ops.swa_indexer(bt, *both.batch_tensors(), window=WINDOW, page_size=PS,
                                             return_num_valid=True, **kw)
    for g, m in enumerate((m0, m1)):
        out, lse = attend(both.block_tables, group=g)
        ref_out, ref_lse = attend(m.block_tables[0])
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
        indices, num_valid = index(both.block_tables, group=g)
        ref_indices, ref_num_valid = index(m.block_tables[0])
        assert torch.equal(indices, ref_indices) and torch.equal(num_valid, ref_num_valid)
    assert not torch.equal(index(both.block_tables, group=1)[0], index(both.block_tables, group=0)[0])
    assert not torch.equal(attend(both.block_tables, group=1)[0], attend(both.block_tables, group=0)[0])


@pytest.mark.parametrize("group", [2, -1])
def test_an_out_of_range_group_is_rejected(group):
    both, _, _ = two_group_step()
    T = both.positions.shape[0]
    latent, q = torch.randn(T, R + P), torch.randn(T, H, R + P)
    full, fp8 = torch.zeros(NUM_BLOCKS, PS, R + P), fp8_cache_of_random_latents()
    calls = {
        "write_kv_cache": lambda: ops.write_kv_cache(latent, full, both.slot_mapping, group=group),
        "write_fp8_cache": lambda: ops.write_fp8_cache(latent, fp8, both.slot_mapping, rope_dim=P, group=group),
        "paged_mla_attention": lambda: ops.paged_mla_attention(q, full, both.block_tables, *both.batch_tensors(),
                                                               SCALE, rope_dim=P, group=group),
        "swa_mla_attention": lambda: ops.swa_mla_attention(q, fp8, both.block_tables, *both.batch_tensors(), SCALE,
                                                           window=WINDOW, rope_dim=P, group=group),
        "swa_indexer": lambda: ops.swa_indexer(both.block_tables, *both.batch_tensors(), window=WINDOW,
                                               page_size=PS, group=group),
    }
    before = (full.clone(), fp8.clone())
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"group {group} is out of range for (slot_mapping|block_tables) "
                                             rf"of 2 cache group\(s\)"):
            call()
    assert torch.equal(full, before[0]) and torch.equal(fp8, before[1])     # nothing was written
