"""The description of one layer's KV cache (docs/design.md §12): ``KVCacheSpec``, and ``cache_groups`` (layers with
equal specs share a cache group).

Every model face states its cache as one spec per layer through ``kv_cache_spec()``: the original ``MLAModel``
(every layer full), the rewritten ``SWAModule`` (sliding layers with their window and sinks, packed FP8 rows),
and the compile backend / post-grad pass (``backend(schedule).kv_cache_spec(model)``). The engine groups the
layers with ``cache_groups`` and gives each group a row of the step's block tables and slot mappings.

This module imports nothing of the package but the FP8 row layout (which imports nothing either), so models,
the rewrite, the compile backend and the runtime all sit above it.
"""

from __future__ import annotations

import dataclasses
from typing import Hashable, Optional, Sequence

import torch

from ..fp8_format import row_bytes

FULL = "full"
SLIDING = "sliding"


@dataclasses.dataclass(frozen=True)
class KVCacheSpec:
    """One layer's cache: what it holds and how a token's row is laid out.

    Attributes:
        kind: ``"full"`` (every position of a request stays) or ``"sliding"`` (positions in the window, and the
            sink tokens, are what the layer reads).
        window: the window ``W`` of a sliding layer; None for a full layer.
        sinks: sink tokens of a sliding layer (positions ``0 … sinks-1`` stay visible); 0 for a full layer.
        dtype: the cache tensor's dtype (the model dtype for a full layer, ``uint8`` for the packed FP8 row).
        width: entries per token (the cache's last dimension): ``R + P``, or the packed row's bytes.
        bytes_per_token: bytes one token's row takes, ``width * dtype.itemsize``.

    Equal specs (all fields) share a cache group (``cache_groups``).
    """

    kind: str
    window: Optional[int]
    sinks: int
    dtype: torch.dtype
    width: int
    bytes_per_token: int

    def __post_init__(self):
        if self.kind not in (FULL, SLIDING):
            raise ValueError(f"kind must be {FULL!r} or {SLIDING!r}, got {self.kind!r}")
        if (self.kind == FULL) != (self.window is None):
            raise ValueError(f"a {self.kind} cache spec {'has no' if self.kind == FULL else 'needs a'} window, "
                             f"got window={self.window!r}")
        if self.kind == FULL and self.sinks:
            raise ValueError(f"a full cache spec has no sink tokens, got sinks={self.sinks}")
        if self.bytes_per_token != self.width * self.dtype.itemsize:
            raise ValueError(f"bytes_per_token={self.bytes_per_token} is not width {self.width} x "
                             f"{self.dtype.itemsize} bytes of {self.dtype}")

    @staticmethod
    def full(kv_lora_rank: int, rope_dim: int, dtype: torch.dtype) -> "KVCacheSpec":
        """A full layer's latent cache: ``R + P`` entries of the model dtype per token."""
        width = kv_lora_rank + rope_dim
        return KVCacheSpec(FULL, None, 0, dtype, width, width * dtype.itemsize)

    @staticmethod
    def sliding(kv_lora_rank: int, rope_dim: int, window: int, sinks: int = 0) -> "KVCacheSpec":
        """A sliding layer's packed FP8 cache: ``R + 4·R/128 + 2·P`` ``uint8`` bytes per token
        (``fp8_format.row_bytes``; 656 for DeepSeek-V3)."""
        width = row_bytes(kv_lora_rank, rope_dim)
        return KVCacheSpec(SLIDING, window, sinks, torch.uint8, width, width)

    @staticmethod
    def of_layout(dtype: torch.dtype, width: int, window: Optional[int] = None, sinks: int = 0) -> "KVCacheSpec":
        """The spec of a cache allocated as ``[..., width]`` of ``dtype``: sliding when ``window`` is given."""
        kind = FULL if window is None else SLIDING
        return KVCacheSpec(kind, window, sinks if window is not None else 0, dtype, width, width * dtype.itemsize)


def _is_full(spec: Hashable) -> bool:
    kind = getattr(spec, "kind", None)
    if kind is None and isinstance(spec, tuple) and spec:
        kind = spec[0]
    return kind == FULL


def cache_groups(specs: Sequence[Hashable]) -> tuple[int, ...]:
    """The cache group of each layer: layers with equal specs share one. Full-attention specs are numbered
    first, then the others, each in the order of its first layer — so the layers a rewrite leaves alone keep
    group 0, the group every layer of the original model is in, and their graph nodes do not change. Takes
    ``KVCacheSpec``s (or hashable keys whose first item is the kind)."""
    index: dict = {}
    for s in sorted(specs, key=lambda s: not _is_full(s)):   # stable: first-layer order within each kind
        index.setdefault(s, len(index))
    return tuple(index[s] for s in specs)


def num_groups(groups: Sequence[int]) -> int:
    """How many cache groups ``groups`` (one per layer) use: ``max + 1``, at least 1."""
    return max(groups, default=-1) + 1 or 1


def schedule_cache_groups(schedule) -> tuple[int, ...]:
    """The cache group of each layer of a model rewritten with ``schedule`` (a ``swa_rewrite.Schedule``), as
    ``cache_groups`` gives it from the rewritten model's specs: the pass sets these in the graph without the
    model's dtypes, which need not be known there. Full layers share one layout (the model dtype) and every
    sliding layer the packed row, so a spec differs from another exactly where kind, window or sinks do."""
    keys = [(SLIDING, schedule.window_of(i), schedule.sinks_of(i)) if schedule.is_swa(i) else (FULL,)
            for i in range(schedule.num_layers)]
    return cache_groups(keys)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def sink_blocks(spec: KVCacheSpec, page_size: int) -> int:
    """Blocks that hold a sliding layer's sink tokens (positions ``0 … sinks-1``): kept for a request's life."""
    return _cdiv(spec.sinks, page_size) if spec.kind == SLIDING else 0


def blocks_per_request(spec: KVCacheSpec, num_tokens: int, page_size: int, *, chunk: int = 1,
                       bounded: bool = True) -> int:
    """The most blocks one request of ``num_tokens`` positions holds at once in a cache of ``spec``
    (docs/design.md §12, "Bounded"): every page for a full layer (or when not ``bounded``); for a sliding layer
    the sink blocks plus the ``ceil((W - 1 + C) / ps) + 1`` blocks that can cover a step's window of
    ``C ≤ chunk`` tokens — never more than all ``ceil(num_tokens / ps)`` pages."""
    pages = _cdiv(num_tokens, page_size)
    if spec.kind == FULL or not bounded:
        return pages
    c = max(1, min(chunk, num_tokens))
    return min(pages, sink_blocks(spec, page_size) + _cdiv(spec.window - 1 + c, page_size) + 1)


def group_specs(specs: Sequence[KVCacheSpec]) -> list[tuple[KVCacheSpec, int]]:
    """``(spec, number of layers)`` of each cache group of per-layer ``specs``, indexed by group."""
    groups = cache_groups(specs)
    out: list = [None] * num_groups(groups)
    for s, g in zip(specs, groups):
        out[g] = (s, 1 if out[g] is None else out[g][1] + 1)
    return out


def bytes_per_request(specs: Sequence[KVCacheSpec], num_tokens: int, page_size: int, *, chunk: int = 1,
                      bounded: bool = True) -> list[int]:
    """Cache bytes one request of ``num_tokens`` positions holds at most, per cache group of the per-layer
    ``specs`` (``blocks_per_request`` blocks of ``page_size`` rows in every layer of the group)."""
    return [blocks_per_request(s, num_tokens, page_size, chunk=chunk, bounded=bounded) * page_size
            * s.bytes_per_token * n for s, n in group_specs(specs)]
