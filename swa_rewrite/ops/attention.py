"""MLA attention ops in absorbed (MQA) form.

``paged_mla_attention``: full causal attention over the model-dtype paged cache (full layers).
Shapes use SPEC §2 names: ``T`` tokens, ``H`` heads, ``D = R + P`` latent width.
"""

from __future__ import annotations

import torch

from .validation import check_batch, fail

# Bound the [tokens, context, D] gather of the paged attention reference to about this many elements.
_GATHER_BUDGET = 1 << 26


def token_positions(cu_seqlens_q: torch.Tensor, seq_lens_decoder: torch.Tensor,
                    batch_id_per_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute position ``[T]`` (int64) of each query token and its request ``[T]`` (int64, ``-1`` = padding).

    Query token ``i`` of request ``b`` sits at ``seq_lens_decoder[b] + i`` (SPEC §5).
    """
    req = batch_id_per_token.long()
    b = req.clamp(min=0)
    tok = torch.arange(req.shape[0], device=req.device)
    pos = seq_lens_decoder.long()[b] + tok - cu_seqlens_q.long()[b]
    return torch.where(req >= 0, pos, -1), req


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
    ps = cache.shape[1]
    ctx = block_tables.shape[1] * ps
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    pos, req = token_positions(cu_seqlens_q, seq_lens_decoder, batch_id_per_token)
    j = torch.arange(ctx, device=q.device)
    flat = cache.view(-1, D)
    outs, lses = [], []
    step = max(1, _GATHER_BUDGET // max(1, ctx * D))
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        rows = block_tables.long()[req[t0:t1].clamp(min=0)]                  # [t, max_blocks]
        slots = rows[:, j // ps] * ps + j % ps                                # [t, ctx]
        mask = (j[None, :] <= pos[t0:t1, None]) & (slots >= 0)                # [t, ctx]
        kv = flat[slots.clamp(min=0)].to(acc)                                 # [t, ctx, D]
        kv = torch.where(mask[..., None], kv, 0.0)                            # unused slots may hold NaN
        s = torch.einsum("thd,tcd->thc", q[t0:t1].to(acc), kv) * scale
        s = s.masked_fill(~mask[:, None, :], float("-inf"))
        lse = torch.logsumexp(s, dim=-1)                                      # [t, H]
        empty = ~mask.any(dim=-1)[:, None]
        p = torch.exp(s - torch.where(empty, 0.0, lse)[..., None])
        o = torch.einsum("thc,tcr->thr", p, kv[..., :R])
        outs.append(torch.where(empty[..., None], 0.0, o).to(q.dtype))
        lses.append(torch.where(empty, float("inf"), lse).float())
    if not outs:
        return q.new_zeros(0, H, R), q.new_zeros(0, H, dtype=torch.float32)
    return torch.cat(outs), torch.cat(lses)


# ---------------------------------------------------------------------------------------------- op
def _check_paged_attention(q, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                           batch_id_per_token, rope_dim, data=True):
    if q.dim() != 3:
        fail(f"q must be [T, H, D], got shape {tuple(q.shape)}")
    if cache.dim() != 3 or cache.shape[-1] != q.shape[-1]:
        fail(f"cache must be [num_blocks, page_size, {q.shape[-1]}], got shape {tuple(cache.shape)}")
    if cache.dtype != q.dtype:
        fail(f"q dtype {q.dtype} does not match cache dtype {cache.dtype}")
    if not 0 < rope_dim < q.shape[-1]:
        fail(f"rope_dim must be in (0, {q.shape[-1]}), got {rope_dim}")
    check_batch(q.shape[0], block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                batch_id_per_token, cache.shape[1], cache.shape[0], data=data)


@torch.library.custom_op("swa_rewrite::paged_mla_attention", mutates_args=())
def paged_mla_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                        cu_seqlens_q: torch.Tensor, seq_lens_encoder: torch.Tensor,
                        seq_lens_decoder: torch.Tensor, batch_id_per_token: torch.Tensor,
                        scale: float, rope_dim: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full causal MLA attention over the model-dtype paged cache → ``out [T, H, R]``, ``lse [T, H]`` fp32."""
    _check_paged_attention(q, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                           batch_id_per_token, rope_dim)
    return paged_mla_attention_reference(q, cache, block_tables, cu_seqlens_q, seq_lens_decoder,
                                           batch_id_per_token, scale, rope_dim)


@paged_mla_attention.register_fake
def _(q, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder, batch_id_per_token,
      scale, rope_dim, layer):
    _check_paged_attention(q, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                           batch_id_per_token, rope_dim, data=False)
    T, H, D = q.shape
    return q.new_empty(T, H, D - rope_dim), q.new_empty(T, H, dtype=torch.float32)
