"""The gathered MLA forward kernel (issue 4) in absorbed (MQA) form over a latent cache (docs/design.md §6,
§7, §10), and its paged launcher ``paged_attention_fwd``.

Each program *gathers* its keys row by row; a compile-time switch (``KEYS``) says from where:
  ``KEYS_INDICES`` — a list of cache slots per token (``indices [T, 1, K]``, ``-1`` skipped;
  ``sparse_mla.sparse_mla_attention_fwd``);
  ``KEYS_PAGED`` — positions ``lo … p`` of the token's request through its block table (``paged_attention_fwd``:
  dense full attention with ``window = 0``, SWA decode with ``window = W``; ``paged_mla`` falls back to it
  where its page tiles do not fit);
  ``KEYS_ROWS`` — the same positions in a contiguous bf16 *staging buffer* that
  ``sparse_mla._stage_windows_kernel`` filled once per step (SWA prefill: adjacent queries share most of
  their window, so every cache row is dequantised once for all of them instead of once per query; with few
  heads ``_staged_tiled_fwd_kernel`` also tiles adjacent tokens);
and how a cache row is stored (``FP8``): the packed FP8 layout of docs/design.md §6 (dequantised to bf16 in
registers) or plain model-dtype rows.

A program owns one query token, ``BLOCK_H`` heads and one split of the token's keys. The head block is the
M dimension of both matrix products (``S = Q·Kᵀ`` over ``D = R + P``, ``O += P·V`` over ``R``; V is the
first ``R`` columns of the same tile), so one dequantised tile serves ``BLOCK_H`` heads. With more than one
split (few tokens: decode) each split writes a normalised fp32 partial and its lse, and
``_common._combine_splits_kernel`` merges them lse-weighted; all grid sizes depend on shapes only, so no host
synchronisation happens and a decode step can be captured in a CUDA graph.

``_launch`` (grids, block sizes, split buffers) serves every launcher of this kernel; ``swa_rewrite.ops.attention``
reaches them through ``sparse_mla`` and ``paged_mla``. Measurements and the reasons for the configuration:
``benchmarks/NOTES-attention.md``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import fp8_format
from . import cdiv, interpreting, next_pow2
from ._common import (_LOG2E, _M_INIT, KEYS_INDICES, KEYS_PAGED, KEYS_ROWS, _attend_tile, _combine_splits_kernel,
                      _dequantize_tile, _load_queries, _load_tile, _outputs, _plan, _split_range, _store_rows,
                      split_targets)


@triton.jit
def _tile_keys(kk, k_end, idx_row_ptr, bt_row_ptr, lo, page_size, KEYS: tl.constexpr):
    """The index loads of a tile of keys ``kk [BLOCK_N]``: its slot-list entries (``KEYS_INDICES``) or the
    block ids of its positions (``KEYS_PAGED``); staging rows (``KEYS_ROWS``) need none."""
    valid = kk < k_end
    if KEYS == 0:
        key = tl.load(idx_row_ptr + kk, mask=valid, other=-1).to(tl.int64)
    elif KEYS == 1:
        key = tl.load(bt_row_ptr + (lo + kk) // page_size, mask=valid, other=0).to(tl.int64)
    else:
        key = kk.to(tl.int64)
    return key


@triton.jit
def _tile_rows(key, kk, k_end, lo, row0, page_size, stride_cb, stride_cr, KEYS: tl.constexpr):
    """Element offsets (int64) of the cache rows of keys ``kk`` and which of them are valid."""
    valid = kk < k_end
    if KEYS == 0:
        valid = valid & (key >= 0)
        slot = tl.maximum(key, 0)
        row = (slot // page_size) * stride_cb + (slot % page_size) * stride_cr
    elif KEYS == 1:
        row = key * stride_cb + ((lo + kk) % page_size) * stride_cr
    else:
        row = (row0 + kk) * stride_cr
    return row, valid


@triton.jit
def _mla_attention_fwd_kernel(
        q_ptr, cache_ptr, idx_ptr, bt_ptr, cu_ptr, dec_ptr, bid_ptr, out_ptr, lse_ptr,
        qk_scale,                                   # softmax scale · log2(e)
        H, K, window, page_size, num_splits,
        stride_qt, stride_qh,
        stride_cb, stride_cr,                       # cache block / row strides (cache elements)
        stride_it, stride_bt,
        stride_os, stride_ot, stride_oh,            # out (or partials: split, token, head)
        stride_ls, stride_lt,                       # lse (or partial lse: split, token); head stride 1
        R: tl.constexpr, P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, NT: tl.constexpr, KEYS: tl.constexpr,
        FP8: tl.constexpr, PARTIAL: tl.constexpr, INTERPRET: tl.constexpr):
    # Grid axis 0 enumerates (token, head block) pairs, head blocks of one token adjacent (axis 0 holds up
    # to 2^31 - 1 programs; T alone may pass the 65535 of axes 1 and 2).
    pid = tl.program_id(0)
    n_hb = tl.cdiv(H, BLOCK_H)
    t = (pid // n_hb).to(tl.int64)
    pid_h = pid % n_hb
    pid_s = tl.program_id(1)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    h_mask = offs_h < H

    # ---- this token's key range [0, n_keys) in key-list coordinates
    lo = 0
    row0 = 0
    bb = 0
    if KEYS == 0:                                   # KEYS_INDICES
        n_keys = K
    else:
        b = tl.load(bid_ptr + t).to(tl.int64)
        bb = tl.maximum(b, 0)
        cu_b = tl.load(cu_ptr + bb).to(tl.int64)
        dec_b = tl.load(dec_ptr + bb).to(tl.int64)
        pos = dec_b + t - cu_b
        lo = tl.where(window > 0, tl.maximum(pos - window + 1, 0), 0)     # first attended position
        n_keys = tl.where(b >= 0, pos - lo + 1, 0)
        if KEYS == 2:                               # KEYS_ROWS
            # Staging rows of request b start at cu_b + b·(W-1) and hold positions dec_b - W + 1 + j.
            row0 = cu_b + bb * (window - 1) - (dec_b - window + 1) + lo
    k_begin, k_end = _split_range(0, n_keys, num_splits, pid_s, BLOCK_N)
    idx_row_ptr = idx_ptr + t * stride_it
    bt_row_ptr = bt_ptr + bb * stride_bt

    q_lat, q_pe = _load_queries(q_ptr + t * stride_qt + offs_h * stride_qh, h_mask, R, P, BLOCK_R, BLOCK_P,
                                INTERPRET)
    m_i = tl.full([BLOCK_H], _M_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_N):
        kk = k0 + offs_n
        key = _tile_keys(kk, k_end, idx_row_ptr, bt_row_ptr, lo, page_size, KEYS)
        row, valid = _tile_rows(key, kk, k_end, lo, row0, page_size, stride_cb, stride_cr, KEYS)
        raw, sc, pe_raw = _load_tile(cache_ptr, row, valid, R, P, BLOCK_R, BLOCK_P, NT, FP8)
        kv, pe = _dequantize_tile(raw, sc, pe_raw, BLOCK_N, BLOCK_R, NT, FP8, INTERPRET)
        m_i, l_i, acc = _attend_tile(q_lat, q_pe, kv, pe, valid[None, :], m_i, l_i, acc, qk_scale)

    _store_rows(out_ptr, lse_ptr, acc, m_i, l_i, pid_s * stride_os + t * stride_ot + offs_h * stride_oh,
                pid_s * stride_ls + t * stride_lt + offs_h, h_mask, R, BLOCK_R, PARTIAL, INTERPRET)


@triton.jit
def _staged_tiled_fwd_kernel(
        q_ptr, stage_ptr, cu_ptr, dec_ptr, bid_ptr, out_ptr, lse_ptr,
        qk_scale, T, H, window, num_splits,
        stride_qt, stride_qh, stride_sr,
        stride_os, stride_ot, stride_oh, stride_ls, stride_lt,
        R: tl.constexpr, P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
        PARTIAL: tl.constexpr, INTERPRET: tl.constexpr):
    """SWA prefill over the staging rows with ``BLOCK_T`` adjacent query tokens × ``BLOCK_H`` heads per
    program (few heads: a tensor-parallel shard). Adjacent tokens' windows overlap in all but one row, so
    each key tile loaded serves all ``BLOCK_T`` tokens; row ``m`` of the ``M = BLOCK_T·BLOCK_H`` matrix
    rows is head ``m % BLOCK_H`` of token ``m // BLOCK_H`` and masks the keys outside its own window.
    Tokens of a tile may belong to two requests: their staging rows are adjacent, the masks keep them apart."""
    BLOCK_M: tl.constexpr = BLOCK_T * BLOCK_H
    pid = tl.program_id(0)
    n_hb = tl.cdiv(H, BLOCK_H)
    pid_s = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    tok = (pid // n_hb).to(tl.int64) * BLOCK_T + offs_m // BLOCK_H
    head = (pid % n_hb) * BLOCK_H + offs_m % BLOCK_H
    row_mask = (tok < T) & (head < H)
    tok_c = tl.minimum(tok, T - 1)
    head_c = tl.minimum(head, H - 1)

    # ---- each row's keys: staging rows [first, first + n_keys) (layout of _stage_windows_kernel)
    b = tl.load(bid_ptr + tok_c, mask=tok < T, other=-1).to(tl.int64)
    bb = tl.maximum(b, 0)
    cu_b = tl.load(cu_ptr + bb).to(tl.int64)
    dec_b = tl.load(dec_ptr + bb).to(tl.int64)
    pos = dec_b + tok - cu_b
    lo = tl.maximum(pos - window + 1, 0)
    n_keys = tl.where(b >= 0, pos - lo + 1, 0)
    first = cu_b + bb * (window - 1) - (dec_b - window + 1) + lo
    end = first + n_keys
    # The union of the rows' ranges, split evenly in tiles across pid_s.
    u_lo = tl.min(tl.where(n_keys > 0, first, 2**62))
    u_hi = tl.max(tl.where(n_keys > 0, end, 0))
    k_begin, k_end = _split_range(u_lo, u_hi, num_splits, pid_s, BLOCK_N)

    offs_n = tl.arange(0, BLOCK_N)
    q_lat, q_pe = _load_queries(q_ptr + tok_c * stride_qt + head_c * stride_qh, row_mask, R, P, BLOCK_R, BLOCK_P,
                                INTERPRET)
    m_i = tl.full([BLOCK_M], _M_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_N):
        rr = k0 + offs_n
        in_tile = rr < k_end
        raw, sc, pe_raw = _load_tile(stage_ptr, rr * stride_sr, in_tile, R, P, BLOCK_R, BLOCK_P,
                                     NT=1, FP8=False)   # staging rows: bf16
        kv, pe = _dequantize_tile(raw, sc, pe_raw, BLOCK_N, BLOCK_R, NT=1, FP8=False, INTERPRET=INTERPRET)
        allowed = (rr[None, :] >= first[:, None]) & (rr[None, :] < end[:, None]) & in_tile[None, :]
        m_i, l_i, acc = _attend_tile(q_lat, q_pe, kv, pe, allowed, m_i, l_i, acc, qk_scale)

    _store_rows(out_ptr, lse_ptr, acc, m_i, l_i, pid_s * stride_os + tok_c * stride_ot + head_c * stride_oh,
                pid_s * stride_ls + tok_c * stride_lt + head_c, row_mask, R, BLOCK_R, PARTIAL, INTERPRET)


# ------------------------------------------------------------------------------------------ launchers
def _launch(q, cache, out, lse, *, keys, fp8, scale, rope_dim, max_keys, idx=None, bt=None, cu=None,
            dec=None, bid=None, window=0, page_size=1, stride_cb=0, stride_cr=0, config=None, stats=None):
    T, H, D = q.shape
    R, P = D - rope_dim, rope_dim
    if dec is not None and dec.shape[0] == 0:
        # No request: every token is padding. Empty metadata tensors have no memory to read.
        out.zero_()
        lse.fill_(float("inf"))
        return out, lse
    plan = _plan(T, H, max_keys, q.device, config, keys)
    block_r = max(16, next_pow2(R))
    block_p = max(16, next_pow2(P))
    dummy = torch.empty(1, dtype=torch.int32, device=q.device)
    idx = dummy if idx is None else idx
    bt = dummy if bt is None else bt
    cu, dec, bid = (dummy if x is None else x for x in (cu, dec, bid))
    splits = plan["splits"]
    o_t, l_t, o_strides, l_strides = split_targets(out, lse, splits)
    block_t = plan["block_t"]
    grid = (cdiv(T, block_t) * plan["n_hb"], splits)
    common = dict(R=R, P=P, BLOCK_R=block_r, BLOCK_P=block_p, BLOCK_H=plan["block_h"], BLOCK_N=plan["block_n"],
                  PARTIAL=splits > 1, INTERPRET=interpreting(), num_warps=plan["num_warps"],
                  num_stages=plan["num_stages"])
    if block_t > 1 and keys != KEYS_ROWS:
        raise ValueError(f"token tiles (block_t = {block_t}) need the staged path")
    if T > 0:
        if block_t > 1:
            compiled = _staged_tiled_fwd_kernel[grid](
                q, cache, cu, dec, bid, o_t, l_t, scale * _LOG2E, T, H, window, splits,
                q.stride(0), q.stride(1), stride_cr, *o_strides, *l_strides, BLOCK_T=block_t, **common)
        else:
            compiled = _mla_attention_fwd_kernel[grid](
                q, cache, idx, bt, cu, dec, bid, o_t, l_t,
                scale * _LOG2E, H, max_keys if keys == KEYS_INDICES else 0, window, page_size, splits,
                q.stride(0), q.stride(1), stride_cb, stride_cr,
                idx.stride(0) if idx.dim() > 0 else 0, bt.stride(0) if bt.dim() > 1 else 0,
                *o_strides, *l_strides,
                NT=block_r // fp8_format.TILE if fp8 else 1, KEYS=keys, FP8=fp8, **common)
        if stats is not None:
            stats.update(attention=compiled, plan=plan)
        if splits > 1:
            bh = 16
            _combine_splits_kernel[(T, cdiv(H, bh))](
                o_t, l_t, out, lse, H, splits,  # the fp32 partials
                *o_strides, *l_strides,
                out.stride(0), out.stride(1), lse.stride(0),
                R=R, BLOCK_R=block_r, BLOCK_H=bh, INTERPRET=interpreting(),
                num_warps=4)
    return out, lse


def paged_attention_fwd(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                        cu_seqlens_q: torch.Tensor, seq_lens_decoder: torch.Tensor,
                        batch_id_per_token: torch.Tensor, scale: float, rope_dim: int, *, window: int,
                        fp8: bool, config: dict | None = None, out=None,
                        stats=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query token to positions ``max(0, p-W+1) … p`` of its request (all of ``0 … p``
    when ``window == 0``) read through ``block_tables`` from ``cache`` (packed FP8 when ``fp8``, else the
    model-dtype ``[NB, ps, D]`` cache) → ``out [T, H, R]`` (q dtype), ``lse [T, H]`` fp32."""
    R = q.shape[-1] - rope_dim
    out, lse = _outputs(q, R, out)
    capacity = block_tables.shape[1] * cache.shape[1]
    max_keys = min(window, capacity) if window > 0 else capacity
    return _launch(q, cache, out, lse, keys=KEYS_PAGED, fp8=fp8, scale=scale, rope_dim=rope_dim,
                   max_keys=max_keys, bt=block_tables, cu=cu_seqlens_q, dec=seq_lens_decoder,
                   bid=batch_id_per_token, window=window, page_size=cache.shape[1],
                   stride_cb=cache.stride(0), stride_cr=cache.stride(1), config=config, stats=stats)
