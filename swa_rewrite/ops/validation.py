"""Input validation shared by every op.

Shape and dtype checks cost nothing and always run (they also run at trace time in the fake
implementations). Data checks — slot ranges, block-table bounds — read tensor values, which
synchronises with the device, so they run only in *checked mode*: eager execution outside CUDA-graph
capture, outside Dynamo tracing and outside ``checks_disabled()`` blocks (``swa_rewrite.compile`` runs its
compiled steps in one), unless ``SWA_REWRITE_CHECKS=0`` is set in the environment.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Optional

import torch

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


def check_index(name: str, t: torch.Tensor, dim: int) -> None:
    if t.dtype not in _INDEX_DTYPES:
        fail(f"{name} must be int32 or int64, got {t.dtype}")
    if t.dim() != dim:
        fail(f"{name} must have {dim} dimension(s), got shape {tuple(t.shape)}")


def check_cache_write(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
                      width: int, *, data: bool = True) -> None:
    """``latent [T, D]``, ``cache [num_blocks, ps, width]``, ``slot_mapping [T]``.

    ``data=False`` (fake implementations) checks shapes and dtypes only.
    """
    if latent.dim() != 2:
        fail(f"latent must be [T, D], got shape {tuple(latent.shape)}")
    if cache.dim() != 3:
        fail(f"cache must be [num_blocks, page_size, bytes_or_D], got shape {tuple(cache.shape)}")
    if cache.shape[-1] != width:
        fail(f"cache rows are {cache.shape[-1]} wide, expected {width} for latent width {latent.shape[1]}")
    check_index("slot_mapping", slot_mapping, 1)
    if slot_mapping.shape[0] != latent.shape[0]:
        fail(f"slot_mapping has {slot_mapping.shape[0]} entries for {latent.shape[0]} latent rows")
    if latent.device != cache.device or slot_mapping.device != cache.device:
        fail(f"latent ({latent.device}), cache ({cache.device}) and slot_mapping ({slot_mapping.device}) "
             "must be on one device")
    if data and checks_enabled() and slot_mapping.numel() and cache.device.type != "meta":
        num_slots = cache.shape[0] * cache.shape[1]
        bad = (slot_mapping < -1) | (slot_mapping >= num_slots)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            fail(f"slot_mapping[{i}] = {int(slot_mapping[i])} is out of range [-1, {num_slots})")
        used = slot_mapping[slot_mapping >= 0]
        if used.numel() != used.unique().numel():
            fail("slot_mapping writes the same slot twice in one step")


def check_batch(num_tokens: int, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                seq_lens_encoder: torch.Tensor, seq_lens_decoder: torch.Tensor,
                batch_id_per_token: torch.Tensor, page_size: int, num_blocks: int, *,
                data: bool = True) -> Optional[tuple[torch.Tensor, ...]]:
    """Batch metadata of SPEC §5 for ``num_tokens`` query tokens (``data=False``: shapes and dtypes only).

    Returns the host int64 copies ``(block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
    batch_id_per_token)`` the data checks ran on, or None when they did not run."""
    check_index("block_tables", block_tables, 2)
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


def checked_slot_mapping(positions: torch.Tensor, slot_mapping: torch.Tensor, cache: torch.Tensor,
                         block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens_encoder: torch.Tensor,
                         seq_lens_decoder: torch.Tensor, batch_id_per_token: torch.Tensor) -> torch.Tensor:
    """``slot_mapping``, after checking a model step's inputs against each other (checked mode only).

    The cache ops see slots only, so they cannot tell a slot of another request from the right one: this
    check, run once per step before any cache write, requires token ``i`` of request ``b`` to sit at
    position ``seq_lens_decoder[b] + i`` and to write the slot its block table gives that position (SPEC
    §5), and padding tokens to write nothing. ``cache`` (any layer's) gives the page size and block count.
    """
    if positions.dim() != 1 or slot_mapping.dim() != 1 or positions.shape != slot_mapping.shape:
        fail(f"positions {tuple(positions.shape)} and slot_mapping {tuple(slot_mapping.shape)} must both be [T]")
    check_index("positions", positions, 1)
    check_index("slot_mapping", slot_mapping, 1)
    if positions.device != batch_id_per_token.device or slot_mapping.device != batch_id_per_token.device:
        fail(f"positions ({positions.device}) and slot_mapping ({slot_mapping.device}) must be on the device of "
             f"the step's metadata ({batch_id_per_token.device})")
    num_blocks, page_size = cache.shape[0], cache.shape[1]
    host = check_batch(positions.shape[0], block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                       batch_id_per_token, page_size, num_blocks)
    if host is None:
        return slot_mapping
    bt, cu, _, dec, bid = host                   # validated host copies: cu and bid agree
    n = int(cu[-1])
    pos, slots = torch.stack([positions.long(), slot_mapping.long()]).cpu()
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
            fail(f"slot_mapping[{t}] = {int(slots[t])}, but position {int(want_pos[t])} of request {int(bid[t])} "
                 f"is slot {int(want_slots[t])} of its block table (page size {page_size})")
    bad = slots[n:] != -1
    if bool(bad.any()):
        t = n + int(bad.nonzero()[0, 0])
        fail(f"slot_mapping[{t}] = {int(slots[t])} for a padding token (after the last request): must be -1")
    return slot_mapping
