"""Checks of a cache write (``write_kv_cache``, ``write_fp8_cache``): shapes, slots, finite latents."""

from __future__ import annotations

from typing import Optional

import torch

from .checks import check_group, check_index, checks_enabled, defer_check, deferred_flag, fail, validated_entries


class NonFiniteLatentError(ValueError):
    """A latent row to be cached holds NaN or inf, which the packed FP8 cache cannot store.

    ``row`` is the row of the write's ``latent`` and ``slot`` the cache slot it was going to. A caller that
    knows the step (the engine) re-raises it with ``request`` and ``position`` filled in.
    """

    def __init__(self, message: str, *, row: int, slot: int, request: Optional[int] = None,
                 position: Optional[int] = None):
        super().__init__(message)
        self.row, self.slot, self.request, self.position = row, slot, request, position


def check_cache_write(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
                      width: int, group: int, *, data: bool = True, shapes: bool = True) -> None:
    """``latent [T, D]``, ``cache [num_blocks, ps, width]``, ``slot_mapping [G, T]`` of which row ``group``
    is this cache's.

    ``data=False`` (fake implementations) checks shapes and dtypes only; ``shapes=False`` (an op inside a compiled
    graph, whose trace checked them: ``checks.compiled_graph``) the data only.
    """
    if shapes:
        if latent.dim() != 2:
            fail(f"latent must be [T, D], got shape {tuple(latent.shape)}")
        if cache.dim() != 3:
            fail(f"cache must be [num_blocks, page_size, bytes_or_D], got shape {tuple(cache.shape)}")
        if cache.shape[-1] != width:
            fail(f"cache rows are {cache.shape[-1]} wide, expected {width} for latent width {latent.shape[1]}")
        check_index("slot_mapping", slot_mapping, 2)
        check_group("slot_mapping", slot_mapping, group)
        if slot_mapping.shape[1] != latent.shape[0]:
            fail(f"slot_mapping has {slot_mapping.shape[1]} entries for {latent.shape[0]} latent rows")
        if latent.device != cache.device or slot_mapping.device != cache.device:
            fail(f"latent ({latent.device}), cache ({cache.device}) and slot_mapping ({slot_mapping.device}) "
                 "must be on one device")
    # Inside a validated step whose check covered these very slots (range and uniqueness with the tables),
    # nothing is left to check (and no device-to-host copy is needed).
    if (data and slot_mapping.shape[1] and cache.device.type != "meta" and checks_enabled()
            and SLOTS_VALIDATED not in validated_entries((slot_mapping,), group)):
        slot_mapping = slot_mapping[group]
        num_slots = cache.shape[0] * cache.shape[1]
        bad = (slot_mapping < -1) | (slot_mapping >= num_slots)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            fail(f"slot_mapping[{i}] = {int(slot_mapping[i])} is out of range [-1, {num_slots})")
        used = slot_mapping[slot_mapping >= 0]
        if used.numel() != used.unique().numel():
            fail("slot_mapping writes the same slot twice in one step")


SLOTS_VALIDATED = "slots"     # what the step check records for a group's slot_mapping row (checks.note_validated)


def check_finite_latent(latent: torch.Tensor, slot_mapping: torch.Tensor, group: int) -> None:
    """In checked mode, every row of ``latent [T, D]`` that is written (``slot_mapping[group] [T] >= 0``) is finite;
    raises ``NonFiniteLatentError`` naming the first row that is not. Inside a model step
    (``checks.validated_step``) the check is deferred to the step's end, where one host copy reads every
    layer's flag (``checks.defer_check``) instead of one synchronisation per write."""
    if not latent.numel() or latent.device.type == "meta" or not checks_enabled():
        return
    slot_mapping = slot_mapping[group]       # (only now: a select is a dispatched op, on every unchecked write too)
    # 0·x is ±0 for a finite x and NaN for NaN or ±inf, so a row's sum of them is NaN exactly when the row holds a
    # non-finite value: two device ops for every row (isfinite, all, the slot mask and the reductions were nine
    # launches per write), and the step's flag one more: NaN when any row is — a padding row too, which the action
    # then finds allowed (an extra read in that rare case, never a wrong error).
    rows = _finite_rows(latent)
    if not defer_check(rows.sum(), lambda: _raise_first_non_finite(rows, slot_mapping)):
        _raise_first_non_finite(rows, slot_mapping)


def deferred_finite_flag(latent: torch.Tensor, slot_mapping: torch.Tensor, group: int) -> Optional[torch.Tensor]:
    """``check_finite_latent`` for a write kernel that checks the rows it writes itself: in checked mode inside a model
    step, a zeroed int32 ``[1]`` flag on ``latent``'s device for the kernel to set — a slot of the step's one flag
    buffer (``checks.deferred_flag``: one zeroing launch per step, not per write) — queued for the step's end with
    the action that finds the row (from ``latent``, which the step does not change); elsewhere the rows are checked
    here and None is returned."""
    if not latent.numel() or latent.device.type == "meta" or not checks_enabled():
        return None
    flag = deferred_flag(latent.device, lambda: _raise_first_non_finite(_finite_rows(latent), slot_mapping[group]))
    if flag is None:
        check_finite_latent(latent, slot_mapping, group)
    return flag


def _finite_rows(latent: torch.Tensor) -> torch.Tensor:
    """``[T]`` float32: ±0 for a finite row of ``latent``, NaN for a row holding NaN or ±inf."""
    return (latent * 0).sum(dim=1, dtype=torch.float32)


def _raise_first_non_finite(rows: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Raise ``NonFiniteLatentError`` for the first written row (``slot_mapping [T] >= 0``) whose ``rows`` entry is
    NaN; return if there is none."""
    bad = torch.isnan(rows) & (slot_mapping >= 0)
    if bool(bad.any()):
        t = int(bad.nonzero()[0, 0])
        slot = int(slot_mapping[t])
        raise NonFiniteLatentError(f"latent row {t} (slot {slot}) has non-finite values; the FP8 cache "
                                   "cannot store them", row=t, slot=slot)
