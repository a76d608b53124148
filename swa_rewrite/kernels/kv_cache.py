"""Model-dtype latent-cache write: copy each token's latent row ``[D]`` to its paged slot.

One program handles ``BLOCK_T`` tokens and walks the row in ``BLOCK_D`` chunks; ``-1`` slots (padding)
store nothing. Addresses are int64 (``slot × row stride`` passes 2^31 on large caches).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import cdiv
from .launch import launch


@triton.jit
def _write_kv_cache_kernel(latent_ptr, cache_ptr, slot_ptr, T, D, page_size,
                           stride_lt, stride_cb, stride_cr,
                           BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = toks < T
    slot = tl.load(slot_ptr + toks, mask=tmask, other=-1).to(tl.int64)
    live = tmask & (slot >= 0)
    src = latent_ptr + toks.to(tl.int64)[:, None] * stride_lt
    dst = cache_ptr + (slot // page_size)[:, None] * stride_cb + (slot % page_size)[:, None] * stride_cr
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = live[:, None] & (d < D)[None, :]
        row = tl.load(src + d[None, :], mask=mask)
        tl.store(dst + d[None, :], row.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, *,
                   block_t: int = 8, block_d: int = 128, num_warps: int = 4) -> None:
    """Write ``latent [T, D]`` (unit last stride) into ``cache [num_blocks, ps, D]`` (unit last stride, any
    block/row strides) at ``slot_mapping [T]`` (int32/int64, contiguous). Not validated here (the op does)."""
    T, D = latent.shape
    if T == 0:
        return
    grid = (cdiv(T, block_t),)
    launch(_write_kv_cache_kernel, grid, latent, cache, slot_mapping, T, D, cache.shape[1],
           latent.stride(0), cache.stride(0), cache.stride(1), BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps)
