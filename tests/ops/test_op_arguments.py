"""Plain arguments of the ops (ints, scale) and unsupported cache dtypes: a clear error naming the value (issue 11)."""

import math

import numpy as np
import pytest
import torch

from swa_rewrite import ops
from swa_rewrite.runtime import StepBatch, StepItem

R, P, H = 128, 16, 2
D = R + P
PS = 4


def _meta():
    b = StepBatch.build([StepItem([1, 2, 3], 5, [2, 0], True), StepItem([4], 2, [1], False)], PS)
    return dict(block_tables=b.meta.block_tables, cu_seqlens_q=b.meta.cu_seqlens_q,
                seq_lens_encoder=b.meta.seq_lens_encoder, seq_lens_decoder=b.meta.seq_lens_decoder,
                batch_id_per_token=b.meta.batch_id_per_token)


def _packed_cache():
    cache = torch.zeros(3, PS, ops.fp8_cache_bytes(R, P), dtype=torch.uint8)
    ops.write_fp8_cache(torch.randn(3 * PS, D), cache, torch.arange(3 * PS), rope_dim=P)
    return cache


def _calls(window=4, page_size=PS, rope_dim=P, scale=0.1):
    """Every public op function taking ``window`` / ``page_size`` / ``rope_dim`` / ``scale``, as thunks."""
    q, meta, packed = torch.randn(4, H, D), _meta(), _packed_cache()
    idx = torch.zeros(4, 1, 3, dtype=torch.int32)
    return {
        "swa_indexer": lambda: ops.swa_indexer(**meta, window=window, page_size=page_size),
        "write_fp8_cache": lambda: ops.write_fp8_cache(torch.randn(2, D), packed.clone(), torch.tensor([0, 5]),
                                                       rope_dim=rope_dim),
        "dequantize_fp8_cache": lambda: ops.dequantize_fp8_cache(packed, rope_dim=rope_dim),
        "sparse_mla_attention": lambda: ops.sparse_mla_attention(q, packed, idx, scale, rope_dim=rope_dim),
        "swa_mla_attention": lambda: ops.swa_mla_attention(q, packed, **meta, scale=scale, window=window,
                                                           rope_dim=rope_dim),
        "paged_mla_attention": lambda: ops.paged_mla_attention(q, torch.randn(3, PS, D), **meta, scale=scale,
                                                               rope_dim=rope_dim),
        "allocate_kv_cache": lambda: ops.allocate_kv_cache(2, page_size, R, rope_dim, torch.uint8),
    }


def test_numpy_integers_give_the_same_results_as_ints(seed):
    torch.manual_seed(seed)
    plain = {name: call() for name, call in _calls().items()}
    torch.manual_seed(seed)
    numpy = {name: call() for name, call in _calls(np.int64(4), np.int32(PS), np.int64(P), np.float32(0.1)).items()}
    for name in plain:
        a, b = plain[name], numpy[name]
        if name == "allocate_kv_cache":       # contents undefined
            a, b = a.shape, b.shape
        assert str(a) == str(b), name
    assert numpy["swa_indexer"].shape == (4, 1, 4)


@pytest.mark.parametrize("argument,value", [("window", True), ("window", 4.0), ("page_size", True),
                                            ("page_size", 4.0), ("rope_dim", True), ("rope_dim", 16.0)])
def test_bools_and_floats_are_type_errors_naming_the_value(argument, value):
    calls = _calls(**{argument: value})
    names = [n for n in calls if n != "swa_indexer" or argument != "rope_dim"]
    names = [n for n in names if argument != "window" or n in ("swa_indexer", "swa_mla_attention")]
    names = [n for n in names if argument != "page_size" or n in ("swa_indexer", "allocate_kv_cache")]
    assert names
    for name in names:
        with pytest.raises(TypeError, match=rf"{argument} must be an integer, got {value!r}"):
            calls[name]()


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_non_finite_scale_is_a_value_error(scale):
    for name in ("sparse_mla_attention", "swa_mla_attention", "paged_mla_attention"):
        with pytest.raises(ValueError, match=f"scale must be .*finite.*got {scale}"):
            _calls(scale=scale)[name]()
    # Graphs call the ops directly: the op itself checks too (and so does its fake, at trace time).
    q, meta = torch.randn(4, H, D), _meta()
    with pytest.raises(ValueError, match=f"scale must be a finite softmax scale, got {scale}"):
        torch.ops.swa_rewrite.swa_mla_attention(q, _packed_cache(), *meta.values(), scale, P, 4, 0, 0)
    with torch.device("meta"), pytest.raises(ValueError, match="finite softmax scale"):
        torch.ops.swa_rewrite.paged_mla_attention(torch.empty(4, H, D), torch.empty(3, PS, D),
                                                  *(t.to("meta") for t in meta.values()), scale, P, 0, 0)


def test_scale_of_the_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="scale must be a float, got '0.1'"):
        _calls(scale="0.1")["sparse_mla_attention"]()


def test_unsupported_cache_dtypes_are_named():
    q, meta = torch.randn(4, H, D), _meta()
    packed = _packed_cache()
    # A packed-width cache that is not uint8.
    with pytest.raises(ValueError, match=r"rows are 164 wide, the packed FP8 layout, but its dtype is torch.float16"):
        ops.paged_mla_attention(q.half(), packed.half(), **meta, scale=0.1, rope_dim=P)
    with pytest.raises(ValueError, match=r"packed FP8 cache \(uint8\), got torch.float16"):
        ops.swa_mla_attention(q, packed.half(), **meta, scale=0.1, window=4, rope_dim=P)
    with pytest.raises(ValueError, match=r"packed FP8 cache \(uint8\), got torch.float16"):
        ops.sparse_mla_attention(q, packed.half(), torch.zeros(4, 1, 3, dtype=torch.int32), 0.1, rope_dim=P)
    # Integer caches and queries.
    with pytest.raises(ValueError, match=r"model-dtype cache .* or the packed FP8 cache \(uint8\), got torch.int32"):
        ops.paged_mla_attention(q, torch.zeros(3, PS, D, dtype=torch.int32), **meta, scale=0.1, rope_dim=P)
    with pytest.raises(ValueError, match="q must be a floating-point tensor, got torch.int32"):
        ops.paged_mla_attention(q.int(), torch.zeros(3, PS, D, dtype=torch.int32), **meta, scale=0.1, rope_dim=P)
    cache = torch.zeros(3, PS, D, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"or the packed FP8 cache \(uint8\), got torch.int32"):
        ops.write_kv_cache(torch.zeros(2, D, dtype=torch.int32), cache, torch.tensor([0, 1]))
    assert (cache == 0).all()
    with pytest.raises(ValueError, match=r"cache dtype must be .* or torch.uint8 .*, got torch.int32"):
        ops.allocate_kv_cache(2, PS, R, P, torch.int32)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype, got 'uint8'"):
        ops.allocate_kv_cache(2, PS, R, P, "uint8")
