"""Checks of the per-request batch metadata (docs/design.md §5, §12) an attention or indexer op reads:
``check_batch`` (one op: one cache group, read with its window and sinks) and ``check_batch_data`` (the same on
host copies; the model's step check runs it for every group of a step at once).

What a group's block tables must hold is a ``BatchRule``. A full-attention op reads every page
``0 … ceil(end / ps) - 1`` of a request (``end`` its positions after this step), so all of them must be blocks
in ``[0, num_blocks)``. A sliding op (window ``W``, ``s`` sinks) reads, for a request with ``n`` cached positions
and ``C`` tokens in the step, only the pages covering its sink positions ``0 … min(s, n + C) - 1`` and positions
``[max(0, n - W + 1), n + C)`` (the union of its tokens' windows; the staged prefill kernel reads exactly that
range per request): those must be blocks; the others may be ``-1`` (released; a window-bounded cache group gives
a request only the blocks its window covers) or blocks. No entry may be anything else.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .checks import check_group, check_index, checks_enabled, fail, host_int64, validated_entries


@dataclasses.dataclass(frozen=True)
class BatchRule:
    """What a cache group's block tables must hold for an op of page size ``page_size`` over ``num_blocks``
    blocks: every page up to each request's end (``window == 0``, full attention), or the pages of a sliding
    window of ``window`` positions plus ``sinks`` sink positions (module docstring)."""

    page_size: int
    num_blocks: int
    window: int = 0
    sinks: int = 0

    @staticmethod
    def of(page_size: int, num_blocks: int, window: Optional[int] = None, sinks: int = 0) -> "BatchRule":
        """The rule of an op with ``window`` (None or 0: full attention, whose ``sinks`` do not matter)."""
        window = int(window or 0)
        return BatchRule(int(page_size), int(num_blocks), window, int(sinks) if window else 0)

    def covers(self, other: "BatchRule") -> bool:
        """Whether metadata that passed this rule passes ``other`` too: same page size, no more blocks allowed,
        and every page ``other`` needs is one this rule needs (full needs them all; a window and sinks at
        least as large)."""
        if self.page_size != other.page_size or self.num_blocks > other.num_blocks:
            return False
        if self.window == 0:
            return True
        return other.window != 0 and other.window <= self.window and other.sinks <= self.sinks

    def describe(self) -> str:
        if self.window == 0:
            return "full attention"
        return f"window {self.window}" + (f", {self.sinks} sinks" if self.sinks else "")


def check_batch(num_tokens: int, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                seq_lens_encoder: torch.Tensor, seq_lens_decoder: torch.Tensor,
                batch_id_per_token: torch.Tensor, page_size: int, num_blocks: int, group: int, *,
                window: Optional[int] = None, sinks: int = 0, data: bool = True, shapes: bool = True) -> None:
    """Batch metadata of docs/design.md §5 for ``num_tokens`` query tokens, ``block_tables [G, B, nb]`` read at
    ``group`` by an op with ``window`` (None or 0: full attention) and ``sinks`` (``BatchRule``).

    Shapes and dtypes are checked unless ``shapes=False`` (an op inside a compiled graph, whose trace checked them:
    ``checks.compiled_graph``). The data checks (``check_batch_data``, one device-to-host copy) run in
    checked mode unless ``data=False`` (fake implementations) or these tensors are the very objects the step
    check of the enclosing ``checks.validated_step`` block validated for this group under a rule covering this
    op's (``BatchRule.covers``)."""
    if shapes:
        _check_batch_shapes(num_tokens, block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                            batch_id_per_token, page_size, group)
    if not data or block_tables.device.type == "meta" or not checks_enabled():
        return
    rule = BatchRule.of(page_size, num_blocks, window, sinks)
    tensors = (block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder, batch_id_per_token)
    if any(seen.covers(rule) for seen in validated_entries(tensors, group)):
        return                  # the step check validated these very tensors for this group, at least as strictly
    table = block_tables[group]
    host = host_int64((table,) + tensors[1:])
    check_batch_data(num_tokens, host[0].view(table.shape), *host[1:], rule, group)


def _check_batch_shapes(num_tokens: int, block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        seq_lens_encoder: torch.Tensor, seq_lens_decoder: torch.Tensor,
                        batch_id_per_token: torch.Tensor, page_size: int, group: int) -> None:
    check_index("block_tables", block_tables, 3)
    check_group("block_tables", block_tables, group)
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("seq_lens_encoder", seq_lens_encoder),
                    ("seq_lens_decoder", seq_lens_decoder), ("batch_id_per_token", batch_id_per_token)):
        check_index(name, t, 1)
    B = block_tables.shape[1]
    if cu_seqlens_q.shape[0] != B + 1:
        fail(f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries, expected batch size + 1 = {B + 1}")
    if seq_lens_encoder.shape[0] != B or seq_lens_decoder.shape[0] != B:
        fail(f"seq_lens_encoder {tuple(seq_lens_encoder.shape)} and seq_lens_decoder "
             f"{tuple(seq_lens_decoder.shape)} must both be [{B}]")
    if batch_id_per_token.shape[0] != num_tokens:
        fail(f"batch_id_per_token has {batch_id_per_token.shape[0]} entries for {num_tokens} tokens")
    if page_size < 1:
        fail(f"page_size must be >= 1, got {page_size}")
    device = block_tables.device
    if (cu_seqlens_q.device != device or seq_lens_encoder.device != device or seq_lens_decoder.device != device
            or batch_id_per_token.device != device):
        devices = {t.device for t in (block_tables, cu_seqlens_q, seq_lens_encoder, seq_lens_decoder,
                                      batch_id_per_token)}
        fail(f"the step's metadata tensors must be on one device, got {sorted(map(str, devices))}")


def table_name(group: int) -> str:
    """How messages name group ``group``'s block tables (``block_tables[g]``; group 0's plainly)."""
    return "block_tables" if group == 0 else f"block_tables[{group}]"


def check_batch_data(num_tokens: int, bt: torch.Tensor, cu: torch.Tensor, enc: torch.Tensor, dec: torch.Tensor,
                     bid: torch.Tensor, rule: BatchRule, group: int = 0) -> None:
    """The data checks of ``check_batch`` on host int64 copies: one group's table ``bt [B, nb]`` and the step's
    ``cu [B+1]``, ``enc [B]``, ``dec [B]``, ``bid [T]``, against ``rule``."""
    q_lens = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or bool((q_lens < 0).any()) or int(cu[-1]) > num_tokens:
        fail(f"cu_seqlens_q must start at 0, not decrease and end at <= {num_tokens} tokens, got {cu.tolist()}")
    if bool((dec < 0).any()) or bool((enc < 0).any()):
        fail("seq_lens_encoder and seq_lens_decoder must be >= 0")
    bad = (enc > 0) & (enc != q_lens)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        fail(f"request {b}: seq_lens_encoder = {int(enc[b])} but cu_seqlens_q gives it {int(q_lens[b])} tokens")
    _check_table(bt, q_lens, dec, rule, group)
    expected = torch.full((num_tokens,), -1, dtype=torch.long)
    # Token t < cu[-1] belongs to the request b with cu[b] <= t < cu[b + 1]: the number of ends cu[1:] <= t
    # (searchsorted, not repeat_interleave: that opens a parallel region on the host's threads for any size).
    expected[: int(cu[-1])] = torch.searchsorted(cu[1:], torch.arange(int(cu[-1])), right=True)
    if not torch.equal(bid, expected):
        i = int((bid != expected).nonzero()[0, 0])
        fail(f"batch_id_per_token[{i}] = {int(bid[i])} does not match cu_seqlens_q (expected {int(expected[i])}; "
             "padding tokens after the last request carry -1)")


def needed_pages(nb: int, q_lens: torch.Tensor, dec: torch.Tensor, rule: BatchRule) -> tuple[torch.Tensor, torch.Tensor]:
    """``needed [B, nb]``: which table columns an op of ``rule`` reads (host int64 ``q_lens``, ``dec``), and
    ``first [B, nb]``: the first position it reads in each (module docstring)."""
    ps = rule.page_size
    ends = dec + q_lens
    start = torch.arange(nb, dtype=torch.long)[None, :] * ps                  # [1, nb] first position of each page
    if rule.window == 0:
        return start < ends[:, None], start.expand(ends.shape[0], nb)
    lo = (dec - rule.window + 1).clamp(min=0)[:, None]                         # [B, 1] first window position
    in_window = (start + ps > lo) & (start < ends[:, None])
    in_sinks = start < ends.clamp(max=rule.sinks)[:, None]
    return in_window | in_sinks, torch.where(in_sinks, start, torch.maximum(start, lo))


def _check_table(bt: torch.Tensor, q_lens: torch.Tensor, dec: torch.Tensor, rule: BatchRule, group: int) -> None:
    ps, num_blocks = rule.page_size, rule.num_blocks
    name = table_name(group)
    ends = dec + q_lens
    capacity = bt.shape[1] * ps
    if bool((ends > capacity).any()):
        b = int((ends > capacity).nonzero()[0, 0])
        fail(f"request {b} reaches position {int(ends[b]) - 1} but its block table holds {capacity} positions "
             f"({bt.shape[1]} blocks of {ps})")
    needed, first = needed_pages(bt.shape[1], q_lens, dec, rule)
    bad = needed & ((bt < 0) | (bt >= num_blocks))
    if bool(bad.any()):
        b, i = (int(v) for v in bad.nonzero()[0])
        value, p = int(bt[b, i]), int(first[b, i])
        if value != -1:
            fail(f"{name}[{b}, {i}] = {value} is out of range [0, {num_blocks})")
        if rule.window == 0:
            fail(f"{name}[{b}, {i}] = -1 is out of range [0, {num_blocks}): position {p} of request {b} is in that "
                 f"page, and full attention reads every page up to the request's end ({int(ends[b])} positions)")
        lo = max(0, int(dec[b]) - rule.window + 1)
        sink_end = min(rule.sinks, int(ends[b]))
        sinks = f" and its sink positions 0 … {sink_end - 1}" if sink_end else ""
        where = "among its sinks" if p < min(sink_end, lo) else "in its window"
        fail(f"{name}[{b}, {i}] = -1 (released), but position {p} of request {b} lies {where}: with "
             f"{int(dec[b])} positions cached and {int(q_lens[b])} in this step it reads positions {lo} … "
             f"{int(ends[b]) - 1}{sinks} ({rule.describe()}, page size {ps})")
    bad = (bt < -1) | (bt >= num_blocks)
    if bool(bad.any()):
        b, i = (int(v) for v in bad.nonzero()[0])
        fail(f"{name}[{b}, {i}] = {int(bt[b, i])} is out of range [-1, {num_blocks}) (-1: no block; no token of "
             f"request {b} reads that page, but an entry is a block id or -1)")
