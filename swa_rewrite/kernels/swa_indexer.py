"""Sliding-window indexer (SPEC §3, §7): per query token, the cache slots of its window.

Token ``t`` of request ``b = batch_id_per_token[t]`` sits at ``p = seq_lens_decoder[b] + t - cu_seqlens_q[b]``
(cached history counts, so chunked prefill, prefix reuse and multi-token decode are one case). Entry ``k``
of its row is the slot of position ``q = p - W + 1 + k``::

    indices[t, 0, k] = block_tables[b, q // ps] * ps + q % ps     if q >= 0, else -1

and ``num_valid[t] = min(W, p + 1)``. Padding tokens (``b == -1``) get all ``-1`` and ``num_valid = 0``.

With ``s = sinks > 0`` attention sinks (SPEC §12) lead the row, which is ``s + W`` wide: column ``c < s`` is
the slot of position ``c`` where ``c <= p - W`` (below the window, so no position appears twice), else
``-1``; columns ``s + k`` are the window entries above. ``num_valid`` adds ``min(s, max(0, p - W + 1))``.

Each program fills a ``[BLOCK_T, BLOCK_W]`` tile of tokens x window entries. The page size is an argument
of every call, never assumed. By default the launcher passes it as the compile-time ``PAGE_SIZE`` (one
compilation per page size a process uses; the per-entry ``// ps`` and ``% ps`` become multiplies), which
measured 1.2-1.7x faster on an H100 (from 16K tokens x 512 entries up) than the run-time divisor
(``specialize_page_size=False``, ``PAGE_SIZE = 0``); see benchmarks/RESULTS.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import cdiv, next_pow2

_TILE_ELEMS = 2048  # window entries per program


@triton.jit
def _swa_indexer_kernel(
    block_tables_ptr, cu_seqlens_ptr, seq_lens_decoder_ptr, batch_id_ptr,
    indices_ptr, num_valid_ptr,
    num_tokens, window, sinks, page_size, max_blocks,
    stride_bt_b, stride_bt_i,
    BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, PAGE_SIZE: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_w = tl.program_id(1)
    if PAGE_SIZE > 0:
        ps = PAGE_SIZE
    else:
        ps = page_size
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)                                 # [BLOCK_T]
    tmask = tok < num_tokens
    req = tl.load(batch_id_ptr + tok, mask=tmask, other=-1).to(tl.int32)
    live = req >= 0
    req = tl.where(live, req, 0)
    start = tl.load(cu_seqlens_ptr + req, mask=tmask, other=0).to(tl.int32)
    cached = tl.load(seq_lens_decoder_ptr + req, mask=tmask, other=0).to(tl.int32)
    pos = cached + tok - start                                                    # [BLOCK_T]

    width = sinks + window
    c = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)                                   # [BLOCK_W] column
    sink = (c < sinks)[None, :]
    # A sink column holds position c, kept only below the window; a window column position p - W + 1 + k.
    q = tl.where(sink, c[None, :], pos[:, None] - window + 1 + (c - sinks)[None, :])  # [BLOCK_T, BLOCK_W]
    inside = tl.where(sink, q <= pos[:, None] - window, q >= 0)
    qc = tl.maximum(q, 0)
    page = qc // ps
    valid = live[:, None] & inside & (page < max_blocks)
    row = block_tables_ptr + req.to(tl.int64) * stride_bt_b
    blk = tl.load(row[:, None] + page.to(tl.int64) * stride_bt_i, mask=valid, other=-1)
    slot = tl.where(valid & (blk >= 0), blk * ps + (qc - page * ps), -1)

    out = indices_ptr + tok.to(tl.int64)[:, None] * width + c[None, :]
    tl.store(out, slot.to(tl.int32), mask=tmask[:, None] & (c < width)[None, :])
    if pid_w == 0:
        below = tl.minimum(tl.maximum(pos - window + 1, 0), sinks)                # sinks below the window
        n = tl.where(live, tl.minimum(pos + 1, window) + below, 0)
        tl.store(num_valid_ptr + tok, n.to(tl.int32), mask=tmask)


def swa_indexer(block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens_decoder: torch.Tensor,
                batch_id_per_token: torch.Tensor, indices: torch.Tensor, num_valid: torch.Tensor, *,
                window: int, page_size: int, sinks: int = 0, specialize_page_size: bool = True,
                tile_elems: int = _TILE_ELEMS, num_warps: int = 4) -> None:
    """Fill ``indices int32 [T, 1, sinks + window]`` (contiguous) and ``num_valid int32 [T]``.

    ``block_tables [B, max_blocks]`` (int32/int64, any strides); ``cu_seqlens_q [B+1]``,
    ``seq_lens_decoder [B]``, ``batch_id_per_token [T]`` contiguous int32/int64. Inputs are not validated
    here (the op does that).
    """
    T = batch_id_per_token.shape[0]
    width = sinks + window
    assert indices.is_contiguous() and indices.shape == (T, 1, width) and num_valid.shape == (T,)
    if T == 0:
        return
    if block_tables.shape[0] == 0:  # no request: all padding; empty metadata has no memory to read
        indices.fill_(-1)
        num_valid.zero_()
        return
    block_w = min(next_pow2(width), tile_elems)
    block_t = max(1, min(tile_elems // block_w, next_pow2(T)))
    grid = (cdiv(T, block_t), cdiv(width, block_w))
    _swa_indexer_kernel[grid](
        block_tables, cu_seqlens_q, seq_lens_decoder, batch_id_per_token, indices, num_valid,
        T, window, sinks, page_size, block_tables.shape[1], block_tables.stride(0), block_tables.stride(1),
        BLOCK_T=block_t, BLOCK_W=block_w, PAGE_SIZE=page_size if specialize_page_size else 0,
        num_warps=num_warps)
