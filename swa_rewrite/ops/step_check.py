"""The model's once-per-step check: ``checked_step_metadata`` (a step's metadata against itself and the
caches, before any cache write, per cache group and window-aware) and ``check_kv_caches`` (one disjoint cache per
layer); ``spec_key`` / ``schedule_spec_keys``: the per-layer cache descriptions the check takes."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .cache_write_checks import SLOTS_VALIDATED
from .batch_checks import BatchRule, check_batch, check_batch_data, table_name
from .checks import check_group, check_index, checks_enabled, fail, host_int64, note_validated
from .kv_cache_spec import FULL, SLIDING, KVCacheSpec
from .mha_prefill import _check_rows, mha_rows_validated
from .step_metadata import StepMetadata

# The key of a full-attention layer's cache (``spec_key``).
FULL_KEY = (FULL, None, 0)


def spec_key(spec) -> tuple:
    """``(kind, window, sinks)`` of one layer's cache: from a ``KVCacheSpec``, or such a key already
    (``("full", None, 0)``, ``("sliding", W, s)``; a shorter ``("full",)`` / ``("sliding", W)`` is completed).

    Keys are what a traced graph holds as the step check's argument (plain constants, no dtype to go stale when
    the model moves); the layout fields of a spec do not change what the check requires."""
    if isinstance(spec, KVCacheSpec):
        return (spec.kind, spec.window, spec.sinks)
    if isinstance(spec, (tuple, list)) and spec and spec[0] in (FULL, SLIDING):
        kind = spec[0]
        window = spec[1] if len(spec) > 1 else None
        sinks = spec[2] if len(spec) > 2 else 0
        if kind == FULL and window is None and sinks == 0:
            return FULL_KEY
        if kind == SLIDING and isinstance(window, int) and not isinstance(window, bool) and window >= 1 \
                and isinstance(sinks, int) and not isinstance(sinks, bool) and sinks >= 0:
            return (SLIDING, window, sinks)
    raise TypeError(f"a layer's cache spec must be a KVCacheSpec or a key ('full', None, 0) / ('sliding', window, "
                    f"sinks), got {spec!r}")


def schedule_spec_keys(schedule) -> tuple:
    """``spec_key`` of every layer of a model rewritten with ``schedule`` (a ``swa_rewrite.Schedule``): what the
    pass gives the rewritten graph's step check (``ops.kv_cache_spec.schedule_cache_groups`` groups the same)."""
    return tuple((SLIDING, schedule.window_of(i), schedule.sinks_of(i)) if schedule.is_swa(i) else FULL_KEY
                 for i in range(schedule.num_layers))


def group_rules(cache_groups: Sequence[int], keys: Sequence[tuple]) -> dict:
    """``{group: (window, sinks)}``: what the ops of each group's layers read, together: ``(0, 0)`` (every page)
    when any of its layers is full, else the largest window and sink count of its layers."""
    rules: dict = {}
    for g, (kind, window, sinks) in zip(cache_groups, keys):
        have = rules.get(g)
        if kind == FULL or have == (0, 0):
            rules[g] = (0, 0)
        else:
            rules[g] = (max(window, have[0]), max(sinks, have[1])) if have else (window, sinks)
    return rules


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


def checked_step_metadata(meta: StepMetadata, kv_caches: Sequence[torch.Tensor], cache_groups: Sequence[int],
                          specs: Optional[Sequence] = None) -> StepMetadata:
    """``meta``, after checking a model step's inputs against each other (data checks in checked mode only).

    The cache ops see slots only, so they cannot tell a slot of another request from the right one: this
    check, run once per step before any cache write, requires token ``i`` of request ``b`` to sit at
    position ``seq_lens_decoder[b] + i`` and, in every cache group ``g``, to write the slot
    ``block_tables[g]`` gives that position (never a released ``-1`` page), and padding tokens to write nothing
    (docs/design.md §5). Every group's table is checked as its layers' ops read it (``batch_checks``): a full
    group needs every page up to each request's end, a sliding group (window-bounded, §12) only the pages of
    its requests' windows and sinks, the rest may be ``-1``.

    ``kv_caches`` holds one cache per layer, ``cache_groups`` the cache group of each layer and ``specs`` its
    cache description (a ``KVCacheSpec`` or its ``spec_key``; None: every layer full). A group whose layers
    differ is checked for what all of them read (``group_rules``). The lengths are always checked (static).
    In checked mode the caches must be on the metadata's device, share no memory, and the caches of one group
    lead with one ``(num_blocks, page_size)`` (see ``check_kv_caches``); the first cache of group ``g`` gives
    that group's page size and block count.

    Inside a ``checks.validated_step()`` block the check records what it validated, so the layers' ops given
    these very tensors skip repeating it (and its device-to-host copy).
    """
    if not isinstance(meta, StepMetadata):
        raise TypeError(f"meta must be a swa_rewrite.ops.StepMetadata (built by StepBatch.build), "
                        f"got {type(meta).__name__}")
    if not isinstance(kv_caches, (list, tuple)):
        raise TypeError(f"kv_caches must be a list with one cache tensor per layer, got {type(kv_caches).__name__}")
    if len(kv_caches) != len(cache_groups):
        fail(f"kv_caches holds {len(kv_caches)} caches, expected one per layer: {len(cache_groups)}")
    if specs is None:
        keys = (FULL_KEY,) * len(cache_groups)
    else:
        if len(specs) != len(cache_groups):
            fail(f"{len(specs)} cache specs for {len(cache_groups)} layers: one per layer")
        keys = tuple(spec_key(s) for s in specs)
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
    checked = checks_enabled()
    if checked:
        check_kv_caches(kv_caches, len(cache_groups), device=device,
                        blocks=[tuple(kv_caches[first[g]].shape[:2]) for g in cache_groups])
    windows = group_rules(cache_groups, keys)
    T = positions.shape[0]
    rules = {g: BatchRule.of(kv_caches[layer].shape[1], kv_caches[layer].shape[0], *windows[g])
             for g, layer in first.items()}
    for g, rule in rules.items():                           # shapes and dtypes (always)
        check_batch(T, block_tables, *meta.batch_tensors(), rule.page_size, rule.num_blocks, g,
                    window=rule.window, sinks=rule.sinks, data=False)
    if not checked or not rules or device.type == "meta":
        return meta
    rows, rows_cu = meta.mha_kv_slots, meta.mha_kv_cu
    check_index("mha_kv_slots", rows, 2)
    check_index("mha_kv_cu", rows_cu, 2)
    if rows.shape[0] != block_tables.shape[0] or rows_cu.shape != (block_tables.shape[0], block_tables.shape[1] + 1):
        fail(f"mha_kv_slots {tuple(rows.shape)} and mha_kv_cu {tuple(rows_cu.shape)} must be [G, M] and [G, B + 1] "
             f"for block_tables {tuple(block_tables.shape)}")
    if rows.device != device or rows_cu.device != device:
        fail(f"mha_kv_slots ({rows.device}) and mha_kv_cu ({rows_cu.device}) must be on the device of the step's "
             f"metadata ({device})")
    # One device-to-host copy for the whole step (the MHA rows with it: they are addresses the layers read through).
    host = host_int64((positions, slot_mapping, block_tables, *meta.batch_tensors())
                      + ((rows, rows_cu) if rows.shape[1] else ()))
    pos, slots, bt = host[0], host[1].view(slot_mapping.shape), host[2].view(block_tables.shape)
    cu, enc, dec, bid = host[3:7]
    # All groups at once, with few tensor operations; only when that finds something wrong (or cannot tell) do the
    # per-group checks run, in their order, and raise their message.
    passed = _step_data_ok(T, pos, slots, bt, cu, enc, dec, bid, rules)
    for g, rule in rules.items():
        if not passed:
            check_batch_data(T, bt[g], cu, enc, dec, bid, rule, g)
            _check_slots(pos, slots[g], bt[g], cu, dec, bid, rule.page_size, g)
        if rows.shape[1]:
            _check_mha_rows(bt[g], cu, dec, host[7].view(rows.shape)[g], host[8].view(rows_cu.shape)[g], rule, g)
    tensors = (block_tables, *meta.batch_tensors())
    for g, rule in rules.items():
        note_validated(tensors, g, rule)
        # The slots match the validated tables (so lie in range) and no two write one slot: the cache writes of
        # this step need not check them again.
        note_validated((slot_mapping,), g, SLOTS_VALIDATED)
        if rows.shape[1]:
            note_validated((rows, rows_cu), g, mha_rows_validated(rule.window, rule.sinks))
    return meta


def _step_data_ok(T: int, pos: torch.Tensor, slots: torch.Tensor, bt: torch.Tensor, cu: torch.Tensor,
                  enc: torch.Tensor, dec: torch.Tensor, bid: torch.Tensor, rules: dict) -> bool:
    """Whether every group ``g`` of ``rules`` passes ``check_batch_data`` and ``_check_slots`` (host int64 copies:
    ``pos [T]``, ``slots [G, T]``, ``bt [G, B, nb]``, ``cu [B+1]``, ``enc``, ``dec [B]``, ``bid [T]``).

    The same conditions, computed for all groups together in few array operations (the per-group checks take
    tens of small operations each, every step, each a few microseconds of host time). In NumPy, on views of the
    host tensors: an operation costs ~1 µs where a CPU tensor operation costs ~5, and it never opens a parallel
    region (a torch operation over more than 32K elements does, ~0.1 ms on a 16-core host: a 128K-token table of
    32 requests is 65K entries per group). True only if all of them hold; False when one does not, or when the
    groups' page sizes differ (not vectorised): the per-group checks then decide, and name what is wrong."""
    if len({rule.page_size for rule in rules.values()}) != 1:
        return False
    ps = next(iter(rules.values())).page_size
    groups = list(rules)
    pos, slots, bt, cu, enc, dec, bid = (t.numpy() for t in (pos, slots, bt, cu, enc, dec, bid))
    G, B, nb = bt.shape
    if groups != list(range(G)):
        bt, slots = bt[groups], slots[groups]
    first, n = (int(cu[0]), int(cu[B])) if B else (int(cu[0]),) * 2
    if first != 0 or n > T:
        return False
    q_lens = np.diff(cu)
    ends = dec + q_lens
    if B:
        # Lengths and cached counts >= 0, and every request within its nb pages.
        if min(q_lens.min(), enc.min(), dec.min(), nb * ps - ends.max()) < 0:
            return False
        if not np.array_equal(np.where(enc > 0, q_lens, 0), enc):          # a prefill's new tokens are its chunk
            return False
    tok = np.arange(n)
    req = np.searchsorted(cu[1:], tok, side="right")                        # [n] the request of each token
    if not np.array_equal(bid[:n], req) or (bid[n:] != -1).any():
        return False
    want_pos = (dec - cu[:-1])[req] + tok                                    # [n] each token's position
    if not np.array_equal(pos[:n], want_pos):
        return False
    if B * nb:
        flat = bt.reshape(len(groups), -1)                                 # every entry a block or -1 ...
        if any(lo < -1 or hi >= rules[g].num_blocks
               for g, lo, hi in zip(groups, flat.min(1).tolist(), flat.max(1).tolist())):
            return False
        # ... and a block on every page a group's ops read: batch_checks.needed_pages, for each distinct rule.
        start = np.arange(0, nb * ps, ps)                                   # [nb] first position of each page
        upto = start < ends[:, None]                                        # [B, nb] pages up to the end
        masks: dict = {}
        for g in groups:
            window, sinks = rules[g].window, rules[g].sinks
            if (window, sinks) in masks:
                continue
            mask = upto
            if window:
                lo = np.maximum(dec - (window - 1), 0)                      # [B] the window's first position
                read = (start + ps) > lo[:, None]
                if sinks:
                    read |= start < np.minimum(ends, sinks)[:, None]
                mask = read & upto
            masks[window, sinks] = mask
        needed = (next(iter(masks.values())) if len(masks) == 1       # [B, nb], broadcast over the groups
                  else np.stack([masks[rules[g].window, rules[g].sinks] for g in groups]))
        if (needed & (bt < 0)).any():
            return False
    # Each token writes the slot its table gives its position (a block: its page is one its group reads), padding
    # tokens nothing, and no slot twice.
    want = bt[:, req, want_pos // ps] * ps + want_pos % ps                  # [G, n]
    if not np.array_equal(slots[:, :n], want) or (slots[:, n:] != -1).any():
        return False
    if n > 1:
        ordered = np.sort(want, axis=1)
        if (ordered[:, 1:] == ordered[:, :-1]).any():
            return False
    return True


def _check_mha_rows(bt, cu, dec, rows, rows_cu, rule, g) -> None:
    """Group ``g``'s MHA rows (host tensors) are the ones ``plan_mha_rows`` gives its table, window and sinks."""
    try:
        _check_rows(bt, cu, dec, rows, rows_cu, rule.page_size, rule.window or 0, rule.sinks if rule.window else 0)
    except ValueError as e:
        fail(f"cache group {g}: mha_kv_slots / mha_kv_cu: {e}")


def _check_slots(pos: torch.Tensor, slots: torch.Tensor, bt: torch.Tensor, cu: torch.Tensor, dec: torch.Tensor,
                 bid: torch.Tensor, page_size: int, group: int) -> None:
    """Host int64 ``pos [T]`` and group ``group``'s ``slots [T]`` against the validated host metadata (``bt``
    that group's table; ``cu`` and ``bid`` agree)."""
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
        pages = want_pos // page_size
        blocks = bt[bid, pages]
        released = blocks < 0
        if bool(released.any()):
            t = int(released.nonzero()[0, 0])
            b, i = int(bid[t]), int(pages[t])
            fail(f"{where}[{t}] = {int(slots[t])} writes position {int(want_pos[t])} of request {b}, but "
                 f"{table_name(group)}[{b}, {i}] = {int(blocks[t])}: that page has no block (released)")
        want_slots = blocks * page_size + want_pos % page_size
        bad = slots[:n] != want_slots
        if bool(bad.any()):
            t = int(bad.nonzero()[0, 0])
            slot = int(slots[t])
            owner = ""
            if slot >= 0:
                rows = (bt == slot // page_size).nonzero()
                others = [(int(b), int(i)) for b, i in rows if int(b) != int(bid[t])]
                if others:
                    owner = f" (block {slot // page_size} is page {others[0][1]} of request {others[0][0]})"
            fail(f"{where}[{t}] = {slot}, but position {int(want_pos[t])} of request {int(bid[t])} "
                 f"is slot {int(want_slots[t])} of its block table (page size {page_size}){owner}")
    bad = slots[n:] != -1
    if bool(bad.any()):
        t = n + int(bad.nonzero()[0, 0])
        fail(f"{where}[{t}] = {int(slots[t])} for a padding token (after the last request): must be -1")
    used = slots[:n]
    if used.numel() != used.unique().numel():
        fail(f"{where} writes the same slot twice in one step (two requests' tables share a block they write)")
