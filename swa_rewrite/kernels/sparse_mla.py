"""Triton kernels for MLA attention in absorbed (MQA) form over a latent cache (docs/design.md §6, §7, §10).

One forward kernel serves every attention op of the package; compile-time switches pick

- where a query's keys come from (``KEYS``):
  ``KEYS_INDICES`` — a list of cache slots per token (``indices [T, 1, K]``, ``-1`` skipped; sparse op);
  ``KEYS_PAGED`` — positions ``lo … p`` of the token's request through its block table (dense full
  attention with ``window = 0``, SWA decode with ``window = W``);
  ``KEYS_ROWS`` — the same positions in a contiguous bf16 *staging buffer* that ``_stage_windows_kernel``
  filled once per step (SWA prefill: adjacent queries share most of their window, so every cache row is
  dequantised once for all of them instead of once per query);
- how a cache row is stored (``FP8``): the packed FP8 layout of docs/design.md §6 (dequantised to bf16 in registers)
  or plain model-dtype rows.

A program owns one query token, ``BLOCK_H`` heads and one split of the token's keys. The head block is the
M dimension of both matrix products (``S = Q·Kᵀ`` over ``D = R + P``, ``O += P·V`` over ``R``; V is the
first ``R`` columns of the same tile), so one dequantised tile serves ``BLOCK_H`` heads. With more than one
split (few tokens: decode) each split writes a normalised fp32 partial and its lse, and
``_combine_splits_kernel`` merges them lse-weighted; all grid sizes depend on shapes only, so no host
synchronisation happens and a decode step can be captured in a CUDA graph.

Launchers (grids, block sizes, allocation) are at the bottom; ``swa_rewrite.ops.attention`` calls them.
Decode-like SWA steps go through ``paged_mla.paged_tiles_fwd``, which runs this kernel (``KEYS_PAGED``) or
the page-tile kernel of ``paged_mla`` (issue 17).
Measurements and the reasons for the configuration: ``benchmarks/NOTES-attention.md``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import fp8_format
from . import interpreting

KEYS_INDICES, KEYS_PAGED, KEYS_ROWS = 0, 1, 2

_LOG2E = 1.4426950408889634
_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
# Running-max start value. Finite on purpose: exp2(m_old - m_new) stays defined while every key seen so
# far is masked (-inf scores), and masked scores still give exp2(-inf - m) = 0.
_M_INIT: tl.constexpr = tl.constexpr(-1.0e30)
# The packed FP8 row (swa_rewrite.fp8_format, docs/design.md §6), as constants the JIT code can read.
_TILE: tl.constexpr = tl.constexpr(fp8_format.TILE)
_SCALE_BYTES: tl.constexpr = tl.constexpr(fp8_format.SCALE_BYTES)


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
def _load_tile(cache_ptr, row, valid, R: tl.constexpr, P: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_P: tl.constexpr, NT: tl.constexpr, FP8: tl.constexpr):
    """Raw cache rows: latent ``[BLOCK_N, BLOCK_R]`` (e4m3 bytes or model dtype), tile scales
    ``[BLOCK_N, NT]`` fp32 (FP8 only, else ones) and rope ``[BLOCK_N, BLOCK_P]``; masked entries are 0."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, NT)
    lat_mask = valid[:, None] & (offs_r < R)[None, :]
    pe_mask = valid[:, None] & (offs_p < P)[None, :]
    if FP8:
        # Packed row: R × e4m3 | R/128 × fp32 scale | P × bf16 (fp8_format.scale_offset / rope_offset).
        SCALE_OFF: tl.constexpr = R
        ROPE_OFF: tl.constexpr = SCALE_OFF + _SCALE_BYTES * (R // _TILE)
        raw = tl.load(cache_ptr + row[:, None] + offs_r[None, :], mask=lat_mask, other=0)
        sc_ptr = (cache_ptr + row[:, None] + SCALE_OFF + _SCALE_BYTES * offs_c[None, :]).to(
            tl.pointer_type(tl.float32))
        sc = tl.load(sc_ptr, mask=valid[:, None] & (offs_c < R // _TILE)[None, :], other=0.0)
        pe_ptr = (cache_ptr + row[:, None] + ROPE_OFF).to(tl.pointer_type(tl.bfloat16))
        pe = tl.load(pe_ptr + offs_p[None, :], mask=pe_mask, other=0.0)
    else:
        raw = tl.load(cache_ptr + row[:, None] + offs_r[None, :], mask=lat_mask, other=0.0)
        sc = tl.full([row.shape[0], NT], 1.0, tl.float32)
        pe = tl.load(cache_ptr + row[:, None] + R + offs_p[None, :], mask=pe_mask, other=0.0)
    return raw, sc, pe


@triton.jit
def _dequantize_tile(raw, sc, pe, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, NT: tl.constexpr,
                     FP8: tl.constexpr, INTERPRET: tl.constexpr):
    """Raw rows → latent ``[BLOCK_N, BLOCK_R]`` and rope in bf16 (fp32 when ``INTERPRET``)."""
    if FP8:
        x = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        # Power-of-two scales: the product is exact, and so is its rounding to bf16.
        x = tl.reshape(x, [BLOCK_N, NT, _TILE]) * sc[:, :, None]
        lat = tl.reshape(x, [BLOCK_N, BLOCK_R]).to(tl.bfloat16)
    else:
        lat = raw
    if INTERPRET:
        # The Triton interpreter's bf16 dot is wrong; fp32 operands are exact there. Never set on GPU.
        lat = lat.to(tl.float32)
        pe = pe.to(tl.float32)
    return lat, pe


@triton.jit
def _split_range(lo, hi, num_splits, pid_s, BLOCK_N: tl.constexpr):
    """``[begin, end)`` of split ``pid_s`` when keys ``[lo, hi)`` are cut into ``num_splits`` runs of whole
    ``BLOCK_N`` tiles (empty for splits past the end)."""
    tiles = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N), num_splits)
    begin = lo + pid_s * tiles * BLOCK_N
    return begin, tl.minimum(hi, begin + tiles * BLOCK_N)


@triton.jit
def _load_queries(row_ptrs, row_mask, R: tl.constexpr, P: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_P: tl.constexpr, INTERPRET: tl.constexpr):
    """Query rows at ``row_ptrs [M]``: latent part ``[M, BLOCK_R]`` and rope part ``[M, BLOCK_P]``."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_P)
    q_lat = tl.load(row_ptrs[:, None] + offs_r[None, :], mask=row_mask[:, None] & (offs_r < R)[None, :], other=0.0)
    q_pe = tl.load(row_ptrs[:, None] + R + offs_p[None, :], mask=row_mask[:, None] & (offs_p < P)[None, :],
                   other=0.0)
    if INTERPRET:
        q_lat = q_lat.to(tl.float32)
        q_pe = q_pe.to(tl.float32)
    return q_lat, q_pe


@triton.jit
def _attend_tile(q_lat, q_pe, kv, pe, allowed, m_i, l_i, acc, qk_scale):
    """One online-softmax step: scores of the ``M`` query rows against a tile of keys where ``allowed``
    (``[M or 1, BLOCK_N]``), running max ``m_i`` (log2 units), running sum ``l_i`` and unnormalised output
    ``acc [M, BLOCK_R]`` updated."""
    s = tl.dot(q_pe, tl.trans(pe))
    s = tl.dot(q_lat, tl.trans(kv), s)                                      # [M, BLOCK_N]
    s = tl.where(allowed, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(kv.dtype), kv, acc * alpha[:, None])                  # [BLOCK_H, BLOCK_R]
    return m_new, l_i, acc


@triton.jit
def _round_to_bf16_grid(x):
    """Round fp32 ``x`` to the nearest bf16 value (ties to even), kept in fp32. Only for the interpreter,
    whose fp32→bf16 conversion truncates where the GPU rounds to nearest."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


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
def _store_rows(out_ptr, lse_ptr, acc, m_i, l_i, o_row_offs, lse_offs, row_mask, R: tl.constexpr,
                BLOCK_R: tl.constexpr, PARTIAL: tl.constexpr, INTERPRET: tl.constexpr):
    """Normalise and store ``M`` rows: ``out`` at element offsets ``o_row_offs [M]`` (+ column), natural-log
    ``lse`` at ``lse_offs [M]``. A row with no key gets ``out = 0`` and ``lse = +inf`` (a partial: ``-inf``,
    weight 0 in the combine)."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = (m_i + tl.math.log2(l_safe)) * _LN2
    if PARTIAL:
        lse = tl.where(empty, float("-inf"), lse)
    else:
        lse = tl.where(empty, float("inf"), lse)
    if INTERPRET and out_ptr.dtype.element_ty == tl.bfloat16:
        o = _round_to_bf16_grid(o)
    offs_r = tl.arange(0, BLOCK_R)
    tl.store(out_ptr + o_row_offs[:, None] + offs_r[None, :], o.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (offs_r < R)[None, :])
    tl.store(lse_ptr + lse_offs, lse, mask=row_mask)


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


@triton.jit
def _combine_splits_kernel(part_o_ptr, part_lse_ptr, out_ptr, lse_ptr, H, num_splits,
                           stride_pos, stride_pot, stride_poh, stride_pls, stride_plt,
                           stride_ot, stride_oh, stride_lt,
                           R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
                           INTERPRET: tl.constexpr):
    """out = Σ_s exp(lse_s - lse)·o_s with lse = log Σ_s exp(lse_s); no key anywhere → out 0, lse +inf."""
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    h_mask = offs_h < H
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    for s in range(num_splits):
        ls = tl.load(part_lse_ptr + s * stride_pls + t * stride_plt + offs_h, mask=h_mask, other=float("-inf"))
        m = tl.maximum(m, ls)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    mask = h_mask[:, None] & (offs_r < R)[None, :]
    for s in range(num_splits):
        ls = tl.load(part_lse_ptr + s * stride_pls + t * stride_plt + offs_h, mask=h_mask, other=float("-inf"))
        w = tl.exp(ls - m_safe)
        o = tl.load(part_o_ptr + s * stride_pos + t * stride_pot + offs_h[:, None] * stride_poh + offs_r[None, :],
                    mask=mask, other=0.0)
        denom += w
        acc += w[:, None] * o
    out = acc / tl.where(denom == 0.0, 1.0, denom)[:, None]
    lse = tl.where(m == float("-inf"), float("inf"), m_safe + tl.log(tl.where(denom == 0.0, 1.0, denom)))
    if INTERPRET and out_ptr.dtype.element_ty == tl.bfloat16:
        out = _round_to_bf16_grid(out)
    tl.store(out_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs_r[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + t * stride_lt + offs_h, lse, mask=h_mask)


@triton.jit
def _stage_windows_kernel(cache_ptr, bt_ptr, cu_ptr, dec_ptr, stage_ptr, window, page_size,
                          stride_cb, stride_cr, stride_bt, stride_sr,
                          R: tl.constexpr, P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                          BLOCK_N: tl.constexpr, NT: tl.constexpr, FP8: tl.constexpr):
    """Dequantise the positions ``dec_b - W + 1 … dec_b + q_len_b - 1`` of request ``b`` (those ≥ 0) into
    staging rows ``cu_b + b·(W-1) + j`` (bf16 ``[rows, R + P]``): the union of the windows of this step's
    query tokens of ``b``, each cache row read once."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cu_b = tl.load(cu_ptr + b).to(tl.int64)
    n_rows = tl.load(cu_ptr + b + 1).to(tl.int64) - cu_b + window - 1
    kpos = tl.load(dec_ptr + b).to(tl.int64) - window + 1 + j
    valid = (j < n_rows) & (kpos >= 0)
    if tl.program_id(1) * BLOCK_N < n_rows:
        kpos = tl.maximum(kpos, 0)
        blk = tl.load(bt_ptr + b * stride_bt + kpos // page_size, mask=valid, other=0).to(tl.int64)
        row = blk * stride_cb + (kpos % page_size) * stride_cr
        raw, sc, pe = _load_tile(cache_ptr, row, valid, R, P, BLOCK_R, BLOCK_P, NT, FP8)
        lat, pe = _dequantize_tile(raw, sc, pe, BLOCK_N, BLOCK_R, NT, FP8, INTERPRET=False)   # bf16 staging
        dst = stage_ptr + (cu_b + b * (window - 1) + j)[:, None] * stride_sr
        offs_r = tl.arange(0, BLOCK_R)
        offs_p = tl.arange(0, BLOCK_P)
        # Rows of negative positions are written too, as zeros: the token-tiled kernel loads whole tiles of
        # the union of its tokens' ranges and masks scores only, so no staging row may hold garbage.
        rows = (j < n_rows)[:, None]
        tl.store(dst + offs_r[None, :], lat.to(stage_ptr.dtype.element_ty), mask=rows & (offs_r < R)[None, :])
        tl.store(dst + R + offs_p[None, :], pe.to(stage_ptr.dtype.element_ty), mask=rows & (offs_p < P)[None, :])


# ------------------------------------------------------------------------------------------ launchers
@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


# Tunables of the forward kernel, chosen from measurements (benchmarks/NOTES-attention.md).
# `min_tiles_per_split`: a split must cover at least this many BLOCK_N tiles, so partial outputs
# (H·R·4 bytes written and read per split) stay small next to the cache bytes they summarise.
DEFAULT_CONFIG = dict(block_n=64, num_warps=8, num_stages=2, min_tiles_per_split=2, stage_block_n=32)


def _plan(T: int, H: int, max_keys: int, device: torch.device, config: dict | None, keys: int = KEYS_INDICES):
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    # Few heads (a tensor-parallel shard) on staging rows: tile BLOCK_T adjacent tokens so the matrix
    # products keep 64 rows and every key tile serves BLOCK_T tokens (``block_t=1`` turns it off).
    block_t = cfg.get("block_t")
    if block_t is None:
        block_t = 64 // triton.next_power_of_2(H) if keys == KEYS_ROWS and H <= 32 else 1
    if block_t > 1:
        block_h = cfg.get("block_h") or triton.next_power_of_2(H)
        if block_t * block_h < 16:
            raise ValueError(f"block_t * block_h must be >= 16 (the smallest matrix-product tile), got "
                             f"{block_t} * {block_h}")
    else:
        block_h = cfg.get("block_h") or (64 if H > 32 else max(16, triton.next_power_of_2(H)))
    block_n = cfg["block_n"]
    num_warps = cfg["num_warps"] if block_h * block_t == 64 else 4
    if interpreting():
        block_n = min(block_n, 16)
    n_hb = triton.cdiv(H, block_h)
    tiles = triton.cdiv(max(max_keys + block_t - 1, 1), block_n)
    progs = max(triton.cdiv(T, block_t) * n_hb, 1)
    splits = 1
    if progs < _sm_count(device):
        splits = max(1, min(_sm_count(device) // progs, tiles // cfg["min_tiles_per_split"]))
    if "splits" in cfg:
        splits = cfg["splits"]
    return dict(block_h=block_h, block_t=block_t, block_n=block_n, num_warps=num_warps,
                num_stages=cfg["num_stages"], n_hb=n_hb, splits=splits, stage_block_n=cfg["stage_block_n"])


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
    block_r = max(16, triton.next_power_of_2(R))
    block_p = max(16, triton.next_power_of_2(P))
    dummy = torch.empty(1, dtype=torch.int32, device=q.device)
    idx = dummy if idx is None else idx
    bt = dummy if bt is None else bt
    cu, dec, bid = (dummy if x is None else x for x in (cu, dec, bid))
    splits = plan["splits"]
    o_t, l_t, o_strides, l_strides = split_targets(out, lse, splits)
    block_t = plan["block_t"]
    grid = (triton.cdiv(T, block_t) * plan["n_hb"], splits)
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
            _combine_splits_kernel[(T, triton.cdiv(H, bh))](
                o_t, l_t, out, lse, H, splits,  # the fp32 partials
                *o_strides, *l_strides,
                out.stride(0), out.stride(1), lse.stride(0),
                R=R, BLOCK_R=block_r, BLOCK_H=bh, INTERPRET=interpreting(),
                num_warps=4)
    return out, lse


def split_targets(out: torch.Tensor, lse: torch.Tensor, splits: int):
    """Where a kernel writes: ``out [T, H, R]`` / ``lse [T, H]`` themselves with one split, else fp32
    partials ``[splits, T, H, R]`` / ``[splits, T, H]`` for ``_combine_splits_kernel``. Returns the two
    tensors and their (split, token, head) strides (split stride 0 when unsplit)."""
    if splits > 1:
        T, H, R = out.shape
        part_o = torch.empty((splits, T, H, R), dtype=torch.float32, device=out.device)
        part_lse = torch.empty((splits, T, H), dtype=torch.float32, device=out.device)
        return (part_o, part_lse, (part_o.stride(0), part_o.stride(1), part_o.stride(2)),
                (part_lse.stride(0), part_lse.stride(1)))
    return out, lse, (0, out.stride(0), out.stride(1)), (0, lse.stride(0))


def _outputs(q, R, out):
    """``out [T, H, R]`` (q dtype) and ``lse [T, H]`` fp32: the caller's pair (tests poison them) or new."""
    if out is not None:
        return out
    T, H, _ = q.shape
    return (torch.empty((T, H, R), dtype=q.dtype, device=q.device),
            torch.empty((T, H), dtype=torch.float32, device=q.device))


def sparse_mla_attention_fwd(q: torch.Tensor, cache: torch.Tensor, indices: torch.Tensor, scale: float,
                             rope_dim: int, config: dict | None = None, out=None,
                             stats=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MLA attention of ``q [T, H, D]`` (bf16) over the packed FP8 ``cache [NB, ps, bytes]`` (uint8)
    at ``indices [T, 1, K]`` (slots, ``-1`` skipped) → ``out [T, H, R]`` bf16, ``lse [T, H]`` fp32."""
    R = q.shape[-1] - rope_dim
    out, lse = _outputs(q, R, out)
    idx = indices.reshape(indices.shape[0], indices.shape[-1])
    if idx.stride(-1) != 1:
        idx = idx.contiguous()
    return _launch(q, cache, out, lse, keys=KEYS_INDICES, fp8=True, scale=scale, rope_dim=rope_dim,
                   max_keys=idx.shape[1], idx=idx, page_size=cache.shape[1], stride_cb=cache.stride(0),
                   stride_cr=cache.stride(1), config=config, stats=stats)


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


def staged_swa_attention_fwd(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                             cu_seqlens_q: torch.Tensor, seq_lens_decoder: torch.Tensor,
                             batch_id_per_token: torch.Tensor, scale: float, rope_dim: int, window: int,
                             config: dict | None = None, out=None,
                             stats=None) -> tuple[torch.Tensor, torch.Tensor]:
    """SWA attention for prefill-heavy steps: dequantise the union of each request's windows once into a
    bf16 staging buffer of ``T + B·(W-1)`` rows, then attend from its contiguous rows. Same result as
    ``paged_attention_fwd(..., window=W, fp8=True)``."""
    T, H, D = q.shape
    R = D - rope_dim
    B = block_tables.shape[0]
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    stage = torch.empty((T + B * (window - 1), D), dtype=q.dtype, device=q.device)
    block_n = cfg["stage_block_n"] if not interpreting() else 16
    if T > 0 and B > 0:
        staged_kernel = _stage_windows_kernel[(B, triton.cdiv(T + window - 1, block_n))](
            cache, block_tables, cu_seqlens_q, seq_lens_decoder, stage, window, cache.shape[1],
            cache.stride(0), cache.stride(1), block_tables.stride(0), stage.stride(0),
            R=R, P=rope_dim, BLOCK_R=max(16, triton.next_power_of_2(R)),
            BLOCK_P=max(16, triton.next_power_of_2(rope_dim)), BLOCK_N=block_n,
            NT=max(16, triton.next_power_of_2(R)) // fp8_format.TILE, FP8=True, num_warps=4)
        if stats is not None:
            stats.update(stage=staged_kernel)
    out, lse = _outputs(q, R, out)
    return _launch(q, stage, out, lse, keys=KEYS_ROWS, fp8=False, scale=scale, rope_dim=rope_dim,
                   max_keys=window, cu=cu_seqlens_q, dec=seq_lens_decoder, bid=batch_id_per_token,
                   window=window, stride_cr=stage.stride(0), config=config, stats=stats)


# Prefill-heavy steps (many query tokens per request) stage each request's window union in bf16 once;
# decode-like steps walk the block table directly (staging would copy W rows for a single query).
STAGING_MIN_TOKENS_PER_REQUEST = 4
STAGING_MAX_BYTES = 1 << 30


def swa_attention_fwd(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      seq_lens_decoder: torch.Tensor, batch_id_per_token: torch.Tensor, scale: float,
                      rope_dim: int, window: int, config: dict | None = None,
                      staged: bool | None = None, out=None,
                      stats=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sliding-window attention over the packed FP8 paged cache; picks the staged (prefill) or the direct
    (decode) path from shapes alone, so the choice never synchronises with the device."""
    T, _, D = q.shape
    B = block_tables.shape[0]
    if staged is None:
        stage_bytes = (T + B * (window - 1)) * D * q.element_size()
        staged = T >= STAGING_MIN_TOKENS_PER_REQUEST * max(B, 1) and stage_bytes <= STAGING_MAX_BYTES
    if staged:
        return staged_swa_attention_fwd(q, cache, block_tables, cu_seqlens_q, seq_lens_decoder,
                                        batch_id_per_token, scale, rope_dim, window, config, out, stats)
    # Decode-like steps: the page-tile kernel where the page size allows it (issue 17), else the gathered
    # kernel above; paged_mla imports this module, hence the late import.
    from .paged_mla import SWA_DECODE_CONFIG, paged_tiles_fwd

    return paged_tiles_fwd(q, cache, block_tables, cu_seqlens_q, seq_lens_decoder, batch_id_per_token, scale,
                           rope_dim, window, True, dict(SWA_DECODE_CONFIG, **(config or {})), out, stats)
