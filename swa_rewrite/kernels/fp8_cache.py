"""Packed FP8 latent cache (docs/design.md §6): quantise-and-scatter write, and dequantise.

One cache row (token) in the packed FP8 layout of ``swa_rewrite.fp8_format`` (docs/design.md §6), which
defines the offsets and constants once: the launchers pass the byte offsets of the scales and the rope part
(``SCALE_OFF``, ``ROPE_OFF``) as constexprs, and the JIT code takes the tile width, the e4m3 maximum and the
scale floor from the module-level constexprs below. Because a scale is a power of two, ``x * (1/s)`` is
the exact quotient and dequantisation ``q * s`` is exact in bf16.

A write program quantises ``BLOCK_T`` tokens, loading their whole latent rows at once (all loads in flight
before the first tile reduction; the tiles are a reshape). Rows need no alignment (any block stride works):
scales and rope values go out as int32/int16 stores when rows are 4-byte aligned (``WIDE``), as single
bytes otherwise, and are read back as bytes. All addresses are int64 (``slot * 656`` overflows int32 past
~3.2M slots). Measured on an H100: benchmarks/RESULTS.md.

``SOFT_CVT``: the Triton interpreter truncates float32 -> bf16 and rounds float32 -> fp8 half-up without
carrying into the exponent, so when interpreting the launchers round with integer arithmetic instead
(bit-identical to the hardware ``cvt.rn`` conversions, which the GPU path uses).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .. import fp8_format
from . import cdiv, interpreting, next_pow2
from .launch import launch

_TILE: tl.constexpr = tl.constexpr(fp8_format.TILE)
_E4M3_MAX: tl.constexpr = tl.constexpr(fp8_format.E4M3_MAX)
_SCALE_FLOOR: tl.constexpr = tl.constexpr(fp8_format.SCALE_FLOOR)


# ------------------------------------------------------------------------------------------ helpers
@triton.jit
def _fp32_to_e4m3_bits(y):
    """float32 ``y`` (``|y| <= 448``) -> e4m3fn bit pattern as int32, round to nearest even, in integers."""
    bits = y.to(tl.int32, bitcast=True)
    sign = tl.where(bits < 0, 0x80, 0)
    a = bits & 0x7FFFFFFF
    e = a >> 23
    # Normal e4m3 (|y| >= 2^-6): drop 20 mantissa bits with round-half-even; a carry moves into the
    # exponent by itself. (a >> 20) is (exponent << 3 | 3 mantissa bits); rebias the exponent 127 -> 7.
    r = a + 0x7FFFF + ((a >> 20) & 1)
    normal = (r >> 20) - (120 << 3)
    # Subnormal e4m3 (multiples of 2^-9): round full_significand * 2^(e - 150) / 2^-9 to an integer.
    full = (a & 0x7FFFFF) | 0x800000
    shift = tl.minimum(141 - e, 31)
    sub = (full + (1 << (shift - 1)) - 1 + ((full >> shift) & 1)) >> shift
    return tl.where(e >= 121, normal, sub) | sign


@triton.jit
def _fp32_to_bf16_bits(x):
    """float32 -> bf16 bit pattern (low 16 bits of an int32), round to nearest even, in integers."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


# ------------------------------------------------------------------------------------------ write
@triton.jit
def _write_fp8_cache_kernel(
    latent_ptr, cache_ptr, slot_ptr, flag_ptr,
    num_tokens, num_slots, page_size,
    stride_lt, stride_ld,            # latent [T, D]
    stride_cb, stride_cp,            # cache [num_blocks, ps, bytes], byte strides (last one is 1)
    R: tl.constexpr, P: tl.constexpr, SCALE_OFF: tl.constexpr, ROPE_OFF: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_T: tl.constexpr, SOFT_CVT: tl.constexpr, WIDE: tl.constexpr, CHECK: tl.constexpr,
):
    NT: tl.constexpr = R // _TILE        # scale tiles
    BLOCK_NT: tl.constexpr = BLOCK_R // _TILE
    pid = tl.program_id(0)
    tok = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)                       # [BLOCK_T]
    slot = tl.load(slot_ptr + tok, mask=tok < num_tokens, other=-1).to(tl.int64)
    # -1 (padding) and out-of-range slots write nothing: no other token's bytes can change.
    keep = (slot >= 0) & (slot < num_slots)
    slot = tl.where(keep, slot, 0)
    row = cache_ptr + (slot // page_size) * stride_cb + (slot % page_size) * stride_cp  # [BLOCK_T] ptrs
    src = latent_ptr + tok * stride_lt

    # Whole rows at once (latent and rope loads all in flight before the first reduction).
    cols = tl.arange(0, BLOCK_R)
    if BLOCK_R == R:
        lmask = keep[:, None]
    else:
        lmask = keep[:, None] & (cols < R)[None, :]
    pcols = tl.arange(0, BLOCK_P)
    pmask = keep[:, None] & (pcols < P)[None, :]
    x = tl.load(src[:, None] + cols[None, :] * stride_ld, mask=lmask, other=0.0)      # [BLOCK_T, BLOCK_R]
    r = tl.load(src[:, None] + (R + pcols)[None, :] * stride_ld, mask=pmask, other=0.0)  # [BLOCK_T, BLOCK_P]

    x = x.to(tl.float32)
    if CHECK:
        # A written row (the others loaded as 0) holding NaN or ±inf sets the flag (``flag_ptr``, int32).
        rf = r.to(tl.float32)
        bad = tl.sum(tl.sum(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=1), axis=0)
        bad += tl.sum(tl.sum(((rf != rf) | (tl.abs(rf) == float("inf"))).to(tl.int32), axis=1), axis=0)
        tl.atomic_max(flag_ptr, (bad > 0).to(tl.int32))
    x = tl.reshape(x, [BLOCK_T, BLOCK_NT, _TILE])
    amax = tl.max(tl.abs(x), axis=2)                                                # [BLOCK_T, BLOCK_NT]
    s = tl.maximum(tl.math.div_rn(amax, _E4M3_MAX), _SCALE_FLOOR)
    # Round s up to a power of two: add "all mantissa ones" and clear the mantissa.
    s_bits = (s.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000
    inv = ((254 << 23) - s_bits).to(tl.float32, bitcast=True)                      # exactly 1 / s
    y = x * inv[:, :, None]
    if SOFT_CVT:
        q = _fp32_to_e4m3_bits(y).to(tl.uint8)
    else:
        q = y.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
    tl.store(row[:, None] + cols[None, :], tl.reshape(q, [BLOCK_T, BLOCK_R]), mask=lmask)

    tcols = tl.arange(0, BLOCK_NT)
    smask = keep[:, None] & (tcols < NT)[None, :]
    if WIDE:
        tl.store((row + SCALE_OFF).to(tl.pointer_type(tl.int32))[:, None] + tcols[None, :], s_bits, mask=smask)
    else:
        for k in tl.static_range(4):  # little-endian float32 scales
            tl.store(row[:, None] + (SCALE_OFF + 4 * tcols + k)[None, :], ((s_bits >> (8 * k)) & 0xFF).to(tl.uint8),
                     mask=smask)

    if r.dtype == tl.bfloat16:
        h = r.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    elif SOFT_CVT:
        h = _fp32_to_bf16_bits(r.to(tl.float32))
    else:
        h = r.to(tl.float32).to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.int16, bitcast=True)
        h = h.to(tl.int32) & 0xFFFF
    if WIDE:
        dst16 = (row + ROPE_OFF).to(tl.pointer_type(tl.int16))
        tl.store(dst16[:, None] + pcols[None, :], h.to(tl.int16), mask=pmask)
    else:
        dst = row[:, None] + (ROPE_OFF + 2 * pcols)[None, :]
        tl.store(dst, (h & 0xFF).to(tl.uint8), mask=pmask)
        tl.store(dst + 1, (h >> 8).to(tl.uint8), mask=pmask)


def write_fp8_cache(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, *,
                    rope_dim: int, block_t: int = 8, num_warps: int = 4,
                    soft_cvt: bool | None = None, wide_stores: bool | None = None,
                    finite_flag: torch.Tensor | None = None) -> None:
    """Quantise ``latent [T, R+P]`` (bf16/fp16/fp32) into ``cache [num_blocks, ps, bytes]`` (uint8) rows.

    Row ``slot_mapping[t]`` (int32/int64; ``-1`` or out of range: skipped) receives token ``t``.
    ``cache`` may have any block stride; within a block rows must be ``bytes`` apart and bytes contiguous.
    Inputs are not validated here (the op does that). ``soft_cvt`` defaults to "interpreting";
    ``wide_stores`` (scales as int32, rope as int16 stores) defaults to "rows are 4-byte aligned".
    ``finite_flag``: an int32 tensor on the device whose first element the kernel sets to 1 when a row it writes
    holds NaN or ±inf (the checked op's finite-latent check, without launches of its own); left as it is otherwise.
    """
    T, D = latent.shape
    R = D - rope_dim
    num_blocks, ps, _ = cache.shape
    assert R % fp8_format.TILE == 0 and cache.stride(2) == 1, (R, cache.stride())
    if T == 0:
        return
    soft = interpreting() if soft_cvt is None else soft_cvt
    aligned = cache.data_ptr() % 4 == 0 and cache.stride(0) % 4 == 0 and cache.stride(1) % 4 == 0
    wide = aligned if wide_stores is None else wide_stores
    assert aligned or not wide, "wide stores need 4-byte aligned cache rows"
    grid = (cdiv(T, block_t),)
    launch(_write_fp8_cache_kernel, grid,
        latent, cache, slot_mapping.contiguous(), finite_flag if finite_flag is not None else slot_mapping,
        T, num_blocks * ps, ps,
        latent.stride(0), latent.stride(1), cache.stride(0), cache.stride(1),
        R=R, P=rope_dim, SCALE_OFF=fp8_format.scale_offset(R), ROPE_OFF=fp8_format.rope_offset(R),
        BLOCK_R=next_pow2(R), BLOCK_P=next_pow2(rope_dim),
        BLOCK_T=block_t, SOFT_CVT=soft, WIDE=wide, CHECK=finite_flag is not None, num_warps=num_warps)


# ------------------------------------------------------------------------------------- dequantise
@triton.jit
def _dequantize_fp8_cache_kernel(
    cache_ptr, out_ptr,
    num_rows, inner,                 # rows are (outer, inner) pairs of a [outer, inner, bytes] view
    stride_co, stride_ci,
    R: tl.constexpr, P: tl.constexpr, SCALE_OFF: tl.constexpr, ROPE_OFF: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)                       # [BLOCK_T]
    live = row < num_rows
    src = cache_ptr + (row // inner) * stride_co + (row % inner) * stride_ci
    dst = out_ptr + row * (R + P)
    cols = tl.arange(0, _TILE)
    for i in tl.static_range(R // _TILE):
        s_bits = tl.zeros([BLOCK_T], dtype=tl.int32)
        for k in tl.static_range(4):
            byte = tl.load(src + (SCALE_OFF + 4 * i + k), mask=live, other=0).to(tl.int32)
            s_bits = s_bits | (byte << (8 * k))
        s = s_bits.to(tl.float32, bitcast=True)
        q = tl.load(src[:, None] + (cols + i * _TILE)[None, :], mask=live[:, None], other=0)
        x = q.to(tl.float8e4nv, bitcast=True).to(tl.float32) * s[:, None]          # exact in bf16
        tl.store(dst[:, None] + (cols + i * _TILE)[None, :], x.to(tl.bfloat16), mask=live[:, None])
    pcols = tl.arange(0, BLOCK_P)
    pmask = live[:, None] & (pcols < P)[None, :]
    rope = src[:, None] + (ROPE_OFF + 2 * pcols)[None, :]
    lo = tl.load(rope, mask=pmask, other=0).to(tl.int32)
    hi = tl.load(rope + 1, mask=pmask, other=0).to(tl.int32)
    h = (lo | (hi << 8)).to(tl.int16).to(tl.bfloat16, bitcast=True)
    tl.store(dst[:, None] + (R + pcols)[None, :], h, mask=pmask)


def dequantize_fp8_cache(cache: torch.Tensor, out: torch.Tensor, *, rope_dim: int, block_t: int = 16,
                         num_warps: int = 4) -> None:
    """Dequantise ``cache [outer, inner, bytes]`` (uint8, last stride 1) into ``out [outer*inner, D]`` bf16."""
    outer, inner, nbytes = cache.shape
    D = out.shape[-1]
    R = D - rope_dim
    assert cache.stride(2) == 1 and out.is_contiguous() and out.shape[0] == outer * inner, (cache.stride(),)
    assert nbytes == fp8_format.row_bytes(R, rope_dim), (nbytes, D, rope_dim)
    n = outer * inner
    if n == 0:
        return
    _dequantize_fp8_cache_kernel[(cdiv(n, block_t),)](
        cache, out, n, inner, cache.stride(0), cache.stride(1),
        R=R, P=rope_dim, SCALE_OFF=fp8_format.scale_offset(R), ROPE_OFF=fp8_format.rope_offset(R),
        BLOCK_P=next_pow2(rope_dim), BLOCK_T=block_t, num_warps=num_warps)
