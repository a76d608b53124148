"""Paged MLA decode in Gluon, Triton's explicit-layout dialect, for Hopper (issue 17): the dense kernel of the
full layers (``_gluon_decode_kernel``, the default on Hopper), the sliding window over the packed FP8 cache
(``_gluon_swa_fp8_kernel``) and a ping-pong variant of the dense kernel (``_gluon_pingpong_kernel``, FlashMLA's
schedule, measured slower: session 9). Measurements: ``benchmarks/RESULTS.md``, issue 17, sessions 7 and 9.

The plain-Triton page-tile kernel (``paged_mla._paged_tiles_fwd_kernel``) cannot choose how its two
warpgroups share the work: Triton lays a chained ``S = Q·Kᵀ`` out with both warpgroups computing all of it,
and it has no lookahead for tile loads whose address comes from an in-loop block-id load. Here the layouts
and the pipeline are written out:

- **S computed once**: ``S [64 heads, 64 keys]`` has the wgmma layout ``warps_per_cta = [4, 2]``, so each
  warpgroup computes 32 of the 64 key columns over all 576 dims; the row max / sum are reduced across the
  two, and P goes to both as the A operand of ``P·V`` (a layout conversion through shared memory).
- **O split**: ``O [64, 512]`` fp32 has the same ``[4, 2]`` layout with 256-column wgmma instructions: each
  warpgroup owns 256 of the 512 output columns (128 registers per thread).
- **TMA ring**: a key tile is 64 contiguous rows of one page (``page_size % 64 == 0``), loaded by TMA as a
  ``[64, 512]`` latent and a ``[64, 64]`` rope box into a ring of ``NBUF`` shared-memory slots with one
  mbarrier each; the block id of a tile is read one iteration before its load is issued, so no load's
  address waits on an in-loop load. Q lives in shared memory for the whole item (72 KB; two slots 144 KB).
- ``WARP_SPECIALIZE``: the loads are issued by a separate one-warp producer partition (``gl.warp_specialize``)
  that runs ahead through "empty" / "ready" barrier rings, instead of by the compute warps between tiles.

The FP8 kernel stages a tile's FP8 bytes, scales and rope rows by TMA in a producer warp and has the compute
warps dequantise them into one bf16 operand buffer (there is no room for two bf16 slots beside the staging).

A split's last, partial tile is loaded with masked loads into its slot (rows past the request's last position
may be unwritten: ``0 · NaN`` would survive P·V). One program owns (token, 64-head block, split), the same
work item and partial-output layout as the page-tile kernel, whose ``_combine_splits_kernel`` merges splits.

Gluon has no interpreter: the launcher (``paged_mla.paged_tiles_fwd`` with ``kernel="gluon"``) takes this
kernel only on a Hopper GPU and for the shapes it is written for (bf16 ``[NB, ps, 576]`` cache, R = 512,
P = 64, fewer than 64 heads padded to a 64-row block as FlashMLA pads them, no window; the FP8 kernel for the
packed cache with a window), and falls back to the interpreter-tested page-tile kernel otherwise.
``tests/kernels/hopper_compile.py`` compiles it for sm_90 without a GPU; its GPU tests check it against the
float64 reference. The Gluon API moved between Triton 3.6 (the GPU machine) and 3.9 (CI): the names that
changed are aliased below, at module level (the JIT resolves every attribute it sees in a kernel body).
"""

from __future__ import annotations

import functools
import weakref

import torch

from .. import fp8_format
from . import cdiv
from .launch import launch as launch_kernel

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    AVAILABLE = True
except ImportError:  # pragma: no cover - a Triton without Gluon
    AVAILABLE = False

_LN2 = 0.6931471805599453
BLOCK_H = 64
BLOCK_N = 64

if AVAILABLE:

    @gluon.jit
    def _item(bid_ptr, cu_ptr, dec_ptr, bt_ptr, stride_bt, H, num_splits, window, BLOCK_H: gl.constexpr,
              BLOCK_N: gl.constexpr):
        """This program's work item: token ``t``, head block ``pid_h``, split ``pid_s``; the first attended
        position ``lo`` of the token at position ``p`` (``p - window + 1``, or 0 without a window); the split's
        key range ``[k_begin, k_end)`` (whole ``BLOCK_N`` tiles per split from the tile holding ``lo``, as
        ``_common._split_range``; empty for padding tokens) and the request's block-table row."""
        n_hb = gl.cdiv(H, BLOCK_H)
        t = gl.program_id(0) // n_hb
        pid_h = gl.program_id(0) % n_hb
        pid_s = gl.program_id(1)
        b = gl.load(bid_ptr + t)
        bb = gl.maximum(b, 0)
        cu_b = gl.load(cu_ptr + bb)
        dec_b = gl.load(dec_ptr + bb)
        pos = dec_b + t - cu_b
        lo = gl.where(window > 0, gl.maximum(pos - window + 1, 0), 0)
        t0 = (lo // BLOCK_N) * BLOCK_N
        hi = gl.where(b >= 0, pos + 1, t0)
        tiles = gl.cdiv(gl.cdiv(hi - t0, BLOCK_N), num_splits)
        k_begin = t0 + pid_s * tiles * BLOCK_N
        k_end = gl.minimum(hi, k_begin + tiles * BLOCK_N)
        return t, pid_h, pid_s, lo, k_begin, k_end, bt_ptr + bb.to(gl.int64) * stride_bt

    @gluon.jit
    def _slot_barriers(N: gl.constexpr, EMPTY_COUNT: gl.constexpr):
        """``N`` "ready" mbarriers (one arrival: a TMA byte count or a publisher) and ``N`` "empty" ones
        (``EMPTY_COUNT`` arrivals: the consumers releasing a slot), initialised and fenced."""
        ready = gl.allocate_shared_memory(gl.int64, [N, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [N, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(N):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=EMPTY_COUNT)
        fence_async_shared()
        return ready, empty

    @gluon.jit
    def _tile_row(bt_row_ptr, k0, page_size):
        """First cache row (in the ``[NB·ps, D]`` view) of the tile at position ``k0``."""
        blk = gl.load(bt_row_ptr + k0 // page_size)
        return blk * page_size + k0 % page_size

    @gluon.jit
    def _issue(lat_desc, pe_desc, row, bar, lat_dst, pe_dst):
        mbarrier.expect(bar, lat_desc.block_type.nbytes + pe_desc.block_type.nbytes)
        _tma_load(lat_desc, [row, 0], bar, lat_dst)
        _tma_load(pe_desc, [row, 0], bar, pe_dst)

    @gluon.jit
    def _scores(q_lat_s, q_pe_s, kl, kp, s_layout: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr):
        """``S = Q·Kᵀ`` of the key tile in shared memory (``kl [BLOCK_N, R]``, ``kp [BLOCK_N, P]``), issued
        asynchronously (two wgmma groups): wait before reading it."""
        s = warpgroup_mma(q_pe_s, kp.permute((1, 0)), gl.zeros([BLOCK_H, BLOCK_N], gl.float32, s_layout),
                          use_acc=False, is_async=True)
        return warpgroup_mma(q_lat_s, kl.permute((1, 0)), s, is_async=True)

    @gluon.jit
    def _softmax(s, m_i, l_i, acc, qk_scale, k0, lo, k_end, MASKED: gl.constexpr, s_layout: gl.constexpr,
                 o_layout: gl.constexpr, BLOCK_N: gl.constexpr):
        """The online-softmax update of scores ``s`` (``MASKED``: only positions in ``[lo, k_end)`` count):
        new max and sum, P as the A operand of P·V, and ``acc`` rescaled."""
        s = s * qk_scale
        if MASKED:
            offs = k0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            s = gl.where(gl.expand_dims((offs >= lo) & (offs < k_end), 0), s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p, axis=1)
        p_op = gl.convert_layout(p.to(gl.bfloat16), gl.DotOperandLayout(operand_index=0, parent=o_layout,
                                                                          k_width=2))
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        return p_op, m_new, l_i, acc

    @gluon.jit
    def _attend(q_lat_s, q_pe_s, kl, kp, m_i, l_i, acc, qk_scale, k0, lo, k_end, MASKED: gl.constexpr,
                s_layout: gl.constexpr, o_layout: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr):
        """One online-softmax step over the key tile at position ``k0`` in shared memory, start to finish."""
        s = _scores(q_lat_s, q_pe_s, kl, kp, s_layout, BLOCK_H, BLOCK_N)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        p_op, m_i, l_i, acc = _softmax(s, m_i, l_i, acc, qk_scale, k0, lo, k_end, MASKED, s_layout, o_layout,
                                       BLOCK_N)
        acc = warpgroup_mma(p_op, kl, acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        return m_i, l_i, acc

    @gluon.jit
    def _rows_to_shared(ptr, rows, mask, lat_s, pe_s, R: gl.constexpr, P: gl.constexpr, ld: gl.constexpr):
        """Rows at element offsets ``rows [M, 1]`` of ``ptr`` (``mask``: the others zero) into shared memory:
        latent columns ``0 … R`` into ``lat_s``, rope columns ``R … R+P`` into ``pe_s``; fenced for the wgmmas."""
        lat_s.store(gl.load(ptr + rows + gl.expand_dims(gl.arange(0, R, layout=gl.SliceLayout(0, ld)), 0),
                            mask=mask, other=0.0))
        pe_s.store(gl.load(ptr + rows + R + gl.expand_dims(gl.arange(0, P, layout=gl.SliceLayout(0, ld)), 0),
                           mask=mask, other=0.0))
        fence_async_shared()
        _barrier()

    @gluon.jit
    def _masked_tile(cache_ptr, bt_row_ptr, k0, k_end, page_size, stride_cb, stride_cr, kl, kp,
                     R: gl.constexpr, P: gl.constexpr, BLOCK_N: gl.constexpr, num_warps: gl.constexpr):
        """The partial tile at ``k0`` into slot ``kl`` / ``kp`` with masked loads (rows at or past ``k_end``
        are zeros), fenced for the wgmma that reads it."""
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [num_warps, 1], [1, 0])
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ld))
        blk = gl.load(bt_row_ptr + k0 // page_size).to(gl.int64)
        rows = gl.expand_dims(blk * stride_cb + (k0 % page_size + offs_n).to(gl.int64) * stride_cr, 1)
        valid = gl.expand_dims(k0 + offs_n < k_end, 1)
        _rows_to_shared(cache_ptr, rows, valid, kl, kp, R, P, ld)

    @gluon.jit
    def _compute(q_ptr, cache_ptr, lat_desc, pe_desc, bt_row_ptr, out_ptr, lse_ptr, q_lat_s, q_pe_s, k_lat_s,
                 k_pe_s, ready, empty, t, pid_h, pid_s, H, k_begin, k_end, qk_scale, page_size,
                 stride_qt, stride_qh, stride_cb, stride_cr, stride_os, stride_ot, stride_oh, stride_ls, stride_lt,
                 R: gl.constexpr, P: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr,
                 NBUF: gl.constexpr, PARTIAL: gl.constexpr, WARP_SPECIALIZE: gl.constexpr,
                 PIPELINE: gl.constexpr, num_warps: gl.constexpr):
        """The compute warps (two warpgroups) of one work item: Q into shared memory, the whole tiles (issuing
        their loads unless a producer partition does), the partial tile, the normalised store."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                           instr_shape=[16, 32, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                           instr_shape=[16, 256, 16])
        n_full = gl.maximum(k_end - k_begin, 0) // BLOCK_N
        k_full = k_begin + n_full * BLOCK_N

        if not WARP_SPECIALIZE:          # the first NBUF tiles' loads, before Q's (they take longer)
            row_next = 0
            for i in gl.static_range(NBUF):
                if i < n_full:
                    row = _tile_row(bt_row_ptr, k_begin + i * BLOCK_N, page_size)
                    _issue(lat_desc, pe_desc, row, ready.index(i), k_lat_s.index(i), k_pe_s.index(i))
            if NBUF < n_full:
                row_next = _tile_row(bt_row_ptr, k_begin + NBUF * BLOCK_N, page_size)

        _load_q(q_ptr, t, pid_h, H, stride_qt, stride_qh, q_lat_s, q_pe_s, R, P, BLOCK_H, num_warps)
        m_i = gl.full([BLOCK_H], -1.0e30, gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_H], gl.float32, gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BLOCK_H, R], gl.float32, o_layout)
        if PIPELINE:
            # P·V of tile j and S of tile j+1 issued back to back: the tensor cores go from one to the other
            # without waiting for the slot's release, which follows P·V's completion alone.
            s = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, s_layout)
            if n_full > 0:
                mbarrier.wait(ready.index(0), 0)
                s = _scores(q_lat_s, q_pe_s, k_lat_s.index(0), k_pe_s.index(0), s_layout, BLOCK_H, BLOCK_N)
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
            for j in range(n_full - 1):
                slot = j % NBUF
                nxt = (j + 1) % NBUF
                p_op, m_i, l_i, acc = _softmax(s, m_i, l_i, acc, qk_scale, 0, 0, 0, False, s_layout, o_layout,
                                               BLOCK_N)
                acc = warpgroup_mma(p_op, k_lat_s.index(slot), acc, is_async=True)
                mbarrier.wait(ready.index(nxt), ((j + 1) // NBUF) & 1)
                s = _scores(q_lat_s, q_pe_s, k_lat_s.index(nxt), k_pe_s.index(nxt), s_layout, BLOCK_H, BLOCK_N)
                acc = warpgroup_mma_wait(num_outstanding=2, deps=(acc, ))        # P·V done, S may still run
                _barrier()
                mbarrier.arrive(empty.index(slot), count=1)
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
            if n_full > 0:
                slot = (n_full - 1) % NBUF
                p_op, m_i, l_i, acc = _softmax(s, m_i, l_i, acc, qk_scale, 0, 0, 0, False, s_layout, o_layout,
                                               BLOCK_N)
                acc = warpgroup_mma(p_op, k_lat_s.index(slot), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                _barrier()
                mbarrier.arrive(empty.index(slot), count=1)
        else:
            for j in range(n_full):
                slot = j % NBUF
                mbarrier.wait(ready.index(slot), (j // NBUF) & 1)
                m_i, l_i, acc = _attend(q_lat_s, q_pe_s, k_lat_s.index(slot), k_pe_s.index(slot), m_i, l_i, acc,
                                        qk_scale, 0, 0, 0, False, s_layout, o_layout, BLOCK_H, BLOCK_N)
                _barrier()                   # both warpgroups are done with the slot
                if WARP_SPECIALIZE:
                    mbarrier.arrive(empty.index(slot), count=1)
                else:
                    if j + NBUF < n_full:    # the slot's next tile; the block id of the one after, for next time
                        _issue(lat_desc, pe_desc, row_next, ready.index(slot), k_lat_s.index(slot),
                               k_pe_s.index(slot))
                        if j + NBUF + 1 < n_full:
                            row_next = _tile_row(bt_row_ptr, k_begin + (j + NBUF + 1) * BLOCK_N, page_size)
        if k_full < k_end:               # every slot is free: all loads were consumed
            slot = n_full % NBUF
            _masked_tile(cache_ptr, bt_row_ptr, k_full, k_end, page_size, stride_cb, stride_cr,
                         k_lat_s.index(slot), k_pe_s.index(slot), R, P, BLOCK_N, num_warps)
            m_i, l_i, acc = _attend(q_lat_s, q_pe_s, k_lat_s.index(slot), k_pe_s.index(slot), m_i, l_i, acc,
                                    qk_scale, k_full, 0, k_end, True, s_layout, o_layout, BLOCK_H, BLOCK_N)

        _store_out(out_ptr, lse_ptr, acc, m_i, l_i, t, pid_h, pid_s, H, stride_os, stride_ot, stride_oh, stride_ls,
                   stride_lt, s_layout, o_layout, R, BLOCK_H, PARTIAL)

    @gluon.jit
    def _load_q(q_ptr, t, pid_h, H, stride_qt, stride_qh, q_lat_s, q_pe_s, R: gl.constexpr, P: gl.constexpr,
                BLOCK_H: gl.constexpr, num_warps: gl.constexpr):
        """The head block's query rows into shared memory (latent and rope parts; rows past ``H`` zero: fewer
        heads are padded to the 64-row block, as FlashMLA pads them), fenced for the wgmmas."""
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [num_warps, 1], [1, 0])
        offs_h = pid_h * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, ld))
        q_rows = gl.expand_dims(t.to(gl.int64) * stride_qt + offs_h.to(gl.int64) * stride_qh, 1)
        _rows_to_shared(q_ptr, q_rows, gl.expand_dims(offs_h < H, 1), q_lat_s, q_pe_s, R, P, ld)

    @gluon.jit
    def _store_out(out_ptr, lse_ptr, acc, m_i, l_i, t, pid_h, pid_s, H, stride_os, stride_ot, stride_oh, stride_ls,
                   stride_lt, s_layout: gl.constexpr, o_layout: gl.constexpr, R: gl.constexpr,
                   BLOCK_H: gl.constexpr, PARTIAL: gl.constexpr):
        """Normalise and store the head block's rows. A row with no key: out = 0 and lse = +inf (a partial:
        -inf, weight 0 in the combine)."""
        empty_row = l_i == 0.0
        l_safe = gl.where(empty_row, 1.0, l_i)
        lse = (m_i + gl.log2(l_safe)) * 0.6931471805599453
        lse = gl.where(empty_row, float("-inf") if PARTIAL else float("inf"), lse)
        offs_hs = pid_h * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, s_layout))
        gl.store(lse_ptr + pid_s * stride_ls + t.to(gl.int64) * stride_lt + offs_hs, lse, mask=offs_hs < H)
        o = acc / gl.expand_dims(gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout)), 1)
        offs_ho = pid_h * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, o_layout))
        o_rows = pid_s * stride_os + t.to(gl.int64) * stride_ot + offs_ho.to(gl.int64) * stride_oh
        o_ptrs = out_ptr + gl.expand_dims(o_rows, 1) + gl.expand_dims(
            gl.arange(0, R, layout=gl.SliceLayout(0, o_layout)), 0)
        gl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=gl.expand_dims(offs_ho < H, 1))

    @gluon.jit
    def _producer(lat_desc, pe_desc, bt_row_ptr, k_begin, n_full, page_size, k_lat_s, k_pe_s, ready, empty,
                  NBUF: gl.constexpr, BLOCK_N: gl.constexpr):
        """The one-warp load partition: tile ``j``'s TMA loads into slot ``j % NBUF`` once the compute
        warps have released it."""
        for j in range(n_full):
            slot = j % NBUF
            mbarrier.wait(empty.index(slot), ((j // NBUF) & 1) ^ 1)
            row = _tile_row(bt_row_ptr, k_begin + j * BLOCK_N, page_size)
            _issue(lat_desc, pe_desc, row, ready.index(slot), k_lat_s.index(slot), k_pe_s.index(slot))

    @gluon.jit
    def _gluon_decode_kernel(q_ptr, cache_ptr, lat_desc, pe_desc, bt_ptr, cu_ptr, dec_ptr, bid_ptr, out_ptr,
                             lse_ptr, qk_scale, H, page_size, num_splits,
                             stride_qt, stride_qh, stride_cb, stride_cr, stride_bt,
                             stride_os, stride_ot, stride_oh, stride_ls, stride_lt,
                             R: gl.constexpr, P: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr,
                             NBUF: gl.constexpr, PARTIAL: gl.constexpr, WARP_SPECIALIZE: gl.constexpr,
                             PIPELINE: gl.constexpr, num_warps: gl.constexpr):
        t, pid_h, pid_s, lo, k_begin, k_end, bt_row_ptr = _item(bid_ptr, cu_ptr, dec_ptr, bt_ptr, stride_bt, H,
                                                                num_splits, 0, BLOCK_H, BLOCK_N)

        q_lat_s = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, R], lat_desc.layout)
        q_pe_s = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, P], pe_desc.layout)
        k_lat_s = gl.allocate_shared_memory(gl.bfloat16, [NBUF, BLOCK_N, R], lat_desc.layout)
        k_pe_s = gl.allocate_shared_memory(gl.bfloat16, [NBUF, BLOCK_N, P], pe_desc.layout)
        ready, empty = _slot_barriers(NBUF, 1)

        if WARP_SPECIALIZE:
            n_full = gl.maximum(k_end - k_begin, 0) // BLOCK_N
            gl.warp_specialize([
                (_compute, (q_ptr, cache_ptr, lat_desc, pe_desc, bt_row_ptr, out_ptr, lse_ptr, q_lat_s, q_pe_s,
                            k_lat_s, k_pe_s, ready, empty, t, pid_h, pid_s, H, k_begin, k_end, qk_scale, page_size,
                            stride_qt, stride_qh, stride_cb, stride_cr, stride_os, stride_ot, stride_oh, stride_ls,
                            stride_lt, R, P, BLOCK_H, BLOCK_N, NBUF, PARTIAL, WARP_SPECIALIZE, PIPELINE, num_warps)),
                (_producer, (lat_desc, pe_desc, bt_row_ptr, k_begin, n_full, page_size, k_lat_s, k_pe_s, ready,
                             empty, NBUF, BLOCK_N)),
            ], [1], [24])
        else:
            _compute(q_ptr, cache_ptr, lat_desc, pe_desc, bt_row_ptr, out_ptr, lse_ptr, q_lat_s, q_pe_s, k_lat_s,
                     k_pe_s, ready, empty, t, pid_h, pid_s, H, k_begin, k_end, qk_scale, page_size,
                     stride_qt, stride_qh, stride_cb, stride_cr, stride_os, stride_ot, stride_oh, stride_ls,
                     stride_lt, R, P, BLOCK_H, BLOCK_N, NBUF, PARTIAL, WARP_SPECIALIZE, PIPELINE, num_warps)


    # ------------------------------------------------------------------ ping-pong (FlashMLA's schedule)
    @gluon.jit
    def _zero_rows(kl, k0, k_end, R: gl.constexpr, BLOCK_N: gl.constexpr):
        """Rows of the key tile at ``k0`` at or past ``k_end`` set to 0 in shared memory (64 columns at a time, by
        one warpgroup), fenced for the wgmmas of both warpgroups."""
        zl: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        keep = gl.expand_dims(k0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, zl)) < k_end, 1)
        for c in gl.static_range(R // 64):
            part = kl.slice(c * 64, 64, dim=1)
            part.store(gl.where(keep, part.load(zl), 0.0))
        fence_async_shared()
        _barrier()

    @gluon.jit
    def _pp_scores(q_pe_ptrs, q_pe_mask, q_lat_s, k_lat_s, k_pe_s, ready, j, k_begin, k_end, qk_scale,
                   s_layout: gl.constexpr, R: gl.constexpr, BLOCK_N: gl.constexpr, NBUF: gl.constexpr):
        """Scaled scores of this warpgroup's tile ``j`` (whole ``S``, positions at or past ``k_end`` -inf); a
        split's partial last tile has its rows past the end zeroed in shared memory first (for both P·Vs)."""
        slot = j % NBUF
        q_pe = gl.load(q_pe_ptrs, mask=q_pe_mask, other=0.0)
        mbarrier.wait(ready.index(slot), (j // NBUF) & 1)
        k0 = k_begin + j * BLOCK_N
        if k0 + BLOCK_N > k_end:                 # rows past the request's last position may be NaN
            _zero_rows(k_lat_s.index(slot), k0, k_end, R, BLOCK_N)
        sc = warpgroup_mma(q_pe, k_pe_s.index(slot).permute((1, 0)),
                           gl.zeros([q_pe.shape[0], BLOCK_N], gl.float32, s_layout), use_acc=False)
        sc = warpgroup_mma(q_lat_s, k_lat_s.index(slot).permute((1, 0)), sc) * qk_scale
        offs_n = k0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        return gl.where(gl.expand_dims(offs_n < k_end, 0), sc, float("-inf"))

    @gluon.jit
    def _pp_publish(sc, m_i, l_i, p_bufs, st_bufs, p_full, p_empty, j, row_o: gl.constexpr, st_l: gl.constexpr,
                    ME: gl.constexpr):
        """The softmax of this warpgroup's tile ``j`` with the running ``(m, l)``; ``P_j`` (bf16) and the new
        ``(m, l)`` published to the other warpgroup. Returns P, m, l and the rescale of O (in O's row layout)."""
        m_new = gl.maximum(m_i, gl.max(sc, axis=1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(sc - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p, axis=1)
        pb = p.to(gl.bfloat16)
        mbarrier.wait(p_empty.index(ME), ((j // 2) & 1) ^ 1)
        p_bufs.index(ME).store(pb)
        st_bufs.index(2 * ME).store(gl.convert_layout(m_new, st_l))
        st_bufs.index(2 * ME + 1).store(gl.convert_layout(l_i, st_l))
        fence_async_shared()
        _barrier()
        mbarrier.arrive(p_full.index(ME), count=1)
        return pb, m_new, l_i, gl.convert_layout(alpha, row_o)

    @gluon.jit
    def _pp_receive(st_bufs, ready, p_full, i, m_i, row_s: gl.constexpr, row_o: gl.constexpr, st_l: gl.constexpr,
                    ME: gl.constexpr, NBUF: gl.constexpr):
        """Wait for the other warpgroup's ``P_i`` and read its ``(m, l)``: the new running pair and the rescale
        of this warpgroup's O (in O's row layout)."""
        mbarrier.wait(ready.index(i % NBUF), (i // NBUF) & 1)
        mbarrier.wait(p_full.index(1 - ME), (i // 2) & 1)
        m_new = gl.convert_layout(st_bufs.index(2 * (1 - ME)).load(st_l), row_s)
        l_i = gl.convert_layout(st_bufs.index(2 * (1 - ME) + 1).load(st_l), row_s)
        return m_new, l_i, gl.convert_layout(gl.exp2(m_i - m_new), row_o)

    @gluon.jit
    def _pp_own(q_pe_ptrs, q_pe_mask, q_lat_s, k_lat_s, k_pe_s, p_bufs, st_bufs, ready, empty, p_full, p_empty, j,
                k_begin, k_end, qk_scale, m_i, l_i, acc, s_layout: gl.constexpr, o_layout: gl.constexpr,
                a_o: gl.constexpr, st_l: gl.constexpr, ME: gl.constexpr, R: gl.constexpr, BLOCK_N: gl.constexpr,
                NBUF: gl.constexpr):
        """This warpgroup's tile ``j`` alone: scores, softmax, publish, its P·V; the slot released."""
        HALF: gl.constexpr = R // 2
        sc = _pp_scores(q_pe_ptrs, q_pe_mask, q_lat_s, k_lat_s, k_pe_s, ready, j, k_begin, k_end, qk_scale,
                        s_layout, R, BLOCK_N, NBUF)
        pb, m_i, l_i, alpha = _pp_publish(sc, m_i, l_i, p_bufs, st_bufs, p_full, p_empty, j,
                                          gl.SliceLayout(1, o_layout), st_l, ME)
        acc = acc * gl.expand_dims(alpha, 1)
        acc = warpgroup_mma(gl.convert_layout(pb, a_o), k_lat_s.index(j % NBUF).slice(ME * HALF, HALF, dim=1), acc)
        _barrier()
        mbarrier.arrive(empty.index(j % NBUF), count=1)
        return m_i, l_i, acc

    @gluon.jit
    def _pp_consumer(q_ptr, out_ptr, lse_ptr, q_lat_s, k_lat_s, k_pe_s, p_bufs, st_bufs, ready, empty, p_full,
                     p_empty, t, pid_h, pid_s, H, k_begin, k_end, n_tiles, qk_scale, stride_qt, stride_qh, stride_os,
                     stride_ot, stride_oh, stride_ls, stride_lt, ME: gl.constexpr, R: gl.constexpr, P: gl.constexpr,
                     BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, NBUF: gl.constexpr, PARTIAL: gl.constexpr,
                     OVERLAP: gl.constexpr):
        """One of the two compute warpgroups of the ping-pong kernel (``ME`` 0 or 1). Tile ``j`` belongs to
        warpgroup ``j % 2``: its owner computes the whole ``S`` (64-wide instructions: Q read once), the softmax
        with the running max of tile ``j-1`` (published by the other warpgroup), and publishes ``P_j`` (bf16)
        and the running ``(m, l)`` through shared memory; both warpgroups add ``P_j·V_j`` to their own 256
        columns of O. While one runs its softmax, the other's S and P·V use the tensor cores; within a warpgroup
        the other's P·V runs asynchronously beside its own softmax with ``OVERLAP`` (more registers: ptxas
        reports more spills), else before it."""
        HALF: gl.constexpr = R // 2
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HALF, 16])
        a_s: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
        a_o: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        st_l: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        # Q's rope part comes from global memory (L2) into registers for each own tile, as the A operand of S's
        # rope product: the two P buffers take its place in shared memory, and holding it across the loop spilled.
        offs_h = pid_h * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, a_s))
        q_pe_ptrs = (q_ptr + gl.expand_dims(t.to(gl.int64) * stride_qt + offs_h.to(gl.int64) * stride_qh, 1) + R
                     + gl.expand_dims(gl.arange(0, P, layout=gl.SliceLayout(0, a_s)), 0))
        q_pe_mask = gl.expand_dims(offs_h < H, 1)
        m_i = gl.full([BLOCK_H], -1.0e30, gl.float32, row_s)
        l_i = gl.zeros([BLOCK_H], gl.float32, row_s)
        acc = gl.zeros([BLOCK_H, HALF], gl.float32, o_layout)
        # Warpgroup 0: its tile 0 alone; then steps that each take the other's tile i = j - 1 and this
        # warpgroup's tile j, the other's P·V running on the tensor cores while this one's softmax runs; last,
        # the other's final tile alone where it has one.
        if ME == 0:
            if n_tiles > 0:
                m_i, l_i, acc = _pp_own(q_pe_ptrs, q_pe_mask, q_lat_s, k_lat_s, k_pe_s, p_bufs, st_bufs, ready, empty,
                                        p_full, p_empty, 0, k_begin, k_end, qk_scale, m_i, l_i, acc, s_layout,
                                        o_layout, a_o, st_l, ME, R, BLOCK_N, NBUF)
            first = 1
            steps = (n_tiles + 1) // 2
        else:
            first = 0
            steps = n_tiles // 2
        for k in range(first, steps):
            j = 2 * k + ME
            i = j - 1
            sc = _pp_scores(q_pe_ptrs, q_pe_mask, q_lat_s, k_lat_s, k_pe_s, ready, j, k_begin, k_end, qk_scale,
                            s_layout, R, BLOCK_N, NBUF)
            m_i, l_i, alpha = _pp_receive(st_bufs, ready, p_full, i, m_i, row_s, row_o, st_l, ME, NBUF)
            acc = acc * gl.expand_dims(alpha, 1)
            acc = warpgroup_mma(p_bufs.index(1 - ME), k_lat_s.index(i % NBUF).slice(ME * HALF, HALF, dim=1), acc,
                                is_async=OVERLAP)
            pb, m_i, l_i, alpha = _pp_publish(sc, m_i, l_i, p_bufs, st_bufs, p_full, p_empty, j, row_o, st_l, ME)
            if OVERLAP:
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            _barrier()
            mbarrier.arrive(p_empty.index(1 - ME), count=1)
            mbarrier.arrive(empty.index(i % NBUF), count=1)
            acc = acc * gl.expand_dims(alpha, 1)
            acc = warpgroup_mma(gl.convert_layout(pb, a_o), k_lat_s.index(j % NBUF).slice(ME * HALF, HALF, dim=1),
                                acc)
            _barrier()
            mbarrier.arrive(empty.index(j % NBUF), count=1)
        if n_tiles % 2 == ME:                    # the other's last tile n_tiles - 1 (none when n_tiles == 0)
            i = n_tiles - 1
            if i >= 0:
                m_i, l_i, alpha = _pp_receive(st_bufs, ready, p_full, i, m_i, row_s, row_o, st_l, ME, NBUF)
                acc = acc * gl.expand_dims(alpha, 1)
                acc = warpgroup_mma(p_bufs.index(1 - ME), k_lat_s.index(i % NBUF).slice(ME * HALF, HALF, dim=1), acc)
                _barrier()
                mbarrier.arrive(p_empty.index(1 - ME), count=1)
                mbarrier.arrive(empty.index(i % NBUF), count=1)
        # Normalise and store this warpgroup's 256 columns (warpgroup 0 also stores lse).
        empty_row = l_i == 0.0
        l_safe = gl.where(empty_row, 1.0, l_i)
        if ME == 0:
            lse = (m_i + gl.log2(l_safe)) * 0.6931471805599453
            lse = gl.where(empty_row, float("-inf") if PARTIAL else float("inf"), lse)
            offs_hs = pid_h * BLOCK_H + gl.arange(0, BLOCK_H, layout=row_s)
            gl.store(lse_ptr + pid_s * stride_ls + t.to(gl.int64) * stride_lt + offs_hs, lse, mask=offs_hs < H)
        o = acc / gl.expand_dims(gl.convert_layout(l_safe, row_o), 1)
        offs_ho = pid_h * BLOCK_H + gl.arange(0, BLOCK_H, layout=row_o)
        o_rows = pid_s * stride_os + t.to(gl.int64) * stride_ot + offs_ho.to(gl.int64) * stride_oh + ME * HALF
        o_ptrs = out_ptr + gl.expand_dims(o_rows, 1) + gl.expand_dims(gl.arange(0, HALF, layout=gl.SliceLayout(0, o_layout)), 0)
        gl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=gl.expand_dims(offs_ho < H, 1))

    @gluon.jit
    def _pp_producer(q_ptr, out_ptr, lse_ptr, q_lat_s, k_lat_s, k_pe_s, p_bufs, st_bufs, ready, empty, p_full,
                     p_empty, t, pid_h, pid_s, H, k_begin, k_end, n_tiles, qk_scale, stride_qt, stride_qh, stride_os,
                     stride_ot, stride_oh, stride_ls, stride_lt, lat_desc, pe_desc, bt_row_ptr, page_size,
                     NBUF: gl.constexpr, BLOCK_N: gl.constexpr):
        """The ping-pong kernel's load warp (the dense kernel's ``_producer``; its slots are released by both
        compute warpgroups)."""
        _producer(lat_desc, pe_desc, bt_row_ptr, k_begin, n_tiles, page_size, k_lat_s, k_pe_s, ready, empty, NBUF,
                  BLOCK_N)

    @gluon.jit
    def _gluon_pingpong_kernel(q_ptr, cache_ptr, lat_desc, pe_desc, bt_ptr, cu_ptr, dec_ptr, bid_ptr, out_ptr,
                               lse_ptr, qk_scale, H, page_size, num_splits,
                               stride_qt, stride_qh, stride_cb, stride_cr, stride_bt,
                               stride_os, stride_ot, stride_oh, stride_ls, stride_lt,
                               R: gl.constexpr, P: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr,
                               NBUF: gl.constexpr, PARTIAL: gl.constexpr, OVERLAP: gl.constexpr,
                               num_warps: gl.constexpr):
        """Dense decode with FlashMLA's schedule (``pingpong`` variant; measured 35–70 % slower than
        ``gluon-ws`` on the H200 (RESULTS.md, issue 17 session 9), so not the default): the
        default partition and a 4-warp worker are the two compute warpgroups (``_pp_consumer``), a 1-warp worker
        loads. No separate masked-tile path (a split's partial last tile has its rows past the end zeroed in shared memory
        by its owner). Shared memory: Q's latent part 64 KB, two key slots 144 KB, two P buffers 16 KB."""
        t, pid_h, pid_s, lo, k_begin, k_end, bt_row_ptr = _item(bid_ptr, cu_ptr, dec_ptr, bt_ptr, stride_bt, H,
                                                                num_splits, 0, BLOCK_H, BLOCK_N)
        n_tiles = gl.cdiv(gl.maximum(k_end - k_begin, 0), BLOCK_N)

        q_lat_s = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, R], lat_desc.layout)
        k_lat_s = gl.allocate_shared_memory(gl.bfloat16, [NBUF, BLOCK_N, R], lat_desc.layout)
        k_pe_s = gl.allocate_shared_memory(gl.bfloat16, [NBUF, BLOCK_N, P], pe_desc.layout)
        gl.static_assert(NBUF == 2, "two key slots: one deadlocks (warpgroup 1 waits for a tile that only its own "
                                    "release can load), three do not fit in shared memory")
        p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_N], gl.bfloat16)
        p_bufs = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_H, BLOCK_N], p_layout)
        st_bufs = gl.allocate_shared_memory(gl.float32, [4, BLOCK_H], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        ready, empty = _slot_barriers(NBUF, 2)              # both compute warpgroups release a slot
        p_full, p_empty = _slot_barriers(2, 1)              # one P buffer per warpgroup
        # Q's latent rows by the default warps, before the partitions start (128 columns at a time).
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [num_warps, 1], [1, 0])
        offs_h = pid_h * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, ld))
        q_rows = gl.expand_dims(t.to(gl.int64) * stride_qt + offs_h.to(gl.int64) * stride_qh, 1)
        for c in gl.static_range(R // 128):
            cols = gl.expand_dims(c * 128 + gl.arange(0, 128, layout=gl.SliceLayout(0, ld)), 0)
            q_lat_s.slice(c * 128, 128, dim=1).store(
                gl.load(q_ptr + q_rows + cols, mask=gl.expand_dims(offs_h < H, 1), other=0.0))
        fence_async_shared()
        _barrier()
        gl.warp_specialize([
            (_pp_consumer, (q_ptr, out_ptr, lse_ptr, q_lat_s, k_lat_s, k_pe_s, p_bufs, st_bufs, ready, empty, p_full,
                            p_empty, t, pid_h, pid_s, H, k_begin, k_end, n_tiles, qk_scale, stride_qt, stride_qh,
                            stride_os, stride_ot, stride_oh, stride_ls, stride_lt, 0, R, P, BLOCK_H, BLOCK_N, NBUF,
                            PARTIAL, OVERLAP)),
            (_pp_consumer, (q_ptr, out_ptr, lse_ptr, q_lat_s, k_lat_s, k_pe_s, p_bufs, st_bufs, ready, empty, p_full,
                            p_empty, t, pid_h, pid_s, H, k_begin, k_end, n_tiles, qk_scale, stride_qt, stride_qh,
                            stride_os, stride_ot, stride_oh, stride_ls, stride_lt, 1, R, P, BLOCK_H, BLOCK_N, NBUF,
                            PARTIAL, OVERLAP)),
            (_pp_producer, (q_ptr, out_ptr, lse_ptr, q_lat_s, k_lat_s, k_pe_s, p_bufs, st_bufs, ready, empty, p_full,
                            p_empty, t, pid_h, pid_s, H, k_begin, k_end, n_tiles, qk_scale, stride_qt, stride_qh,
                            stride_os, stride_ot, stride_oh, stride_ls, stride_lt, lat_desc, pe_desc, bt_row_ptr,
                            page_size, NBUF, BLOCK_N)),
        ], [4, 1], [240, 24])

    # ------------------------------------------------------------------ sliding window over the FP8 cache
    @gluon.jit
    def _fp8_producer(lat_desc, sc_desc, pe_desc, bt_row_ptr, k_begin, n_tiles, page_size, st_lat, st_sc, pe_ring,
                      ready, empty, NBUF: gl.constexpr, BLOCK_N: gl.constexpr):
        """The one-warp load partition of the FP8 kernel: tile ``j``'s packed rows by TMA into stage ``j %
        NBUF`` (FP8 latent bytes, tile scales) and its rope rows into rope slot ``j % NBUF`` (bf16 already,
        a wgmma operand as they are), once the compute warps have released them."""
        for j in range(n_tiles):
            slot = j % NBUF
            mbarrier.wait(empty.index(slot), ((j // NBUF) & 1) ^ 1)
            row = _tile_row(bt_row_ptr, k_begin + j * BLOCK_N, page_size)
            bar = ready.index(slot)
            mbarrier.expect(bar, lat_desc.block_type.nbytes + sc_desc.block_type.nbytes + pe_desc.block_type.nbytes)
            _tma_load(lat_desc, [row, 0], bar, st_lat.index(slot))
            _tma_load(sc_desc, [row, 0], bar, st_sc.index(slot))
            _tma_load(pe_desc, [row, 0], bar, pe_ring.index(slot))

    @gluon.jit
    def _dequantize(st_lat, st_sc, lat_s, k0, lo, k_end, R: gl.constexpr, BLOCK_N: gl.constexpr,
                    num_warps: gl.constexpr):
        """Staged FP8 rows × their tile scales → the bf16 latent operand ``lat_s``, 128 columns (one scale tile)
        at a time; rows outside ``[lo, k_end)`` become 0 (past the request's last position they may be
        unwritten: a NaN there would survive ``0 · NaN`` in P·V)."""
        cv: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [num_warps, 1], [1, 0])
        sl: gl.constexpr = gl.BlockedLayout([1, 4], [32, 1], [num_warps, 1], [1, 0])
        NT: gl.constexpr = R // 128
        sc = st_sc.load(sl)                                                        # [BLOCK_N, NT] fp32
        cols = gl.expand_dims(gl.arange(0, NT, layout=gl.SliceLayout(0, sl)), 0)
        offs_n = k0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, cv))
        valid = gl.expand_dims((offs_n >= lo) & (offs_n < k_end), 1)
        for c in gl.static_range(NT):
            sc_c = gl.convert_layout(gl.sum(gl.where(cols == c, sc, 0.0), axis=1), gl.SliceLayout(1, cv))
            raw = st_lat.slice(c * 128, 128, dim=1).load(cv)
            x = raw.to(gl.float8e4nv, bitcast=True).to(gl.float32) * gl.expand_dims(sc_c, 1)
            lat_s.slice(c * 128, 128, dim=1).store(gl.where(valid, x, 0.0).to(gl.bfloat16))
        fence_async_shared()
        _barrier()

    @gluon.jit
    def _fp8_compute(q_ptr, out_ptr, lse_ptr, q_lat_s, q_pe_s, lat_s, st_lat, st_sc, pe_ring, ready, empty, t,
                     pid_h, pid_s, H, lo, k_begin, k_end, qk_scale, stride_qt, stride_qh, stride_os, stride_ot,
                     stride_oh, stride_ls, stride_lt, R: gl.constexpr, P: gl.constexpr, BLOCK_H: gl.constexpr,
                     BLOCK_N: gl.constexpr, NBUF: gl.constexpr, PARTIAL: gl.constexpr, num_warps: gl.constexpr):
        """The compute warps of the FP8 kernel: per tile, dequantise the staged rows into the bf16 operand,
        then the same online-softmax step as the dense kernel, masked to ``[lo, k_end)``."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                           instr_shape=[16, 32, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                           instr_shape=[16, 256, 16])
        n_tiles = gl.cdiv(gl.maximum(k_end - k_begin, 0), BLOCK_N)
        _load_q(q_ptr, t, pid_h, H, stride_qt, stride_qh, q_lat_s, q_pe_s, R, P, BLOCK_H, num_warps)
        m_i = gl.full([BLOCK_H], -1.0e30, gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_H], gl.float32, gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BLOCK_H, R], gl.float32, o_layout)
        for j in range(n_tiles):
            slot = j % NBUF
            k0 = k_begin + j * BLOCK_N
            mbarrier.wait(ready.index(slot), (j // NBUF) & 1)
            _dequantize(st_lat.index(slot), st_sc.index(slot), lat_s, k0, lo, k_end, R, BLOCK_N, num_warps)
            m_i, l_i, acc = _attend(q_lat_s, q_pe_s, lat_s, pe_ring.index(slot), m_i, l_i, acc, qk_scale, k0, lo,
                                    k_end, True, s_layout, o_layout, BLOCK_H, BLOCK_N)
            _barrier()                   # both warpgroups are done with the stage, the rope slot and lat_s
            mbarrier.arrive(empty.index(slot), count=1)
        _store_out(out_ptr, lse_ptr, acc, m_i, l_i, t, pid_h, pid_s, H, stride_os, stride_ot, stride_oh, stride_ls,
                   stride_lt, s_layout, o_layout, R, BLOCK_H, PARTIAL)

    @gluon.jit
    def _gluon_swa_fp8_kernel(q_ptr, lat_desc, sc_desc, pe_desc, bt_ptr, cu_ptr, dec_ptr, bid_ptr, out_ptr, lse_ptr,
                              qk_scale, H, window, page_size, num_splits,
                              stride_qt, stride_qh, stride_bt,
                              stride_os, stride_ot, stride_oh, stride_ls, stride_lt,
                              R: gl.constexpr, P: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr,
                              NBUF: gl.constexpr, PARTIAL: gl.constexpr, num_warps: gl.constexpr):
        """Sliding-window decode over the packed FP8 cache: a producer warp stages each tile's FP8 rows, scales
        and rope rows by TMA (``NBUF`` stages); the compute warps dequantise a stage into one bf16 operand
        buffer and attend to it. Shared memory: Q 72 KB, bf16 latent 64 KB, per stage 33 KB + 8 KB rope."""
        t, pid_h, pid_s, lo, k_begin, k_end, bt_row_ptr = _item(bid_ptr, cu_ptr, dec_ptr, bt_ptr, stride_bt, H,
                                                                num_splits, window, BLOCK_H, BLOCK_N)
        n_tiles = gl.cdiv(gl.maximum(k_end - k_begin, 0), BLOCK_N)

        bf16_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, R], gl.bfloat16)
        q_lat_s = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, R], bf16_layout)
        q_pe_s = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, P], pe_desc.layout)
        lat_s = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_N, R], bf16_layout)
        st_lat = gl.allocate_shared_memory(gl.uint8, [NBUF, BLOCK_N, R], lat_desc.layout)
        st_sc = gl.allocate_shared_memory(gl.float32, [NBUF, BLOCK_N, R // 128], sc_desc.layout)
        pe_ring = gl.allocate_shared_memory(gl.bfloat16, [NBUF, BLOCK_N, P], pe_desc.layout)
        ready, empty = _slot_barriers(NBUF, 1)
        gl.warp_specialize([
            (_fp8_compute, (q_ptr, out_ptr, lse_ptr, q_lat_s, q_pe_s, lat_s, st_lat, st_sc, pe_ring, ready, empty, t,
                            pid_h, pid_s, H, lo, k_begin, k_end, qk_scale, stride_qt, stride_qh, stride_os, stride_ot,
                            stride_oh, stride_ls, stride_lt, R, P, BLOCK_H, BLOCK_N, NBUF, PARTIAL, num_warps)),
            (_fp8_producer, (lat_desc, sc_desc, pe_desc, bt_row_ptr, k_begin, n_tiles, page_size, st_lat, st_sc,
                             pe_ring, ready, empty, NBUF, BLOCK_N)),
        ], [1], [24])


def supports(q: torch.Tensor, cache: torch.Tensor, rope_dim: int, window: int, fp8: bool) -> bool:
    """Whether a Gluon kernel is written for this call (else the caller takes the page-tile kernel): the dense
    kernel for a bf16 cache without a window, the FP8 kernel for the packed cache with one."""
    if not AVAILABLE or fp8 != (window > 0) or not q.is_cuda or cache.dim() != 3:
        return False
    if _major(q.device.index if q.device.index is not None else torch.cuda.current_device()) != 9:
        return False
    T, H, D = q.shape
    NB, ps, Dc = cache.shape
    width = fp8_format.row_bytes(D - rope_dim, rope_dim) if fp8 else D
    return (q.dtype == torch.bfloat16 and cache.dtype == (torch.uint8 if fp8 else torch.bfloat16) and D == 576
            and rope_dim == 64 and Dc == width and ps % BLOCK_N == 0 and q.stride(-1) == 1
            and cache.is_contiguous() and NB * ps < 2**31)


@functools.lru_cache(maxsize=16)
def _major(device_index: int) -> int:
    """The compute capability's major number of a CUDA device (read once: ``supports`` is on every call's path)."""
    return torch.cuda.get_device_capability(device_index)[0]


@functools.lru_cache(maxsize=16)
def _shared_layout(width: int, dtype: str):
    """The wgmma / TMA shared-memory layout of a ``[BLOCK_N, width]`` tile (computed once: it is on every call's
    host path, ~7 µs each)."""
    return gl.NVMMASharedLayout.get_default_for([BLOCK_N, width], getattr(gl, dtype))


class _Address:
    """What a launch reads of a descriptor's tensor — its address and dtype — without holding the tensor, so that a
    remembered descriptor does not keep a dropped cache's memory alive (``_remembered``)."""

    __slots__ = ("_ptr", "dtype")

    def __init__(self, t: torch.Tensor):
        self._ptr, self.dtype = t.data_ptr(), t.dtype

    def data_ptr(self) -> int:
        return self._ptr


_REMEMBERED: dict = {}
_REMEMBERED_MAX = 1024     # a layer a cache: DeepSeek-V3 has 61, and a few models may share the process


def _remembered(kind: str, cache: torch.Tensor, R: int, P: int, build):
    """``build(cache, R, P)``'s descriptors, built once per cache tensor and reused while it is the same object at
    the same address and layout: a layer's cache is the same tensor every step, and building three descriptors
    costs the host ~40 µs a launch (issue 14). Held weakly: a dropped cache's entry is rebuilt, never read."""
    key = (kind, id(cache), cache.data_ptr(), cache.shape, cache.stride(), cache.dtype, R, P)
    hit = _REMEMBERED.get(key)
    if hit is not None and hit[0]() is cache:
        return hit[1]
    descs = build(cache, R, P)
    for d in descs:
        d.base = _Address(d.base)
    if len(_REMEMBERED) >= _REMEMBERED_MAX:
        _REMEMBERED.clear()
    _REMEMBERED[key] = (weakref.ref(cache), descs)
    return descs


def descriptors(cache: torch.Tensor, R: int, P: int):
    """TMA descriptors over the cache rows (``[NB·ps, D]``): latent boxes ``[64, R]`` and rope boxes ``[64, P]``,
    in the 128-byte-swizzled layouts the wgmma operands use."""
    rows = cache.view(-1, cache.shape[-1])
    lat_layout = _shared_layout(R, "bfloat16")
    pe_layout = _shared_layout(P, "bfloat16")
    return (GluonDescriptor(rows, [rows.shape[0], R], [rows.stride(0), 1], [BLOCK_N, R], lat_layout),
            GluonDescriptor(rows[:, R:], [rows.shape[0], P], [rows.stride(0), 1], [BLOCK_N, P], pe_layout))


def fp8_descriptors(cache: torch.Tensor, R: int, P: int):
    """TMA descriptors over the packed rows (``[NB·ps, bytes]``): FP8 latent bytes ``[64, R]``, tile scales
    ``[64, R/128]`` (fp32) and rope ``[64, P]`` (bf16), at their byte offsets in a row (SPEC §6)."""
    rows = cache.view(-1, cache.shape[-1])
    f32 = rows.view(torch.float32)[:, fp8_format.scale_offset(R) // 4:][:, :fp8_format.num_tiles(R)]
    b16 = rows.view(torch.bfloat16)[:, fp8_format.rope_offset(R) // 2:][:, :P]
    u8_layout = _shared_layout(R, "uint8")
    sc_layout = _shared_layout(f32.shape[1], "float32")
    pe_layout = _shared_layout(P, "bfloat16")
    return (GluonDescriptor(rows, [rows.shape[0], R], [rows.stride(0), 1], [BLOCK_N, R], u8_layout),
            GluonDescriptor(f32, list(f32.shape), [f32.stride(0), 1], [BLOCK_N, f32.shape[1]], sc_layout),
            GluonDescriptor(b16, list(b16.shape), [b16.stride(0), 1], [BLOCK_N, P], pe_layout))


def launch_fp8(q, cache, block_tables, cu_seqlens_q, seq_lens_decoder, batch_id_per_token, qk_scale, window: int,
               o_t, l_t, o_strides, l_strides, splits: int, nbuf: int = 2, descs=None):
    """One launch of ``_gluon_swa_fp8_kernel`` (as ``launch``, over the packed FP8 cache with a window)."""
    T, H, D = q.shape
    P = 64
    R = D - P
    if descs is None:
        descs = _remembered("fp8", cache, R, P, fp8_descriptors)
    return launch_kernel(_gluon_swa_fp8_kernel, (T * cdiv(H, BLOCK_H), splits),
        q, *descs, block_tables, cu_seqlens_q, seq_lens_decoder, batch_id_per_token, o_t, l_t, qk_scale, H, window,
        cache.shape[1], splits, q.stride(0), q.stride(1), block_tables.stride(0), *o_strides, *l_strides,
        R=R, P=P, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, NBUF=nbuf, PARTIAL=splits > 1, num_warps=8, maxnreg=168)


def launch(q, cache, block_tables, cu_seqlens_q, seq_lens_decoder, batch_id_per_token, qk_scale, o_t, l_t,
           o_strides, l_strides, splits: int, warp_specialize: bool, pipeline: bool = False,
           pingpong: bool | str = False, nbuf: int = 2, descs=None):
    """One launch of ``_gluon_decode_kernel`` over (token × head block, split), writing ``o_t`` / ``l_t`` (the
    outputs, or the fp32 split partials) at the given (split, token, head) strides; ``descs``: ``descriptors(cache,
    ...)`` when the caller has them. Returns the compiled kernel."""
    T, H, D = q.shape
    P = 64
    R = D - P
    lat_desc, pe_desc = _remembered("dense", cache, R, P, descriptors) if descs is None else descs
    grid = (T * cdiv(H, BLOCK_H), splits)
    if pingpong:      # 4 default warps + 4 + 1 worker warps: three warpgroups, as the warp-specialised kernel
        return launch_kernel(_gluon_pingpong_kernel, grid,
            q, cache, lat_desc, pe_desc, block_tables, cu_seqlens_q, seq_lens_decoder, batch_id_per_token, o_t,
            l_t, qk_scale, H, cache.shape[1], splits, q.stride(0), q.stride(1), cache.stride(0), cache.stride(1),
            block_tables.stride(0), *o_strides, *l_strides,
            R=R, P=P, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, NBUF=nbuf, PARTIAL=splits > 1, OVERLAP=pingpong == "overlap",
            num_warps=4, maxnreg=168)
    extra = dict(maxnreg=168) if warp_specialize else {}     # 3 warpgroups: 24 registers to the producer's
    return launch_kernel(_gluon_decode_kernel, grid,
        q, cache, lat_desc, pe_desc, block_tables, cu_seqlens_q, seq_lens_decoder, batch_id_per_token, o_t, l_t,
        qk_scale, H, cache.shape[1], splits, q.stride(0), q.stride(1), cache.stride(0), cache.stride(1),
        block_tables.stride(0), *o_strides, *l_strides,
        R=R, P=P, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, NBUF=nbuf, PARTIAL=splits > 1,
        WARP_SPECIALIZE=warp_specialize, PIPELINE=pipeline and warp_specialize, num_warps=8, **extra)
