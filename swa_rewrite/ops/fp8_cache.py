"""Packed FP8 latent cache (docs/design.md §6): ``write_fp8_cache`` and ``dequantize_fp8_cache``.

A token's cache row is ``fp8_cache_bytes(R, P)`` uint8 bytes (656 for DeepSeek-V3's ``R=512, P=64``),
byte-compatible with FlashMLA's "FP8 with scale" KV cache; the layout, its constants and the pure-PyTorch
quantise / dequantise are defined once in ``swa_rewrite.fp8_format`` (docs/design.md §6). This module
checks the ops' arguments in their terms and wraps that definition as the references.

CUDA tensors go through the Triton kernels of ``swa_rewrite.kernels.fp8_cache``; everything else through
the PyTorch references below, which are also the test oracle.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import fp8_format
from . import decode_plans
from .cache_write_checks import check_cache_write, check_finite_latent, deferred_finite_flag
from .checks import fail, shapes_traced
from .registration import register_cuda

# The latent dtypes the packed write quantises (the model dtypes a sliding-window layer can have).
LATENT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def fp8_cache_bytes(kv_lora_rank: int, rope_dim: int) -> int:
    """Bytes per token of the packed cache: ``R + 4*R/128 + 2*P`` (656 for ``R=512, P=64``)."""
    if rope_dim < 0 or rope_dim % 2:
        fail(f"rope_dim must be even and >= 0 for the FP8 cache, got {rope_dim}")
    if kv_lora_rank < fp8_format.TILE or kv_lora_rank % fp8_format.TILE:
        fail(f"kv_lora_rank must be a positive multiple of {fp8_format.TILE} for the FP8 cache, got {kv_lora_rank}")
    return fp8_format.row_bytes(kv_lora_rank, rope_dim)


def implied_rope_dim(latent_dim: int, packed_bytes: int) -> Optional[int]:
    """``P > 0`` of a packed row of ``packed_bytes`` holding latents of width ``D = R + P``, or None if no such
    row (``fp8_format.row_dims``)."""
    dims = fp8_format.row_dims(packed_bytes, latent_dim=latent_dim)
    return dims[1] if dims is not None and dims[1] > 0 else None


def packed_row_bytes(width: int, rope_dim: int, what: str, cache: Optional[torch.Tensor] = None) -> int:
    """Bytes of the packed row of a latent ``width = R + rope_dim`` wide, the width of tensor ``what``.

    An op sees the latent width and ``rope_dim``, not ``R``: a bad pair is reported in those terms, with the
    ``rope_dim`` that ``cache``'s rows imply for this width when there is one.
    """
    R = width - rope_dim

    def hint() -> str:
        implied = None if cache is None or cache.dim() < 1 else implied_rope_dim(width, cache.shape[-1])
        return "" if implied in (None, rope_dim) else \
            f"; the cache's {cache.shape[-1]}-byte rows fit this {what} with rope_dim={implied}"

    if rope_dim < 0 or rope_dim % 2:
        fail(f"rope_dim must be even and >= 0 for the FP8 cache, got {rope_dim}{hint()}")
    if R < fp8_format.TILE or R % fp8_format.TILE:
        fail(f"{what} is {width} wide with rope_dim={rope_dim}, which leaves R = {R} for the FP8 part: the packed "
             f"cache needs R a positive multiple of {fp8_format.TILE} (DeepSeek-V3: 576 = 512 + 64){hint()}")
    return fp8_cache_bytes(R, rope_dim)


def _latent_rank(num_bytes: int, rope_dim: int) -> int:
    """``R`` of a packed row of ``num_bytes`` bytes (``fp8_format.row_dims``)."""
    dims = fp8_format.row_dims(num_bytes, rope_dim=rope_dim)
    if dims is None:
        fail(f"{num_bytes} bytes per row is not a packed FP8 row for rope_dim={rope_dim} "
             f"(expected R + 4*R/128 + 2*rope_dim with R a multiple of {fp8_format.TILE})")
    return dims[0]


# ------------------------------------------------------------------------------------ references
def quantize_fp8_reference(latent: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Pack ``latent [T, R+P]`` (any float dtype) into ``uint8 [T, fp8_cache_bytes(R, P)]`` rows."""
    _, D = latent.shape
    fp8_cache_bytes(D - rope_dim, rope_dim)
    return fp8_format.quantize_rows(latent, rope_dim)


def dequantize_fp8_reference(packed: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Unpack ``uint8 [..., bytes]`` rows into ``bf16 [..., R+P]``."""
    if packed.dtype != torch.uint8:
        fail(f"packed FP8 cache must be uint8, got {packed.dtype}")
    return fp8_format.dequantize_rows(packed, _latent_rank(packed.shape[-1], rope_dim), rope_dim)


def write_fp8_cache_reference(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
                              rope_dim: int) -> None:
    """Pack ``latent [T, D]`` into ``cache [num_blocks, ps, bytes]`` at ``slot_mapping [T]``.

    ``-1`` and out-of-range slots write nothing (the op rejects out-of-range slots in checked mode).
    """
    ps = cache.shape[1]
    slots = slot_mapping.long()
    keep = (slots >= 0) & (slots < cache.shape[0] * ps)
    packed = quantize_fp8_reference(latent[keep], rope_dim)
    slots = slots[keep]
    cache[slots // ps, slots % ps] = packed


# ---------------------------------------------------------------------------------------------- ops
def _check_fp8_write(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
                     rope_dim: int, group: int, *, data: bool = True, finite: bool = True) -> None:
    """Shapes, dtypes and layout; with ``data`` and in checked mode also slots and (``finite``) finiteness. Inside a
    compiled graph (``checks.shapes_traced``) only the data: its trace checked the rest."""
    if data and shapes_traced():
        check_cache_write(latent, cache, slot_mapping, cache.shape[-1], group, shapes=False)
        if finite:
            check_finite_latent(latent, slot_mapping, group)
        return
    if latent.dim() != 2:
        fail(f"latent must be [T, D], got shape {tuple(latent.shape)}")
    if latent.dtype not in LATENT_DTYPES:
        fail(f"latent must be bfloat16, float16 or float32, got {latent.dtype}")
    if cache.dtype != torch.uint8:
        fail(f"packed FP8 cache must be uint8, got {cache.dtype}: a sliding-window layer's cache must come "
             "from the rewritten allocation (swa_rewrite.apply(...).allocate_kv_cache, "
             "swa_rewrite.compile(...).allocate_kv_cache or swa_rewrite.backend(...).allocate_kv_cache(model, ...))")
    if not 0 <= rope_dim < latent.shape[1]:
        fail(f"rope_dim must be in [0, {latent.shape[1]}), got {rope_dim}")
    check_cache_write(latent, cache, slot_mapping, packed_row_bytes(latent.shape[1], rope_dim, "latent", cache),
                      group, data=data)
    if cache.stride(2) != 1 or (cache.shape[1] > 1 and cache.stride(1) != cache.shape[2]):
        fail(f"cache rows must be contiguous and packed inside a block (strides [*, {cache.shape[2]}, 1]), "
             f"got strides {cache.stride()}")
    if data and finite:
        check_finite_latent(latent, slot_mapping, group)


@torch.library.custom_op("swa_rewrite::write_fp8_cache", mutates_args=("cache",))
def write_fp8_cache(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, rope_dim: int,
                    layer: int, group: int) -> None:
    """Quantise ``latent [T, D]`` into the packed uint8 ``cache [num_blocks, ps, bytes]`` at
    ``slot_mapping[group]`` (``slot_mapping [G, T]``, one row per cache group)."""
    _check_fp8_write(latent, cache, slot_mapping, rope_dim, group)
    write_fp8_cache_reference(latent, cache, slot_mapping[group], rope_dim)


@write_fp8_cache.register_fake
def _(latent, cache, slot_mapping, rope_dim, layer, group):
    _check_fp8_write(latent, cache, slot_mapping, rope_dim, group, data=False)


@register_cuda(write_fp8_cache)
def _(latent, cache, slot_mapping, rope_dim, layer, group):
    write_fp8_cache_triton(latent, cache, slot_mapping, rope_dim, group)


def write_fp8_cache_triton(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, rope_dim: int,
                           group: int) -> None:
    """The op's CUDA implementation (any device the Triton kernel runs on: the interpreter's tests call it on the
    CPU). The kernel checks the rows it writes: inside a model step in checked mode it sets one flag read at the
    step's end, with no launches of its own."""
    from ..kernels.fp8_cache import write_fp8_cache as launch

    key = decode_plans.write_key(latent, cache, slot_mapping, rope_dim, group)
    plan = decode_plans.lookup(key)
    if plan is not None:            # this signature's checks passed (serving mode: no data checks, no finite flag)
        decode_plans.replayed(plan, launch, latent, cache, slot_mapping[group], rope_dim=rope_dim, finite_flag=None)
        return
    _check_fp8_write(latent, cache, slot_mapping, rope_dim, group, finite=False)
    flag = deferred_finite_flag(latent, slot_mapping, group)
    if flag is not None:            # (checked mode: never with a key)
        key = None
    decode_plans.recorded(key, launch, latent, cache, slot_mapping[group], rope_dim=rope_dim, finite_flag=flag)


def _as_3d(cache: torch.Tensor) -> torch.Tensor:
    """A ``[outer, inner, bytes]`` view of ``cache [..., bytes]`` (last stride 1); copies only if it must."""
    if cache.stride(-1) != 1:
        cache = cache.contiguous()
    lead = [d for d in range(cache.dim() - 1) if cache.shape[d] != 1]
    if len(lead) > 2:
        return cache.reshape(-1, cache.shape[-1])[None]
    sizes = [1] * (2 - len(lead)) + [cache.shape[d] for d in lead] + [cache.shape[-1]]
    strides = [0] * (2 - len(lead)) + [cache.stride(d) for d in lead] + [1]
    return cache.as_strided(sizes, strides)


def _dequantize_out(cache: torch.Tensor, rope_dim: int) -> torch.Tensor:
    if cache.dtype != torch.uint8 or cache.dim() < 1:
        fail(f"packed FP8 cache must be a uint8 [..., bytes] tensor, got {cache.dtype} {tuple(cache.shape)}")
    R = _latent_rank(cache.shape[-1], rope_dim)
    return cache.new_empty(*cache.shape[:-1], R + rope_dim, dtype=torch.bfloat16)


@torch.library.custom_op("swa_rewrite::dequantize_fp8_cache", mutates_args=())
def dequantize_fp8_cache(cache: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Dequantise packed rows ``uint8 [..., bytes]`` into ``bf16 [..., R+P]``."""
    _dequantize_out(cache, rope_dim)
    return dequantize_fp8_reference(cache, rope_dim)


@dequantize_fp8_cache.register_fake
def _(cache, rope_dim):
    return _dequantize_out(cache, rope_dim)


@register_cuda(dequantize_fp8_cache)
def _(cache, rope_dim):
    from ..kernels.fp8_cache import dequantize_fp8_cache as launch

    out = _dequantize_out(cache, rope_dim)
    launch(_as_3d(cache), out.view(-1, out.shape[-1]), rope_dim=rope_dim)
    return out
