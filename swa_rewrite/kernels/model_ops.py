"""The bundled model's small per-layer ops as one launch each, for eager steps (issue 14).

An eager decode step is host-bound: its time is what the host takes to issue ~60 ops a layer, ~7-30 µs each on a
lent H200's host. Four kernels fold the model's small ops into one launch each, computing what the op-by-op forms
compute, in the same order and with the same roundings:

* ``rms_norm``: ``weight · rms_norm(x)`` — the float32 normalisation rounded once to ``x``'s dtype, then the weight
  product rounded again (``models.mla.RMSNorm``); with ``residual``, first ``h = x + residual`` rounded to the
  dtype, which it also returns (the decoder layer's residual add before its post-attention norm).
* ``rope_table``: the step's rope table ``[T, 2, P]`` (``models.rope.rope_rotation`` of ``rope_cos_sin``: each
  position's angles, their cosines and sines times the magnitude, rounded to the dtype), ~15 ops in one launch;
* ``mla_rope_latent``: one MLA layer's rope and latent: ``q_pe`` rotated (``models.rope.rotate``: each product
  rounded, then their sum), and the latent row ``[kv_a_layernorm(c_kv) | rotate(k_pe)]`` the layer writes into its
  cache — the kv norm, two rotations and the concatenation, five to nine ops, in one launch;
* ``silu_mul``: the MLP's ``F.silu(gate) * up`` of its ``[gate | up]`` GEMM output in one launch — ``x / (1 +
  exp(-x))`` in float32 with CUDA's ``expf`` and a correctly rounded division, as PyTorch's kernel computes it,
  rounded to the dtype, then the product rounded again.

The rotations read the step's ``RopeRotation`` table and index, and their kernel is compiled without floating-point
contraction (``enable_fp_fusion=False``: Triton's default fuses ``a·c + b·s`` into one FMA, which rounds once where
PyTorch rounds each product; on an H200 ~20 % of the elements differed), so their bits are ``rotate``'s. The norms'
sums of squares are reduced in another order than PyTorch's, so a normalised value can differ from ``F.rms_norm``'s
in the last float32 bits, and rarely by a unit or two of a half dtype after rounding
(``tests/models/test_fused_model_ops.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import cdiv, interpreting, next_pow2
from .launch import launch


@triton.jit
def _rms_row(x, w_ptr, cols, mask, D, eps, DTYPE: tl.constexpr):
    """``weight · rms_norm(x)`` of one row ``x`` (already in the model dtype), as the op-by-op form rounds it."""
    xf = x.to(tl.float32)
    ms = tl.sum(xf * xf, axis=0) / D
    y = (xf * tl.rsqrt(ms + eps)).to(DTYPE)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    return (w.to(tl.float32) * y.to(tl.float32)).to(DTYPE)


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, D, stride_x, stride_r, stride_y, stride_h, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    DTYPE: tl.constexpr = y_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(DTYPE)
        tl.store(h_ptr + row * stride_h + cols, x, mask=mask)
    tl.store(y_ptr + row * stride_y + cols, _rms_row(x, w_ptr, cols, mask, D, eps, DTYPE), mask=mask)


@triton.jit
def _rope_table_kernel(pos_ptr, inv_ptr, tab_ptr, magnitude, stride_t, stride_row, HALF: tl.constexpr,
                       BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK)
    mask = j < HALF
    DTYPE: tl.constexpr = tab_ptr.dtype.element_ty
    angle = tl.load(pos_ptr + t).to(tl.float32) * tl.load(inv_ptr + j, mask=mask, other=0.0)
    if INTERPRET:                                             # (the interpreter has no libdevice: numpy's)
        cos = tl.cos(angle) * magnitude
        sin = tl.sin(angle) * magnitude
    else:                                                     # CUDA's cosf / sinf, as PyTorch's cos / sin
        cos = libdevice.cos(angle) * magnitude
        sin = libdevice.sin(angle) * magnitude
    row = tab_ptr + t * stride_t + j
    tl.store(row, cos.to(DTYPE), mask=mask)                   # [cos | cos]
    tl.store(row + HALF, cos.to(DTYPE), mask=mask)
    # [-sin | sin]: negated before rounding (the same bits: rounding to nearest is symmetric; the interpreter
    # negates a bf16 value wrongly)
    tl.store(row + stride_row, (-sin).to(DTYPE), mask=mask)
    tl.store(row + stride_row + HALF, sin.to(DTYPE), mask=mask)


@triton.jit
def _rotate(x_ptr, src, partner, cos, sin, mask, DTYPE: tl.constexpr):
    """``rotate``: ``x[src]·cos + x[partner]·sin``, each product rounded to the dtype, then their sum."""
    a = tl.load(x_ptr + src, mask=mask, other=0.0).to(tl.float32) * cos
    b = tl.load(x_ptr + partner, mask=mask, other=0.0).to(tl.float32) * sin
    return (a.to(DTYPE).to(tl.float32) + b.to(DTYPE).to(tl.float32)).to(DTYPE)


@triton.jit
def _mla_rope_latent_kernel(q_ptr, kv_ptr, tab_ptr, idx_ptr, w_ptr, qo_ptr, lat_ptr, H, eps,
                            stride_qt, stride_qh, stride_kv, stride_tab, stride_tab_row, stride_qot, stride_qoh,
                            stride_lat, R: tl.constexpr, P: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    DTYPE: tl.constexpr = lat_ptr.dtype.element_ty
    j = tl.arange(0, P)
    src = tl.load(idx_ptr + j)
    partner = tl.load(idx_ptr + P + j)
    cos = tl.load(tab_ptr + t * stride_tab + j).to(tl.float32)
    sin = tl.load(tab_ptr + t * stride_tab + stride_tab_row + j).to(tl.float32)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = (heads < H)[:, None] & (j < P)[None, :]
    q = q_ptr + t * stride_qt + heads.to(tl.int64)[:, None] * stride_qh
    out = _rotate(q, src[None, :], partner[None, :], cos[None, :], sin[None, :], hmask, DTYPE)
    tl.store(qo_ptr + t * stride_qot + heads.to(tl.int64)[:, None] * stride_qoh + j[None, :], out, mask=hmask)
    if hb == 0:                                  # the token's latent row: [kv_a_layernorm(c_kv) | rotate(k_pe)]
        cols = tl.arange(0, BLOCK_R)
        cmask = cols < R
        kv = kv_ptr + t * stride_kv
        c_kv = tl.load(kv + cols, mask=cmask, other=0.0)
        tl.store(lat_ptr + t * stride_lat + cols, _rms_row(c_kv, w_ptr, cols, cmask, R, eps, DTYPE), mask=cmask)
        k = _rotate(kv + R, src, partner, cos, sin, j < P, DTYPE)
        tl.store(lat_ptr + t * stride_lat + R + j, k)


@triton.jit
def _silu_mul_kernel(x_ptr, y_ptr, N, stride_x, stride_y, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    DTYPE: tl.constexpr = y_ptr.dtype.element_ty
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + N + cols, mask=mask, other=0.0).to(tl.float32)
    if INTERPRET:                                             # (the interpreter has no libdevice: numpy's)
        s = g / (1.0 + tl.exp(-g))
    else:                                                     # PyTorch's silu: x / (1 + expf(-x)), IEEE division
        s = tl.math.div_rn(g, 1.0 + libdevice.exp(-g))
    tl.store(y_ptr + row * stride_y + cols, (s.to(DTYPE).to(tl.float32) * u).to(DTYPE), mask=mask)


def silu_mul(gate_up: torch.Tensor, *, out: torch.Tensor | None = None, block: int = 1024) -> torch.Tensor:
    """``F.silu(gate) * up`` of ``gate_up [T, 2N]`` = ``[gate | up]`` (unit last stride) → ``[T, N]`` (``out`` to
    write, unit last stride; default new). Not validated here (``models.fused`` chooses when to call it)."""
    T, N = gate_up.shape[0], gate_up.shape[1] // 2
    y = out if out is not None else torch.empty((T, N), dtype=gate_up.dtype, device=gate_up.device)
    if T and N:
        block = min(block, next_pow2(N))
        launch(_silu_mul_kernel, (T, cdiv(N, block)), gate_up, y, N, gate_up.stride(0), y.stride(0),
               BLOCK=block, INTERPRET=interpreting(), num_warps=4, enable_fp_fusion=False)
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
             out: tuple[torch.Tensor, ...] | None = None, num_warps: int | None = None):
    """``weight · rms_norm(x)`` of ``x [T, D]`` (unit last stride; ``weight [D]`` contiguous, ``x``'s dtype); with
    ``residual [T, D]``, of ``h = x + residual`` and returns ``(y, h)``. ``out``: ``(y,)`` or ``(y, h)`` to write
    (unit last stride; default new). Not validated here (``models.fused`` chooses when to call it)."""
    T, D = x.shape
    if out is None:
        out = tuple(torch.empty((T, D), dtype=x.dtype, device=x.device) for _ in range(1 + (residual is not None)))
    y, h = out[0], out[-1]
    if T:
        block = next_pow2(D)
        r = residual if residual is not None else x
        launch(_rms_norm_kernel, (T,), x, r, weight, y, h, D, x.stride(0), r.stride(0), y.stride(0), h.stride(0),
               eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
               num_warps=num_warps or (8 if block >= 4096 else 4 if block >= 1024 else 2))
    return (y, h) if residual is not None else y


def rope_table(positions: torch.Tensor, inv_freq: torch.Tensor, magnitude: float, dtype: torch.dtype, *,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``[T, 2, P]`` in ``dtype`` for ``positions [T]`` (integers) and ``inv_freq [P/2]`` (float32, contiguous): row 0
    ``[cos | cos]``, row 1 ``[-sin | sin]`` of ``positions · inv_freq`` times ``magnitude`` (a ``RopeRotation``'s
    ``tokens``). ``out``: the table to write (unit last stride). Not validated here."""
    T, half = positions.shape[0], inv_freq.shape[0]
    table = out if out is not None else torch.empty((T, 2, 2 * half), dtype=dtype, device=positions.device)
    if T:
        launch(_rope_table_kernel, (T,), positions, inv_freq, table, float(magnitude), table.stride(0),
               table.stride(1), HALF=half, BLOCK=next_pow2(half), INTERPRET=interpreting(), num_warps=1,
               enable_fp_fusion=False)
    return table


def mla_rope_latent(q_pe: torch.Tensor, kv: torch.Tensor, table: torch.Tensor, index: torch.Tensor,
                    weight: torch.Tensor, eps: float, *, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                    block_h: int = 32, num_warps: int = 4):
    """``(rotate(q_pe), [weight · rms_norm(kv[:, :R]) | rotate(kv[:, R:])])`` for ``q_pe [T, H, P]`` (unit last
    stride), ``kv [T, R + P]`` (the layer's ``kv_a_proj_with_mqa`` output, unit last stride), ``table [T, 2, P]``
    and ``index [2P]`` (a ``RopeRotation``'s ``tokens`` and ``index``) and the kv norm's ``weight [R]``. Returns
    ``q_pe`` rotated ``[T, H, P]`` and the latent ``[T, R + P]`` (``out`` to write them, unit last strides; default
    new and contiguous). Not validated here."""
    T, H, P = q_pe.shape
    R = kv.shape[1] - P
    q_out, latent = out if out is not None else (torch.empty((T, H, P), dtype=q_pe.dtype, device=q_pe.device),
                                                 torch.empty((T, R + P), dtype=kv.dtype, device=kv.device))
    if T:
        block_h = min(block_h, next_pow2(H))
        launch(_mla_rope_latent_kernel, (T, cdiv(H, block_h)), q_pe, kv, table, index, weight, q_out, latent, H,
               eps, q_pe.stride(0), q_pe.stride(1), kv.stride(0), table.stride(0), table.stride(1), q_out.stride(0),
               q_out.stride(1), latent.stride(0), R=R, P=P, BLOCK_R=next_pow2(R), BLOCK_H=block_h,
               num_warps=num_warps, enable_fp_fusion=False)
    return q_out, latent
