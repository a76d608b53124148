"""The one Triton kernel the FlashMLA backend needs (docs/design.md §7, "FlashMLA backend"; issue 16).

FlashMLA's dense decode takes ``q [b, s_q, H, D]``, one block-table row and one key count per request. Our
steps are ragged (``cu_seqlens_q``, ``batch_id_per_token``, padding tokens), so the backend makes every query
token a FlashMLA request of one query: token ``t`` of request ``r`` at position ``p`` attends to ``p + 1`` keys
through row ``r`` of the block table. This kernel writes, in one launch, for every token::

    seqlens[t] = seq_lens_decoder[r] + t - cu_seqlens_q[r] + 1     (0 for a padding token, r = -1)
    rows[t, :] = block_tables[r, :]                                (0 for a padding token: never read)

No host synchronisation, so a decode step stays capturable in a CUDA graph. Inputs are not validated here
(the op's checks do that).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import cdiv, next_pow2

_BLOCK_COLS = 1024   # table columns per program


@triton.jit
def _decode_rows_kernel(block_tables_ptr, cu_seqlens_ptr, seq_lens_decoder_ptr, batch_id_ptr,
                        seqlens_ptr, rows_ptr, max_blocks, stride_bt_b, stride_bt_i,
                        BLOCK: tl.constexpr):
    t = tl.program_id(0)
    pid = tl.program_id(1)
    req = tl.load(batch_id_ptr + t).to(tl.int32)
    live = req >= 0
    r = tl.where(live, req, 0)
    start = tl.load(cu_seqlens_ptr + r).to(tl.int32)
    cached = tl.load(seq_lens_decoder_ptr + r).to(tl.int32)
    if pid == 0:
        n = tl.where(live, cached + t - start + 1, 0)
        tl.store(seqlens_ptr + t, n.to(tl.int32))
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    inside = cols < max_blocks
    # Row 0 stands in for a padding token's (B >= 1); its entries become 0, a block FlashMLA never reads.
    blk = tl.load(block_tables_ptr + r.to(tl.int64) * stride_bt_b + cols.to(tl.int64) * stride_bt_i,
                  mask=inside, other=0)
    blk = tl.where(live, blk, 0)
    tl.store(rows_ptr + t.to(tl.int64) * max_blocks + cols, blk.to(tl.int32), mask=inside)


def decode_rows(block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens_decoder: torch.Tensor,
                batch_id_per_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(seqlens int32 [T], rows int32 [T, nb])`` for one group's ``block_tables [B, nb]`` (any strides, B >= 1)
    and the step's per-request metadata (contiguous int32/int64); see the module docstring."""
    T = batch_id_per_token.shape[0]
    nb = block_tables.shape[1]
    seqlens = torch.empty(T, dtype=torch.int32, device=batch_id_per_token.device)
    rows = torch.empty(T, nb, dtype=torch.int32, device=batch_id_per_token.device)
    if T == 0:
        return seqlens, rows
    block = min(_BLOCK_COLS, next_pow2(max(nb, 1)))
    grid = (T, max(1, cdiv(nb, block)))
    _decode_rows_kernel[grid](block_tables, cu_seqlens_q, seq_lens_decoder, batch_id_per_token, seqlens, rows, nb,
                              block_tables.stride(0), block_tables.stride(1), BLOCK=block)
    return seqlens, rows
