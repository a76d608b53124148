"""Input validation shared by every op.

Shape and dtype checks cost nothing and always run (they also run at trace time in the fake
implementations). Data checks — slot ranges, block-table bounds — read tensor values, which
synchronises with the device, so they run only in *checked mode*: eager execution outside CUDA-graph
capture, outside Dynamo tracing and outside ``checks_disabled()`` blocks (``swa_rewrite.compile`` runs its
compiled steps in one), unless ``SWA_REWRITE_CHECKS=0`` is set in the environment.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import threading
from typing import Any, Optional, Sequence

import torch

from .step_metadata import StepMetadata

_INDEX_DTYPES = (torch.int32, torch.int64)


_state = threading.local()


@contextlib.contextmanager
def checks_disabled():
    """Turn data checks off in this thread for the block (e.g. around a compiled step)."""
    previous = getattr(_state, "disabled", False)
    _state.disabled = True
    try:
        yield
    finally:
        _state.disabled = previous


def checks_enabled() -> bool:
    """Whether data-dependent input checks run now (see module docstring)."""
    if getattr(_state, "disabled", False) or os.environ.get("SWA_REWRITE_CHECKS", "1") == "0":
        return False
    if torch.compiler.is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return True


def fail(message: str) -> None:
    raise ValueError(message)


class NonFiniteLatentError(ValueError):
    """A latent row to be cached holds NaN or inf, which the packed FP8 cache cannot store.

    ``row`` is the row of the write's ``latent`` and ``slot`` the cache slot it was going to. A caller that
    knows the step (the engine) re-raises it with ``request`` and ``position`` filled in.
    """

    def __init__(self, message: str, *, row: int, slot: int, request: Optional[int] = None,
                 position: Optional[int] = None):
        super().__init__(message)
        self.row, self.slot, self.request, self.position = row, slot, request, position


def check_int(name: str, value: Any, *, minimum: Optional[int] = None) -> int:
    """``value`` as a Python ``int``: ints and numpy integers pass; bools, floats and anything else raise
    ``TypeError``, values below ``minimum`` ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        fail(f"{name} must be >= {minimum}, got {value}")
    return value


def check_index(name: str, t: torch.Tensor, dim: int) -> None:
    if t.dtype not in _INDEX_DTYPES:
        fail(f"{name} must be int32 or int64, got {t.dtype}")
    if t.dim() != dim:
        fail(f"{name} must have {dim} dimension(s), got shape {tuple(t.shape)}")


def check_group(name: str, t: torch.Tensor, group: int) -> None:
    """``group`` indexes the leading cache-group dimension of ``t`` (``block_tables`` or ``slot_mapping``)."""
    if not 0 <= group < t.shape[0]:
        fail(f"group {group} is out of range for {name} of {t.shape[0]} cache group(s), shape {tuple(t.shape)}")


def check_cache_write(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
                      width: int, group: int, *, data: bool = True) -> None:
    """``latent [T, D]``, ``cache [num_blocks, ps, width]``, ``slot_mapping [G, T]`` of which row ``group``
    is this cache's.

    ``data=False`` (fake implementations) checks shapes and dtypes only.
    """
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
    slot_mapping = slot_mapping[group]
    if data and checks_enabled() and slot_mapping.numel() and cache.device.type != "meta":
        num_slots = cache.shape[0] * cache.shape[1]
        bad = (slot_mapping < -1) | (slot_mapping >= num_slots)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            fail(f"slot_mapping[{i}] = {int(slot_mapping[i])} is out of range [-1, {num_slots})")
        used = slot_mapping[slot_mapping >= 0]
        if used.numel() != used.unique().numel():
            fail("slot_mapping writes the same slot twice in one step")


def check_finite_latent(latent: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """In checked mode, every row of ``latent [T, D]`` that is written (``slot_mapping [T] >= 0``) is finite;
    raises ``NonFiniteLatentError`` naming the first row that is not."""
    if not checks_enabled() or latent.device.type == "meta" or not latent.numel():
        return
    finite = torch.isfinite(latent).all(dim=1) | (slot_mapping < 0)
    if not bool(finite.all()):
        t = int((~finite).nonzero()[0, 0])
        slot = int(slot_mapping[t])
        raise NonFiniteLatentError(f"latent row {t} (slot {slot}) has non-finite values; the FP8 cache cannot "
                                   "store them", row=t, slot=slot)


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


def check_batch(num_tokens: int, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                seq_lens_encoder: torch.Tensor, seq_lens_decoder: torch.Tensor,
                batch_id_per_token: torch.Tensor, page_size: int, num_blocks: int, group: int, *,
                data: bool = True) -> Optional[tuple[torch.Tensor, ...]]:
    """Batch metadata of SPEC §5 for ``num_tokens`` query tokens, ``block_tables [G, B, nb]`` read at
    ``group`` (``data=False``: shapes and dtypes only).

    Returns the host int64 copies ``(block_tables[group], cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
    batch_id_per_token)`` the data checks ran on, or None when they did not run."""
    check_index("block_tables", block_tables, 3)
    check_group("block_tables", block_tables, group)
    block_tables = block_tables[group]
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("seq_lens_encoder", seq_lens_encoder),
                    ("seq_lens_decoder", seq_lens_decoder), ("batch_id_per_token", batch_id_per_token)):
        check_index(name, t, 1)
    B = block_tables.shape[0]
    if cu_seqlens_q.shape[0] != B + 1:
        fail(f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries, expected batch size + 1 = {B + 1}")
    if seq_lens_encoder.shape[0] != B or seq_lens_decoder.shape[0] != B:
        fail(f"seq_lens_encoder {tuple(seq_lens_encoder.shape)} and seq_lens_decoder "
             f"{tuple(seq_lens_decoder.shape)} must both be [{B}]")
    if batch_id_per_token.shape[0] != num_tokens:
        fail(f"batch_id_per_token has {batch_id_per_token.shape[0]} entries for {num_tokens} tokens")
    if page_size < 1:
        fail(f"page_size must be >= 1, got {page_size}")
    devices = {t.device for t in (block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder, batch_id_per_token)}
    if len(devices) > 1:
        fail(f"the step's metadata tensors must be on one device, got {sorted(map(str, devices))}")
    if not (data and checks_enabled()) or block_tables.device.type == "meta":
        return None
    # One device-to-host copy per call. Every attention op of a step sees the same metadata, so content
    # already validated is only compared (by content, not identity: a buffer refilled in place, by numpy,
    # DLPack or a kernel, without torch seeing the write, is validated again).
    tensors = (block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder, batch_id_per_token)
    flat = torch.cat([t.reshape(-1).long() for t in tensors]).cpu()
    key = (num_tokens, page_size, num_blocks, tuple(block_tables.shape))
    host = flat.split([t.numel() for t in tensors])
    host = (host[0].view(block_tables.shape),) + host[1:]
    last = getattr(_state, "last_batch", None)
    if last is None or last[0] != key or not torch.equal(last[1], flat):
        _check_batch_data(num_tokens, *host, page_size, num_blocks)
        _state.last_batch = (key, flat)
    return host


def _check_batch_data(num_tokens, bt, cu, enc, dec, bid, page_size, num_blocks) -> None:
    """The checks of ``check_batch`` on host int64 copies of the metadata."""
    B = bt.shape[0]
    q_lens = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or bool((q_lens < 0).any()) or int(cu[-1]) > num_tokens:
        fail(f"cu_seqlens_q must start at 0, not decrease and end at <= {num_tokens} tokens, got {cu.tolist()}")
    if bool((dec < 0).any()) or bool((enc < 0).any()):
        fail("seq_lens_encoder and seq_lens_decoder must be >= 0")
    bad = (enc > 0) & (enc != q_lens)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        fail(f"request {b}: seq_lens_encoder = {int(enc[b])} but cu_seqlens_q gives it {int(q_lens[b])} tokens")
    ends = dec + q_lens
    capacity = bt.shape[1] * page_size
    if bool((ends > capacity).any()):
        b = int((ends > capacity).nonzero()[0, 0])
        fail(f"request {b} reaches position {int(ends[b]) - 1} but its block table holds {capacity} positions "
             f"({bt.shape[1]} blocks of {page_size})")
    used = torch.arange(bt.shape[1])[None, :] < ((ends + page_size - 1) // page_size)[:, None]
    bad = used & ((bt < 0) | (bt >= num_blocks))
    if bool(bad.any()):
        b, i = (int(v) for v in bad.nonzero()[0])
        fail(f"block_tables[{b}, {i}] = {int(bt[b, i])} is out of range [0, {num_blocks})")
    expected = torch.full((num_tokens,), -1, dtype=torch.long)
    expected[: int(cu[-1])] = torch.repeat_interleave(torch.arange(B), q_lens)
    if not torch.equal(bid, expected):
        i = int((bid != expected).nonzero()[0, 0])
        fail(f"batch_id_per_token[{i}] = {int(bid[i])} does not match cu_seqlens_q (expected {int(expected[i])}; "
             "padding tokens after the last request carry -1)")


def checked_step_metadata(meta: StepMetadata, kv_caches: Sequence[torch.Tensor],
                          cache_groups: Sequence[int]) -> StepMetadata:
    """``meta``, after checking a model step's inputs against each other (data checks in checked mode only).

    The cache ops see slots only, so they cannot tell a slot of another request from the right one: this
    check, run once per step before any cache write, requires token ``i`` of request ``b`` to sit at
    position ``seq_lens_decoder[b] + i`` and, in every cache group ``g``, to write the slot
    ``block_tables[g]`` gives that position (SPEC §5), and padding tokens to write nothing.

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
