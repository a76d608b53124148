"""Launcher of the dense paged MLA attention (full layers) over the model-dtype ``[NB, ps, D]`` cache.

The kernel is ``sparse_mla._mla_attention_fwd_kernel`` with ``KEYS_PAGED``, ``window = 0`` and plain
(unquantised) rows: a program owns one query token and ``BLOCK_H`` heads and walks positions ``0 … p`` of
the token's request through its block table; few tokens (decode) split the context across programs and
merge the partials by lse. Grids depend on shapes only (CUDA-graph capturable).
"""

from __future__ import annotations

import torch

from .sparse_mla import paged_attention_fwd


def paged_mla_attention_fwd(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, seq_lens_decoder: torch.Tensor,
                            batch_id_per_token: torch.Tensor, scale: float, rope_dim: int,
                            config: dict | None = None, out=None,
                            stats=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of ``q [T, H, D]`` over ``cache [NB, ps, D]`` (q dtype) → ``out [T, H, R]``,
    ``lse [T, H]`` fp32; padding tokens (``batch_id_per_token == -1``) give ``out = 0``, ``lse = +inf``."""
    return paged_attention_fwd(q, cache, block_tables, cu_seqlens_q, seq_lens_decoder, batch_id_per_token,
                               scale, rope_dim, 0, False, config, out, stats)
