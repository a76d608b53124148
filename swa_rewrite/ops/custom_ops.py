"""``torch.ops.swa_rewrite.*``: op definitions, fake implementations and the default (reference) kernels.

Every op takes the layer index as an explicit ``layer`` argument. It does not change the result; it is
how graph passes tell layers apart (SPEC §8). Device-specific kernels are registered on top of the
reference implementation with ``register_kernel`` where the Triton kernels live.
"""

from __future__ import annotations

import torch

from . import reference
from .validation import check_batch, check_cache_write, fail


# ---------------------------------------------------------------------------------------------- allocation
@torch.library.custom_op("swa_rewrite::allocate_kv_cache", mutates_args=())
def allocate_kv_cache(num_blocks: int, page_size: int, width: int, dtype: torch.dtype,
                      device: torch.device, layer: int) -> torch.Tensor:
    """One layer's latent cache ``[num_blocks, page_size, width]`` of ``dtype`` (contents undefined)."""
    if num_blocks < 1 or page_size < 1 or width < 1:
        fail(f"cache dims must be >= 1, got num_blocks={num_blocks}, page_size={page_size}, width={width}")
    return torch.empty((num_blocks, page_size, width), dtype=dtype, device=device)


@allocate_kv_cache.register_fake
def _(num_blocks, page_size, width, dtype, device, layer):
    return torch.empty((num_blocks, page_size, width), dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------- bf16 write
@torch.library.custom_op("swa_rewrite::write_kv_cache", mutates_args=("cache",))
def write_kv_cache(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, layer: int) -> None:
    """Write ``latent [T, D]`` into the model-dtype ``cache [num_blocks, ps, D]`` at ``slot_mapping [T]``."""
    check_cache_write(latent, cache, slot_mapping, latent.shape[-1])
    if latent.dtype != cache.dtype:
        fail(f"latent dtype {latent.dtype} does not match cache dtype {cache.dtype}")
    reference.write_kv_cache(latent, cache, slot_mapping)


@write_kv_cache.register_fake
def _(latent, cache, slot_mapping, layer):
    check_cache_write(latent, cache, slot_mapping, latent.shape[-1])


# ---------------------------------------------------------------------------------- dense paged attention
def _check_paged_attention(q, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                           batch_id_per_token, rope_dim):
    if q.dim() != 3:
        fail(f"q must be [T, H, D], got shape {tuple(q.shape)}")
    if cache.dim() != 3 or cache.shape[-1] != q.shape[-1]:
        fail(f"cache must be [num_blocks, page_size, {q.shape[-1]}], got shape {tuple(cache.shape)}")
    if cache.dtype != q.dtype:
        fail(f"q dtype {q.dtype} does not match cache dtype {cache.dtype}")
    if not 0 < rope_dim < q.shape[-1]:
        fail(f"rope_dim must be in (0, {q.shape[-1]}), got {rope_dim}")
    check_batch(q.shape[0], block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                batch_id_per_token, cache.shape[1], cache.shape[0])


@torch.library.custom_op("swa_rewrite::paged_mla_attention", mutates_args=())
def paged_mla_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                        cu_seqlens_q: torch.Tensor, seq_lens_encoder: torch.Tensor,
                        seq_lens_decoder: torch.Tensor, batch_id_per_token: torch.Tensor,
                        scale: float, rope_dim: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full causal MLA attention over the model-dtype paged cache → ``out [T, H, R]``, ``lse [T, H]`` fp32."""
    _check_paged_attention(q, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                           batch_id_per_token, rope_dim)
    return reference.paged_mla_attention(q, cache, block_tables, cu_seqlens_q, seq_lens_decoder,
                                         batch_id_per_token, scale, rope_dim)


@paged_mla_attention.register_fake
def _(q, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder, batch_id_per_token,
      scale, rope_dim, layer):
    _check_paged_attention(q, cache, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                           batch_id_per_token, rope_dim)
    T, H, D = q.shape
    return q.new_empty(T, H, D - rope_dim), q.new_empty(T, H, dtype=torch.float32)
