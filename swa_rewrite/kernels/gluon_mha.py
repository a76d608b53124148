"""MHA-mode sliding-window prefill attention in Gluon for Hopper (issue 18): a persistent, warp-specialised
version of ``mha_window._mha_window_fwd_kernel`` (same workspace, same masks, same outputs).

Why: at W = 128 the plain-Triton kernel visits three 64-key tiles per 64-query tile, and each program pays its
query load, pipeline fill and store for those three tiles — 95 TFLOP/s where long windows reach 375 (RESULTS.md,
issue 18). Here one program per SM loops over work items, and a one-warp producer partition runs ahead through
them by TMA, so the next item's query and key tiles are in shared memory while the current one is computed:

- **Work item**: 128 query rows of one request (a ``tile_cu`` tile of ``BLOCK_M = 128``) and one head; items in
  the order (head, query tile), query tiles fastest, programs striding by the grid (``tile_requests`` gives each
  tile's request).
- **Two compute warpgroups** (the default partition and a 4-warp worker) own rows ``0 … 63`` and ``64 … 127``
  of the item: each its own ``S [64, 64]`` and ``O [64, 128]`` (fp32, wgmma layouts), the query from shared
  memory as the A operand of ``S``, P from registers as the A operand of ``P·V``. Both read the same key tiles;
  a tile one warpgroup's rows cannot see (past its last row, or before its window) it waits for and releases
  without computing — at W = 128 each warpgroup computes 3 of the item's 4 tiles.
- **Epilogue**: a warpgroup whose 64 rows all belong to the item writes its normalised output into its half of
  the item's query slot (its query is no longer read) and stores it with one TMA box, then releases the slot once
  the store has read shared memory; rows a request ends inside go out by masked stores (``tma_out``). The next
  item's step metadata is loaded after the key loop, so its latency passes in the epilogue (``prefetch``). Both
  were found by ncu at W = 128, where the item's start and end took ~38 % of a warpgroup's time (RESULTS.md,
  issue 18, session 11).
- **Producer** (one warp): per item the query rows (``[128, N]`` and ``[128, P]`` boxes of 2-D views of
  ``q_nope`` / ``q_pe``: head ``h`` starts at column ``h · stride``) into one of ``QBUF`` query slots, then each
  key tile's ``k_nope``, ``v`` (``[64, N]`` / ``[64, V]`` boxes of the ``[M, Hg·(N+V)]`` workspace) and ``k_pe``
  (``[64, P]``) into one of ``NBUF`` slots; "ready" barriers carry the TMA byte counts, "empty" ones count the two
  warpgroups' releases.

Rows past the workspace or the query tensor come back as zeros; rows of other requests inside them are finite
(the workspace holds gathered, expanded rows; ``kv_slots`` never points at a freed slot) and masked in the
scores, as in the Triton kernel's TMA path. Key tiles: the sink rows below the tile's window, then the window's
positions ``lo … p1`` (``mha_window`` module docstring), every computed tile masked.

Gluon has no interpreter: ``mha_window.mha_window_attention`` takes this kernel (``kernel="gluon"``) only on a
Hopper GPU for the shapes it is written for (``supports``), else the interpreter-tested Triton kernel.
``tests/kernels/hopper_compile.py`` compiles it for sm_90 without a GPU; the GPU tests check it against the
float64 reference.
"""

from __future__ import annotations

import functools

import torch

from . import cdiv
from ._common import _sm_count
from .gluon_mla import AVAILABLE

if AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

    from .gluon_mla import _barrier, _slot_barriers, _tma_load
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

BLOCK_M = 128        # query rows per work item (64 per compute warpgroup)
BLOCK_N = 64         # keys per tile
HALF_M = 64

if AVAILABLE:

    @gluon.jit
    def _item_loads(item, n_tiles_all, B, tile_b_ptr, tile_cu_ptr, cu_ptr, dec_ptr, kv_cu_ptr):
        """The step metadata of work item ``item``'s request ``b``: ``cu_seqlens_q[b]``, ``cu_seqlens_q[b + 1]``,
        ``seq_lens_decoder[b]``, ``kv_cu[b]``, ``tile_cu[b]``. Reads in bounds for any ``item ≥ 0`` (a tile taken
        modulo the step's tiles, ``b`` clamped), so a consumer can load the next item's before it knows there is
        one."""
        tile = item % gl.maximum(n_tiles_all, 1)
        b = gl.minimum(gl.maximum(gl.load(tile_b_ptr + tile), 0), B - 1)
        return (b, gl.load(cu_ptr + b), gl.load(cu_ptr + b + 1), gl.load(dec_ptr + b), gl.load(kv_cu_ptr + b),
                gl.load(tile_cu_ptr + b))

    @gluon.jit
    def _item_geometry(item, n_tiles_all, cu_b, cu_b1, dec_b, base, tcu_b, window, sinks, BLOCK_M: gl.constexpr,
                       BLOCK_N: gl.constexpr):
        """Work item ``item`` (with its ``_item_loads``) → head ``h``, its query rows (first token ``tok0``,
        ``n_q`` of them, positions ``p0 … p1``), the first window position ``lo`` of the tile, the sink rows below
        it (``n_sink`` rows from workspace row ``base``), the workspace row of position 0 (``win0``: position
        ``x`` is row ``win0 + x``) and its key tiles: ``n_st`` of sinks, then ``n_wt`` of the window."""
        h = item // n_tiles_all
        tile = item % n_tiles_all
        i0 = (tile - tcu_b) * BLOCK_M
        n_q = gl.minimum(cu_b1 - cu_b - i0, BLOCK_M)
        p0 = dec_b + i0
        p1 = p0 + n_q - 1
        a_b = gl.maximum(dec_b - window + 1, 0)
        ns_b = gl.minimum(sinks, a_b)
        lo = gl.maximum(a_b, p0 - window + 1)
        n_sink = ns_b + gl.maximum(gl.minimum(sinks, lo) - a_b, 0)
        win0 = base + ns_b - a_b
        n_st = gl.cdiv(n_sink, BLOCK_N)
        n_wt = gl.cdiv(gl.maximum(p1 + 1 - lo, 0), BLOCK_N)
        return h, cu_b + i0, n_q, p0, p1, lo, n_sink, base, win0, n_st, n_wt

    @gluon.jit
    def _mha_producer(qn_desc, qp_desc, kn_desc, v_desc, kp_desc, q_n_s, q_p_s, k_n_s, k_p_s, v_s, q_ready,
                      q_empty, ready, empty, tile_b_ptr, tile_cu_ptr, cu_ptr, dec_ptr, kv_cu_ptr, n_tiles_all, B,
                      n_local, window, sinks, qn_col, qp_col, kv_col, N: gl.constexpr, BLOCK_M: gl.constexpr,
                      BLOCK_N: gl.constexpr, NBUF: gl.constexpr, QBUF: gl.constexpr):
        """The one-warp load partition: for each of this program's items, its query rows into query slot
        ``j % QBUF``, then its key tiles into the key slots in turn, each once both warpgroups released it."""
        cnt = 0
        for j in range(n_local):
            item = gl.program_id(0) + j * gl.num_programs(0)
            b, cu_b, cu_b1, dec_b, base, tcu_b = _item_loads(item, n_tiles_all, B, tile_b_ptr, tile_cu_ptr, cu_ptr,
                                                             dec_ptr, kv_cu_ptr)
            h, tok0, n_q, p0, p1, lo, n_sink, base, win0, n_st, n_wt = _item_geometry(
                item, n_tiles_all, cu_b, cu_b1, dec_b, base, tcu_b, window, sinks, BLOCK_M, BLOCK_N)
            qs = j % QBUF
            mbarrier.wait(q_empty.index(qs), ((j // QBUF) & 1) ^ 1)
            bar = q_ready.index(qs)
            mbarrier.expect(bar, qn_desc.block_type.nbytes + qp_desc.block_type.nbytes)
            _tma_load(qn_desc, [tok0, h * qn_col], bar, q_n_s.index(qs))
            _tma_load(qp_desc, [tok0, h * qp_col], bar, q_p_s.index(qs))
            for t in range(n_st + n_wt):
                slot = cnt % NBUF
                mbarrier.wait(empty.index(slot), ((cnt // NBUF) & 1) ^ 1)
                row = gl.where(t < n_st, base + t * BLOCK_N, win0 + lo + (t - n_st) * BLOCK_N)
                bar = ready.index(slot)
                mbarrier.expect(bar, kn_desc.block_type.nbytes + v_desc.block_type.nbytes
                                + kp_desc.block_type.nbytes)
                _tma_load(kn_desc, [row, h * kv_col], bar, k_n_s.index(slot))
                _tma_load(v_desc, [row, h * kv_col + N], bar, v_s.index(slot))
                _tma_load(kp_desc, [row, 0], bar, k_p_s.index(slot))
                cnt += 1

    @gluon.jit
    def _mha_consumer(qn_desc, qp_desc, kn_desc, v_desc, kp_desc, o_desc, q_n_s, q_p_s, k_n_s, k_p_s, v_s, q_ready,
                      q_empty, ready, empty, tile_b_ptr, tile_cu_ptr, cu_ptr, dec_ptr, kv_cu_ptr, out_ptr, lse_ptr,
                      n_tiles_all, B, n_local, qk_scale, window, sinks, qn_col, qp_col, kv_col, stride_ot,
                      stride_oh, stride_lt, stride_lh, N: gl.constexpr, P: gl.constexpr, V: gl.constexpr,
                      BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NBUF: gl.constexpr, QBUF: gl.constexpr,
                      ME: gl.constexpr, SINKS: gl.constexpr, PREFETCH: gl.constexpr, TMA_OUT: gl.constexpr):
        """Compute warpgroup ``ME``: rows ``64·ME … 64·ME + 63`` of every item of this program."""
        HALF: gl.constexpr = BLOCK_M // 2
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, V, 16])
        a_o: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        offs_ms = ME * HALF + gl.arange(0, HALF, layout=row_s)
        offs_mo = ME * HALF + gl.arange(0, HALF, layout=row_o)
        offs_n = gl.arange(0, BLOCK_N, layout=col_s)
        offs_v = gl.arange(0, V, layout=gl.SliceLayout(0, o_layout))
        cnt = 0
        # PREFETCH: the next item's metadata is loaded after this one's key loop, so its latency (~15 % of a
        # warpgroup's time at W = 128 by ncu when loaded where used) passes during the epilogue, and the values are
        # not live in the key loop (held there, they spilled and the spill store waited for the loads); the first
        # item's here.
        b1, c1, e1, d1, k1, t1 = _item_loads(gl.program_id(0), n_tiles_all, B, tile_b_ptr, tile_cu_ptr, cu_ptr,
                                             dec_ptr, kv_cu_ptr)
        for j in range(n_local):
            item = gl.program_id(0) + j * gl.num_programs(0)
            if PREFETCH:
                cu_b, cu_b1, dec_b, base, tcu_b = c1, e1, d1, k1, t1
            else:
                b0, cu_b, cu_b1, dec_b, base, tcu_b = _item_loads(item, n_tiles_all, B, tile_b_ptr, tile_cu_ptr,
                                                                  cu_ptr, dec_ptr, kv_cu_ptr)
            h, tok0, n_q, p0, p1, lo, n_sink, base, win0, n_st, n_wt = _item_geometry(
                item, n_tiles_all, cu_b, cu_b1, dec_b, base, tcu_b, window, sinks, BLOCK_M, BLOCK_N)
            first = p0 + ME * HALF                           # this warpgroup's first and last query positions
            last = gl.minimum(p1, first + HALF - 1)
            has_rows = n_q > ME * HALF
            pos = p0 + offs_ms
            qs = j % QBUF
            mbarrier.wait(q_ready.index(qs), (j // QBUF) & 1)
            q_n = q_n_s.index(qs).slice(ME * HALF, HALF, dim=0)
            q_p = q_p_s.index(qs).slice(ME * HALF, HALF, dim=0)
            m_i = gl.full([HALF], -1.0e30, gl.float32, row_s)      # running maximum of the unscaled scores
            l_i = gl.zeros([HALF], gl.float32, row_s)
            acc = gl.zeros([HALF, V], gl.float32, o_layout)
            for t in range(n_st + n_wt):
                slot = cnt % NBUF
                mbarrier.wait(ready.index(slot), (cnt // NBUF) & 1)
                k0 = lo + (t - n_st) * BLOCK_N                # a window tile's first position
                sink = t < n_st
                need = has_rows & (sink | ((k0 <= last) & ((k0 + BLOCK_N - 1 > first - window) | (k0 < sinks))))
                if need:
                    s = warpgroup_mma(q_p, k_p_s.index(slot).permute((1, 0)),
                                      gl.zeros([HALF, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
                    s = warpgroup_mma(q_n, k_n_s.index(slot).permute((1, 0)), s, is_async=True)
                    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
                    if SINKS:
                        kpos = gl.expand_dims(k0 + offs_n, 0)
                        qpos = gl.expand_dims(pos, 1)
                        in_window = (kpos <= qpos) & ((kpos > qpos - window) | (kpos < sinks))
                        sink_row = gl.expand_dims(t * BLOCK_N + offs_n < n_sink, 0) & (qpos >= 0)
                        s = gl.where(gl.where(sink, sink_row, in_window), s, float("-inf"))
                    elif (k0 + BLOCK_N - 1 > first) | (k0 <= last - window):   # the window cuts the tile
                        kpos = gl.expand_dims(k0 + offs_n, 0)
                        qpos = gl.expand_dims(pos, 1)
                        s = gl.where((kpos <= qpos) & (kpos > qpos - window), s, float("-inf"))
                    m_new = gl.maximum(m_i, gl.max(s, axis=1))
                    m_scaled = m_new * qk_scale
                    alpha = gl.exp2(m_i * qk_scale - m_scaled)
                    p = gl.exp2(s * qk_scale - gl.expand_dims(m_scaled, 1))    # (one FMA per score)
                    l_i = l_i * alpha + gl.sum(p, axis=1)
                    m_i = m_new
                    acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
                    acc = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), a_o), v_s.index(slot), acc,
                                        is_async=True)
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                _barrier()                                   # the warpgroup is done with the slot
                mbarrier.arrive(empty.index(slot), count=1)
                cnt += 1
            if PREFETCH:
                b1, c1, e1, d1, k1, t1 = _item_loads(item + gl.num_programs(0), n_tiles_all, B, tile_b_ptr,
                                                     tile_cu_ptr, cu_ptr, dec_ptr, kv_cu_ptr)
            # Normalise and store this warpgroup's rows (every valid query attends at least to itself).
            l_safe = gl.where(l_i == 0.0, 1.0, l_i)
            lse = gl.where(l_i == 0.0, float("inf"), (m_i * qk_scale + gl.log2(l_safe)) * 0.6931471805599453)
            o = (acc / gl.expand_dims(gl.convert_layout(l_safe, row_o), 1)).to(out_ptr.dtype.element_ty)
            if TMA_OUT and n_q >= (ME + 1) * HALF:
                # Rows all this item's: through this warpgroup's half of the query slot (its query rows are read)
                # by one TMA store, which is done reading shared memory before the slot is released.
                o_s = q_n_s.index(qs).slice(ME * HALF, HALF, dim=0)
                o_s.store(o)
                fence_async_shared()
                _barrier()
                _tma_store(o_desc, [tok0 + ME * HALF, h * stride_oh], o_s)
            else:
                tok_o = (tok0 + offs_mo).to(gl.int64)
                o_ptrs = out_ptr + gl.expand_dims(tok_o * stride_ot + h * stride_oh, 1) + gl.expand_dims(offs_v, 0)
                gl.store(o_ptrs, o, mask=gl.expand_dims(offs_mo < n_q, 1))
            tok_s = (tok0 + offs_ms).to(gl.int64)
            gl.store(lse_ptr + tok_s * stride_lt + h * stride_lh, lse, mask=offs_ms < n_q)
            if TMA_OUT:
                tma.store_wait(0)
            _barrier()
            mbarrier.arrive(q_empty.index(qs), count=1)

    @gluon.jit
    def _gluon_mha_window_kernel(qn_desc, qp_desc, kn_desc, v_desc, kp_desc, o_desc, out_ptr, lse_ptr, cu_ptr,
                                 dec_ptr, kv_cu_ptr, tile_cu_ptr, tile_b_ptr, qk_scale, B, Hg, window, sinks, qn_col,
                                 qp_col, kv_col, stride_ot, stride_oh, stride_lt, stride_lh,
                                 N: gl.constexpr, P: gl.constexpr, V: gl.constexpr, BLOCK_M: gl.constexpr,
                                 BLOCK_N: gl.constexpr, NBUF: gl.constexpr, QBUF: gl.constexpr, SINKS: gl.constexpr,
                                 PREFETCH: gl.constexpr, TMA_OUT: gl.constexpr, num_warps: gl.constexpr):
        n_tiles_all = gl.load(tile_cu_ptr + B)
        total = n_tiles_all * Hg
        n_local = gl.cdiv(gl.maximum(total - gl.program_id(0), 0), gl.num_programs(0))
        q_n_s = gl.allocate_shared_memory(gl.bfloat16, [QBUF, BLOCK_M, N], qn_desc.layout)
        q_p_s = gl.allocate_shared_memory(gl.bfloat16, [QBUF, BLOCK_M, P], qp_desc.layout)
        k_n_s = gl.allocate_shared_memory(gl.bfloat16, [NBUF, BLOCK_N, N], kn_desc.layout)
        v_s = gl.allocate_shared_memory(gl.bfloat16, [NBUF, BLOCK_N, V], v_desc.layout)
        k_p_s = gl.allocate_shared_memory(gl.bfloat16, [NBUF, BLOCK_N, P], kp_desc.layout)
        ready, empty = _slot_barriers(NBUF, 2)               # both compute warpgroups release a key slot
        q_ready, q_empty = _slot_barriers(QBUF, 2)           # ... and a query slot
        gl.warp_specialize([
            (_mha_consumer, (qn_desc, qp_desc, kn_desc, v_desc, kp_desc, o_desc, q_n_s, q_p_s, k_n_s, k_p_s, v_s,
                             q_ready, q_empty, ready, empty, tile_b_ptr, tile_cu_ptr, cu_ptr, dec_ptr, kv_cu_ptr,
                             out_ptr, lse_ptr, n_tiles_all, B, n_local, qk_scale, window, sinks, qn_col, qp_col,
                             kv_col, stride_ot, stride_oh, stride_lt, stride_lh, N, P, V, BLOCK_M, BLOCK_N,
                             NBUF, QBUF, 0, SINKS, PREFETCH, TMA_OUT)),    # ME = 0
            (_mha_consumer, (qn_desc, qp_desc, kn_desc, v_desc, kp_desc, o_desc, q_n_s, q_p_s, k_n_s, k_p_s, v_s,
                             q_ready, q_empty, ready, empty, tile_b_ptr, tile_cu_ptr, cu_ptr, dec_ptr, kv_cu_ptr,
                             out_ptr, lse_ptr, n_tiles_all, B, n_local, qk_scale, window, sinks, qn_col, qp_col,
                             kv_col, stride_ot, stride_oh, stride_lt, stride_lh, N, P, V, BLOCK_M, BLOCK_N,
                             NBUF, QBUF, 1, SINKS, PREFETCH, TMA_OUT)),    # ME = 1
            (_mha_producer, (qn_desc, qp_desc, kn_desc, v_desc, kp_desc, q_n_s, q_p_s, k_n_s, k_p_s, v_s, q_ready,
                             q_empty, ready, empty, tile_b_ptr, tile_cu_ptr, cu_ptr, dec_ptr, kv_cu_ptr, n_tiles_all,
                             B, n_local, window, sinks, qn_col, qp_col, kv_col, N, BLOCK_M, BLOCK_N, NBUF, QBUF)),
        ], [4, 1], [168 if BLOCK_N == 64 else 232, 24])     # (maxnreg 168: 384 threads must fit the SM's registers)


def supports(q_nope: torch.Tensor, q_pe: torch.Tensor, V: int) -> bool:
    """Whether the Gluon kernel is written for these queries: a Hopper GPU, bf16, ``N = V = 128``, ``P = 64``,
    TMA-compatible views (unit last stride, 16-byte aligned base and strides). The workspace it reads is checked
    by ``workspace_ok``."""
    if not AVAILABLE or not q_nope.is_cuda or torch.cuda.get_device_capability(q_nope.device)[0] != 9:
        return False
    if (q_nope.shape[-1], q_pe.shape[-1], V) != (128, 64, 128) or q_nope.shape[0] >= 2**31:
        return False
    return all(x.dtype == torch.bfloat16 and _tma_ok(x) for x in (q_nope, q_pe))


def workspace_ok(kv: torch.Tensor, k_pe: torch.Tensor) -> bool:
    """``kv [M, Hg, N + V]`` contiguous and ``k_pe [M, P]`` TMA-compatible, both bf16."""
    return (kv.dtype == k_pe.dtype == torch.bfloat16 and kv.is_contiguous() and kv.data_ptr() % 16 == 0
            and _tma_ok(k_pe) and 0 < kv.shape[0] < 2**31)


def _tma_ok(x: torch.Tensor) -> bool:
    return x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(s * x.element_size() % 16 == 0
                                                                 for s in x.stride()[:-1])


@functools.lru_cache(maxsize=8)
def _layout(rows: int, width: int):
    return gl.NVMMASharedLayout.get_default_for([rows, width], gl.bfloat16)


def _as_rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """A 2-D ``[T, (H-1)·stride_h + width]`` view of ``x [T, H, width]`` (unit last stride): head ``h``'s columns
    start at ``h · stride_h`` (what TMA boxes address; the last head's columns end the view)."""
    T, H, _ = x.shape
    return x.as_strided((T, (H - 1) * x.stride(1) + width), (x.stride(0), 1))


def _desc(x2: torch.Tensor, rows: int, width: int):
    """A TMA descriptor of ``[rows, width]`` boxes over the 2-D view ``x2``, in the default swizzled layout."""
    return GluonDescriptor(x2, list(x2.shape), list(x2.stride()), [rows, width], _layout(rows, width))


def launch(q_nope, q_pe, kv, k_pe, kv_cu, cu_seqlens_q, seq_lens_decoder, qk_scale, window: int, sinks: int,
           out, lse, tile_cu, tile_b, nbuf: int | None = None, qbuf: int | None = None, block_n: int = BLOCK_N,
           programs: int = 0, prefetch: bool = True, tma_out: bool = True):
    """One launch over the ``tile_cu`` tiles (of ``BLOCK_M`` rows) × heads; ``programs`` (default one per SM).
    ``block_n``: keys per tile, 64 or 128 (128: fewer, larger steps; its S takes 64 more registers per thread, and
    the rings must shrink to fit shared memory: ``nbuf=2, qbuf=1``, the defaults given None). ``prefetch``: load
    the next item's step metadata during this one; ``tma_out``: store the output by TMA through the query slot
    (both on by default; off, the kernel as first measured, for A/B runs)."""
    assert block_n in (64, 128), f"block_n must be 64 or 128, got {block_n}"
    nbuf = nbuf or (3 if block_n == 64 else 2)
    qbuf = qbuf or (2 if block_n == 64 else 1)
    T, Hg, N = q_nope.shape
    P, V = q_pe.shape[-1], out.shape[-1]
    M = kv.shape[0]
    B = kv_cu.shape[0] - 1
    kv2 = kv.view(M, Hg * (N + V))
    qn2, qp2 = _as_rows(q_nope, N), _as_rows(q_pe, P)
    descs = (_desc(qn2, BLOCK_M, N), _desc(qp2, BLOCK_M, P), _desc(kv2, block_n, N), _desc(kv2, block_n, V),
             _desc(k_pe, block_n, P))
    # The output through TMA stores where its rows allow (bf16, TMA-compatible): else (and for a warpgroup's rows
    # a request ends inside) masked stores, and the descriptor passed is an unused stand-in.
    tma_out = bool(tma_out) and out.dtype == torch.bfloat16 and _tma_ok(out)
    o_desc = _desc(_as_rows(out, V), HALF_M, V) if tma_out else descs[0]
    bound = (cdiv(T, BLOCK_M) + B) * Hg
    grid = (max(1, min(bound, programs or _sm_count(q_nope.device))),)
    return _gluon_mha_window_kernel[grid](
        *descs, o_desc, out, lse, cu_seqlens_q, seq_lens_decoder, kv_cu, tile_cu, tile_b, qk_scale, B, Hg, window,
        sinks, q_nope.stride(1), q_pe.stride(1), kv.stride(1), out.stride(0), out.stride(1),
        lse.stride(0), lse.stride(1), N=N, P=P, V=V, BLOCK_M=BLOCK_M, BLOCK_N=block_n, NBUF=nbuf, QBUF=qbuf,
        SINKS=sinks > 0, PREFETCH=bool(prefetch), TMA_OUT=tma_out, num_warps=4, maxnreg=168)
