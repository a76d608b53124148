"""MHA-mode sliding-window prefill (SPEC §13, issue 18): expand the window's latent rows into per-head keys and
values, then a flash-attention kernel over ragged query chunks.

MQA mode (``sparse_mla``, ``gathered_mla``) attends with ``q_abs [H, R + P]`` against the latent and pays
``2·(D + R)`` FLOPs per head and key; MHA mode pays ``2·(N + P) + 2·V`` (640 for DeepSeek-V3, 3.4× fewer), after
an expansion GEMM ``latent[:, :R] @ kv_b_proj.weightᵀ`` that costs about what the model's absorb / un-absorb
BMMs cost in prefill. Three steps, one launcher (``mha_swa_prefill_fwd``):

1. ``gather_latent_rows``: rows ``kv_slots [M]`` of the paged cache (packed FP8 rows dequantised exactly as
   ``fp8_format`` defines, with the building blocks of ``_common``; or model-dtype rows, a full layer's cache)
   → a contiguous latent workspace ``[M, R + P]`` in the query dtype; slot ``-1`` → a zero row.
2. ``torch.mm`` (cuBLAS on CUDA): ``kv [M, Hg, N + V] = latent[:, :R] @ W[h0:h1]ᵀ`` per head group — ``k_nope``
   is ``kv[..., :N]``, ``v`` is ``kv[..., N:]``, and ``k_pe`` is ``latent[:, R:]``, the rope part every head shares.
3. ``_mha_window_fwd_kernel``: per (query tile of one request, head), online softmax over the workspace rows.

**The workspace layout (``kv_cu``, ``kv_slots``).** Request ``b`` owns workspace rows ``[kv_cu[b], kv_cu[b+1])``
(none: the request is not computed here — the step's MQA path or a decode). With ``n = seq_lens_decoder[b]``
cached positions, ``C`` query tokens, window ``W`` and ``s`` sinks, let ``a = max(0, n - W + 1)`` (the first
window position of the chunk's first token) and ``ns = min(s, a)`` (sink positions below it); its rows hold
positions ``0 … ns-1`` then ``a … n + C - 1``, each once — ``C + min(n, W-1) + ns ≤ C + W - 1 + s`` rows
(``ops.mha_prefill.plan_mha_rows`` builds them on the host). The rows are disjoint in position, so "each
position once" (SPEC §12) holds by construction.

**The kernel.** A program owns ``BLOCK_M`` consecutive query tokens of one request and one head; the grid is
``(cdiv(T, BLOCK_M) + B, heads)`` (a bound on the tiles, from shapes only; programs past the last tile exit)
and each program finds its request by binary search over ``tile_cu`` (prefix sums of the requests' tile counts,
computed on the device). Query position ``p`` attends to position ``j`` iff ``j ≤ p`` and (``j > p - W`` or
``j < s``). Key tiles visited, per query tile with positions ``p0 … p1`` and ``lo = max(a, p0 - W + 1)``:

- the rows of positions ``< min(s, lo)`` (sinks below every query's window: allowed for all, only the row
  count is masked);
- positions ``lo … p1`` in tiles of ``BLOCK_N``: tiles with ``k0 ≥ p1 - W + 1`` and ``k0 + BLOCK_N - 1 ≤ p0``
  lie inside every query's window and run unmasked; the others (window start, diagonal) are masked.

No other tile is read: work is ``(BLOCK_M + W) / BLOCK_N`` tiles per query tile whatever the chunk's length.
Key tiles come through host TMA descriptors (``tma``, the default where the workspace is 16-byte aligned: rows past
the workspace are zero-filled, every row inside it is finite, so only scores are masked) or through masked pointer
loads.
Output rows of tokens no program owns (padding, requests without rows) are **untouched** by the kernel; the
launcher's ``fill=True`` (what the op uses) writes them ``o = 0``, ``lse = +inf`` as the MQA ops do.

**Bounded workspace.** The latent workspace is ``M·(R+P)`` elements; the K/V workspace is one head group,
``M·Hg·(N+V)``, with ``Hg`` the most heads whose K/V fit ``workspace_bytes`` (default ``EXPAND_BYTES``, at least
one head), the GEMM and the kernel running once per group. ``M`` comes from the metadata's shape: no host
synchronisation anywhere (grids and groups depend on shapes only).

Interpreter: Triton 3.9's interpreter returns garbage for ``tl.dot`` on bf16 operands, so with ``INTERPRET``
tiles are converted to fp32 before the dots (never on the GPU), and bf16 outputs are rounded to nearest as the
GPU's conversion does (``_common._round_to_bf16_grid``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import fp8_format
from . import cdiv, gluon_mha, interpreting, next_pow2
from ._common import _LOG2E, _M_INIT, _dequantize_tile, _load_tile, _round_to_bf16_grid, _sm_count

try:  # host-side TMA descriptors (Triton >= 3.3); without them the kernel loads through pointers
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)

# K/V workspace of one head group, in bytes (at least one head's K/V is always allocated).
EXPAND_BYTES = 1 << 30
# Block shapes of the attention kernel on the GPU (benchmarks/bench_mha_prefill.py times the alternatives).
# ``tma``: key tiles through host TMA descriptors where the workspace allows (16-byte aligned), else pointers.
# Compiled for sm_90 without a GPU (Triton 3.9, DeepSeek dims, 2026-11-28): 64×64 tiles, 4 warps, TMA: 183
# registers, no spills, 107 KB shared (2 programs per SM); 128-row tiles with 8 warps hit 255 registers and spill
# (168-472 B of stack) with or without TMA; pointer loads spill at every shape (e.g. 528 B at 64×64).
DEFAULT_CONFIG = dict(kernel="auto", block_m=64, block_n=64, num_warps=4, num_stages=2, tma=True)
INTERPRET_CONFIG = dict(kernel="auto", block_m=16, block_n=16, num_warps=4, num_stages=1, tma=True)
# A window of at least this many positions is full causal attention (``window=0`` in the op).
FULL_WINDOW = 1 << 30
# ``kernel="auto"`` takes the Gluon kernel (Hopper) for windows up to this many positions: every window, full
# causal included, since its session-11 version (whole MHA block 0.74-0.84x the Triton kernel's at W = 128 … 4096,
# H = 128 and 16, chunks 512 and 4096; H200, RESULTS.md issue 18); it was 512 before.
GLUON_MAX_WINDOW = FULL_WINDOW


# ------------------------------------------------------------------------------------------ gather
@triton.jit
def _gather_rows_kernel(cache_ptr, slots_ptr, out_ptr, M, page_size, num_slots, stride_cb, stride_cr, stride_om,
                        R: tl.constexpr, P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                        NT: tl.constexpr, BLOCK_T: tl.constexpr, FP8: tl.constexpr):
    """Rows ``m`` of ``out [M, R + P]`` ← cache slot ``slots[m]`` (dequantised when ``FP8``); ``-1`` → zeros, and
    so is a slot past the cache (never dereferenced: unchecked rows cannot read outside it)."""
    m = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    live = m < M
    slot = tl.load(slots_ptr + m, mask=live, other=-1).to(tl.int64)
    valid = (slot >= 0) & (slot < num_slots)
    s = tl.maximum(slot, 0)
    row = (s // page_size) * stride_cb + (s % page_size) * stride_cr
    raw, sc, pe = _load_tile(cache_ptr, row, valid, R, P, BLOCK_R, BLOCK_P, NT, FP8)
    lat, pe = _dequantize_tile(raw, sc, pe, BLOCK_T, BLOCK_R, NT, FP8, INTERPRET=False)
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_P)
    dst = out_ptr + m[:, None] * stride_om
    tl.store(dst + offs_r[None, :], lat.to(out_ptr.dtype.element_ty), mask=live[:, None] & (offs_r < R)[None, :])
    tl.store(dst + R + offs_p[None, :], pe.to(out_ptr.dtype.element_ty), mask=live[:, None] & (offs_p < P)[None, :])


def gather_latent_rows(cache: torch.Tensor, kv_slots: torch.Tensor, out: torch.Tensor, *, rope_dim: int,
                       block_t: int = 16, num_warps: int = 4) -> None:
    """``out [M, R + P]`` ← the cache rows at ``kv_slots [M]`` (``-1`` or past the cache: zeros). ``cache``: packed FP8
    ``uint8 [NB, ps, bytes]`` (rows dequantised to bf16 values, SPEC §6) or a model-dtype ``[NB, ps, R + P]``
    cache of ``out``'s dtype. Rows inside a page contiguous; packed rows 4-byte aligned. No checks (the op's)."""
    M, D = out.shape
    R = D - rope_dim
    if M == 0:
        return
    fp8 = cache.dtype == torch.uint8
    block_r = max(16, next_pow2(R))
    _gather_rows_kernel[(cdiv(M, block_t),)](
        cache, kv_slots, out, M, cache.shape[1], cache.shape[0] * cache.shape[1], cache.stride(0), cache.stride(1),
        out.stride(0),
        R=R, P=rope_dim, BLOCK_R=block_r, BLOCK_P=max(16, next_pow2(rope_dim)),
        NT=block_r // fp8_format.TILE if fp8 else 1, BLOCK_T=block_t, FP8=fp8,
        num_warps=num_warps)


# --------------------------------------------------------------------------------------- attention
@triton.jit
def _col_ok(offs, n: tl.constexpr, BLOCK: tl.constexpr):
    """``offs < n`` — a constant all-true mask when the block is exactly ``n`` wide (loads drop it)."""
    if BLOCK == n:
        ok = tl.full([BLOCK], 1, tl.int1)
    else:
        ok = offs < n
    return ok


@triton.jit
def _load_keys(kv_ptr, kpe_ptr, kn_desc, v_desc, kp_desc, rows, row0, h, row_ok, stride_km, stride_pm,
               N: tl.constexpr, P: tl.constexpr, V: tl.constexpr, BLOCK_NOPE: tl.constexpr,
               BLOCK_ROPE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr,
               INTERPRET: tl.constexpr):
    """``k_nope [BLOCK_N, N]``, ``k_pe [BLOCK_N, P]`` and ``v [BLOCK_N, V]`` of workspace ``rows`` (``row0 +
    arange``). Pointer loads (``kv_ptr`` at this head's ``[N + V]`` columns, ``kpe_ptr`` at the rope columns) give
    zeros where not ``row_ok``; TMA loads (``TMA``: descriptors over ``kv [M, Hg, N + V]`` and ``k_pe [M, P]``)
    ignore ``row_ok``: rows past the workspace come back as zeros, every other row is finite, and the caller masks
    scores. Columns past ``N`` / ``P`` / ``V`` multiply zeros of ``q`` or are never stored."""
    if TMA:
        r0 = row0.to(tl.int32)
        kn = kn_desc.load([r0, h.to(tl.int32), 0]).reshape(BLOCK_N, BLOCK_NOPE)
        v = v_desc.load([r0, h.to(tl.int32), N]).reshape(BLOCK_N, BLOCK_V)
        kp = kp_desc.load([r0, 0]).reshape(BLOCK_N, BLOCK_ROPE)
    else:
        offs_n = tl.arange(0, BLOCK_NOPE)
        offs_p = tl.arange(0, BLOCK_ROPE)
        offs_v = tl.arange(0, BLOCK_V)
        kv_row = kv_ptr + rows[:, None] * stride_km
        kn = tl.load(kv_row + offs_n[None, :], mask=row_ok[:, None] & _col_ok(offs_n, N, BLOCK_NOPE)[None, :],
                     other=0.0)
        v = tl.load(kv_row + N + offs_v[None, :], mask=row_ok[:, None] & _col_ok(offs_v, V, BLOCK_V)[None, :],
                    other=0.0)
        kp = tl.load(kpe_ptr + rows[:, None] * stride_pm + offs_p[None, :],
                     mask=row_ok[:, None] & _col_ok(offs_p, P, BLOCK_ROPE)[None, :], other=0.0)
    if INTERPRET:
        kn = kn.to(tl.float32)
        kp = kp.to(tl.float32)
        v = v.to(tl.float32)
    return kn, kp, v


@triton.jit
def _attend(q_nope, q_pe, kn, kp, v, allowed, m_i, l_i, acc, qk_scale, MASKED: tl.constexpr):
    """One online-softmax step over a key tile (scores in log2 units)."""
    s = tl.dot(q_pe, tl.trans(kp))
    s = tl.dot(q_nope, tl.trans(kn), s) * qk_scale                            # [BLOCK_M, BLOCK_N]
    if MASKED:
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _attend_boundary_tile(q_nope, q_pe, m_i, l_i, acc, qk_scale, kv_h, kpe_ptr, kn_desc, v_desc, kp_desc, kpos0,
                          offs_n, p1, pos, win0, h, window, sinks, stride_km, stride_pm, N: tl.constexpr,
                          P: tl.constexpr, V: tl.constexpr, BLOCK_NOPE: tl.constexpr, BLOCK_ROPE: tl.constexpr, BLOCK_V: tl.constexpr,
                          BLOCK_N: tl.constexpr, TMA: tl.constexpr, INTERPRET: tl.constexpr):
    """One masked key tile at ``kpos0`` (a window-start or diagonal tile): keys past ``p1`` are not loaded, and
    each query sees only keys in its window (``pos - W < k <= pos``) or among the sinks."""
    kpos = kpos0 + offs_n
    ok = kpos <= p1
    kn, kp, v = _load_keys(kv_h, kpe_ptr, kn_desc, v_desc, kp_desc, win0 + kpos, win0 + kpos0, h, ok,
                           stride_km, stride_pm, N, P, V, BLOCK_NOPE, BLOCK_ROPE, BLOCK_V, BLOCK_N, TMA,
                           INTERPRET)
    allowed = (kpos[None, :] <= pos[:, None]) & ((kpos[None, :] > pos[:, None] - window) |
                                                 (kpos[None, :] < sinks))
    return _attend(q_nope, q_pe, kn, kp, v, allowed, m_i, l_i, acc, qk_scale, MASKED=True)


@triton.jit
def _query_tile(q_nope_ptr, q_pe_ptr, cu_ptr, dec_ptr, kv_cu_ptr, tile_cu_ptr, b, tile, live, h, window, sinks,
                stride_qt, stride_qh, stride_pt, stride_ph, N: tl.constexpr, P: tl.constexpr,
                BLOCK_NOPE: tl.constexpr, BLOCK_ROPE: tl.constexpr, BLOCK_M: tl.constexpr, INTERPRET: tl.constexpr):
    """Query tile ``tile`` (of ``tile_cu``'s numbering) of request ``b``'s chunk, head ``h`` (none unless ``live``): the
    queries, which rows exist (``q_ok``), their tokens and positions (``p0 … p1``), the tile's first window
    position ``lo_t``, the sink rows below it (``n_sink`` from workspace row ``base``) and the workspace row of
    position 0 (``win0``: position ``x`` is row ``win0 + x``)."""
    cu_b = tl.load(cu_ptr + b)
    c_b = tl.load(cu_ptr + b + 1) - cu_b
    dec_b = tl.load(dec_ptr + b)
    base = tl.load(kv_cu_ptr + b).to(tl.int64)
    i0 = (tile - tl.load(tile_cu_ptr + b)) * BLOCK_M
    n_q = tl.where(live, tl.minimum(c_b - i0, BLOCK_M), 0)
    offs_m = tl.arange(0, BLOCK_M)
    q_ok = offs_m < n_q
    tok = (cu_b + i0).to(tl.int64) + offs_m
    pos = dec_b + i0 + offs_m                                               # query positions
    p0 = dec_b + i0
    p1 = p0 + n_q - 1
    a_b = tl.maximum(dec_b - window + 1, 0)                                 # first window row's position
    ns_b = tl.minimum(sinks, a_b)                                           # sink rows below it
    lo_t = tl.maximum(a_b, p0 - window + 1)                                 # the tile's first window position
    n_sink = tl.where(live, ns_b + tl.maximum(tl.minimum(sinks, lo_t) - a_b, 0), 0)
    win0 = base + ns_b - a_b                                                # workspace row of position x: win0 + x
    offs_d = tl.arange(0, BLOCK_NOPE)
    offs_p = tl.arange(0, BLOCK_ROPE)
    q_nope = tl.load(q_nope_ptr + tok[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                     mask=q_ok[:, None] & _col_ok(offs_d, N, BLOCK_NOPE)[None, :], other=0.0)
    q_pe = tl.load(q_pe_ptr + tok[:, None] * stride_pt + h * stride_ph + offs_p[None, :],
                   mask=q_ok[:, None] & _col_ok(offs_p, P, BLOCK_ROPE)[None, :], other=0.0)
    if INTERPRET:
        q_nope = q_nope.to(tl.float32)
        q_pe = q_pe.to(tl.float32)
    return q_nope, q_pe, q_ok, tok, pos, p0, p1, lo_t, n_sink, base, win0


@triton.jit
def _store_tile(out_ptr, lse_ptr, acc, m_i, l_i, tok, q_ok, h, stride_ot, stride_oh, stride_lt, stride_lh,
                V: tl.constexpr, BLOCK_V: tl.constexpr, INTERPRET: tl.constexpr):
    """Normalise and store a query tile's rows (every valid query attends at least to itself)."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("inf"), (m_i + tl.math.log2(l_safe)) * _LN2)
    if INTERPRET and out_ptr.dtype.element_ty == tl.bfloat16:
        o = _round_to_bf16_grid(o)
    offs_v = tl.arange(0, BLOCK_V)
    tl.store(out_ptr + tok[:, None] * stride_ot + h * stride_oh + offs_v[None, :], o.to(out_ptr.dtype.element_ty),
             mask=q_ok[:, None] & _col_ok(offs_v, V, BLOCK_V)[None, :])
    tl.store(lse_ptr + tok * stride_lt + h * stride_lh, lse, mask=q_ok)


@triton.jit
def _mha_window_fwd_kernel(
        q_nope_ptr, q_pe_ptr, kv_ptr, kpe_ptr, kn_desc, v_desc, kp_desc, out_ptr, lse_ptr,
        cu_ptr, dec_ptr, kv_cu_ptr, tile_cu_ptr,
        qk_scale,                                   # softmax scale · log2(e)
        B, window, sinks, search_steps,
        stride_qt, stride_qh, stride_pt, stride_ph,
        stride_km, stride_kh, stride_pm,
        stride_ot, stride_oh, stride_lt, stride_lh,
        N: tl.constexpr, P: tl.constexpr, V: tl.constexpr,
        BLOCK_NOPE: tl.constexpr, BLOCK_ROPE: tl.constexpr, BLOCK_V: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr, INTERPRET: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)

    # ---- which request and which of its query tiles: the last b with tile_cu[b] <= pid
    live = pid < tl.load(tile_cu_ptr + B)
    lo_b = pid * 0
    hi_b = pid * 0 + B
    for _ in range(search_steps):
        mid = (lo_b + hi_b) // 2
        go = tl.load(tile_cu_ptr + mid) <= pid
        lo_b = tl.where(go, mid, lo_b)
        hi_b = tl.where(go, hi_b, mid)
    q_nope, q_pe, q_ok, tok, pos, p0, p1, lo_t, n_sink, base, win0 = _query_tile(
        q_nope_ptr, q_pe_ptr, cu_ptr, dec_ptr, kv_cu_ptr, tile_cu_ptr, lo_b, pid, live, h, window, sinks, stride_qt,
        stride_qh, stride_pt, stride_ph, N, P, BLOCK_NOPE, BLOCK_ROPE, BLOCK_M, INTERPRET)
    offs_n = tl.arange(0, BLOCK_N)
    kv_h = kv_ptr + h * stride_kh
    m_i = tl.full([BLOCK_M], _M_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)

    # ---- 1. sink positions below every query's window: rows [base, base + n_sink), all allowed
    for k0 in range(0, n_sink, BLOCK_N):
        kk = k0 + offs_n
        ok = kk < n_sink
        kn, kp, v = _load_keys(kv_h, kpe_ptr, kn_desc, v_desc, kp_desc, base + kk, base + k0, h, ok, stride_km,
                               stride_pm, N, P, V, BLOCK_NOPE, BLOCK_ROPE, BLOCK_V, BLOCK_N, TMA, INTERPRET)
        m_i, l_i, acc = _attend(q_nope, q_pe, kn, kp, v, ok[None, :], m_i, l_i, acc, qk_scale, MASKED=True)

    # ---- 2. positions lo_t … p1: masked window-start tiles, unmasked interior, masked diagonal
    n_tiles = tl.where(live, tl.cdiv(tl.maximum(p1 + 1 - lo_t, 0), BLOCK_N), 0)
    n_a = tl.minimum(tl.cdiv(tl.maximum(p1 - window + 1 - lo_t, 0), BLOCK_N), n_tiles)
    n_full = tl.maximum(n_a, tl.minimum(n_tiles, (p0 - lo_t + 1) // BLOCK_N))
    for t in range(0, n_a):
        m_i, l_i, acc = _attend_boundary_tile(q_nope, q_pe, m_i, l_i, acc, qk_scale, kv_h, kpe_ptr, kn_desc, v_desc,
                                              kp_desc, lo_t + t * BLOCK_N, offs_n, p1, pos, win0, h, window, sinks,
                                              stride_km, stride_pm, N, P, V, BLOCK_NOPE, BLOCK_ROPE, BLOCK_V,
                                              BLOCK_N, TMA, INTERPRET)
    all_rows = tl.full([BLOCK_N], 1, tl.int1)
    for t in range(n_a, n_full):
        kpos0 = lo_t + t * BLOCK_N
        kpos = kpos0 + offs_n
        kn, kp, v = _load_keys(kv_h, kpe_ptr, kn_desc, v_desc, kp_desc, win0 + kpos, win0 + kpos0, h, all_rows,
                               stride_km, stride_pm, N, P, V, BLOCK_NOPE, BLOCK_ROPE, BLOCK_V, BLOCK_N, TMA,
                               INTERPRET)
        m_i, l_i, acc = _attend(q_nope, q_pe, kn, kp, v, all_rows[None, :], m_i, l_i, acc, qk_scale,
                                MASKED=False)
    for t in range(n_full, n_tiles):
        m_i, l_i, acc = _attend_boundary_tile(q_nope, q_pe, m_i, l_i, acc, qk_scale, kv_h, kpe_ptr, kn_desc, v_desc,
                                              kp_desc, lo_t + t * BLOCK_N, offs_n, p1, pos, win0, h, window, sinks,
                                              stride_km, stride_pm, N, P, V, BLOCK_NOPE, BLOCK_ROPE, BLOCK_V,
                                              BLOCK_N, TMA, INTERPRET)

    _store_tile(out_ptr, lse_ptr, acc, m_i, l_i, tok, q_ok, h, stride_ot, stride_oh, stride_lt, stride_lh, V, BLOCK_V,
                INTERPRET)


@triton.jit
def _mha_window_persistent_kernel(
        q_nope_ptr, q_pe_ptr, kv_ptr, kpe_ptr, kn_desc, v_desc, kp_desc, out_ptr, lse_ptr,
        cu_ptr, dec_ptr, kv_cu_ptr, tile_cu_ptr, tile_b_ptr,
        qk_scale,                                   # softmax scale · log2(e)
        B, Hg, window, sinks,
        stride_qt, stride_qh, stride_pt, stride_ph,
        stride_km, stride_kh, stride_pm,
        stride_ot, stride_oh, stride_lt, stride_lh,
        N: tl.constexpr, P: tl.constexpr, V: tl.constexpr,
        BLOCK_NOPE: tl.constexpr, BLOCK_ROPE: tl.constexpr, BLOCK_V: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr, INTERPRET: tl.constexpr):
    """The persistent variant (``persistent`` config, measured against the default in
    ``benchmarks/bench_mha_prefill.py``): a few programs per SM loop over the work items ``(head, query tile)``
    (query tiles fastest: programs running side by side share a head's K/V in L2), each item one loop over its key
    tiles — sinks below the window, then the window's positions, every tile masked. ``tile_b [tiles]``: the
    request of each query tile (``tile_requests``). Triton 3.6 does not fuse this loop nest (``tl.range(...,
    flatten=True)`` only fuses inner loops whose bounds do not depend on the outer one, and automatic warp
    specialisation of the outer loop fails in its Hopper pass), so the next item's loads are not issued under
    the current one's tiles: ``gluon_mha`` does that by hand."""
    n_tiles_all = tl.load(tile_cu_ptr + B)
    offs_n = tl.arange(0, BLOCK_N)
    for item in range(tl.program_id(0), n_tiles_all * Hg, tl.num_programs(0)):
        h = (item // n_tiles_all).to(tl.int64)
        tile = item % n_tiles_all
        q_nope, q_pe, q_ok, tok, pos, p0, p1, lo_t, n_sink, base, win0 = _query_tile(
            q_nope_ptr, q_pe_ptr, cu_ptr, dec_ptr, kv_cu_ptr, tile_cu_ptr, tl.load(tile_b_ptr + tile), tile,
            item >= 0, h, window, sinks, stride_qt, stride_qh, stride_pt, stride_ph, N, P, BLOCK_NOPE, BLOCK_ROPE,
            BLOCK_M, INTERPRET)
        kv_h = kv_ptr + h * stride_kh
        m_i = tl.full([BLOCK_M], _M_INIT, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
        n_st = tl.cdiv(n_sink, BLOCK_N)
        n_wt = tl.cdiv(tl.maximum(p1 + 1 - lo_t, 0), BLOCK_N)
        for t in range(0, n_st + n_wt):
            # (The scalar condition is broadcast by arithmetic, as in _fill_uncovered_kernel.)
            sink = (tl.zeros([BLOCK_N], tl.int32) + t) < n_st
            kk = t * BLOCK_N + offs_n                                   # sink rows: base + kk
            kpos0 = lo_t + (t - n_st) * BLOCK_N                         # window tiles: positions kpos0 + offs_n
            kpos = kpos0 + offs_n
            row0 = tl.where(t < n_st, base + t * BLOCK_N, win0 + kpos0)
            ok = tl.where(sink, kk < n_sink, kpos <= p1)
            kn, kp, v = _load_keys(kv_h, kpe_ptr, kn_desc, v_desc, kp_desc, row0 + offs_n, row0, h, ok,
                                   stride_km, stride_pm, N, P, V, BLOCK_NOPE, BLOCK_ROPE, BLOCK_V, BLOCK_N, TMA,
                                   INTERPRET)
            in_window = (kpos[None, :] <= pos[:, None]) & ((kpos[None, :] > pos[:, None] - window) |
                                                           (kpos[None, :] < sinks))
            allowed = tl.where(sink[None, :], ok[None, :], in_window)
            m_i, l_i, acc = _attend(q_nope, q_pe, kn, kp, v, allowed, m_i, l_i, acc, qk_scale, MASKED=True)

        _store_tile(out_ptr, lse_ptr, acc, m_i, l_i, tok, q_ok, h, stride_ot, stride_oh, stride_lt, stride_lh, V,
                    BLOCK_V, INTERPRET)


@triton.jit
def _fill_uncovered_kernel(out_ptr, lse_ptr, bid_ptr, kv_cu_ptr, T, H, stride_ot, stride_oh, stride_lt, stride_lh,
                           V: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr):
    """``o = 0``, ``lse = +inf`` for the tokens of a ``BLOCK_T`` block that no program computes: padding
    (``bid < 0``) or a request without workspace rows. A block without such tokens (the usual case) only reads
    its batch ids."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    b = tl.load(bid_ptr + offs_t, mask=t_ok, other=0).to(tl.int64)
    bb = tl.maximum(b, 0)
    has = t_ok & (b >= 0)
    rows = tl.load(kv_cu_ptr + bb + 1, mask=has, other=0) - tl.load(kv_cu_ptr + bb, mask=has, other=0)
    uncovered = t_ok & ((b < 0) | (rows <= 0))
    if tl.sum(uncovered.to(tl.int32), 0) > 0:
        offs_v = tl.arange(0, BLOCK_V)
        o_rows = out_ptr + offs_t.to(tl.int64)[:, None] * stride_ot + offs_v[None, :]
        mask = uncovered[:, None] & (offs_v < V)[None, :]
        for h in range(H):
            tl.store(o_rows + h * stride_oh, tl.zeros([BLOCK_T, BLOCK_V], tl.float32).to(out_ptr.dtype.element_ty),
                     mask=mask)
            tl.store(lse_ptr + offs_t.to(tl.int64) * stride_lt + h * stride_lh,
                     tl.full([BLOCK_T], float("inf"), tl.float32), mask=uncovered)


@triton.jit
def _tile_plan_kernel(cu_ptr, kv_cu_ptr, tile_cu_ptr, tile_b_ptr, B, bound, search_steps,
                      BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    """One program: ``tile_cu [B + 1]`` (prefix sums of each request's query tiles, ``cdiv(C_b, BLOCK_M)`` or 0
    without workspace rows) and ``tile_b [bound]`` (each tile's request, ``B`` past the last tile) — what
    ``tile_offsets`` and ``tile_requests`` compute with ten small device ops, in one launch."""
    offs = tl.arange(0, BLOCK)
    carry = tl.sum(tl.zeros([BLOCK], tl.int32), 0)
    tl.store(tile_cu_ptr + offs, tl.zeros([BLOCK], tl.int32), mask=offs == 0)
    for b0 in range(0, B, BLOCK):
        b = b0 + offs
        ok = b < B
        q_len = (tl.load(cu_ptr + b + 1, mask=ok, other=0) - tl.load(cu_ptr + b, mask=ok, other=0)).to(tl.int32)
        rows = (tl.load(kv_cu_ptr + b + 1, mask=ok, other=0) - tl.load(kv_cu_ptr + b, mask=ok, other=0))
        n = tl.where(ok & (rows > 0), (q_len + BLOCK_M - 1) // BLOCK_M, 0)
        tl.store(tile_cu_ptr + b + 1, tl.cumsum(n, 0) + carry, mask=ok)
        carry += tl.sum(n, 0)
    tl.debug_barrier()                       # the block's tile_cu stores are visible to all its threads
    for i0 in range(0, bound, BLOCK):
        i = i0 + offs
        lo = tl.zeros([BLOCK], tl.int32)     # the count of tile_cu[1 …] ≤ i, by binary search over [0, B]
        hi = lo + B
        for _ in range(search_steps):
            active = lo < hi
            mid = (lo + hi) // 2
            go = active & (tl.load(tile_cu_ptr + mid + 1, mask=active, other=0) <= i)
            lo = tl.where(go, mid + 1, lo)
            hi = tl.where(active & ~go, mid, hi)
        tl.store(tile_b_ptr + i, lo, mask=i < bound)


# ------------------------------------------------------------------------------------------ launchers
def attention_config(config: dict | None = None, q_nope: torch.Tensor | None = None,
                     q_pe: torch.Tensor | None = None, V: int = 0, window: int | None = None) -> dict:
    """The attention kernel and its block shapes: ``DEFAULT_CONFIG`` (``INTERPRET_CONFIG`` under the interpreter)
    updated with ``config``. ``kernel``: ``"triton"`` (``_mha_window_fwd_kernel``), ``"gluon"`` (``gluon_mha``:
    128-row query tiles, ``block_n`` 64 or 128, rings ``nbuf`` / ``qbuf``) or ``"auto"`` (the default: Gluon for
    windows of at most ``GLUON_MAX_WINDOW`` positions, where it measured faster, else Triton). Gluon stays only
    where ``gluon_mha.supports`` the queries (given: ``q_nope``, ``q_pe``, ``V``) and not under the interpreter;
    elsewhere the Triton kernel's default runs. The result names the kernel that runs."""
    base = INTERPRET_CONFIG if interpreting() else DEFAULT_CONFIG
    cfg = dict(base, **(config or {}))
    kernel = cfg.get("kernel", "auto")
    if kernel == "auto":
        kernel = "gluon" if window is not None and 0 < window <= GLUON_MAX_WINDOW else "triton"
    if kernel not in ("gluon", "triton"):
        raise ValueError(f"attention config kernel must be 'auto', 'gluon' or 'triton', got {kernel!r}")
    if kernel == "gluon":
        if q_nope is None or interpreting() or not gluon_mha.supports(q_nope, q_pe, V):
            if (config or {}).get("kernel", "auto") == "auto":      # auto: the Triton kernel as configured
                return dict(cfg, kernel="triton")
            return dict(base, kernel="triton")
        cfg["block_m"] = gluon_mha.BLOCK_M
    cfg["kernel"] = kernel
    return cfg


def tile_offsets(cu_seqlens_q: torch.Tensor, kv_cu: torch.Tensor, block_m: int) -> torch.Tensor:
    """``tile_cu [B + 1]`` int32: prefix sums of each request's query tiles (``cdiv(C_b, block_m)``; 0 for a
    request without workspace rows). Device ops only (no synchronisation)."""
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).to(torch.int32)
    rows = kv_cu[1:] - kv_cu[:-1]
    tiles = torch.where(rows > 0, (q_lens + block_m - 1) // block_m, 0)
    return torch.nn.functional.pad(torch.cumsum(tiles, 0, dtype=torch.int32), (1, 0))


def tile_requests(tile_cu: torch.Tensor, bound: int) -> torch.Tensor:
    """``[bound]`` int32: the request of each query tile ``i < tile_cu[-1]`` (the last ``b`` with ``tile_cu[b] ≤ i``;
    ``B`` past the last tile). Device ops only."""
    tiles = torch.arange(bound, dtype=tile_cu.dtype, device=tile_cu.device)
    return torch.searchsorted(tile_cu[1:], tiles, right=True).to(torch.int32)


def tile_plan(cu_seqlens_q: torch.Tensor, kv_cu: torch.Tensor, block_m: int,
              bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tile_offsets(...), tile_requests(..., bound))`` in one launch of one program (the torch versions are
    its reference). No synchronisation."""
    B = kv_cu.shape[0] - 1
    tile_cu = torch.empty(B + 1, dtype=torch.int32, device=kv_cu.device)
    tile_b = torch.empty(max(bound, 1), dtype=torch.int32, device=kv_cu.device)
    _tile_plan_kernel[(1,)](cu_seqlens_q, kv_cu, tile_cu, tile_b, B, bound, B.bit_length() + 1, BLOCK_M=block_m,
                            BLOCK=256 if not interpreting() else 32, num_warps=4)
    return tile_cu, tile_b[:bound]


def mha_window_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
                         kv_cu: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens_decoder: torch.Tensor,
                         scale: float, window: int, sinks: int, out: torch.Tensor, lse: torch.Tensor, *,
                         tile_cu: torch.Tensor | None = None, tile_b: torch.Tensor | None = None,
                         config: dict | None = None, stats=None) -> None:
    """The attention kernel over an expanded workspace (module docstring): ``q_nope [T, Hg, N]``,
    ``q_pe [T, Hg, P]``, ``kv [M, Hg, N + V]`` (``k_nope | v``), ``k_pe [M, P]`` (shared by the heads), request
    rows ``kv_cu [B + 1]`` → ``out [T, Hg, V]`` and ``lse [T, Hg]`` (natural log) written for the tokens of
    requests with rows, other rows untouched. Views with any strides (unit last stride); ``window`` ≥ 1."""
    T, Hg, N = q_nope.shape
    P = q_pe.shape[-1]
    V = out.shape[-1]
    B = kv_cu.shape[0] - 1
    if T == 0 or B == 0 or Hg == 0:
        return
    cfg = attention_config(config, q_nope, q_pe, out.shape[-1], window)
    bm, bn = cfg["block_m"], cfg["block_n"]
    bound = cdiv(T, bm) + B                      # a bound on the query tiles, from shapes only
    if tile_cu is None:
        tile_cu, tile_b = tile_plan(cu_seqlens_q, kv_cu, bm, bound)
    elif tile_b is None and (cfg.get("kernel") == "gluon" or int(cfg.get("persistent", 0)) > 0):
        tile_b = tile_requests(tile_cu, bound)
    assert min(q_nope.stride(-1), q_pe.stride(-1), kv.stride(-1), k_pe.stride(-1), out.stride(-1)) == 1
    # The Gluon kernel where it reads the workspace (else the Triton kernel on the same 128-row tiles of tile_cu).
    if cfg.get("kernel") == "gluon" and gluon_mha.workspace_ok(kv, k_pe):
        compiled = gluon_mha.launch(q_nope, q_pe, kv, k_pe, kv_cu, cu_seqlens_q, seq_lens_decoder, scale * _LOG2E,
                                    min(window, FULL_WINDOW), sinks, out, lse, tile_cu, tile_b,
                                    nbuf=cfg.get("nbuf"), qbuf=cfg.get("qbuf"), block_n=bn,
                                    prefetch=cfg.get("prefetch", True), tma_out=cfg.get("tma_out", True))
        if stats is not None:
            stats.setdefault("attention", []).append(compiled)
            stats["tma"] = True
            stats["kernel"] = "gluon"
        return
    block_nope = max(16, next_pow2(N))
    block_rope = max(16, next_pow2(P))
    block_v = max(16, next_pow2(V))
    descs = _descriptors(kv, k_pe, bn, block_nope, block_rope, block_v) if cfg["tma"] else None
    kn_desc, v_desc, kp_desc = descs if descs is not None else (kv, kv, kv)        # unused pointers
    persistent = int(cfg.get("persistent", 0))
    if persistent > 0:
        grid = (max(1, min(bound * Hg, persistent * _sm_count(q_nope.device))),)
        compiled = _mha_window_persistent_kernel[grid](
            q_nope, q_pe, kv, k_pe, kn_desc, v_desc, kp_desc, out, lse, cu_seqlens_q, seq_lens_decoder, kv_cu,
            tile_cu, tile_b, scale * _LOG2E, B, Hg, min(window, FULL_WINDOW), sinks,
            q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1),
            kv.stride(0), kv.stride(1), k_pe.stride(0),
            out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
            N=N, P=P, V=V, BLOCK_NOPE=block_nope, BLOCK_ROPE=block_rope, BLOCK_V=block_v, BLOCK_M=bm, BLOCK_N=bn,
            TMA=descs is not None, INTERPRET=interpreting(), num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"])
        if stats is not None:
            stats.setdefault("attention", []).append(compiled)
            stats["tma"] = descs is not None
            stats["programs"] = grid[0]
        return
    grid = (cdiv(T, bm) + B, Hg)
    compiled = _mha_window_fwd_kernel[grid](
        q_nope, q_pe, kv, k_pe, kn_desc, v_desc, kp_desc, out, lse, cu_seqlens_q, seq_lens_decoder, kv_cu, tile_cu,
        scale * _LOG2E, B, min(window, FULL_WINDOW), sinks, max(1, math.ceil(math.log2(B + 1))) + 1,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1),
        kv.stride(0), kv.stride(1), k_pe.stride(0),
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        N=N, P=P, V=V, BLOCK_NOPE=block_nope, BLOCK_ROPE=block_rope, BLOCK_V=block_v, BLOCK_M=bm, BLOCK_N=bn,
        TMA=descs is not None, INTERPRET=interpreting(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if stats is not None:
        stats.setdefault("attention", []).append(compiled)
        stats["tma"] = descs is not None


def _descriptors(kv: torch.Tensor, k_pe: torch.Tensor, block_n: int, block_nope: int, block_rope: int,
                 block_v: int):
    """TMA descriptors ``(k_nope, v, k_pe)``: boxes ``[block_n, 1, block_nope]`` / ``[block_n, 1, block_v]`` of
    ``kv [M, Hg, N + V]`` and ``[block_n, block_rope]`` of ``k_pe [M, P]``; None where TMA cannot take them
    (16-byte aligned bases and strides, unit last stride)."""
    if TensorDescriptor is None or kv.dim() != 3 or kv.shape[0] == 0:
        return None
    es = kv.element_size()
    if kv.stride(-1) != 1 or k_pe.stride(-1) != 1 or kv.data_ptr() % 16 or k_pe.data_ptr() % 16:
        return None
    if kv.stride(0) * es % 16 or kv.stride(1) * es % 16 or k_pe.stride(0) * es % 16:
        return None
    if max(block_n, block_nope, block_rope, block_v) > 256:
        return None
    shape, strides = list(kv.shape), list(kv.stride())
    return (TensorDescriptor(kv, shape, strides, [block_n, 1, block_nope]),
            TensorDescriptor(kv, shape, strides, [block_n, 1, block_v]),
            TensorDescriptor(k_pe, list(k_pe.shape), list(k_pe.stride()), [block_n, block_rope]))


def fill_uncovered(out: torch.Tensor, lse: torch.Tensor, kv_cu: torch.Tensor, batch_id_per_token: torch.Tensor,
                   block_t: int = 64) -> None:
    """``out [T, H, V] = 0`` and ``lse [T, H] = +inf`` for the tokens the attention kernel does not compute."""
    T, H, V = out.shape
    if T == 0 or H == 0:
        return
    if kv_cu.shape[0] <= 1:                      # no request: every token is padding
        out.zero_()
        lse.fill_(float("inf"))
        return
    _fill_uncovered_kernel[(cdiv(T, block_t),)](
        out, lse, batch_id_per_token, kv_cu, T, H, out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        V=V, BLOCK_T=block_t, BLOCK_V=max(16, next_pow2(V)), num_warps=4)


def head_group(M: int, H: int, width: int, element_size: int, workspace_bytes: int | None = None) -> int:
    """Heads per expansion group: the most whose ``[M, Hg, width]`` K/V fit ``workspace_bytes``, at least 1,
    balanced over the groups (``cdiv(H, groups)``)."""
    budget = EXPAND_BYTES if workspace_bytes is None else workspace_bytes
    per_head = max(1, M * width * element_size)
    fit = max(1, min(H, budget // per_head))
    groups = cdiv(H, fit)
    return cdiv(H, groups)


def mha_swa_prefill_fwd(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_b_weight: torch.Tensor, cache: torch.Tensor,
                        kv_slots: torch.Tensor, kv_cu: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        seq_lens_decoder: torch.Tensor, batch_id_per_token: torch.Tensor, scale: float,
                        window: int, sinks: int = 0, *, out=None, fill: bool = True, config: dict | None = None,
                        workspace_bytes: int | None = None, stats=None) -> tuple[torch.Tensor, torch.Tensor]:
    """MHA-mode sliding-window attention of a step's chunks (module docstring) → ``o [T, H, V]`` (q dtype),
    ``lse [T, H]`` fp32.

    ``q_nope [T, H, N]``, ``q_pe [T, H, P]`` (rope applied), ``kv_b_weight [H·(N+V), R]`` (``kv_b_proj.weight``),
    ``cache`` packed FP8 ``uint8 [NB, ps, bytes]`` or model-dtype ``[NB, ps, R + P]``, ``kv_slots [M]`` /
    ``kv_cu [B + 1]`` the workspace rows (``ops.mha_prefill.plan_mha_rows``), the step's ``cu_seqlens_q``,
    ``seq_lens_decoder``, ``batch_id_per_token``; ``window`` ≥ 1 (``FULL_WINDOW`` or more: full causal).
    ``out``: a preallocated ``(o, lse)`` to write into; ``fill=False`` leaves the rows of tokens not computed
    here untouched (else ``o = 0``, ``lse = +inf``). ``workspace_bytes``: the K/V workspace bound of one head
    group (``EXPAND_BYTES``). No checks, no host synchronisation."""
    T, H, N = q_nope.shape
    P = q_pe.shape[-1]
    R = kv_b_weight.shape[1]
    V = kv_b_weight.shape[0] // H - N
    M = kv_slots.shape[0]
    dtype = q_nope.dtype
    if out is None:
        out = (torch.empty((T, H, V), dtype=dtype, device=q_nope.device),
               torch.empty((T, H), dtype=torch.float32, device=q_nope.device))
    o, lse = out
    if fill:
        fill_uncovered(o, lse, kv_cu, batch_id_per_token)
    if T == 0 or M == 0 or kv_cu.shape[0] <= 1:
        return o, lse
    cfg = attention_config(config, q_nope, q_pe, V, window)
    latent = torch.empty((M, R + P), dtype=dtype, device=q_nope.device)
    gather_latent_rows(cache, kv_slots, latent, rope_dim=P)
    bound = cdiv(T, cfg["block_m"]) + kv_cu.shape[0] - 1          # query tiles, from shapes only
    tile_cu, tile_b = tile_plan(cu_seqlens_q, kv_cu, cfg["block_m"], bound)
    hg = head_group(M, H, N + V, latent.element_size(), workspace_bytes)
    buf = torch.empty(M * hg * (N + V), dtype=dtype, device=q_nope.device)
    w = kv_b_weight.view(H, N + V, R)
    if stats is not None:
        stats.update(rows=M, head_group=hg, workspace_bytes=buf.numel() * buf.element_size()
                     + latent.numel() * latent.element_size())
    for h0 in range(0, H, hg):
        h1 = min(H, h0 + hg)
        kv = buf[:M * (h1 - h0) * (N + V)].view(M, (h1 - h0) * (N + V))
        torch.mm(latent[:, :R], w[h0:h1].reshape((h1 - h0) * (N + V), R).t(), out=kv)
        mha_window_attention(q_nope[:, h0:h1], q_pe[:, h0:h1], kv.view(M, h1 - h0, N + V), latent[:, R:],
                             kv_cu, cu_seqlens_q, seq_lens_decoder, scale, window, sinks, o[:, h0:h1],
                             lse[:, h0:h1], tile_cu=tile_cu, tile_b=tile_b, config=cfg, stats=stats)
    return o, lse
