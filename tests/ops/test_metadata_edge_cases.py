"""Batch-metadata edge cases every attention path must survive: a step with no request (only padding),
stale ids in unused block-table columns, strided metadata views, padded block strides."""

import pytest
import torch

from swa_rewrite import ops
from swa_rewrite.kernels import swa_indexer as indexer_kernel
from swa_rewrite.kernels.sparse_mla import paged_attention_fwd, swa_attention_fwd
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
    runs = [paged_attention_fwd(q, bf16_cache, bt, cu, dec, bid, 0.1, P, 0, False),
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
    table = b.block_tables.clone()
    table[0, 1:] = 4000                       # stale ids far outside the cache, past the request's end
    cache = torch.randn(2, 16, D)
    q = torch.randn(3, H, D)
    args = (b.cu_seqlens_q, b.seq_lens_encoder, b.seq_lens_decoder, b.batch_id_per_token, 0.1)
    got = ops.paged_mla_attention(q, cache, table, *args, rope_dim=P)
    ref = ops.paged_mla_attention(q, cache, b.block_tables, *args, rope_dim=P)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_padded_block_stride_for_the_model_dtype_cache(seed):
    """Blocks may sit further apart than ps·D elements (SPEC §6 allows it for every cache)."""
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
    wide = torch.stack([b.block_tables, torch.full_like(b.block_tables, 999)], dim=-1).flatten(1)
    strided = wide[:, ::2]
    assert strided.stride(1) == 2 and torch.equal(strided, b.block_tables)
    q = torch.randn(b.input_ids.shape[0], 16, 576, device="cuda").to(torch.bfloat16)
    cache = torch.randn(4, 16, 576, device="cuda").to(torch.bfloat16)
    args = (b.cu_seqlens_q, b.seq_lens_encoder, b.seq_lens_decoder, b.batch_id_per_token, 0.07)
    got = ops.paged_mla_attention(q, cache, strided, *args, rope_dim=64)
    ref = ops.paged_mla_attention(q, cache, b.block_tables, *args, rope_dim=64)
    assert torch.equal(got[0], ref[0])
    packed = torch.zeros(4, 16, 656, dtype=torch.uint8, device="cuda")
    ops.write_fp8_cache(torch.randn(64, 576, device="cuda").to(torch.bfloat16), packed,
                        torch.arange(64, device="cuda"))
    got = ops.swa_mla_attention(q, packed, strided, *args, rope_dim=64, window=8)
    ref = ops.swa_mla_attention(q, packed, b.block_tables, *args, rope_dim=64, window=8)
    assert torch.equal(got[0], ref[0])
