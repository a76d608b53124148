"""Public Python faces of the ``torch.ops.swa_rewrite.*`` ops (docs/design.md §7, §11).

Importing this package registers the ops. Each function here calls its op, which dispatches to the
Triton kernel on CUDA where one is registered and to the PyTorch reference (the ``*_reference``
function of the op's module) otherwise.

One module per op family, each holding its reference, its ``torch.library`` definition and fake:
``kv_cache`` (allocation, model-dtype write), ``fp8_cache`` (packed FP8 write, dequantise),
``swa_indexer`` (window slots), ``attention`` (paged, sparse and fused sliding-window MLA attention, MQA
form), ``mha_prefill`` (MHA-mode prefill), ``mla_attention`` (the per-layer MLA core the model calls: both modes),
``moe`` (the routed experts of a MoE block); ``step_metadata`` holds ``StepMetadata``, the step's metadata.

The ops take the step's ``block_tables [G, B, nb]`` / ``slot_mapping [G, T]`` (one row per cache group) and
the layer's ``group``; the functions here also take one group's ``block_tables [B, nb]`` / ``slot_mapping [T]``
(then ``group`` must be 0).

``inference_only`` gives the ops a backward that raises only when it runs (steps work with grad mode
on). The functions here check their plain arguments first (the dispatcher would turn ``True`` into ``1`` and reject a float ``int`` with a RuntimeError).
"""

from __future__ import annotations

import torch

from . import attention, kv_cache, moe  # noqa: F401  (registers torch.ops.swa_rewrite.*)
from . import fp8_cache as _fp8_cache, swa_indexer as _swa_indexer  # noqa: F401  (registers ops)
from . import mha_prefill as _mha_prefill  # noqa: F401  (registers swa_rewrite::mha_swa_prefill; MHA-mode prefill, issue 18)
from . import mla_attention as _mla_attention  # noqa: F401  (registers the MLA core ops the model calls, SPEC §13)
from .attention import finite_scale
from .fp8_cache import fp8_cache_bytes
from .step_metadata import StepMetadata
from .kv_cache_spec import KVCacheSpec, cache_groups
from .checks import check_int, checks_enabled
from .flashmla_backend import attention_backend, get_attention_backend, set_attention_backend

__all__ = ["StepMetadata", "allocate_kv_cache", "write_kv_cache", "paged_mla_attention", "checks_enabled"]
__all__ += ["write_fp8_cache", "dequantize_fp8_cache", "fp8_cache_bytes", "swa_indexer"]
__all__ += ["sparse_mla_attention", "swa_mla_attention", "KVCacheSpec", "cache_groups"]
__all__ += ["attention_backend", "get_attention_backend", "set_attention_backend"]   # FlashMLA switch (§7)
__all__ += ["mla_attention", "swa_attention"]                                          # the MLA core (§13)


def _grouped(t: torch.Tensor, name: str, group_dims: int) -> torch.Tensor:
    """``t`` with its cache-group dimension: a single group's ``[B, nb]`` table (``[T]`` slots) becomes the
    ``[1, B, nb]`` (``[1, T]``) view the ops take; ``group_dims`` is the rank with that dimension."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    return t.unsqueeze(0) if t.dim() == group_dims - 1 else t


def allocate_kv_cache(num_blocks: int, page_size: int, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype,
                      device: torch.device | str | None = None, *, layer: int = -1) -> torch.Tensor:
    """A latent cache on ``device`` (contents undefined): ``[num_blocks, page_size, R + P]`` of ``dtype``,
    or, for ``dtype=torch.uint8``, the packed FP8 layout ``[num_blocks, page_size, R + 4R/128 + 2P]``."""
    device = torch.device(device) if device is not None else torch.get_default_device()
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    return torch.ops.swa_rewrite.allocate_kv_cache(
        check_int("num_blocks", num_blocks), check_int("page_size", page_size),
        check_int("kv_lora_rank", kv_lora_rank), check_int("rope_dim", rope_dim), dtype, device,
        check_int("layer", layer))


def write_kv_cache(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, *,
                   layer: int = -1, group: int = 0) -> None:
    """Write ``latent [T, D]`` (cache dtype) into ``cache [num_blocks, ps, D]`` at ``slot_mapping [T]``
    (or at row ``group`` of ``slot_mapping [G, T]``).

    ``-1`` slots write nothing. Raises ``ValueError`` on mismatched shapes/dtypes and, in checked mode,
    on a slot out of range or written twice.
    """
    torch.ops.swa_rewrite.write_kv_cache(latent, cache, _grouped(slot_mapping, "slot_mapping", 2),
                                         check_int("layer", layer), check_int("group", group))


def paged_mla_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                        cu_seqlens_q: torch.Tensor, seq_lens_encoder: torch.Tensor,
                        seq_lens_decoder: torch.Tensor, batch_id_per_token: torch.Tensor, scale: float,
                        *, rope_dim: int = 64, layer: int = -1, group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal MLA attention (MQA form) of ``q [T, H, D]`` over a paged model-dtype cache, through
    ``block_tables [B, nb]`` (or row ``group`` of ``block_tables [G, B, nb]``).

    Query token ``i`` of request ``b`` sits at position ``seq_lens_decoder[b] + i`` and attends to
    positions ``0 … p``. Returns ``out [T, H, R]`` (q dtype) and ``lse [T, H]`` (float32, natural log);
    padding tokens (``batch_id_per_token == -1``) give ``out = 0``, ``lse = +inf``.
    """
    return torch.ops.swa_rewrite.paged_mla_attention(q, cache, _grouped(block_tables, "block_tables", 3),
                                                     cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                                                     batch_id_per_token, finite_scale(scale),
                                                     check_int("rope_dim", rope_dim), check_int("layer", layer),
                                                     check_int("group", group))


def write_fp8_cache(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, *,
                    rope_dim: int = 64, layer: int = -1, group: int = 0) -> None:
    """Quantise ``latent [T, R+P]`` (bf16/fp16/fp32) into the packed FP8 ``cache uint8 [NB, ps, bytes]``.

    Row ``slot_mapping[t]`` (or ``slot_mapping[group, t]`` of a ``[G, T]`` mapping) receives token ``t`` in
    FlashMLA's "FP8 with scale" layout (docs/design.md §6, see ``ops.fp8_cache``); ``-1`` slots write nothing. Raises ``ValueError`` on mismatched shapes/dtypes and,
    in checked mode, on a bad slot or a non-finite latent row.
    """
    torch.ops.swa_rewrite.write_fp8_cache(latent, cache, _grouped(slot_mapping, "slot_mapping", 2),
                                          check_int("rope_dim", rope_dim), check_int("layer", layer),
                                          check_int("group", group))


def dequantize_fp8_cache(cache: torch.Tensor, *, rope_dim: int = 64) -> torch.Tensor:
    """Dequantise packed rows ``uint8 [..., bytes]`` (a whole cache or gathered slots) into ``bf16 [..., R+P]``."""
    return torch.ops.swa_rewrite.dequantize_fp8_cache(cache, check_int("rope_dim", rope_dim))


def swa_indexer(block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens_encoder: torch.Tensor,
                seq_lens_decoder: torch.Tensor, batch_id_per_token: torch.Tensor, *, window: int,
                page_size: int, sinks: int = 0, return_num_valid: bool = False, group: int = 0):
    """Cache slots of each query token's sliding window: ``int32 [T, 1, sinks + window]``, through
    ``block_tables [B, nb]`` (or row ``group`` of ``block_tables [G, B, nb]``).

    Entry ``sinks + k`` of the token at position ``p`` is the slot of position ``p - window + 1 + k``, ``-1``
    where that is negative; entry ``j < sinks`` is the slot of sink position ``j``, ``-1`` where ``j > p`` or
    ``j`` is inside the window (``j > p - window``), so no position appears twice (docs/design.md §12).
    Padding tokens (``batch_id_per_token == -1``) get all ``-1``. With ``return_num_valid`` also returns
    ``int32 [T]``, the valid entries: ``min(window, p + 1) + min(sinks, max(0, p - window + 1))`` (0 for
    padding).
    """
    indices, num_valid = torch.ops.swa_rewrite.swa_indexer(_grouped(block_tables, "block_tables", 3),
                                                           cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                                                           batch_id_per_token, check_int("window", window),
                                                           check_int("page_size", page_size),
                                                           check_int("group", group), check_int("sinks", sinks))
    return (indices, num_valid) if return_num_valid else indices


def sparse_mla_attention(q: torch.Tensor, cache: torch.Tensor, indices: torch.Tensor, scale: float, *,
                         rope_dim: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA attention (MQA form) of ``q [T, H, D]`` to the slots ``indices [T, 1, K]`` (int32, ``-1`` skipped)
    of the packed FP8 ``cache uint8 [NB, ps, bytes]`` → ``out [T, H, R]`` (q dtype), ``lse [T, H]`` float32
    (natural log). A row with no valid index gives ``out = 0``, ``lse = +inf``. ``scale`` is the model's
    softmax scale. Raises ``ValueError`` on bad shapes/dtypes and, in checked mode, on an index out of range.
    """
    return torch.ops.swa_rewrite.sparse_mla_attention(q, cache, indices, finite_scale(scale),
                                                      check_int("rope_dim", rope_dim))


def swa_mla_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, seq_lens_encoder: torch.Tensor, seq_lens_decoder: torch.Tensor,
                      batch_id_per_token: torch.Tensor, scale: float, *, window: int, sinks: int = 0,
                      rope_dim: int = 64, layer: int = -1, group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sliding-window MLA attention over the packed FP8 paged cache (what the graph pass inserts).

    The token at position ``p`` of request ``b`` attends to positions ``max(0, p-W+1) … p`` of ``b``
    (docs/design.md §3) and, with ``sinks = s > 0``, to the sink positions ``0 … min(s, p+1)-1``, each
    position once (§12); arguments as ``paged_mla_attention`` plus ``window`` and ``sinks``. Returns
    ``out [T, H, R]`` and ``lse [T, H]`` float32; padding tokens give ``out = 0``, ``lse = +inf``.
    """
    return torch.ops.swa_rewrite.swa_mla_attention(q, cache, _grouped(block_tables, "block_tables", 3),
                                                   cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                                                   batch_id_per_token, finite_scale(scale),
                                                   check_int("rope_dim", rope_dim), check_int("window", window),
                                                   check_int("layer", layer), check_int("group", group),
                                                   check_int("sinks", sinks))


def _mha_rows(mha_kv_slots, mha_kv_cu, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's MHA rows as the core ops take them (``[G, M]``, ``[G, B + 1]``): none when not given, one
    group's ``[M]`` / ``[B + 1]`` with a leading group dimension."""
    G, B = block_tables.shape[0], block_tables.shape[1]
    if mha_kv_slots is None:
        mha_kv_slots = torch.empty((G, 0), dtype=torch.int32, device=block_tables.device)
    if mha_kv_cu is None:
        mha_kv_cu = torch.zeros((G, B + 1), dtype=torch.int32, device=block_tables.device)
    return _grouped(mha_kv_slots, "mha_kv_slots", 2), _grouped(mha_kv_cu, "mha_kv_cu", 2)


def mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_b_weight: torch.Tensor, cache: torch.Tensor,
                  block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens_encoder: torch.Tensor,
                  seq_lens_decoder: torch.Tensor, batch_id_per_token: torch.Tensor, scale: float, *,
                  mha_kv_slots: torch.Tensor | None = None, mha_kv_cu: torch.Tensor | None = None,
                  layer: int = -1, group: int = 0) -> torch.Tensor:
    """A full layer's MLA attention core (what the model calls, SPEC §13): ``q_nope [T, H, N]``, ``q_pe [T, H,
    P]`` (rope applied), the ``kv_b_proj`` weight ``[H·(N+V), R]``, the model-dtype cache and the step metadata →
    ``o [T, H, V]``. Requests with rows in ``mha_kv_cu`` (``ops.mha_prefill.plan_mha_rows``) run MHA mode, the
    others MQA mode; without rows every token runs MQA. Padding tokens give 0."""
    block_tables = _grouped(block_tables, "block_tables", 3)
    rows, cu = _mha_rows(mha_kv_slots, mha_kv_cu, block_tables)
    return torch.ops.swa_rewrite.mla_attention(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q,
                                               seq_lens_encoder, seq_lens_decoder, batch_id_per_token, rows, cu,
                                               finite_scale(scale), check_int("rope_dim", q_pe.shape[-1]),
                                               check_int("layer", layer), check_int("group", group))


def swa_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_b_weight: torch.Tensor, cache: torch.Tensor,
                  block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens_encoder: torch.Tensor,
                  seq_lens_decoder: torch.Tensor, batch_id_per_token: torch.Tensor, scale: float, *, window: int,
                  sinks: int = 0, mha_kv_slots: torch.Tensor | None = None, mha_kv_cu: torch.Tensor | None = None,
                  layer: int = -1, group: int = 0) -> torch.Tensor:
    """A sliding-window layer's MLA attention core over the packed FP8 cache (what the graph pass re-targets
    ``mla_attention`` to): as ``mla_attention``, with the window ``W`` and ``sinks`` of SPEC §3, §12."""
    block_tables = _grouped(block_tables, "block_tables", 3)
    rows, cu = _mha_rows(mha_kv_slots, mha_kv_cu, block_tables)
    return torch.ops.swa_rewrite.swa_attention(q_nope, q_pe, kv_b_weight, cache, block_tables, cu_seqlens_q,
                                               seq_lens_encoder, seq_lens_decoder, batch_id_per_token, rows, cu,
                                               finite_scale(scale), check_int("rope_dim", q_pe.shape[-1]),
                                               check_int("window", window, minimum=1), check_int("layer", layer),
                                               check_int("group", group), check_int("sinks", sinks, minimum=0))
