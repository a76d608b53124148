"""Model-dtype cache ops and the dense paged attention op: contracts, bad input, opcheck (issue 2)."""

import pytest
import torch

from swa_rewrite import ops
from swa_rewrite.runtime import StepBatch, StepItem


def nan_cache(num_blocks=4, ps=5, D=24, dtype=torch.float32):
    return torch.full((num_blocks, ps, D), float("nan"), dtype=dtype)


def test_write_puts_rows_at_slots_and_skips_minus_one(seed):
    cache = nan_cache()
    latent = torch.randn(5, 24)
    slots = torch.tensor([7, -1, 0, 19, -1])
    ops.write_kv_cache(latent, cache, slots)
    flat = cache.view(-1, 24)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat[s], latent[i])
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[[7, 0, 19]] = False
    assert flat[untouched].isnan().all()


def test_write_of_only_padding_changes_nothing():
    cache = torch.randn(2, 3, 8)
    before = cache.clone()
    ops.write_kv_cache(torch.randn(4, 8), cache, torch.full((4,), -1))
    assert torch.equal(cache, before)


@pytest.mark.parametrize("latent,slots,match", [
    (torch.randn(3, 20), torch.tensor([0, 1, 2]), "cache rows are 24 wide"),
    (torch.randn(3, 24), torch.tensor([0, 1]), "slot_mapping has 2 entries for 3 latent rows"),
    (torch.randn(3, 24), torch.tensor([0, 20, 1]), r"slot_mapping\[1\] = 20 is out of range \[-1, 20\)"),
    (torch.randn(3, 24), torch.tensor([0, -2, 1]), r"slot_mapping\[1\] = -2"),
    (torch.randn(3, 24), torch.tensor([4, 4, -1]), "same slot twice"),
    (torch.randn(3, 24), torch.tensor([0.0, 1.0, 2.0]), "slot_mapping must be int32 or int64"),
    (torch.randn(3, 24, dtype=torch.float64), torch.tensor([0, 1, 2]), "dtype"),
])
def test_write_rejects_bad_input_without_touching_the_cache(latent, slots, match):
    cache = nan_cache()
    with pytest.raises(ValueError, match=match):
        ops.write_kv_cache(latent, cache, slots)
    assert cache.isnan().all()


def _batch(ps=4):
    items = [StepItem([1, 2, 3], 5, [2, 0], True), StepItem([4], 2, [1], False)]
    return StepBatch.build(items, ps)


def _attend(q, cache, b, **changes):
    args = dict(block_tables=b.meta.block_tables, cu_seqlens_q=b.meta.cu_seqlens_q, seq_lens_encoder=b.meta.seq_lens_encoder,
                seq_lens_decoder=b.meta.seq_lens_decoder, batch_id_per_token=b.meta.batch_id_per_token)
    args.update(changes)
    return ops.paged_mla_attention(q, cache, scale=0.1, rope_dim=8, **args)


@pytest.mark.parametrize("change,match", [
    (dict(block_tables=torch.tensor([[2], [1]], dtype=torch.int32)), "request 0 reaches position 7 but its block table holds 4"),
    (dict(block_tables=torch.tensor([[2, 9], [1, 0]], dtype=torch.int32)), r"block_tables\[0, 1\] = 9 is out of range"),
    (dict(cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int32)), "cu_seqlens_q has 2 entries, expected batch size \\+ 1 = 3"),
    (dict(seq_lens_encoder=torch.tensor([2, 0], dtype=torch.int32)), "request 0: seq_lens_encoder = 2 but cu_seqlens_q gives it 3"),
    (dict(batch_id_per_token=torch.tensor([0, 0, 1, 1], dtype=torch.int32)), r"batch_id_per_token\[2\] = 1"),
    (dict(block_tables=torch.tensor([[2.0, 0.0], [1.0, 0.0]])), "block_tables must be int32 or int64"),
])
def test_paged_attention_rejects_bad_metadata(change, match):
    q, cache = torch.randn(4, 2, 24), torch.randn(3, 4, 24)
    with pytest.raises(ValueError, match=match):
        _attend(q, cache, _batch(), **change)


def test_paged_attention_rejects_bad_shapes():
    b = _batch()
    with pytest.raises(ValueError, match="cache must be"):
        _attend(torch.randn(4, 2, 24), torch.randn(3, 4, 20), b)
    with pytest.raises(ValueError, match="q dtype torch.float64 does not match cache dtype torch.float32"):
        _attend(torch.randn(4, 2, 24, dtype=torch.float64), torch.randn(3, 4, 24), b)
    with pytest.raises(ValueError, match="batch_id_per_token has 4 entries for 5 tokens"):
        _attend(torch.randn(5, 2, 24), torch.randn(3, 4, 24), b)


def test_paged_attention_padding_rows_give_zero_and_inf():
    b = StepBatch.build([StepItem([1, 2], 0, [0], True)], 4, pad_to=4)
    out, lse = _attend(torch.randn(4, 2, 24), torch.randn(1, 4, 24), b)
    assert torch.equal(out[2:], torch.zeros_like(out[2:])) and torch.isinf(lse[2:]).all() and (lse[2:] > 0).all()
    assert torch.isfinite(out[:2]).all() and torch.isfinite(lse[:2]).all()


def test_allocation_shapes():
    assert ops.allocate_kv_cache(3, 5, 128, 16, torch.float32, "cpu").shape == (3, 5, 144)
    packed = ops.allocate_kv_cache(3, 5, 512, 64, torch.uint8, "meta", layer=2)
    assert packed.shape == (3, 5, 656) and packed.dtype == torch.uint8
    with pytest.raises(ValueError, match="page_size=0"):
        ops.allocate_kv_cache(3, 0, 128, 16, torch.float32, "cpu")


def test_opcheck():
    b = _batch()
    cache = torch.randn(3, 4, 24)
    torch.library.opcheck(torch.ops.swa_rewrite.write_kv_cache.default,
                          (torch.randn(4, 24), cache, b.meta.slot_mapping, 0, 0))
    torch.library.opcheck(torch.ops.swa_rewrite.paged_mla_attention.default,
                          (torch.randn(4, 2, 24), cache, b.meta.block_tables, b.meta.cu_seqlens_q, b.meta.seq_lens_encoder,
                           b.meta.seq_lens_decoder, b.meta.batch_id_per_token, 0.1, 8, 0, 0))
    torch.library.opcheck(torch.ops.swa_rewrite.allocate_kv_cache.default,
                          (2, 4, 16, 8, torch.float32, torch.device("cpu"), 0),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("T,D,ps,pad", [(1, 24, 4, 0), (19, 144, 7, 3), (64, 576, 16, 40)])
def test_write_kernel_matches_reference(T, D, ps, pad, seed):
    """The Triton write kernel (interpreter on CPU, compiled on CUDA) against the reference, padded block
    stride, -1 slots and NaN-poisoned unused slots included."""
    from swa_rewrite.kernels.kv_cache import write_kv_cache as kernel
    from swa_rewrite.ops.kv_cache import write_kv_cache_reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    num_blocks = -(-T // ps) + 2
    def make():
        storage = torch.full((num_blocks, ps * D + pad), float("nan"), device=device)
        return storage, storage[:, : ps * D].view(num_blocks, ps, D)
    latent = torch.randn(T, D, device=device)
    slots = torch.randperm(num_blocks * ps, device=device)[:T]
    slots[torch.rand(T, device=device) < 0.3] = -1
    s1, c1 = make()
    s2, c2 = make()
    kernel(latent, c1, slots)
    write_kv_cache_reference(latent, c2, slots)
    assert torch.equal(s1.isnan(), s2.isnan()) and torch.equal(s1.nan_to_num(), s2.nan_to_num())


def test_batch_checks_run_in_full_outside_a_step_and_never_go_stale(monkeypatch):
    """Outside a model step (``checks.validated_step``, see test_validated_step.py) every op checks its metadata:
    nothing is remembered from one call to the next, so an in-place change is always seen."""
    from swa_rewrite.ops import batch_checks

    calls = []
    real = batch_checks.check_batch_data
    monkeypatch.setattr(batch_checks, "check_batch_data", lambda *a: calls.append(1) or real(*a))
    b = _batch()
    q, cache = torch.randn(4, 2, 24), torch.randn(3, 4, 24)
    for _ in range(4):                                   # four layers' worth of calls
        _attend(q, cache, b)
    assert len(calls) == 4
    b.meta.block_tables[0, 0, 1] = 7                     # corrupted in place after it was checked
    with pytest.raises(ValueError, match=r"block_tables\[0, 1\] = 7 is out of range"):
        _attend(q, cache, b)
