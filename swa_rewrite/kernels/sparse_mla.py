"""Sparse MLA attention launchers (docs/design.md §6, §7, §10): attention of each query token to an explicit
list of cache slots (``sparse_mla_attention_fwd``, FlashMLA's sparse interface) and sliding-window attention
over the packed FP8 paged cache (``swa_attention_fwd``), which picks from shapes alone

- prefill-heavy steps: ``staged_swa_attention_fwd`` — ``_stage_windows_kernel`` dequantises the union of each
  request's windows once into bf16 staging rows, then the gathered kernel attends from them (``KEYS_ROWS``);
- decode-like steps: ``paged_mla.paged_tiles_fwd`` — the page-tile kernel (issue 17), or the gathered kernel
  walking the block table (``gathered_mla.paged_attention_fwd``) where page tiles do not fit.

The forward kernel itself is ``gathered_mla._mla_attention_fwd_kernel``; shared building blocks are in
``_common``. Measurements and the reasons for the configuration: ``benchmarks/NOTES-attention.md``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import fp8_format
from . import cdiv, interpreting, next_pow2
from ._common import DEFAULT_CONFIG, KEYS_INDICES, KEYS_ROWS, _dequantize_tile, _load_tile, _outputs
from .gathered_mla import _launch
from .paged_mla import SWA_DECODE_CONFIG, paged_tiles_fwd


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


def staged_swa_attention_fwd(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                             cu_seqlens_q: torch.Tensor, seq_lens_decoder: torch.Tensor,
                             batch_id_per_token: torch.Tensor, scale: float, rope_dim: int, window: int,
                             config: dict | None = None, out=None,
                             stats=None) -> tuple[torch.Tensor, torch.Tensor]:
    """SWA attention for prefill-heavy steps: dequantise the union of each request's windows once into a
    bf16 staging buffer of ``T + B·(W-1)`` rows, then attend from its contiguous rows. Same result as
    ``gathered_mla.paged_attention_fwd(..., window=W, fp8=True)``."""
    T, H, D = q.shape
    R = D - rope_dim
    B = block_tables.shape[0]
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    stage = torch.empty((T + B * (window - 1), D), dtype=q.dtype, device=q.device)
    block_n = cfg["stage_block_n"] if not interpreting() else 16
    if T > 0 and B > 0:
        staged_kernel = _stage_windows_kernel[(B, cdiv(T + window - 1, block_n))](
            cache, block_tables, cu_seqlens_q, seq_lens_decoder, stage, window, cache.shape[1],
            cache.stride(0), cache.stride(1), block_tables.stride(0), stage.stride(0),
            R=R, P=rope_dim, BLOCK_R=max(16, next_pow2(R)),
            BLOCK_P=max(16, next_pow2(rope_dim)), BLOCK_N=block_n,
            NT=max(16, next_pow2(R)) // fp8_format.TILE, FP8=True, num_warps=4)
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
    # kernel walking the block table (gathered_mla.paged_attention_fwd).
    return paged_tiles_fwd(q, cache, block_tables, cu_seqlens_q, seq_lens_decoder, batch_id_per_token, scale,
                           rope_dim, window, True, dict(SWA_DECODE_CONFIG, **config) if config else SWA_DECODE_CONFIG,
                           out, stats)
