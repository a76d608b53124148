"""Sliding-window indexer (SPEC §3, §5, §7): ``swa_indexer``.

For every query token of a ragged step, the cache slots of the ``W`` positions its window covers, in
position order: entry ``k`` of the token at absolute position ``p`` is the slot of position
``p - W + 1 + k``, or ``-1`` where that position is negative. A token attends to exactly
``min(W, p + 1)`` entries (returned as ``num_valid``); the valid ones are the *last* ``num_valid``.

With ``s = sinks > 0`` attention sinks (SPEC §12; StreamingLLM) lead each row, ``s + W`` wide: entry
``j < s`` is the slot of position ``j`` where ``j <= p - W`` (``-1`` where ``j > p`` or ``j`` is already in
the window, so no position appears twice), and entries ``s + k`` are the window entries above. The token
attends to positions ``0 … min(s, p+1)-1`` and ``max(0, p-W+1) … p``; ``num_valid`` counts them all
(``min(W, p + 1) + min(s, max(0, p - W + 1))``). ``s = 0`` is the plain window.

Only the table entries of pages a row holds are read, so a window-bounded table (``-1`` for the pages outside
each request's window and sinks, docs/design.md §12) gives the same slots as one holding every page.

The page size is an argument (any ``ps >= 1``), and the history already in the cache
(``seq_lens_decoder``) counts for prefill tokens too, so chunked prefill and prefix reuse index correctly.
CUDA tensors go through the Triton kernel of ``swa_rewrite.kernels.swa_indexer``; everything else through
``swa_indexer_reference``.
"""

from __future__ import annotations

import torch

from .batch_checks import check_batch
from .checks import fail
from .registration import register_cuda
from .step_metadata import token_positions


# Bound the [tokens, band] int64 temporaries of the reference to about this many elements each.
_INDEX_BUDGET = 1 << 20


def swa_indexer_reference(block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          seq_lens_decoder: torch.Tensor, batch_id_per_token: torch.Tensor, window: int,
                          page_size: int, sinks: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``indices int32 [T, 1, sinks + W]`` and ``num_valid int32 [T]`` (see module docstring).

    Entry ``k`` holds position ``p - W + 1 + k``, and only positions the block tables reach (``< capacity =
    max_blocks * page_size``) can hold a slot: a token's non-``-1`` entries lie in one band of
    ``min(W, capacity)`` columns. Only that band is computed, a bounded number of tokens at a time, so the
    temporaries stay small however large ``W`` is (a Hugging Face window of 128K, or 10^7, over short
    requests); the output itself is ``[T, 1, sinks + W]`` by contract. Likewise only the first
    ``min(sinks, capacity)`` sink entries can hold a slot.
    """
    pos, req = token_positions(cu_seqlens_q, seq_lens_decoder, batch_id_per_token)   # [T], [T]
    T = pos.shape[0]
    max_blocks = block_tables.shape[1]
    band = max(1, min(window, max_blocks * page_size))
    table = block_tables.long()
    if table.numel() == 0:  # only padding tokens can pass the checks then
        table = table.new_full((max(table.shape[0], 1), 1), -1)
    sink_band = min(sinks, max_blocks * page_size)
    rows = torch.full((T, sinks + window), -1, dtype=torch.int32, device=pos.device)
    head, indices = rows[:, :sinks], rows[:, sinks:]                       # [T, sinks], [T, W] views
    j = torch.arange(band, device=pos.device)
    s = torch.arange(sink_band, device=pos.device)
    step = max(1, _INDEX_BUDGET // max(band, sink_band))
    for t0 in range(0, T, step):
        first = pos[t0:t0 + step] - window + 1                            # [t] position of entry 0
        # First column of the band: the column of position 0, kept inside the row.
        lo = (-first).clamp(min=0, max=window - band)                      # [t]
        slots = _window_slots(first[:, None] + lo[:, None] + j, req[t0:t0 + step], table, page_size,
                              max_blocks)                                   # [t, band] int32
        if band == window:
            indices[t0:t0 + step] = slots
        else:
            indices[t0:t0 + step].scatter_(1, lo[:, None] + j, slots)
        if sink_band:
            # Sink position s only below the window (s < first); -1 makes _window_slots give -1.
            below = torch.where(s[None, :] < first[:, None], s[None, :], -1)   # [t, sink_band]
            head[t0:t0 + step, :sink_band] = _window_slots(below, req[t0:t0 + step], table, page_size,
                                                            max_blocks)
    below_window = torch.clamp(pos - window + 1, min=0, max=sinks)
    num_valid = torch.where(req >= 0, torch.clamp(pos + 1, max=window) + below_window, 0)
    return rows[:, None, :], num_valid.to(torch.int32)


def _window_slots(q: torch.Tensor, req: torch.Tensor, table: torch.Tensor, page_size: int,
                  max_blocks: int) -> torch.Tensor:
    """Slots ``int32 [t, n]`` of positions ``q [t, n]`` (int64) of requests ``req [t]`` (``-1`` = padding)
    through the block tables ``table [B, max_blocks]`` (int64); ``-1`` for a negative position, a padding
    token, or metadata the op's checks would reject (a page past the table, a negative block), as in the
    kernel."""
    qc = q.clamp(min=0)
    page = qc // page_size
    valid = (req >= 0)[:, None] & (q >= 0) & (page < max_blocks)
    blk = table[req.clamp(min=0)[:, None], page.clamp(max=max(max_blocks - 1, 0))]  # [t, n]
    return torch.where(valid & (blk >= 0), blk * page_size + qc % page_size, -1).to(torch.int32)


# ---------------------------------------------------------------------------------------------- op
def _check_indexer(block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder, batch_id_per_token,
                   window, page_size, group, sinks, data=True):
    if window < 1:
        fail(f"window must be >= 1, got {window}")
    if sinks < 0:
        fail(f"sinks must be >= 0, got {sinks}")
    if sinks + window >= 2**31:
        fail(f"sinks + window must be < 2**31 (int32 columns), got {sinks} + {window}")
    # The indexer sees no cache: block ids are only required to give slots that fit the int32 output.
    check_batch(batch_id_per_token.shape[0], block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                batch_id_per_token, page_size, 2**31 // page_size if page_size >= 1 else 1, group, window=window,
                sinks=sinks, data=data)


def _empty_outputs(batch_id_per_token: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = batch_id_per_token.shape[0]
    return (batch_id_per_token.new_empty(T, 1, width, dtype=torch.int32),
            batch_id_per_token.new_empty(T, dtype=torch.int32))


@torch.library.custom_op("swa_rewrite::swa_indexer", mutates_args=())
def swa_indexer(block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens_encoder: torch.Tensor,
                seq_lens_decoder: torch.Tensor, batch_id_per_token: torch.Tensor, window: int,
                page_size: int, group: int, sinks: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Window slots ``int32 [T, 1, sinks + window]`` and valid counts ``int32 [T]`` of a ragged step, through
    the block tables ``block_tables[group]`` of ``block_tables [G, B, nb]``; ``sinks`` (default 0, so graphs
    and callers from before sinks keep their meaning) leading sink entries."""
    _check_indexer(block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder, batch_id_per_token,
                   window, page_size, group, sinks)
    return swa_indexer_reference(block_tables[group], cu_seqlens_q, seq_lens_decoder, batch_id_per_token, window,
                                 page_size, sinks)


@swa_indexer.register_fake
def _(block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder, batch_id_per_token, window, page_size,
      group, sinks=0):
    _check_indexer(block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder, batch_id_per_token,
                   window, page_size, group, sinks, data=False)
    return _empty_outputs(batch_id_per_token, sinks + window)


@register_cuda(swa_indexer)
def _(block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder, batch_id_per_token, window, page_size,
      group, sinks=0):
    _check_indexer(block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder, batch_id_per_token,
                   window, page_size, group, sinks)
    indices, num_valid = _empty_outputs(batch_id_per_token, sinks + window)
    launch_swa_indexer(block_tables[group], cu_seqlens_q, seq_lens_decoder, batch_id_per_token, indices,
                       num_valid, window=window, page_size=page_size, sinks=sinks)
    return indices, num_valid


def launch_swa_indexer(block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens_decoder: torch.Tensor,
                       batch_id_per_token: torch.Tensor, indices: torch.Tensor, num_valid: torch.Tensor, *,
                       window: int, page_size: int, sinks: int = 0) -> None:
    """The Triton indexer on one group's ``block_tables [B, nb]`` (checked metadata), filling ``indices``
    and ``num_valid``; also what the fused SWA op runs for a layer with sinks."""
    from ..kernels.swa_indexer import swa_indexer as launch

    launch(block_tables, cu_seqlens_q.contiguous(), seq_lens_decoder.contiguous(),
           batch_id_per_token.contiguous(), indices, num_valid, window=window, page_size=page_size, sinks=sinks)
