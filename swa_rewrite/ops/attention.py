"""MLA attention ops in absorbed (MQA) form.

- ``paged_mla_attention``: full causal attention over the model-dtype paged cache (full layers);
- ``sparse_mla_attention``: attention to an explicit slot list per token over the packed FP8 cache
  (SPEC §6, §7), FlashMLA's sparse decode semantics;
- ``swa_mla_attention``: the fused sliding-window op the graph pass inserts for SWA layers: the
  arguments of ``paged_mla_attention`` plus ``window`` and ``sinks``, over the packed FP8 cache.
  Semantically ``swa_indexer`` followed by ``sparse_mla_attention`` (SPEC §3, §12); on CUDA, without
  sinks, one kernel walks the window through the block table, or, for prefill-heavy steps, dequantises
  each request's window union once; with sinks the indexer kernel feeds the sparse kernel.

The ops taking block tables take the step's ``block_tables [G, B, nb]`` and the layer's cache ``group``
(a constant beside ``layer``) and read ``block_tables[group]``, a view; the references take one group's
``[B, nb]`` table. A window-bounded sliding group's table is ``-1`` (released) outside the pages of each request's
window and sinks (docs/design.md §12): no path reads those entries, and the checks (``batch_checks``) ask the
sliding ops only for the pages they read, the dense op for every page up to each request's end. Shapes use SPEC §2 names: ``T`` tokens, ``H`` heads, ``D = R + P`` latent width. Every op returns
``out [T, H, R]`` in the query dtype and ``lse [T, H]`` float32 (natural log); a token with no key to
attend to (padding, or only ``-1`` indices) gets ``out = 0`` and ``lse = +inf``. CUDA runs the Triton
kernels of ``swa_rewrite.kernels.sparse_mla`` / ``paged_mla``; other devices run the references here.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from .. import fp8_format
from .fp8_cache import dequantize_fp8_reference, fp8_cache_bytes
from .inference_only import register_inference_only
from .registration import register_cuda
from .batch_checks import check_batch
from .checks import check_index, checks_enabled, fail, shapes_traced
from . import flashmla_backend
from .step_metadata import token_positions
from .swa_indexer import launch_swa_indexer, swa_indexer_reference

# Bound the [tokens, context, D] gather of the paged attention reference to about this many elements.
_GATHER_BUDGET = 1 << 26


def paged_mla_attention_reference(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                                  cu_seqlens_q: torch.Tensor, seq_lens_decoder: torch.Tensor,
                                  batch_id_per_token: torch.Tensor, scale: float,
                                  rope_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal MLA attention (MQA form) of ``q [T, H, D]`` over each request's paged latent cache.

    Token at position ``p`` attends to positions ``0 … p`` of its request. Returns ``out [T, H, R]``
    in ``q.dtype`` and ``lse [T, H]`` float32 (natural log); padding tokens give ``out = 0, lse = +inf``.
    Computes in float32 (float64 for float64 inputs).
    """
    T, H, D = q.shape
    R = D - rope_dim
    if block_tables.shape[0] == 0:  # no request: every token is padding
        return q.new_zeros(T, H, R), q.new_full((T, H), float("inf"), dtype=torch.float32)
    ps = cache.shape[1]
    ctx = block_tables.shape[1] * ps
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    pos, req = token_positions(cu_seqlens_q, seq_lens_decoder, batch_id_per_token)
    j = torch.arange(ctx, device=q.device)
    flat = cache.reshape(-1, D)  # a view unless the block stride is padded
    outs, lses = [], []
    step = max(1, _GATHER_BUDGET // max(1, ctx * D))
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        # Columns past a request's end may hold stale ids: clamp them for the gather, the mask drops them.
        rows = block_tables.long()[req[t0:t1].clamp(min=0)].clamp(max=cache.shape[0] - 1)  # [t, max_blocks]
        slots = rows[:, j // ps] * ps + j % ps                                # [t, ctx]
        mask = (j[None, :] <= pos[t0:t1, None]) & (slots >= 0)                # [t, ctx]
        kv = flat[slots.clamp(min=0)]                                         # [t, ctx, D]
        o, lse = _masked_attention(q[t0:t1], kv, mask, scale, R, acc)
        outs.append(o)
        lses.append(lse)
    if not outs:
        return q.new_zeros(0, H, R), q.new_zeros(0, H, dtype=torch.float32)
    return torch.cat(outs), torch.cat(lses)


def _masked_attention(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, scale: float, R: int,
                      acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [t, H, D]`` against per-token keys ``kv [t, n, D]`` where ``mask [t, n]`` → ``out [t, H, R]``
    (q dtype), ``lse [t, H]`` fp32; masked keys may hold anything (NaN included); no key → 0 / +inf."""
    kv = torch.where(mask[..., None], kv.to(acc), 0.0)
    s = torch.einsum("thd,tcd->thc", q.to(acc), kv) * scale
    s = s.masked_fill(~mask[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                          # [t, H]
    empty = ~mask.any(dim=-1)[:, None]
    p = torch.exp(s - torch.where(empty, 0.0, lse)[..., None])
    o = torch.einsum("thc,tcr->thr", p, kv[..., :R])
    return torch.where(empty[..., None], 0.0, o).to(q.dtype), torch.where(empty, float("inf"), lse).float()


def sparse_mla_attention_reference(q: torch.Tensor, cache: torch.Tensor, indices: torch.Tensor, scale: float,
                                   rope_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA attention (MQA form) of ``q [T, H, D]`` to the cache slots ``indices [T, 1, K]`` of the packed
    FP8 ``cache uint8 [NB, ps, bytes]`` (slot = block·ps + offset; ``-1`` entries skipped, a repeated slot
    counts once per occurrence). Keys are the dequantised rows (bf16 values, SPEC §6). Returns
    ``out [T, H, R]`` in ``q.dtype`` and ``lse [T, H]`` float32; a row with no valid index gives
    ``out = 0``, ``lse = +inf``. Computes in float32 (float64 for float64 ``q``).
    """
    T, H, D = q.shape
    R = D - rope_dim
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    flat = cache.reshape(-1, cache.shape[-1])                                 # [slots, bytes]
    idx = indices.reshape(T, indices.shape[-1]).long()                        # [T, K]
    step = max(1, _GATHER_BUDGET // max(1, idx.shape[1] * D))
    outs, lses = [], []
    for t0 in range(0, T, step):
        ii = idx[t0:t0 + step]
        kv = dequantize_fp8_reference(flat[ii.clamp(min=0)], rope_dim)       # [t, K, D] bf16
        o, lse = _masked_attention(q[t0:t0 + step], kv, ii >= 0, scale, R, acc)
        outs.append(o)
        lses.append(lse)
    if not outs:
        return q.new_zeros(0, H, R), q.new_zeros(0, H, dtype=torch.float32)
    return torch.cat(outs), torch.cat(lses)


def swa_mla_attention_reference(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                                cu_seqlens_q: torch.Tensor, seq_lens_decoder: torch.Tensor,
                                batch_id_per_token: torch.Tensor, scale: float, rope_dim: int,
                                window: int, sinks: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sliding-window MLA attention over the packed FP8 paged cache: the token at position ``p`` attends
    to positions ``0 … min(s, p+1)-1`` and ``max(0, p-W+1) … p`` of its request, each once (SPEC §3, §12;
    ``s = sinks``, 0 for a plain window). ``swa_indexer`` + sparse attention."""
    window, sinks = _reachable(window, sinks, block_tables, cache)
    indices, _ = swa_indexer_reference(block_tables, cu_seqlens_q, seq_lens_decoder, batch_id_per_token,
                                       window, cache.shape[1], sinks)
    return sparse_mla_attention_reference(q, cache, indices, scale, rope_dim)


def _reachable(window: int, sinks: int, block_tables: torch.Tensor, cache: torch.Tensor) -> tuple[int, int]:
    """``window`` and ``sinks`` cut to the positions the block tables reach (``capacity``), which selects
    the same positions. With a window far beyond them (a Hugging Face window of 128K over short requests)
    the leading entries would all be -1, so index only what the tables hold. A token sits below capacity,
    so with ``W >= capacity`` no sink lies below its window, as with ``W = capacity``; sink positions at or
    past capacity hold no slot."""
    capacity = block_tables.shape[1] * cache.shape[1]
    return max(1, min(window, capacity)), min(sinks, capacity)


def swa_sinks_attention_fwd(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, seq_lens_decoder: torch.Tensor,
                            batch_id_per_token: torch.Tensor, scale: float, rope_dim: int, window: int,
                            sinks: int, out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused op's Triton path for a layer with sinks: the indexer kernel writes each token's
    ``[T, 1, sinks + W]`` slots, the sparse kernel attends to them (``-1`` skipped). One group's
    ``block_tables [B, nb]``; checked metadata; bf16 ``q``; no host synchronisation. ``out`` as
    ``sparse_mla_attention_fwd`` (preallocated ``(out, lse)``)."""
    from ..kernels.sparse_mla import sparse_mla_attention_fwd

    window, sinks = _reachable(window, sinks, block_tables, cache)
    T = q.shape[0]
    indices = torch.empty(T, 1, sinks + window, dtype=torch.int32, device=q.device)
    num_valid = torch.empty(T, dtype=torch.int32, device=q.device)
    launch_swa_indexer(block_tables, cu_seqlens_q, seq_lens_decoder, batch_id_per_token, indices, num_valid,
                       window=window, page_size=cache.shape[1], sinks=sinks)
    return sparse_mla_attention_fwd(q, cache, indices, scale, rope_dim, out=out)


# ---------------------------------------------------------------------------------------------- op
def _unpacked(cache: torch.Tensor, q: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """A packed FP8 cache dequantised whole to ``q``'s dtype, else ``cache`` itself.

    Full attention over a packed cache only happens when a graph is traced with a layer's packed cache but
    has not been rewritten yet (``torch.compile`` with ``swa_rewrite.backend``, whose pass then swaps in the
    sliding-window op); it is correct but reads and converts the whole cache.
    """
    if cache.dtype != torch.uint8:
        return cache
    return torch.ops.swa_rewrite.dequantize_fp8_cache(cache, rope_dim).to(q.dtype)


def finite_scale(scale: Any) -> float:
    """The ``scale`` argument of the public attention functions: a finite real number (TypeError for a
    non-number or a bool, ValueError for NaN / inf, which would poison every output)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float, got {scale!r} ({type(scale).__name__})")
    _check_scale(float(scale))
    return float(scale)


def _check_scale(scale: float) -> None:
    if not math.isfinite(scale):
        fail(f"scale must be a finite softmax scale, got {scale}")


def _check_paged_attention(q, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                           batch_id_per_token, scale, rope_dim, group, data=True):
    if data and shapes_traced():          # inside a compiled graph: its trace checked the shapes
        check_batch(q.shape[0], block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                    batch_id_per_token, cache.shape[1], cache.shape[0], group, shapes=False)
        return
    if q.dim() != 3:
        fail(f"q must be [T, H, D], got shape {tuple(q.shape)}")
    if not q.dtype.is_floating_point:
        fail(f"q must be a floating-point tensor, got {q.dtype}")
    _check_scale(scale)
    if not 0 < rope_dim < q.shape[-1]:
        fail(f"rope_dim must be in (0, {q.shape[-1]}), got {rope_dim}")
    packed = cache.dtype == torch.uint8
    if not (packed or cache.dtype.is_floating_point):
        fail(f"cache must be the model-dtype cache ({q.dtype}, as q) or the packed FP8 cache (uint8), "
             f"got {cache.dtype}")
    if cache.dtype != q.dtype and not packed:
        fail(f"q dtype {q.dtype} does not match cache dtype {cache.dtype}")
    width = fp8_cache_bytes(q.shape[-1] - rope_dim, rope_dim) if packed else q.shape[-1]
    if cache.dim() != 3 or cache.shape[-1] != width:
        R = q.shape[-1] - rope_dim
        if not packed and R % fp8_format.TILE == 0 and cache.shape[-1] == fp8_cache_bytes(R, rope_dim):
            fail(f"cache rows are {cache.shape[-1]} wide, the packed FP8 layout, but its dtype is {cache.dtype}: "
                 "a packed cache must be uint8 (as the rewritten allocation makes it)")
        fail(f"cache must be [num_blocks, page_size, {width}], got shape {tuple(cache.shape)}")
    check_batch(q.shape[0], block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                batch_id_per_token, cache.shape[1], cache.shape[0], group, data=data)


@torch.library.custom_op("swa_rewrite::paged_mla_attention", mutates_args=())
def paged_mla_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                        cu_seqlens_q: torch.Tensor, seq_lens_encoder: torch.Tensor,
                        seq_lens_decoder: torch.Tensor, batch_id_per_token: torch.Tensor,
                        scale: float, rope_dim: int, layer: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full causal MLA attention over the model-dtype paged cache → ``out [T, H, R]``, ``lse [T, H]`` fp32.

    ``block_tables [G, B, nb]``: the layer reads row ``group`` (its cache group, see ``ops.step_metadata``).
    """
    _check_paged_attention(q, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                           batch_id_per_token, scale, rope_dim, group)
    return paged_mla_attention_reference(q, _unpacked(cache, q, rope_dim), block_tables[group], cu_seqlens_q,
                                         seq_lens_decoder, batch_id_per_token, scale, rope_dim)


@paged_mla_attention.register_fake
def _(q, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder, batch_id_per_token,
      scale, rope_dim, layer, group):
    _check_paged_attention(q, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                           batch_id_per_token, scale, rope_dim, group, data=False)
    T, H, D = q.shape
    return q.new_empty(T, H, D - rope_dim), q.new_empty(T, H, dtype=torch.float32)


@register_cuda(paged_mla_attention)
def _(q, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder, batch_id_per_token,
      scale, rope_dim, layer, group):
    _check_paged_attention(q, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                           batch_id_per_token, scale, rope_dim, group)
    # block_tables[group]: a view of the group's tables, no copy, no sync.
    return paged_mqa_cuda(q, cache, block_tables[group], cu_seqlens_q, seq_lens_decoder, batch_id_per_token,
                          scale, rope_dim)


def paged_mqa_cuda(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                   seq_lens_decoder: torch.Tensor, batch_id_per_token: torch.Tensor, scale: float,
                   rope_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The full layer's MQA-mode attention on CUDA, inputs already checked: FlashMLA when selected and able,
    else our Triton kernel, else (a dtype or layout it does not take) the reference. One group's
    ``block_tables [B, nb]``; tokens with ``batch_id_per_token = -1`` give ``out = 0``, ``lse = +inf``."""
    cache = _unpacked(cache, q, rope_dim)
    if not _triton_supported(q, cache):
        return paged_mla_attention_reference(q, cache, block_tables, cu_seqlens_q, seq_lens_decoder,
                                             batch_id_per_token, scale, rope_dim)
    flashmla = flashmla_backend.try_dense_decode(q, cache, block_tables, cu_seqlens_q, seq_lens_decoder,
                                                 batch_id_per_token, scale, rope_dim)   # None: not selected / can't
    if flashmla is not None:
        return flashmla
    from ..kernels.paged_mla import paged_mla_attention_fwd

    # The kernels index the metadata with unit column strides.
    return paged_mla_attention_fwd(q.contiguous(), cache, block_tables.contiguous(), cu_seqlens_q.contiguous(),
                                   seq_lens_decoder.contiguous(), batch_id_per_token.contiguous(), scale, rope_dim)


def _triton_supported(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """The Triton kernels take bf16 queries (FP8 tiles dequantise to bf16 for the dot with q) and caches
    whose rows are contiguous and 4-byte aligned; anything else takes the PyTorch reference."""
    strides, size = cache.stride(), cache.element_size()
    return (q.dtype == torch.bfloat16 and strides[-1] == 1 and cache.data_ptr() % 4 == 0
            and all(s * size % 4 == 0 for s in strides[:-1]))


# ------------------------------------------------------------------------------------- sparse op
def _fp8_latent_rank(cache: torch.Tensor, q: torch.Tensor, rope_dim: int) -> int:
    """Check ``cache`` is a packed FP8 cache ``uint8 [NB, ps, bytes]`` (or ``[NB, ps, 1, bytes]``) for ``q``."""
    if q.dim() != 3:
        fail(f"q must be [T, H, D], got shape {tuple(q.shape)}")
    if not q.dtype.is_floating_point:
        fail(f"q must be a floating-point tensor, got {q.dtype}")
    if not 0 < rope_dim < q.shape[-1]:
        fail(f"rope_dim must be in (0, {q.shape[-1]}), got {rope_dim}")
    R = q.shape[-1] - rope_dim
    if R % fp8_format.TILE:
        fail(f"the packed FP8 cache needs R = D - rope_dim to be a multiple of {fp8_format.TILE}, got R = {R}")
    nbytes = fp8_cache_bytes(R, rope_dim)
    if cache.dtype != torch.uint8:
        fail(f"cache must be the packed FP8 cache (uint8), got {cache.dtype}")
    if not (cache.dim() == 3 or (cache.dim() == 4 and cache.shape[2] == 1)) or cache.shape[-1] != nbytes:
        fail(f"cache must be [num_blocks, page_size, {nbytes}] uint8 for R={R}, P={rope_dim}, "
             f"got shape {tuple(cache.shape)}")
    if cache.device != q.device:
        fail(f"q ({q.device}) and cache ({cache.device}) must be on one device")
    return R


def _check_sparse_attention(q, cache, indices, scale, rope_dim, data=True):
    _fp8_latent_rank(cache, q, rope_dim)
    _check_scale(scale)
    check_index("indices", indices, 3)
    if indices.shape[0] != q.shape[0] or indices.shape[1] != 1:
        fail(f"indices must be [T={q.shape[0]}, 1, K], got shape {tuple(indices.shape)}")
    if indices.device != q.device:
        fail(f"indices ({indices.device}) and q ({q.device}) must be on one device")
    if data and checks_enabled() and indices.numel() and indices.device.type != "meta":
        num_slots = cache.shape[0] * cache.shape[1]
        bad = (indices < -1) | (indices >= num_slots)
        if bool(bad.any()):
            t, _, k = (int(v) for v in bad.nonzero()[0])
            fail(f"indices[{t}, 0, {k}] = {int(indices[t, 0, k])} is out of range [-1, {num_slots})")


@torch.library.custom_op("swa_rewrite::sparse_mla_attention", mutates_args=())
def sparse_mla_attention(q: torch.Tensor, cache: torch.Tensor, indices: torch.Tensor, scale: float,
                         rope_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MLA attention over the packed FP8 cache → ``out [T, H, R]``, ``lse [T, H]`` fp32 (SPEC §7)."""
    _check_sparse_attention(q, cache, indices, scale, rope_dim)
    return sparse_mla_attention_reference(q, cache, indices, scale, rope_dim)


@sparse_mla_attention.register_fake
def _(q, cache, indices, scale, rope_dim):
    _check_sparse_attention(q, cache, indices, scale, rope_dim, data=False)
    T, H, D = q.shape
    return q.new_empty(T, H, D - rope_dim), q.new_empty(T, H, dtype=torch.float32)


@register_cuda(sparse_mla_attention)
def _(q, cache, indices, scale, rope_dim):
    _check_sparse_attention(q, cache, indices, scale, rope_dim)
    if not _triton_supported(q, cache):
        return sparse_mla_attention_reference(q, cache, indices, scale, rope_dim)
    from ..kernels.sparse_mla import sparse_mla_attention_fwd

    return sparse_mla_attention_fwd(q.contiguous(), cache, indices.contiguous(), scale, rope_dim)


# ---------------------------------------------------------------------------------------- SWA op
def _check_swa_attention(q, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                         batch_id_per_token, scale, rope_dim, window, group, sinks, data=True):
    if data and shapes_traced():          # inside a compiled graph: its trace checked the shapes
        check_batch(q.shape[0], block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                    batch_id_per_token, cache.shape[1], cache.shape[0], group, window=window, sinks=sinks,
                    shapes=False)
        return
    _fp8_latent_rank(cache, q, rope_dim)
    _check_scale(scale)
    if window < 1:
        fail(f"window must be >= 1, got {window}")
    if sinks < 0:
        fail(f"sinks must be >= 0, got {sinks}")
    # Window-aware: a window-bounded group's tables hold only the pages of each request's window and sinks.
    check_batch(q.shape[0], block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                batch_id_per_token, cache.shape[1], cache.shape[0], group, window=window, sinks=sinks, data=data)


@torch.library.custom_op("swa_rewrite::swa_mla_attention", mutates_args=())
def swa_mla_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, seq_lens_encoder: torch.Tensor, seq_lens_decoder: torch.Tensor,
                      batch_id_per_token: torch.Tensor, scale: float, rope_dim: int, window: int,
                      layer: int, group: int, sinks: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sliding-window MLA attention over the packed FP8 paged cache → ``out [T, H, R]``, ``lse [T, H]``.

    ``block_tables [G, B, nb]``: the layer reads row ``group`` (its cache group, see ``ops.step_metadata``).
    ``sinks`` (default 0, so graphs and callers from before sinks keep their meaning): the layer's attention
    sink tokens (SPEC §12).
    """
    _check_swa_attention(q, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                         batch_id_per_token, scale, rope_dim, window, group, sinks)
    return swa_mla_attention_reference(q, cache, block_tables[group], cu_seqlens_q, seq_lens_decoder,
                                       batch_id_per_token, scale, rope_dim, window, sinks)


@swa_mla_attention.register_fake
def _(q, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder, batch_id_per_token, scale,
      rope_dim, window, layer, group, sinks=0):
    _check_swa_attention(q, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                         batch_id_per_token, scale, rope_dim, window, group, sinks, data=False)
    T, H, D = q.shape
    return q.new_empty(T, H, D - rope_dim), q.new_empty(T, H, dtype=torch.float32)


@register_cuda(swa_mla_attention)
def _(q, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder, batch_id_per_token, scale,
      rope_dim, window, layer, group, sinks=0):
    _check_swa_attention(q, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                         batch_id_per_token, scale, rope_dim, window, group, sinks)
    # block_tables[group]: a view of the group's tables, no copy, no sync.
    return swa_mqa_cuda(q, cache, block_tables[group], cu_seqlens_q, seq_lens_decoder, batch_id_per_token, scale,
                        rope_dim, window, sinks)


def swa_mqa_cuda(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 seq_lens_decoder: torch.Tensor, batch_id_per_token: torch.Tensor, scale: float, rope_dim: int,
                 window: int, sinks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sliding-window layer's MQA-mode attention on CUDA over the packed FP8 cache, inputs already checked:
    FlashMLA when selected and able, else our Triton kernels (sinks: indexer + sparse kernel), else the
    reference. One group's ``block_tables [B, nb]``; ``batch_id_per_token = -1`` tokens give 0 / ``+inf``."""
    if not _triton_supported(q, cache):
        return swa_mla_attention_reference(q, cache, block_tables, cu_seqlens_q, seq_lens_decoder,
                                           batch_id_per_token, scale, rope_dim, window, sinks)
    flashmla = flashmla_backend.try_swa_decode(q, cache, block_tables, cu_seqlens_q, seq_lens_decoder,
                                               batch_id_per_token, scale, rope_dim, window, sinks)
    if flashmla is not None:
        return flashmla
    if sinks > 0:
        # Sinks break the one contiguous band the fused kernels walk: index, then attend sparsely.
        return swa_sinks_attention_fwd(q.contiguous(), cache, block_tables, cu_seqlens_q, seq_lens_decoder,
                                       batch_id_per_token, scale, rope_dim, window, sinks)
    from ..kernels.sparse_mla import swa_attention_fwd

    return swa_attention_fwd(q.contiguous(), cache, block_tables.contiguous(), cu_seqlens_q.contiguous(),
                             seq_lens_decoder.contiguous(), batch_id_per_token.contiguous(), scale, rope_dim,
                             window)


for _op in (paged_mla_attention, sparse_mla_attention, swa_mla_attention):
    register_inference_only(_op)
