"""Checks of the per-request batch metadata (docs/design.md §5) an attention or indexer op reads: ``check_batch``."""

from __future__ import annotations

from typing import Optional

import torch

from .checks import _state, check_group, check_index, checks_enabled, fail


def check_batch(num_tokens: int, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                seq_lens_encoder: torch.Tensor, seq_lens_decoder: torch.Tensor,
                batch_id_per_token: torch.Tensor, page_size: int, num_blocks: int, group: int, *,
                data: bool = True) -> Optional[tuple[torch.Tensor, ...]]:
    """Batch metadata of docs/design.md §5 for ``num_tokens`` query tokens, ``block_tables [G, B, nb]`` read at
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
