"""What the MLA attention kernels share (docs/design.md §6, §7, §10): the JIT building blocks — load a tile of
cache rows (packed FP8 or model dtype) and dequantise it, load query rows, one online-softmax step, store
normalised rows (or fp32 split partials) — the kernel that merges split partials by lse, and the host-side
planning (block sizes, splits) and output buffers of every launcher.

Users: ``gathered_mla`` (the row-gathering forward kernel), ``sparse_mla`` (sparse and SWA launchers, the
staging kernel) and ``paged_mla`` (the page-tile kernel).
"""

from __future__ import annotations

import functools
import types

import torch
import triton
import triton.language as tl

from .. import fp8_format
from . import cdiv, interpreting, next_pow2

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


# ------------------------------------------------------------------------------------------ host side
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
    """Block sizes, warps and splits of a launch (a dict the caller may not change: it is remembered)."""
    sms = _sm_count(device)
    try:
        # (In the dict's order: the same settings in another order only plan once more.)
        key = (T, H, max_keys, sms, keys, interpreting(), tuple(config.items()) if config else ())
        hash(key)
    except TypeError:         # a config value that is not hashable: plan without remembering
        return _make_plan(T, H, max_keys, sms, config, keys)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= 1024:
            _PLANS.clear()
        plan = _PLANS[key] = types.MappingProxyType(_make_plan(T, H, max_keys, sms, config, keys))
    return plan


_PLANS: dict = {}


def _make_plan(T: int, H: int, max_keys: int, sms: int, config: dict | None, keys: int):
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    # Few heads (a tensor-parallel shard) on staging rows: tile BLOCK_T adjacent tokens so the matrix
    # products keep 64 rows and every key tile serves BLOCK_T tokens (``block_t=1`` turns it off).
    block_t = cfg.get("block_t")
    if block_t is None:
        block_t = 64 // next_pow2(H) if keys == KEYS_ROWS and H <= 32 else 1
    if block_t > 1:
        block_h = cfg.get("block_h") or next_pow2(H)
        if block_t * block_h < 16:
            raise ValueError(f"block_t * block_h must be >= 16 (the smallest matrix-product tile), got "
                             f"{block_t} * {block_h}")
    else:
        block_h = cfg.get("block_h") or (64 if H > 32 else max(16, next_pow2(H)))
    block_n = cfg["block_n"]
    num_warps = cfg["num_warps"] if block_h * block_t == 64 else 4
    if interpreting():
        block_n = min(block_n, 16)
    n_hb = cdiv(H, block_h)
    tiles = cdiv(max(max_keys + block_t - 1, 1), block_n)
    progs = max(cdiv(T, block_t) * n_hb, 1)
    splits = 1
    # Split keys across programs only when the items alone leave SMs idle: below ``split_below`` of them (a split
    # costs a combine launch and two partial buffers: ~45 µs of host per call, issue 14).
    if progs < sms * cfg.get("split_below", 1.0):
        splits = max(1, min(sms // progs, tiles // cfg["min_tiles_per_split"]))
    if "splits" in cfg:
        splits = cfg["splits"]
    return dict(block_h=block_h, block_t=block_t, block_n=block_n, num_warps=num_warps,
                num_stages=cfg["num_stages"], n_hb=n_hb, splits=splits, stage_block_n=cfg["stage_block_n"])


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
