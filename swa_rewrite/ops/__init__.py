"""Public Python faces of the ``torch.ops.swa_rewrite.*`` ops (SPEC §7, §11).

Importing this package registers the ops. Each function here calls its op, which dispatches to the
Triton kernel on CUDA where one is registered and to the PyTorch reference (the ``*_reference``
function of the op's module) otherwise.

One module per op family, each holding its reference, its ``torch.library`` definition and fake:
``kv_cache`` (allocation, model-dtype write), ``attention`` (paged and sparse MLA attention).
"""

from __future__ import annotations

import torch

from . import attention, kv_cache  # noqa: F401  (registers torch.ops.swa_rewrite.*)
from .validation import checks_enabled

__all__ = ["allocate_kv_cache", "write_kv_cache", "paged_mla_attention", "checks_enabled"]


def allocate_kv_cache(num_blocks: int, page_size: int, width: int, dtype: torch.dtype,
                      device: torch.device | str | None = None, *, layer: int = -1) -> torch.Tensor:
    """``[num_blocks, page_size, width]`` cache of ``dtype`` on ``device`` (contents undefined)."""
    device = torch.device(device) if device is not None else torch.get_default_device()
    return torch.ops.swa_rewrite.allocate_kv_cache(num_blocks, page_size, width, dtype, device, layer)


def write_kv_cache(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, *,
                   layer: int = -1) -> None:
    """Write ``latent [T, D]`` (cache dtype) into ``cache [num_blocks, ps, D]`` at ``slot_mapping [T]``.

    ``-1`` slots write nothing. Raises ``ValueError`` on mismatched shapes/dtypes and, in checked mode,
    on a slot out of range or written twice.
    """
    torch.ops.swa_rewrite.write_kv_cache(latent, cache, slot_mapping, layer)


def paged_mla_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                        cu_seqlens_q: torch.Tensor, seq_lens_encoder: torch.Tensor,
                        seq_lens_decoder: torch.Tensor, batch_id_per_token: torch.Tensor, scale: float,
                        *, rope_dim: int = 64, layer: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal MLA attention (MQA form) of ``q [T, H, D]`` over a paged model-dtype cache.

    Query token ``i`` of request ``b`` sits at position ``seq_lens_decoder[b] + i`` and attends to
    positions ``0 … p``. Returns ``out [T, H, R]`` (q dtype) and ``lse [T, H]`` (float32, natural log);
    padding tokens (``batch_id_per_token == -1``) give ``out = 0``, ``lse = +inf``.
    """
    return torch.ops.swa_rewrite.paged_mla_attention(q, cache, block_tables, cu_seqlens_q, seq_lens_encoder,
                                                     seq_lens_decoder, batch_id_per_token, scale, rope_dim,
                                                     layer)
