"""Latent-cache allocation and the model-dtype (bf16) cache write: ``allocate_kv_cache``, ``write_kv_cache``.

Every op takes the layer index as an explicit ``layer`` argument. It does not change the result; it is
how graph passes tell layers apart (docs/design.md §8). The write also takes the layer's cache ``group``: the row of
the step's ``slot_mapping [G, T]`` it writes (see ``ops.step_metadata``).
"""

from __future__ import annotations

import torch

from .fp8_cache import fp8_cache_bytes, implied_rope_dim
from .cache_write_checks import check_cache_write
from . import decode_plans
from .checks import fail, shapes_traced
from .registration import register_cuda


def write_kv_cache_reference(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write ``latent [T, D]`` into ``cache [num_blocks, ps, D]`` (any block stride) at ``slot_mapping [T]``;
    ``-1`` writes nothing."""
    slots = slot_mapping.long()
    if slots.numel() == 0:
        return
    ps = cache.shape[1]
    keep = slots >= 0
    # Nothing here may synchronise with the host (CUDA-graph capture): no boolean indexing, no indexing
    # by a tensor scalar. Padding rows repeat the first real row's write exactly, or rewrite slot 0 with
    # its own value when there is no real row.
    first = torch.argmax(keep.to(torch.int32)).reshape(1)
    any_keep = keep.any()
    sink = torch.where(any_keep, slots.index_select(0, first), 0)                              # [1]
    sink_value = torch.where(any_keep, latent.index_select(0, first).to(cache.dtype), cache[0, :1])  # [1, D]
    target = torch.where(keep, slots, sink)
    value = torch.where(keep[:, None], latent.to(cache.dtype), sink_value)
    cache.index_put_((target // ps, target % ps), value)


def cache_shape(num_blocks: int, page_size: int, kv_lora_rank: int, rope_dim: int,
                dtype: torch.dtype) -> tuple[int, int, int]:
    """``[num_blocks, page_size, R + P]`` for a model-dtype cache; ``uint8`` means the packed FP8 layout
    ``[num_blocks, page_size, R + 4R/128 + 2P]`` of docs/design.md §6."""
    width = fp8_cache_bytes(kv_lora_rank, rope_dim) if dtype == torch.uint8 else kv_lora_rank + rope_dim
    return (num_blocks, page_size, width)


def _check_allocation(num_blocks: int, page_size: int, kv_lora_rank: int, rope_dim: int,
                      dtype: torch.dtype) -> None:
    if num_blocks < 1 or page_size < 1 or kv_lora_rank < 1 or rope_dim < 0:
        fail(f"cache dims must be positive, got num_blocks={num_blocks}, page_size={page_size}, "
             f"kv_lora_rank={kv_lora_rank}, rope_dim={rope_dim}")
    if not (dtype == torch.uint8 or dtype.is_floating_point):
        fail(f"cache dtype must be the model's floating-point dtype or torch.uint8 (the packed FP8 layout), "
             f"got {dtype}")


@torch.library.custom_op("swa_rewrite::allocate_kv_cache", mutates_args=())
def allocate_kv_cache(num_blocks: int, page_size: int, kv_lora_rank: int, rope_dim: int, dtype: torch.dtype,
                      device: torch.device, layer: int) -> torch.Tensor:
    """One layer's latent cache (see ``cache_shape``; contents undefined). ``dtype=torch.uint8`` allocates
    the packed FP8 layout; the graph pass turns an SWA layer's allocation into that by changing ``dtype``."""
    _check_allocation(num_blocks, page_size, kv_lora_rank, rope_dim, dtype)
    return torch.empty(cache_shape(num_blocks, page_size, kv_lora_rank, rope_dim, dtype), dtype=dtype, device=device)


@allocate_kv_cache.register_fake
def _(num_blocks, page_size, kv_lora_rank, rope_dim, dtype, device, layer):
    _check_allocation(num_blocks, page_size, kv_lora_rank, rope_dim, dtype)
    return torch.empty(cache_shape(num_blocks, page_size, kv_lora_rank, rope_dim, dtype), dtype=dtype, device=device)


def packed_rope_dim(latent_dim: int, packed_bytes: int) -> int:
    """``P`` of a packed cache row of ``packed_bytes`` holding latents of width ``D = R + P``
    (``fp8_cache.implied_rope_dim``); a ValueError if there is none."""
    rope_dim = implied_rope_dim(latent_dim, packed_bytes)
    if rope_dim is None:
        fail(f"a uint8 cache row of {packed_bytes} bytes is not the packed FP8 layout of a latent of width "
             f"{latent_dim} (R + 4R/128 + 2P bytes with R a multiple of 128)")
    return rope_dim


def _check_write(latent, cache, slot_mapping, group, data=True):
    if data and shapes_traced():          # inside a compiled graph: its trace checked the shapes
        check_cache_write(latent, cache, slot_mapping, cache.shape[-1], group, shapes=False)
        return
    if cache.dtype == torch.uint8:
        if cache.dim() == 3:
            packed_rope_dim(latent.shape[-1], cache.shape[-1])
        check_cache_write(latent, cache, slot_mapping, cache.shape[-1] if cache.dim() == 3 else -1, group,
                          data=data)
        return
    if not cache.dtype.is_floating_point:
        fail(f"cache must be the model-dtype cache (a floating-point dtype, as latent) or the packed FP8 cache "
             f"(uint8), got {cache.dtype}")
    check_cache_write(latent, cache, slot_mapping, latent.shape[-1], group, data=data)
    if latent.dtype != cache.dtype:
        fail(f"latent dtype {latent.dtype} does not match cache dtype {cache.dtype}")


@torch.library.custom_op("swa_rewrite::write_kv_cache", mutates_args=("cache",))
def write_kv_cache(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, layer: int,
                   group: int) -> None:
    """Write ``latent [T, D]`` into ``cache [num_blocks, ps, D]`` (model dtype) at ``slot_mapping[group]``
    (``slot_mapping [G, T]``, one row per cache group).

    A ``uint8`` cache is written in the packed FP8 layout (through ``write_fp8_cache``): a graph traced
    with a layer's packed cache stays valid before the rewrite names the packed write explicitly.
    """
    _check_write(latent, cache, slot_mapping, group)
    if cache.dtype == torch.uint8:
        rope_dim = packed_rope_dim(latent.shape[-1], cache.shape[-1])
        torch.ops.swa_rewrite.write_fp8_cache(latent, cache, slot_mapping, rope_dim, layer, group)
        return
    write_kv_cache_reference(latent, cache, slot_mapping[group])


@write_kv_cache.register_fake
def _(latent, cache, slot_mapping, layer, group):
    _check_write(latent, cache, slot_mapping, group, data=False)


@register_cuda(write_kv_cache)
def _(latent, cache, slot_mapping, layer, group):
    key = decode_plans.write_key(latent, cache, slot_mapping, group)
    plan = decode_plans.lookup(key)
    if plan is not None:                                 # this signature's checks passed and took the kernel
        from ..kernels.kv_cache import write_kv_cache as launch

        decode_plans.replayed(plan, launch, latent, cache, slot_mapping[group].contiguous())
        return
    _check_write(latent, cache, slot_mapping, group)
    if cache.dtype == torch.uint8:
        rope_dim = packed_rope_dim(latent.shape[-1], cache.shape[-1])
        torch.ops.swa_rewrite.write_fp8_cache(latent, cache, slot_mapping, rope_dim, layer, group)
        return
    slots = slot_mapping[group]                          # a view of the group's row: no copy
    if latent.stride(-1) != 1 or cache.stride(-1) != 1:
        write_kv_cache_reference(latent, cache, slots)
        return
    from ..kernels.kv_cache import write_kv_cache as launch

    decode_plans.recorded(key, launch, latent, cache, slots.contiguous())
