"""The model's once-per-step check: ``checked_step_metadata`` (a step's metadata against itself and the
caches, before any cache write) and ``check_kv_caches`` (one disjoint cache per layer)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .batch_checks import check_batch
from .checks import check_group, check_index, checks_enabled, fail
from .step_metadata import StepMetadata


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """``[first, last + 1)`` byte addresses ``t`` can touch (strides are never negative in torch)."""
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 1)
    return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size()


def check_kv_caches(kv_caches: Sequence[torch.Tensor], num_layers: Optional[int], *,
                    blocks: Optional[tuple[int, int] | Sequence[tuple[int, int]]] = None,
                    device: Optional[torch.device] = None) -> None:
    """``kv_caches``: one cache ``[num_blocks, page_size, ...]`` per layer, no two overlapping in memory.

    ``num_layers`` (if known) is the number of caches expected; ``blocks`` the ``(num_blocks, page_size)``
    every cache must lead with (default: the first cache's), or a list of one such pair per layer (caches of
    different cache groups may differ); ``device`` the device of every cache (default:
    the first cache's). Caches that share memory would overwrite each other's latents, and a missing or
    smaller cache would fail a layer after earlier layers wrote: both are rejected before anything runs.
    """
    if not isinstance(kv_caches, (list, tuple)):
        raise TypeError(f"kv_caches must be a list with one cache tensor per layer, got {type(kv_caches).__name__}")
    if num_layers is not None and len(kv_caches) != num_layers:
        fail(f"kv_caches holds {len(kv_caches)} caches, expected one per layer: {num_layers}")
    for i, c in enumerate(kv_caches):
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"kv_caches[{i}] must be a tensor, got {type(c).__name__}")
    if not kv_caches:
        return
    if blocks is None:
        blocks = tuple(kv_caches[0].shape[:2])
    per_layer = list(blocks) if blocks and isinstance(blocks[0], tuple) else [tuple(blocks)] * len(kv_caches)
    device = kv_caches[0].device if device is None else torch.device(device)
    for i, (c, want) in enumerate(zip(kv_caches, per_layer)):
        if c.dim() != 3 or tuple(c.shape[:2]) != want:
            fail(f"kv_caches[{i}] has shape {tuple(c.shape)}, expected [{want[0]}, {want[1]}, ...]")
        if c.device.type != device.type or (device.index is not None and c.device.index != device.index):
            fail(f"kv_caches[{i}] is on {c.device}, expected {device}")
    if device.type == "meta":
        return
    ranges = sorted((*_byte_range(c), i) for i, c in enumerate(kv_caches) if c.numel())
    for (_, end, i), (start, _, j) in zip(ranges, ranges[1:]):
        if start < end:
            fail(f"kv_caches[{min(i, j)}] and kv_caches[{max(i, j)}] share memory: every layer needs a cache "
                 "of its own")


def checked_step_metadata(meta: StepMetadata, kv_caches: Sequence[torch.Tensor],
                          cache_groups: Sequence[int]) -> StepMetadata:
    """``meta``, after checking a model step's inputs against each other (data checks in checked mode only).

    The cache ops see slots only, so they cannot tell a slot of another request from the right one: this
    check, run once per step before any cache write, requires token ``i`` of request ``b`` to sit at
    position ``seq_lens_decoder[b] + i`` and, in every cache group ``g``, to write the slot
    ``block_tables[g]`` gives that position (docs/design.md §5), and padding tokens to write nothing.

    ``kv_caches`` holds one cache per layer and ``cache_groups`` the cache group of each layer (always
    checked: static lengths). In checked mode the caches must be on the metadata's device, share no memory,
    and the caches of one group lead with one ``(num_blocks, page_size)`` (see ``check_kv_caches``); the
    first cache of group ``g`` gives that group's page size and block count.
    """
    if not isinstance(meta, StepMetadata):
        raise TypeError(f"meta must be a swa_rewrite.ops.StepMetadata (built by StepBatch.build), "
                        f"got {type(meta).__name__}")
    if not isinstance(kv_caches, (list, tuple)):
        raise TypeError(f"kv_caches must be a list with one cache tensor per layer, got {type(kv_caches).__name__}")
    if len(kv_caches) != len(cache_groups):
        fail(f"kv_caches holds {len(kv_caches)} caches, expected one per layer: {len(cache_groups)}")
    positions, slot_mapping, block_tables = meta.positions, meta.slot_mapping, meta.block_tables
    check_index("positions", positions, 1)
    check_index("slot_mapping", slot_mapping, 2)
    check_index("block_tables", block_tables, 3)
    if slot_mapping.shape[1] != positions.shape[0] or slot_mapping.shape[0] != block_tables.shape[0]:
        fail(f"slot_mapping {tuple(slot_mapping.shape)} must be [G, T] for positions {tuple(positions.shape)} "
             f"and block_tables {tuple(block_tables.shape)} [G, B, nb]")
    device = meta.batch_id_per_token.device
    if positions.device != device or slot_mapping.device != device:
        fail(f"positions ({positions.device}) and slot_mapping ({slot_mapping.device}) must be on the device of "
             f"the step's metadata ({device})")
    first = {}                                               # group -> its first layer
    for layer, g in enumerate(cache_groups):
        first.setdefault(g, layer)
        check_group("block_tables", block_tables, g)
    if checks_enabled():
        check_kv_caches(kv_caches, len(cache_groups), device=device,
                        blocks=[tuple(kv_caches[first[g]].shape[:2]) for g in cache_groups])
    hosts = {g: check_batch(positions.shape[0], block_tables, *meta.batch_tensors(), kv_caches[layer].shape[1],
                            kv_caches[layer].shape[0], g) for g, layer in first.items()}
    if any(h is None for h in hosts.values()) or not hosts:
        return meta
    pos, slots = torch.cat([positions.long()[None], slot_mapping.long()]).cpu().split([1, slot_mapping.shape[0]])
    for g, host in hosts.items():
        _check_slots(pos[0], slots[g], host, kv_caches[first[g]].shape[1], g)
    return meta


def _check_slots(pos: torch.Tensor, slots: torch.Tensor, host: tuple[torch.Tensor, ...], page_size: int,
                 group: int) -> None:
    """Host int64 ``pos [T]`` and group ``group``'s ``slots [T]`` against the validated host metadata."""
    bt, cu, _, dec, bid = host                   # validated host copies: cu and bid agree
    n = int(cu[-1])
    where = "slot_mapping" if group == 0 else f"slot_mapping[{group}]"
    if n:
        bid = bid[:n]
        want_pos = dec[bid] + torch.arange(n) - cu[bid]
        bad = pos[:n] != want_pos
        if bool(bad.any()):
            t = int(bad.nonzero()[0, 0])
            fail(f"positions[{t}] = {int(pos[t])}, but token {t} is token {t - int(cu[bid[t]])} of request "
                 f"{int(bid[t])}, which has {int(dec[bid[t]])} cached: expected {int(want_pos[t])}")
        blocks = bt[bid, want_pos // page_size]
        want_slots = blocks * page_size + want_pos % page_size
        bad = slots[:n] != want_slots
        if bool(bad.any()):
            t = int(bad.nonzero()[0, 0])
            fail(f"{where}[{t}] = {int(slots[t])}, but position {int(want_pos[t])} of request {int(bid[t])} "
                 f"is slot {int(want_slots[t])} of its block table (page size {page_size})")
    bad = slots[n:] != -1
    if bool(bad.any()):
        t = n + int(bad.nonzero()[0, 0])
        fail(f"{where}[{t}] = {int(slots[t])} for a padding token (after the last request): must be -1")
