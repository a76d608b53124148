"""The builder of one engine step's inputs (docs/design.md §5): ``StepBatch.build`` packs per-request work items
(``StepItem``) into the token ids and the ``StepMetadata`` the model takes."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from ..ops.step_metadata import StepMetadata
from ..ops.checks import check_int


@dataclasses.dataclass(frozen=True)
class StepItem:
    """One request's share of a step: ``tokens`` to run, after ``num_cached`` already-cached positions.

    ``is_prefill`` marks prompt tokens (fresh or a chunk of a prompt); a decode runs the 1 (or 1+k, for
    multi-token prediction) newest tokens.
    """

    tokens: Sequence[int]
    num_cached: int
    block_table: Sequence[int]
    is_prefill: bool


@dataclasses.dataclass
class StepBatch:
    """What one step feeds the model: ``input_ids [T]`` int64 (``num_padding`` trailing padding tokens among
    the ``T``), the step's ``meta`` (``StepMetadata``: positions, per-request metadata, block tables and slots
    of ``G`` cache groups) and ``last_token_index [B]`` int64, the row of each request's last token."""

    input_ids: torch.Tensor
    meta: StepMetadata
    last_token_index: torch.Tensor

    @staticmethod
    def build(items: Sequence[StepItem], page_size: int, *, pad_to: Optional[int] = None,
              max_blocks: Optional[int] = None, num_groups: int = 1,
              device: torch.device | str | None = None) -> "StepBatch":
        """Pack ``items`` into step tensors; pad to ``pad_to`` tokens and ``max_blocks`` table columns if given.

        ``num_groups``: the model's cache groups ``G`` (``ops.kv_cache_spec.cache_groups`` of its specs), the
        leading dimension of ``block_tables [G, B, nb]`` and ``slot_mapping [G, T]``. For now every group gets
        the same row: each request's one block table serves every group, whose caches (one block pool each,
        of the same size) stay unbounded; holding only the blocks a sliding group's window covers
        (docs/design.md §12, "Bounded") is the next step, and gives each group its own rows.
        """
        page_size = check_int("page_size", page_size, minimum=1)
        num_groups = check_int("num_groups", num_groups, minimum=1)
        if pad_to is not None:
            pad_to = check_int("pad_to", pad_to)
        if max_blocks is not None:
            max_blocks = check_int("max_blocks", max_blocks, minimum=0)
        ids, pos, slots, bids, cu = [], [], [], [], [0]
        width = max([len(it.block_table) for it in items] + [max_blocks or 0, 1])
        table = torch.full((1, len(items), width), -1, dtype=torch.int32)       # one row, repeated per group
        for b, it in enumerate(items):
            if it.num_cached < 0:
                raise ValueError(f"request {b}: num_cached must be >= 0, got {it.num_cached}")
            end = it.num_cached + len(it.tokens)
            if end > len(it.block_table) * page_size:
                raise ValueError(f"request {b} reaches position {end - 1} but has {len(it.block_table)} "
                                 f"blocks of {page_size}")
            if not it.tokens:
                raise ValueError(f"request {b} has no tokens to run")
            table[0, b, :len(it.block_table)] = torch.tensor(list(it.block_table), dtype=torch.int32)
            for i, tok in enumerate(it.tokens):
                p = it.num_cached + i
                ids.append(tok)
                pos.append(p)
                slots.append(it.block_table[p // page_size] * page_size + p % page_size)
                bids.append(b)
            cu.append(cu[-1] + len(it.tokens))
        T = len(ids)
        pad = 0 if pad_to is None else pad_to - T
        if pad < 0:
            raise ValueError(f"pad_to={pad_to} is smaller than the {T} tokens of the step")
        ids += [0] * pad
        pos += [0] * pad
        slots += [-1] * pad
        bids += [-1] * pad
        i32 = dict(dtype=torch.int32, device=device)
        meta = StepMetadata(
            positions=torch.tensor(pos, dtype=torch.int64, device=device),
            cu_seqlens_q=torch.tensor(cu, **i32),
            seq_lens_encoder=torch.tensor([len(it.tokens) if it.is_prefill else 0 for it in items], **i32),
            seq_lens_decoder=torch.tensor([it.num_cached for it in items], **i32),
            batch_id_per_token=torch.tensor(bids, **i32),
            block_tables=table.repeat(num_groups, 1, 1).to(device),
            slot_mapping=torch.tensor([slots] * num_groups, dtype=torch.int64, device=device),
        )
        return StepBatch(input_ids=torch.tensor(ids, dtype=torch.int64, device=device), meta=meta,
                         last_token_index=torch.tensor(cu[1:], dtype=torch.int64, device=device) - 1)


def token_of_slot(items: Sequence[StepItem], slot: int, page_size: int) -> Optional[tuple[int, int]]:
    """``(b, position)``: the request ``b`` of ``items`` and the position in it whose token this step writes
    to cache ``slot``, or None if no token of the step writes there (an error path's lookup, not a hot one)."""
    block, offset = divmod(slot, page_size)
    for b, it in enumerate(items):
        for i, table_block in enumerate(it.block_table):
            position = i * page_size + offset
            if table_block == block and it.num_cached <= position < it.num_cached + len(it.tokens):
                return b, position
    return None
