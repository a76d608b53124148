"""Paged MLA attention by page tiles: the dense full-layer attention over the model-dtype ``[NB, ps, D]``
cache (``paged_mla_attention_fwd``) and the sliding-window decode over the packed FP8 cache
(``paged_tiles_fwd(..., window=W, fp8=True)``, which ``sparse_mla.swa_attention_fwd`` calls).

``_paged_tiles_fwd_kernel`` (issue 17) walks key tiles of ``BLOCK_N`` positions aligned to ``BLOCK_N``,
which divides the page size, so a tile never crosses a page: it is ``BLOCK_N`` *contiguous* cache rows at
one block id. Its address is one scalar, not ``BLOCK_N`` gathered row offsets; whole tiles load without
masks (a window's first tile, which may start before the window, masks scores only; a split's last,
partial tile is done after the loop with masked loads); the tiles can come through TMA (``tma``: host
tensor descriptors, block ``[1, BLOCK_N, …]``); the block ids can be read before the tile loop
(``chunk``); the score product can be split between the warpgroups (``dedup``). Where the page size is
not a multiple of the tile (or on request, ``kernel="generic"``) the launchers fall back to
``gathered_mla.paged_attention_fwd`` (the gathered kernel of issue 4, ``KEYS_PAGED``).

A program owns one query token, ``BLOCK_H`` heads and one split of the token's positions; few tokens
(decode) split them across programs and ``_combine_splits_kernel`` merges the partials by lse. Grids
depend on shapes only (CUDA-graph capturable). Measurements and reasons: ``benchmarks/NOTES-attention.md``
(issue 17).
"""

from __future__ import annotations

import threading

import torch
import triton
import triton.language as tl

from .. import fp8_format
from .._threads import thread_value
from . import cdiv, gluon_mla, interpreting, next_pow2
from ._common import (_LOG2E, _M_INIT, _TILE, KEYS_PAGED, _attend_tile, _combine_splits_kernel, _dequantize_tile,
                      _load_queries, _load_tile, _plan, _sm_count, _split_range, _store_rows, split_targets)
from .gathered_mla import paged_attention_fwd
from .launch import launch

try:  # host-side TMA descriptors (Triton ≥ 3.3); without them the ``tma`` variant is not offered
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None


@triton.jit
def _exchange(s, scr_ptr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr):
    """``s`` written to this SM's scratch slot and read back: the value is the same, but the SSA chain from
    the score product to the P·V product is cut, so Triton lays ``S = Q·Kᵀ`` out with the two warpgroups
    on different key columns instead of both computing all of it (a chained dot gets ``warpsPerCTA =
    [num_warps, 1]``; NOTES-attention.md, issue 17; measured slower than computing S twice). The read is
    inline PTX so that no pass may hoist it above the store; the barrier orders the store before the other
    warps' reads (and, with two slots used in turn, a slot's reads before its next write)."""
    offs = tl.arange(0, BLOCK_H)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(scr_ptr + offs, s)
    if INTERPRET:
        s = tl.load(scr_ptr + offs)
    else:
        # ``bar.sync`` as inline PTX, not ``tl.debug_barrier()``: Triton's pipeliner leaves a loop with a
        # ``ttg.barrier`` unpipelined (seen in the TTGIR: its TMA loads became synchronous).
        tl.inline_asm_elementwise("bar.sync 0;", "=r,r", [offs.shape[0]], dtype=tl.int32, is_pure=False, pack=1)
        s = tl.inline_asm_elementwise("ld.global.f32 $0, [$1];", "=r,l", [scr_ptr + offs], dtype=tl.float32,
                                      is_pure=False, pack=1)
    return s


@triton.jit
def _attend_full_tile(q_lat, q_pe, kv, pe, m_i, l_i, acc, qk_scale, allowed, scr_ptr, BLOCK_H: tl.constexpr,
                      BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DEDUP: tl.constexpr, INTERPRET: tl.constexpr):
    """``_attend_tile`` for a tile whose rows are all finite: scores masked by ``allowed [BLOCK_N]`` only when
    ``MASKED``; ``DEDUP``: scores pass through ``_exchange`` (at ``scr_ptr``)."""
    # Rope part first: with DEDUP only this small product (K = P) stays chained (it feeds the latent
    # product's accumulator) and is computed by both warpgroups; the latent one (K = R) is split.
    s = tl.dot(q_pe, tl.trans(pe))
    s = tl.dot(q_lat, tl.trans(kv), s)                                      # [BLOCK_H, BLOCK_N]
    if DEDUP:
        s = _exchange(s, scr_ptr, BLOCK_H, BLOCK_N, INTERPRET)
    s = s * qk_scale
    if MASKED:
        s = tl.where(allowed[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(kv.dtype), kv, acc * alpha[:, None])                  # [BLOCK_H, BLOCK_R]
    return m_new, l_i, acc


@triton.jit
def _page_tile(cache_ptr, lat_desc, sc_desc, pe_desc, blk, off, stride_cb, stride_cr,
               R: tl.constexpr, P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
               BLOCK_N: tl.constexpr, NT: tl.constexpr, FP8: tl.constexpr, TMA: tl.constexpr,
               BF16_DEQUANT: tl.constexpr, INTERPRET: tl.constexpr):
    """The ``BLOCK_N`` contiguous rows ``off …`` of cache block ``blk``, all valid: latent ``[BLOCK_N,
    BLOCK_R]`` and rope ``[BLOCK_N, BLOCK_P]`` in bf16 (columns past ``R`` / ``P`` are 0; FP8 rows
    dequantised); fp32 under the interpreter (its bf16 dot is wrong, fp32 operands are exact)."""
    if TMA:
        c_blk = blk.to(tl.int32)
        c_off = off.to(tl.int32)
        raw = lat_desc.load([c_blk, c_off, 0]).reshape(BLOCK_N, BLOCK_R)
        pe = pe_desc.load([c_blk, c_off, 0]).reshape(BLOCK_N, BLOCK_P)
        if FP8:
            sc = sc_desc.load([c_blk, c_off, 0]).reshape(BLOCK_N, NT)
        else:
            sc = tl.full([BLOCK_N, NT], 1.0, tl.float32)
    else:
        rows = blk.to(tl.int64) * stride_cb + (off + tl.arange(0, BLOCK_N)).to(tl.int64) * stride_cr
        if FP8 or R != BLOCK_R or P != BLOCK_P:
            raw, sc, pe = _load_tile(cache_ptr, rows, tl.arange(0, BLOCK_N) < BLOCK_N, R, P, BLOCK_R, BLOCK_P,
                                     NT, FP8)
        else:
            raw = tl.load(cache_ptr + rows[:, None] + tl.arange(0, BLOCK_R)[None, :])
            pe = tl.load(cache_ptr + rows[:, None] + R + tl.arange(0, BLOCK_P)[None, :])
            sc = tl.full([BLOCK_N, NT], 1.0, tl.float32)
    if FP8 and BF16_DEQUANT and not INTERPRET:     # (the interpreter's e4m3 → bf16 conversion is wrong)
        kv, pe = _dequantize_bf16(raw, sc, pe, BLOCK_N, BLOCK_R, NT)
    else:
        kv, pe = _dequantize_tile(raw, sc, pe, BLOCK_N, BLOCK_R, NT, FP8, INTERPRET)
    return kv, pe


@triton.jit
def _dequantize_bf16(raw, sc, pe, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, NT: tl.constexpr):
    """FP8 rows → bf16 without an fp32 tile: e4m3 → bf16 is exact, and so is the product with a power-of-two
    scale (docs/design.md §6) in bf16, which has fp32's exponent range. Meant to halve the fp32 tile's registers;
    measured 5-15 % slower than ``_dequantize_tile`` (issue 17), so not the default."""
    x = raw.to(tl.float8e4nv, bitcast=True).to(tl.bfloat16)
    x = tl.reshape(x, [BLOCK_N, NT, _TILE]) * sc.to(tl.bfloat16)[:, :, None]
    return tl.reshape(x, [BLOCK_N, BLOCK_R]), pe


@triton.jit
def _masked_tile(cache_ptr, bt_row_ptr, k0, lo, hi, page_size, stride_cb, stride_cr,
                 R: tl.constexpr, P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                 BLOCK_N: tl.constexpr, NT: tl.constexpr, FP8: tl.constexpr, INTERPRET: tl.constexpr):
    """The tile at position ``k0`` with only positions ``[lo, hi)`` valid (masked pointer loads: a whole-tile
    load would read rows past the request's last position, unwritten or another request's, and a NaN
    there survives ``0 · NaN`` in P·V)."""
    kk = k0 + tl.arange(0, BLOCK_N)
    valid = (kk >= lo) & (kk < hi)
    blk = tl.load(bt_row_ptr + k0 // page_size).to(tl.int64)
    rows = blk * stride_cb + (k0 % page_size + tl.arange(0, BLOCK_N)).to(tl.int64) * stride_cr
    raw, sc, pe = _load_tile(cache_ptr, rows, valid, R, P, BLOCK_R, BLOCK_P, NT, FP8)
    kv, pe = _dequantize_tile(raw, sc, pe, BLOCK_N, BLOCK_R, NT, FP8, INTERPRET)
    return kv, pe, valid


@triton.jit
def _slot(pid, num_slots, INTERPRET: tl.constexpr):
    """This program's scratch slot: its SM's id (the interpreter runs programs one at a time: slot 0)."""
    if INTERPRET:
        slot = pid * 0
    else:
        slot = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [pid], dtype=tl.int32, is_pure=True,
                                         pack=1) % num_slots
    return slot


@triton.jit
def _paged_tile_item(
        pid, pid_s,                                 # (token, head block) and split of this work item
        q_ptr, cache_ptr, lat_desc, sc_desc, pe_desc, bt_ptr, cu_ptr, dec_ptr, bid_ptr, out_ptr, lse_ptr,
        scr_ptr,
        qk_scale,
        H, window, page_size, num_splits, num_slots,
        stride_qt, stride_qh,
        stride_cb, stride_cr,                       # cache block / row strides (cache elements)
        stride_bt,
        stride_os, stride_ot, stride_oh,            # out (or partials: split, token, head)
        stride_ls, stride_lt,                       # lse (or partial lse: split, token); head stride 1
        R: tl.constexpr, P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, NT: tl.constexpr, FP8: tl.constexpr,
        WINDOWED: tl.constexpr, CHUNK: tl.constexpr, TMA: tl.constexpr, DEDUP: tl.constexpr,
        BF16_DEQUANT: tl.constexpr, PARTIAL: tl.constexpr, INTERPRET: tl.constexpr):
    """One work item of ``_paged_tiles_fwd_kernel``: attention of token ``t`` (the heads of one block) to positions ``max(0, p-W+1) … p`` of its request
    (``0 … p`` when ``window == 0``; ``WINDOWED`` is ``window > 0``) in tiles aligned to ``BLOCK_N``
    (``page_size % BLOCK_N == 0``).
    ``CHUNK > 0``: the block ids of ``CHUNK`` tiles are loaded before an inner tile loop, which then has no
    address-feeding load; ``CHUNK == 0``: one scalar block-id load per tile. ``DEDUP``: scores go through
    a scratch slot of this SM (``num_slots`` slots of two ``[BLOCK_H, BLOCK_N]`` fp32 buffers; one program
    per SM). ``BF16_DEQUANT``: whole FP8 tiles dequantise in bf16 (``_dequantize_bf16``)."""
    n_hb = tl.cdiv(H, BLOCK_H)
    t = (pid // n_hb).to(tl.int64)
    pid_h = pid % n_hb
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    h_mask = offs_h < H

    b = tl.load(bid_ptr + t).to(tl.int64)
    bb = tl.maximum(b, 0)
    cu_b = tl.load(cu_ptr + bb).to(tl.int64)
    dec_b = tl.load(dec_ptr + bb).to(tl.int64)
    pos = dec_b + t - cu_b
    lo = 0
    if WINDOWED:
        lo = tl.maximum(pos - window + 1, 0)                                # first attended position
    # Its tile. BLOCK_N divides the page size (the launcher's condition), so the tile lies in lo's own page:
    # every block id read below is of a page the window covers, never a released (-1) entry of a
    # window-bounded table (docs/design.md §12); a tile crossing into the page before would read one.
    t0 = (lo // BLOCK_N) * BLOCK_N
    k_begin, k_end = _split_range(t0, tl.where(b >= 0, pos + 1, t0), num_splits, pid_s, BLOCK_N)
    k_full = k_begin + (tl.maximum(k_end - k_begin, 0) // BLOCK_N) * BLOCK_N  # end of the whole tiles
    bt_row_ptr = bt_ptr + bb * stride_bt
    scr_ptr = scr_ptr + _slot(tl.program_id(0), num_slots, INTERPRET).to(tl.int64) * (2 * BLOCK_H * BLOCK_N)

    q_lat, q_pe = _load_queries(q_ptr + t * stride_qt + offs_h * stride_qh, h_mask, R, P, BLOCK_R, BLOCK_P,
                                INTERPRET)
    m_i = tl.full([BLOCK_H], _M_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    # Whole tiles. With a window, the first one may start before the window: its rows there are earlier
    # positions of the same request in the same (live) page, so finite, and only their scores are masked.
    if CHUNK > 0:
        offs_c = tl.arange(0, CHUNK)
        for c0 in range(k_begin, k_full, CHUNK * BLOCK_N):
            tile_k = c0 + offs_c * BLOCK_N
            blks = tl.load(bt_row_ptr + tile_k // page_size, mask=tile_k < k_full, other=0)   # [CHUNK]
            for k0 in range(c0, tl.minimum(k_full, c0 + CHUNK * BLOCK_N), BLOCK_N):
                blk = tl.sum(tl.where(offs_c == (k0 - c0) // BLOCK_N, blks, 0))
                kv, pe = _page_tile(cache_ptr, lat_desc, sc_desc, pe_desc, blk, k0 % page_size, stride_cb,
                                    stride_cr, R, P, BLOCK_R, BLOCK_P, BLOCK_N, NT, FP8, TMA, BF16_DEQUANT,
                                    INTERPRET)
                m_i, l_i, acc = _attend_full_tile(q_lat, q_pe, kv, pe, m_i, l_i, acc, qk_scale, k0 + offs_n >= lo,
                                                  scr_ptr + ((k0 // BLOCK_N) % 2) * (BLOCK_H * BLOCK_N),
                                                  BLOCK_H, BLOCK_N, WINDOWED, DEDUP, INTERPRET)
    else:
        for k0 in range(k_begin, k_full, BLOCK_N):
            blk = tl.load(bt_row_ptr + k0 // page_size)
            kv, pe = _page_tile(cache_ptr, lat_desc, sc_desc, pe_desc, blk, k0 % page_size, stride_cb,
                                stride_cr, R, P, BLOCK_R, BLOCK_P, BLOCK_N, NT, FP8, TMA, BF16_DEQUANT,
                                INTERPRET)
            m_i, l_i, acc = _attend_full_tile(q_lat, q_pe, kv, pe, m_i, l_i, acc, qk_scale, k0 + offs_n >= lo,
                                              scr_ptr + ((k0 // BLOCK_N) % 2) * (BLOCK_H * BLOCK_N),
                                              BLOCK_H, BLOCK_N, WINDOWED, DEDUP, INTERPRET)
    if k_full < k_end:
        # The split's last, partial tile: rows past the request's last position may be unwritten.
        kv, pe, valid = _masked_tile(cache_ptr, bt_row_ptr, k_full, lo, k_end, page_size, stride_cb, stride_cr,
                                     R, P, BLOCK_R, BLOCK_P, BLOCK_N, NT, FP8, INTERPRET)
        m_i, l_i, acc = _attend_tile(q_lat, q_pe, kv, pe, valid[None, :], m_i, l_i, acc, qk_scale)

    _store_rows(out_ptr, lse_ptr, acc, m_i, l_i, pid_s * stride_os + t * stride_ot + offs_h * stride_oh,
                pid_s * stride_ls + t * stride_lt + offs_h, h_mask, R, BLOCK_R, PARTIAL, INTERPRET)


@triton.jit
def _paged_tiles_fwd_kernel(
        q_ptr, cache_ptr, lat_desc, sc_desc, pe_desc, bt_ptr, cu_ptr, dec_ptr, bid_ptr, out_ptr, lse_ptr,
        scr_ptr,
        qk_scale,                                   # softmax scale · log2(e)
        H, window, page_size, num_splits, num_slots,
        items_per_split,                            # tokens × head blocks
        stride_qt, stride_qh,
        stride_cb, stride_cr,                       # cache block / row strides (cache elements)
        stride_bt,
        stride_os, stride_ot, stride_oh,            # out (or partials: split, token, head)
        stride_ls, stride_lt,                       # lse (or partial lse: split, token); head stride 1
        R: tl.constexpr, P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, NT: tl.constexpr, FP8: tl.constexpr,
        WINDOWED: tl.constexpr, CHUNK: tl.constexpr, TMA: tl.constexpr, DEDUP: tl.constexpr,
        BF16_DEQUANT: tl.constexpr, PARTIAL: tl.constexpr, INTERPRET: tl.constexpr,
        PERSISTENT: tl.constexpr):
    """The page-tile kernel (``_paged_tile_item``): one program per (token, head block) × split — or, with
    ``PERSISTENT``, a grid of a few programs per SM, each looping over work items ``w`` (split ``w //
    items_per_split``, item ``w % items_per_split``), so per-program set-up is paid once per program."""
    if PERSISTENT:
        for w in range(tl.program_id(0), items_per_split * num_splits, tl.num_programs(0)):
            _paged_tile_item(w % items_per_split, w // items_per_split, q_ptr, cache_ptr, lat_desc, sc_desc, pe_desc, bt_ptr, cu_ptr, dec_ptr, bid_ptr, out_ptr, lse_ptr, scr_ptr,
                qk_scale, H, window, page_size, num_splits, num_slots, stride_qt, stride_qh, stride_cb, stride_cr,
                stride_bt, stride_os, stride_ot, stride_oh, stride_ls, stride_lt, R, P, BLOCK_R, BLOCK_P, BLOCK_H,
                BLOCK_N, NT, FP8, WINDOWED, CHUNK, TMA, DEDUP, BF16_DEQUANT, PARTIAL, INTERPRET)
    else:
        _paged_tile_item(tl.program_id(0), tl.program_id(1), q_ptr, cache_ptr, lat_desc, sc_desc, pe_desc, bt_ptr, cu_ptr, dec_ptr, bid_ptr, out_ptr, lse_ptr, scr_ptr,
                qk_scale, H, window, page_size, num_splits, num_slots, stride_qt, stride_qh, stride_cb, stride_cr,
                stride_bt, stride_os, stride_ot, stride_oh, stride_ls, stride_lt, R, P, BLOCK_R, BLOCK_P, BLOCK_H,
                BLOCK_N, NT, FP8, WINDOWED, CHUNK, TMA, DEDUP, BF16_DEQUANT, PARTIAL, INTERPRET)


# ------------------------------------------------------------------------------------------ launchers
# Settings of the page-tile kernel (issue 17; benchmarks/NOTES-attention.md): ``kernel`` "gluon" (gluon_mla,
# Hopper; ``warp_specialize``: its one-warp producer; ``pipeline``: P·V and the next S back to back;
# ``pingpong``: FlashMLA's schedule, "overlap" with the other warpgroup's P·V asynchronous), "tiles" (the kernel
# above) or "generic" (gathered_mla's kernel); ``tma``: tile loads through host TMA descriptors;
# ``chunk``: block ids read per outer step (0: one scalar load per tile); ``dedup``: scores through a per-SM
# scratch slot; ``bf16_dequant``: FP8 tiles dequantised in bf16 (exact: power-of-two scales). Other keys
# (block_n, num_warps, num_stages, splits, …) as _common.DEFAULT_CONFIG.
# Dense default (2026-11-28, H200, RESULTS.md issue 17): page tiles through TMA, 64 keys, 2 stages: 2.4x
# the gathered kernel at B = 128 and 1.9x at B = 8 (H = 128), 1.6-2.3x at H = 64 / 16; every other variant
# tried was slower.
# Since 2026-11-28 (call 3 of session 7) the dense default is the Gluon kernel (``gluon_mla``, warp-specialised:
# 1.44-1.46x FlashMLA at H = 128 where the page tiles took 2.12-2.26x, 1.02-1.09x at H = 64 B = 128); it falls
# back to these page tiles off Hopper and for the shapes it is not written for.
PAGED_DECODE_CONFIG = dict(kernel="gluon", warp_specialize=True, block_n=64, num_warps=8, num_stages=2, chunk=0,
                           tma=True, dedup=False, bf16_dequant=False)
# SWA decode default, ``kernel="auto"`` (the rule and its numbers at its use in ``paged_tiles_fwd``): on Hopper the
# Gluon FP8 kernel except for windows under ``SWA_TILES_MIN_WINDOW`` over many tokens with 64-head blocks, which
# take the gathered kernel (a window that is not tile-aligned spans one more tile); elsewhere the plain page tiles
# for long windows with 64-head blocks (1.1-1.8x the gathered kernel at W = 512 … 4096) and the gathered kernel
# otherwise (with 16-head blocks the TMA page tiles lost: call 2 of issue 17).
SWA_DECODE_CONFIG = dict(PAGED_DECODE_CONFIG, kernel="auto", warp_specialize=False)
SWA_TILES_MIN_WINDOW = 512
# The Gluon FP8 kernel splits a window across programs only when its items fill under this fraction of the SMs.
SWA_SPLIT_BELOW = 0.25
_TILE_KEYS = ("kernel", "chunk", "tma", "dedup", "bf16_dequant", "persistent", "warp_specialize", "pipeline",
              "pingpong")
# ``dedup`` scratch: one slot per SM id; %smid stays below the physical SM count (≤ 144 on GH100).
_SCRATCH_SLOTS = 256


def _descriptors(cache: torch.Tensor, R: int, P: int, block_n: int, block_r: int, block_p: int, fp8: bool):
    """TMA descriptors ``(latent, scales, rope)`` over the page rows, or None where TMA cannot take this cache
    (16-byte aligned bases and strides, boxes of ≥ 16 bytes, exact power-of-two widths for FP8)."""
    if TensorDescriptor is None or cache.dim() != 3 or cache.stride(-1) != 1 or cache.data_ptr() % 16:
        return None
    NB, ps = cache.shape[:2]
    es = cache.element_size()
    if any(cache.stride(d) * es % 16 for d in range(2)):
        return None
    if fp8:
        nt = fp8_format.num_tiles(R)
        scales, rope = fp8_format.scale_offset(R), fp8_format.rope_offset(R)
        if R != block_r or P != block_p or nt * fp8_format.SCALE_BYTES < 16 or R % 16 or rope % 16:
            return None
        f32 = cache.view(torch.float32)[..., scales // 4:scales // 4 + nt]     # tile scales
        b16 = cache.view(torch.bfloat16)[..., rope // 2:]                      # rope
        return (TensorDescriptor(cache, [NB, ps, R], list(cache.stride()), [1, block_n, block_r]),
                TensorDescriptor(f32, [NB, ps, nt], list(f32.stride()), [1, block_n, nt]),
                TensorDescriptor(b16, [NB, ps, P], list(b16.stride()), [1, block_n, block_p]))
    if (R * es) % 16 or block_r * es < 16 or block_p * es < 16:
        return None
    lat = TensorDescriptor(cache, [NB, ps, R], list(cache.stride()), [1, block_n, block_r])
    return lat, lat, TensorDescriptor(cache[..., R:], [NB, ps, P], list(cache.stride()), [1, block_n, block_p])


def paged_tiles_fwd(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    seq_lens_decoder: torch.Tensor, batch_id_per_token: torch.Tensor, scale: float, rope_dim: int,
                    window: int, fp8: bool, config: dict, out=None,
                    stats=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query token of ``q [T, H, D]`` to positions ``max(0, p-W+1) … p`` of its request
    (``0 … p`` when ``window == 0``) through ``block_tables`` → ``out [T, H, R]`` (q dtype), ``lse [T, H]``
    fp32; ``cache`` is packed FP8 (``fp8``) or model-dtype ``[NB, ps, D]``. ``config``: a complete settings
    dict (``PAGED_DECODE_CONFIG`` keys). Falls back to the gathered kernel where the page size is not a
    multiple of the tile or ``config["kernel"]`` is "generic" (or "auto" and the window or heads are few)."""
    T, H, D = q.shape
    R, P = D - rope_dim, rope_dim
    ps = cache.shape[1]
    block_n = config["block_n"] if not interpreting() else min(config["block_n"], 16)
    kernel = config["kernel"]
    long_window = window >= SWA_TILES_MIN_WINDOW and H > 32
    if kernel == "auto":
        # The Gluon FP8 kernel (where it runs) but for short windows over many tokens with 64-head blocks
        # (W = 128, B = 128, H >= 64: the gathered kernel reads 128 rows where the tiles read 192, 1.90x vs 2.02x
        # FlashMLA); with few tokens the window is split across programs (W = 128, B <= 8: 1.37-1.39x vs
        # 1.78-1.89x), and a 16-head shard pads to 64 heads and wins everywhere (1.18-1.33x vs 1.39-2.52x).
        few = T * cdiv(H, 64) < _sm_count(q.device)
        kernel = "generic" if window < SWA_TILES_MIN_WINDOW and H > 32 and not few else "gluon"
    if kernel == "gluon" and not gluon_mla.supports(q, cache, rope_dim, window, fp8):
        # CPU, other GPUs, other shapes: the plain-Triton kernels (the gathered one for short windows and for
        # 16-head blocks, where the TMA page tiles lost: call 2 of issue 17)
        kernel = "tiles" if window == 0 or long_window else "generic"
    if kernel == "generic" or ps % block_n or cache.dim() != 3 or seq_lens_decoder.shape[0] == 0 or T == 0:
        generic = {k: v for k, v in config.items() if k not in _TILE_KEYS}
        return paged_attention_fwd(q, cache, block_tables, cu_seqlens_q, seq_lens_decoder, batch_id_per_token,
                                   scale, rope_dim, window=window, fp8=fp8, config=generic, out=out,
                                   stats=stats)
    if out is None:
        out = (torch.empty((T, H, R), dtype=q.dtype, device=q.device),
               torch.empty((T, H), dtype=torch.float32, device=q.device))
    out_t, lse_t = out
    capacity = block_tables.shape[1] * ps
    max_keys = min(window + block_n - 1, capacity) if window > 0 else capacity   # a window spans one more tile
    cfg = dict(config, block_n=block_n)
    if kernel == "gluon" and window > 0:
        # One-tile splits of a short window over several programs, but only where the items fill under a quarter
        # of the SMs: W = 128 over 32 tokens × 2 head blocks ran 25.2 µs unsplit, 24.8 µs in two splits with
        # their combine (H200, session 12), and the split cost the host 45 µs more per call.
        cfg.setdefault("min_tiles_per_split", 1)
        cfg.setdefault("split_below", SWA_SPLIT_BELOW)
    plan = _plan(T, H, max_keys, q.device, cfg, KEYS_PAGED)
    if kernel == "gluon":
        return gluon_fwd(q, cache, block_tables, cu_seqlens_q, seq_lens_decoder, batch_id_per_token, scale, out,
                          plan, window, config, stats)
    block_r = max(16, next_pow2(R))
    block_p = max(16, next_pow2(P))
    nt = block_r // fp8_format.TILE if fp8 else 1
    descs = _descriptors(cache, R, P, block_n, block_r, block_p, fp8) if config["tma"] else None
    lat_desc, sc_desc, pe_desc = descs if descs is not None else (cache, cache, cache)   # unused pointers
    splits = plan["splits"]
    o_t, l_t, o_strides, l_strides = split_targets(out_t, lse_t, splits)
    chunk = int(config["chunk"])
    if chunk:
        chunk = max(2, next_pow2(chunk))
    # The per-SM score slots need one program per SM: true at BLOCK_H = 64 and 8 warps, where the [64, R]
    # fp32 accumulator alone takes 128 registers per thread (checked after the launch, below). The
    # interpreter runs one program at a time: any head block may use slot 0 there.
    dedup = bool(config["dedup"]) and (plan["block_h"] >= 64 or interpreting())
    slots = (_SCRATCH_SLOTS if not interpreting() else 1) if dedup else 1
    scratch = torch.empty(slots * 2 * plan["block_h"] * block_n if dedup else 1, dtype=torch.float32,
                          device=q.device)
    items = T * plan["n_hb"]
    persistent = int(config.get("persistent", 0))
    if persistent > 0:                  # a few programs per SM loop over the work items
        grid = (max(1, min(items * splits, persistent * _sm_count(q.device))),)
    else:
        grid = (items, splits)
    compiled = _paged_tiles_fwd_kernel[grid](
        q, cache, lat_desc, sc_desc, pe_desc, block_tables, cu_seqlens_q, seq_lens_decoder, batch_id_per_token,
        o_t, l_t, scratch, scale * _LOG2E, H, window, ps, splits, slots, items, q.stride(0), q.stride(1),
        cache.stride(0), cache.stride(1), block_tables.stride(0), *o_strides, *l_strides,
        R=R, P=P, BLOCK_R=block_r, BLOCK_P=block_p, BLOCK_H=plan["block_h"], BLOCK_N=block_n, NT=nt, FP8=fp8,
        WINDOWED=window > 0, CHUNK=chunk, TMA=descs is not None, DEDUP=dedup, BF16_DEQUANT=bool(config["bf16_dequant"]),
        PARTIAL=splits > 1, INTERPRET=interpreting(), PERSISTENT=persistent > 0,
        num_warps=plan["num_warps"], num_stages=plan["num_stages"])
    if dedup and q.is_cuda and compiled is not None:
        props = torch.cuda.get_device_properties(q.device)
        regs = compiled.n_regs * 32 * plan["num_warps"]
        assert 2 * regs > props.regs_per_multiprocessor or 2 * compiled.metadata.shared > \
            props.shared_memory_per_multiprocessor, "dedup needs one program per SM"
    if stats is not None:
        stats.update(attention=compiled, plan=dict(plan, kernel="tiles", chunk=chunk, tma=descs is not None,
                                                   dedup=dedup, programs=grid[0] * (grid[1] if len(grid) > 1 else 1),
                                                   items=items * splits))
    _combine(o_t, l_t, out_t, lse_t, o_strides, l_strides, splits)
    return out_t, lse_t


def _combine(o_t, l_t, out_t, lse_t, o_strides, l_strides, splits: int):
    """Merge the fp32 split partials into ``out_t`` / ``lse_t`` (nothing to do with one split)."""
    if splits > 1:
        T, H, R = out_t.shape
        bh = 16
        launch(_combine_splits_kernel, (T, cdiv(H, bh)),
               o_t, l_t, out_t, lse_t, H, splits,  # the fp32 partials
               *o_strides, *l_strides,
               out_t.stride(0), out_t.stride(1), lse_t.stride(0),
               R=R, BLOCK_R=max(16, next_pow2(R)), BLOCK_H=bh, INTERPRET=interpreting(), num_warps=4)


_TAP = threading.local()


def gluon_calls():
    """Within it (this thread) every ``gluon_fwd`` call appends its arguments to the list it yields: what
    ``ops.decode_plans`` checks a recorded call against before replaying that route."""
    return thread_value(_TAP, "calls", [])


def gluon_fwd(q, cache, block_tables, cu_seqlens_q, seq_lens_decoder, batch_id_per_token, scale, out, plan,
              window: int, config: dict, stats):
    """``kernel="gluon"`` where ``gluon_mla.supports`` the call: the dense kernel (no window, bf16 cache) or the
    sliding-window kernel over the packed FP8 cache (always warp-specialised). ``out``: the ``(out [T, H, R],
    lse [T, H])`` pair it writes; ``plan``: ``_plan``'s for the call."""
    calls = getattr(_TAP, "calls", None)
    if calls is not None:
        calls.append((q, cache, block_tables, cu_seqlens_q, seq_lens_decoder, batch_id_per_token, scale, out, plan,
                      window, config))
    out_t, lse_t = out
    splits = plan["splits"]
    o_t, l_t, o_strides, l_strides = split_targets(out_t, lse_t, splits)
    meta = (q, cache, block_tables, cu_seqlens_q, seq_lens_decoder, batch_id_per_token, scale * _LOG2E)
    warp_specialize = window > 0 or bool(config.get("warp_specialize"))
    if window > 0:
        compiled = gluon_mla.launch_fp8(*meta, window, o_t, l_t, o_strides, l_strides, splits)
    else:
        compiled = gluon_mla.launch(*meta, o_t, l_t, o_strides, l_strides, splits, warp_specialize,
                                    bool(config.get("pipeline")), config.get("pingpong") or False)
    if stats is not None:
        T, H, _ = q.shape
        items = T * cdiv(H, gluon_mla.BLOCK_H)
        stats.update(attention=compiled, plan=dict(plan, kernel="gluon", block_h=gluon_mla.BLOCK_H, tma=True,
                                                   dedup=False, warp_specialize=warp_specialize, chunk=0,
                                                   pingpong=window == 0 and bool(config.get("pingpong")),
                                                   programs=items * splits, items=items * splits))
    _combine(o_t, l_t, out_t, lse_t, o_strides, l_strides, splits)
    return out_t, lse_t


def paged_mla_attention_fwd(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, seq_lens_decoder: torch.Tensor,
                            batch_id_per_token: torch.Tensor, scale: float, rope_dim: int,
                            config: dict | None = None, out=None,
                            stats=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of ``q [T, H, D]`` over ``cache [NB, ps, D]`` (q dtype) → ``out [T, H, R]``,
    ``lse [T, H]`` fp32; padding tokens (``batch_id_per_token == -1``) give ``out = 0``, ``lse = +inf``.
    ``config`` overrides ``PAGED_DECODE_CONFIG``."""
    return paged_tiles_fwd(q, cache, block_tables, cu_seqlens_q, seq_lens_decoder, batch_id_per_token, scale,
                           rope_dim, 0, False, dict(PAGED_DECODE_CONFIG, **config) if config else PAGED_DECODE_CONFIG,
                           out, stats)
