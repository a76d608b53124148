"""Batch metadata of one engine step (SPEC §5), built from per-request work items."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from ..ops.validation import check_int


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
    """Tensors of one step; ``T`` tokens (``num_padding`` trailing padding tokens among them), ``B`` requests."""

    input_ids: torch.Tensor           # [T] int64
    positions: torch.Tensor           # [T] int64
    block_tables: torch.Tensor        # [B, max_blocks] int32, unused entries -1
    cu_seqlens_q: torch.Tensor        # [B + 1] int32
    seq_lens_encoder: torch.Tensor    # [B] int32, prefill tokens this step (0 for decode)
    seq_lens_decoder: torch.Tensor    # [B] int32, tokens cached before this step
    batch_id_per_token: torch.Tensor  # [T] int32, -1 for padding
    slot_mapping: torch.Tensor        # [T] int64, -1 for padding
    last_token_index: torch.Tensor    # [B] int64 row of each request's last token

    @staticmethod
    def build(items: Sequence[StepItem], page_size: int, *, pad_to: Optional[int] = None,
              max_blocks: Optional[int] = None, device: torch.device | str | None = None) -> "StepBatch":
        """Pack ``items`` into step tensors; pad to ``pad_to`` tokens and ``max_blocks`` table columns if given."""
        page_size = check_int("page_size", page_size, minimum=1)
        if pad_to is not None:
            pad_to = check_int("pad_to", pad_to)
        if max_blocks is not None:
            max_blocks = check_int("max_blocks", max_blocks, minimum=0)
        ids, pos, slots, bids, cu = [], [], [], [], [0]
        width = max([len(it.block_table) for it in items] + [max_blocks or 0, 1])
        table = torch.full((len(items), width), -1, dtype=torch.int32)
        for b, it in enumerate(items):
            if it.num_cached < 0:
                raise ValueError(f"request {b}: num_cached must be >= 0, got {it.num_cached}")
            end = it.num_cached + len(it.tokens)
            if end > len(it.block_table) * page_size:
                raise ValueError(f"request {b} reaches position {end - 1} but has {len(it.block_table)} "
                                 f"blocks of {page_size}")
            if not it.tokens:
                raise ValueError(f"request {b} has no tokens to run")
            table[b, :len(it.block_table)] = torch.tensor(list(it.block_table), dtype=torch.int32)
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
        return StepBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
            positions=torch.tensor(pos, dtype=torch.int64, device=device),
            block_tables=table.to(device),
            cu_seqlens_q=torch.tensor(cu, **i32),
            seq_lens_encoder=torch.tensor([len(it.tokens) if it.is_prefill else 0 for it in items], **i32),
            seq_lens_decoder=torch.tensor([it.num_cached for it in items], **i32),
            batch_id_per_token=torch.tensor(bids, **i32),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            last_token_index=torch.tensor(cu[1:], dtype=torch.int64, device=device) - 1,
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of ``MLAModel.forward`` (all but ``input_ids`` and ``kv_caches``)."""
        return dict(positions=self.positions, block_tables=self.block_tables, cu_seqlens_q=self.cu_seqlens_q,
                    seq_lens_encoder=self.seq_lens_encoder, seq_lens_decoder=self.seq_lens_decoder,
                    batch_id_per_token=self.batch_id_per_token, slot_mapping=self.slot_mapping)


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
