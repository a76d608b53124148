"""Batch-metadata edge cases every attention path must survive: a step with no request (only padding),
stale ids in unused block-table columns, strided metadata views, padded block strides."""

import pytest
import torch

from swa_rewrite import ops
from swa_rewrite.kernels import swa_indexer as indexer_kernel
from swa_rewrite.kernels.gathered_mla import paged_attention_fwd
from swa_rewrite.kernels.sparse_mla import swa_attention_fwd
from swa_rewrite.ops.fp8_cache import fp8_cache_bytes
from swa_rewrite.runtime import StepBatch, StepItem

I32 = dict(dtype=torch.int32)
R, P, H = 128, 16, 4
D = R + P


def empty_step(T, device="cpu"):
    """T padding tokens and no request: the metadata tensors are empty (and have no memory behind them)."""
    return (torch.zeros(0, 3, device=device, **I32), torch.zeros(1, device=device, **I32),
            torch.zeros(0, device=device, **I32), torch.zeros(0, device=device, **I32),
            torch.full((T,), -1, device=device, **I32))


def test_kernels_on_a_step_with_no_request():
    """The Triton launchers (interpreter on CPU) must not read the empty per-request metadata."""
    bt, cu, enc, dec, bid = empty_step(5)
    idx = torch.full((5, 1, 8), 7, **I32)
    num_valid = torch.full((5,), 7, **I32)
    indexer_kernel.swa_indexer(bt, cu, dec, bid, idx, num_valid, window=8, page_size=16)
    assert bool((idx == -1).all()) and num_valid.tolist() == [0] * 5
    q = torch.randn(5, H, D).to(torch.bfloat16)
    bf16_cache = torch.full((2, 16, D), float("nan")).to(torch.bfloat16)
    packed = torch.full((2, 16, fp8_cache_bytes(R, P)), 255, dtype=torch.uint8)
    runs = [paged_attention_fwd(q, bf16_cache, bt, cu, dec, bid, 0.1, P, window=0, fp8=False),
            swa_attention_fwd(q, packed, bt, cu, dec, bid, 0.1, P, 8, staged=False),
            swa_attention_fwd(q, packed, bt, cu, dec, bid, 0.1, P, 8, staged=True)]
    for out, lse in runs:
        assert torch.equal(out.float(), torch.zeros(5, H, R)) and bool(torch.isposinf(lse).all())


def test_ops_on_a_step_with_no_request():
    bt, cu, enc, dec, bid = empty_step(3)
    q = torch.randn(3, H, D)
    out, lse = ops.paged_mla_attention(q, torch.randn(2, 16, D), bt, cu, enc, dec, bid, 0.1, rope_dim=P)
    assert torch.equal(out, torch.zeros(3, H, R)) and bool(torch.isposinf(lse).all())
    out, lse = ops.swa_mla_attention(q, torch.zeros(2, 16, fp8_cache_bytes(R, P), dtype=torch.uint8), bt, cu,
                                     enc, dec, bid, 0.1, rope_dim=P, window=4)
    assert torch.equal(out, torch.zeros(3, H, R)) and bool(torch.isposinf(lse).all())


def test_stale_block_ids_in_unused_columns_are_never_read():
    b = StepBatch.build([StepItem([1, 2, 3], 0, [1], True)], 16, max_blocks=3)
    table = b.meta.block_tables.clone()
    table[0, 1:] = 4000                       # stale ids far outside the cache, past the request's end
    cache = torch.randn(2, 16, D)
    q = torch.randn(3, H, D)
    args = (b.meta.cu_seqlens_q, b.meta.seq_lens_encoder, b.meta.seq_lens_decoder, b.meta.batch_id_per_token, 0.1)
    got = ops.paged_mla_attention(q, cache, table, *args, rope_dim=P)
    ref = ops.paged_mla_attention(q, cache, b.meta.block_tables, *args, rope_dim=P)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_padded_block_stride_for_the_model_dtype_cache(seed):
    """Blocks may sit further apart than ps·D elements (docs/design.md §6 allows it for every cache)."""
    storage = torch.full((3, 16 * D + 40), float("nan"))
    cache = storage[:, : 16 * D].view(3, 16, D)
    assert cache.stride(0) == 16 * D + 40
    latent = torch.randn(4, D)
    slots = torch.tensor([0, 17, -1, 47])
    ops.write_kv_cache(latent, cache, slots)
    assert torch.equal(cache[0, 0], latent[0]) and torch.equal(cache[1, 1], latent[1])
    assert torch.equal(cache[2, 15], latent[3])
    assert bool(storage[:, 16 * D:].isnan().all())  # the padding between blocks is untouched


@pytest.mark.gpu
def test_strided_metadata_views_on_cuda(seed):
    """Column-strided block tables (and other metadata views) give the same result as contiguous ones."""
    b = StepBatch.build([StepItem(list(range(20)), 0, [2, 0], True), StepItem([5], 30, [1, 3], False)], 16,
                        device="cuda")
    table = b.meta.block_tables[0]                                            # [B, nb] of the one group
    wide = torch.stack([table, torch.full_like(table, 999)], dim=-1).flatten(1)
    strided = wide[:, ::2]
    assert strided.stride(1) == 2 and torch.equal(strided, table)
    q = torch.randn(b.input_ids.shape[0], 16, 576, device="cuda").to(torch.bfloat16)
    cache = torch.randn(4, 16, 576, device="cuda").to(torch.bfloat16)
    args = (b.meta.cu_seqlens_q, b.meta.seq_lens_encoder, b.meta.seq_lens_decoder, b.meta.batch_id_per_token, 0.07)
    got = ops.paged_mla_attention(q, cache, strided, *args, rope_dim=64)
    ref = ops.paged_mla_attention(q, cache, table, *args, rope_dim=64)
    assert torch.equal(got[0], ref[0])
    packed = torch.zeros(4, 16, 656, dtype=torch.uint8, device="cuda")
    ops.write_fp8_cache(torch.randn(64, 576, device="cuda").to(torch.bfloat16), packed,
                        torch.arange(64, device="cuda"))
    got = ops.swa_mla_attention(q, packed, strided, *args, rope_dim=64, window=8)
    ref = ops.swa_mla_attention(q, packed, table, *args, rope_dim=64, window=8)
    assert torch.equal(got[0], ref[0])


# ------------------------------------------------------------------- found in review (second session)
def test_steps_with_no_token():
    """T = 0 (an idle data-parallel rank): every attention op returns empty outputs."""
    packed = torch.zeros(2, 16, fp8_cache_bytes(R, P), dtype=torch.uint8)
    q = torch.randn(0, H, D)
    out, lse = ops.sparse_mla_attention(q, packed, torch.zeros(0, 1, 8, **I32), 0.1, rope_dim=P)
    assert out.shape == (0, H, R) and lse.shape == (0, H)
    for bt, cu, enc, dec, bid in (empty_step(0), (torch.zeros(1, 2, **I32), torch.zeros(2, **I32),
                                                  torch.zeros(1, **I32), torch.tensor([5], **I32),
                                                  torch.zeros(0, **I32))):
        out, lse = ops.swa_mla_attention(q, packed, bt, cu, enc, dec, bid, 0.1, rope_dim=P, window=4)
        assert out.shape == (0, H, R) and lse.shape == (0, H)
    out, lse = _sparse_kernel_launch(q.to(torch.bfloat16), packed, torch.zeros(0, 1, 8, **I32))
    assert out.shape == (0, H, R)


def _sparse_kernel_launch(q, cache, idx):
    from swa_rewrite.kernels.sparse_mla import sparse_mla_attention_fwd
    return sparse_mla_attention_fwd(q, cache, idx, 0.1, P)


def test_checks_work_in_inference_mode():
    """Tensors made under ``torch.inference_mode`` have no version counter; the checks must not need one."""
    b = StepBatch.build([StepItem([1, 2, 3], 0, [1], True)], 16)
    with torch.inference_mode():
        bt = b.meta.block_tables.clone()
        args = (b.meta.cu_seqlens_q.clone(), b.meta.seq_lens_encoder.clone(), b.meta.seq_lens_decoder.clone(),
                b.meta.batch_id_per_token.clone(), 0.1)
        out, _ = ops.paged_mla_attention(torch.randn(3, H, D), torch.randn(2, 16, D), bt, *args, rope_dim=P)
        assert out.shape == (3, H, R)
        bt[0, 0] = 9
        with pytest.raises(ValueError, match=r"block_tables\[0, 0\] = 9 is out of range \[0, 2\)"):
            ops.paged_mla_attention(torch.randn(3, H, D), torch.randn(2, 16, D), bt, *args, rope_dim=P)


def test_metadata_refilled_behind_torchs_back_is_checked_again():
    """A buffer rewritten without a version bump (numpy view, DLPack, a kernel) is validated again: the
    per-step check memory is keyed on content, not on tensor identity."""
    b = StepBatch.build([StepItem([1, 2, 3], 0, [1], True)], 16)
    args = (b.meta.cu_seqlens_q, b.meta.seq_lens_encoder, b.meta.seq_lens_decoder, b.meta.batch_id_per_token, 0.1)
    cache, bt = torch.randn(2, 16, D), b.meta.block_tables.clone()
    ops.paged_mla_attention(torch.randn(3, H, D), cache, bt, *args, rope_dim=P)
    version = bt._version
    bt.numpy()[0, 0] = 1000
    assert bt._version == version
    with pytest.raises(ValueError, match=r"block_tables\[0, 0\] = 1000 is out of range \[0, 2\)"):
        ops.paged_mla_attention(torch.randn(3, H, D), cache, bt, *args, rope_dim=P)


def test_a_step_with_no_request_still_checks_its_tokens():
    bt, cu, enc, dec, bid = empty_step(2)
    q, cache = torch.randn(2, H, D), torch.randn(2, 16, D)
    with pytest.raises(ValueError, match=r"cu_seqlens_q must start at 0.*got \[2\]"):
        ops.paged_mla_attention(q, cache, bt, torch.tensor([2], **I32), enc, dec, bid, 0.1, rope_dim=P)
    with pytest.raises(ValueError, match=r"batch_id_per_token\[0\] = 0 does not match"):
        ops.paged_mla_attention(q, cache, bt, cu, enc, dec, torch.zeros(2, **I32), 0.1, rope_dim=P)


def test_metadata_on_two_devices_is_rejected():
    b = StepBatch.build([StepItem([1, 2, 3], 0, [1], True)], 16)
    with pytest.raises(ValueError, match="metadata tensors must be on one device"):
        ops.paged_mla_attention(torch.randn(3, H, D), torch.randn(2, 16, D), b.meta.block_tables,
                                b.meta.cu_seqlens_q.to("meta"), b.meta.seq_lens_encoder, b.meta.seq_lens_decoder,
                                b.meta.batch_id_per_token, 0.1, rope_dim=P)


@pytest.mark.parametrize("page_size", [1, 8, 53])
def test_indexer_rejects_blocks_whose_slots_overflow_int32(page_size):
    limit = 2**31 // page_size
    bt = torch.tensor([[limit - 1]], **I32)
    meta = (torch.tensor([0, 1], **I32), torch.tensor([1], **I32), torch.tensor([0], **I32), torch.zeros(1, **I32))
    idx = ops.swa_indexer(bt, *meta, window=1, page_size=page_size)
    assert int(idx[0, 0, 0]) == (limit - 1) * page_size          # the largest slot that fits
    with pytest.raises(ValueError, match=rf"block_tables\[0, 0\] = {limit} is out of range \[0, {limit}\)"):
        ops.swa_indexer(torch.tensor([[limit]]), *meta, window=1, page_size=page_size)   # int64 table


def test_window_far_beyond_the_context_on_cpu(seed):
    """A Hugging Face-sized window (128K) over a short prompt: same result as W = context, without
    materialising T × 128K indices."""
    b = StepBatch.build([StepItem(list(range(40)), 0, [3, 1, 0], True), StepItem([7], 20, [2, 4], False)], 16)
    cache = torch.full((5, 16, fp8_cache_bytes(R, P)), 255, dtype=torch.uint8)
    ops.write_fp8_cache(torch.randn(41, D), cache, b.meta.slot_mapping, rope_dim=P)
    history = [2 * 16 + p for p in range(16)] + [4 * 16 + p for p in range(4)]      # request 1's 20 cached
    cache.view(-1, cache.shape[-1])[history] = 0                                     # zero latents
    args = (b.meta.block_tables, *b.meta.batch_tensors(), 0.1)
    q = torch.randn(41, H, D)
    huge = ops.swa_mla_attention(q, cache, *args, rope_dim=P, window=131072)
    exact = ops.swa_mla_attention(q, cache, *args, rope_dim=P, window=41)
    torch.testing.assert_close(huge, exact, rtol=1e-6, atol=1e-6)
