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
    multi-token prediction) newest tokens. ``block_table``: the request's block id of each page, one list
    serving every cache group, or one list per group (``[G][pages]``: a window-bounded sliding group holds
    only some pages, the others are ``-1``, docs/design.md §12).
    """

    tokens: Sequence[int]
    num_cached: int
    block_table: Sequence[int]
    is_prefill: bool


def mha_crossover_tokens(kv_lora_rank: int, nope_dim: int, v_dim: int) -> Optional[int]:
    """The chunk length from which MHA-mode prefill does fewer FLOPs than MQA mode (SPEC §13), or None if it
    never does. Per head, a chunk of ``C`` tokens over ``W`` keys costs ``C·W·2(2R + P)`` + the absorb /
    un-absorb ``C·2R(N + V)`` in MQA mode, and ``C·W·2(N + P + V)`` + the expansion of about ``C + W`` rows,
    ``(C + W)·2R(N + V)``, in MHA mode: MHA wins once ``C > R(N + V) / (2R - N - V)`` — whatever ``W`` is.
    DeepSeek-V3 (``R = 512``, ``N = V = 128``): 171 tokens. A count of FLOPs, not a measurement: the engine's
    ``mha_prefill`` takes a measured threshold instead (``benchmarks/bench_mha_prefill.py``)."""
    denominator = 2 * kv_lora_rank - nope_dim - v_dim
    if denominator <= 0:
        return None
    return kv_lora_rank * (nope_dim + v_dim) // denominator + 1


@dataclasses.dataclass(frozen=True)
class MHAPlan:
    """Which chunks of a step run MHA-mode prefill (SPEC §13), for ``StepBatch.build``.

    ``groups``: each cache group's ``(window, sinks)``, window 0 for a full group (causal); ``min_tokens``: a
    prompt chunk of at least this many tokens runs MHA mode (in every group), shorter chunks and decodes MQA.
    """

    groups: tuple[tuple[int, int], ...]
    min_tokens: int

    def selects(self, item: StepItem) -> bool:
        return item.is_prefill and len(item.tokens) >= self.min_tokens

    @staticmethod
    def for_groups(group_specs, min_tokens: int) -> "MHAPlan":
        """The plan for cache groups of these ``KVCacheSpec``s (one per group, in group order)."""
        return MHAPlan(tuple((0, 0) if s.window is None else (s.window, s.sinks) for s in group_specs), min_tokens)

    @staticmethod
    def for_model(model, min_tokens: int) -> "MHAPlan":
        """The plan for a model that states its per-layer ``kv_cache_spec()`` (an ``MLAModel``, an
        ``SWAModule``), its groups numbered as the engine numbers them."""
        from ..ops.kv_cache_spec import group_specs  # noqa: PLC0415

        return MHAPlan.for_groups([spec for spec, _ in group_specs(model.kv_cache_spec())], min_tokens)


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
              max_blocks: Optional[int] = None, num_groups: int = 1, mha: Optional[MHAPlan] = None,
              device: torch.device | str | None = None) -> "StepBatch":
        """Pack ``items`` into step tensors; pad to ``pad_to`` tokens and ``max_blocks`` table columns if given.

        ``num_groups``: the model's cache groups ``G`` (``ops.kv_cache_spec.cache_groups`` of its specs), the
        leading dimension of ``block_tables [G, B, nb]`` and ``slot_mapping [G, T]``; an item's one block table
        serves every group, or it gives one per group (``StepItem``). ``mha``: the chunks that run MHA-mode
        prefill and the groups' windows; their rows (``ops.mha_prefill.plan_mha_rows``, on the host) go into
        ``meta.mha_kv_slots [G, M]`` / ``mha_kv_cu [G, B + 1]`` (each group's rows padded with ``-1`` to the
        longest); without it, or with no chunk selected, ``M = 0``.
        """
        page_size = check_int("page_size", page_size, minimum=1)
        num_groups = check_int("num_groups", num_groups, minimum=1)
        if pad_to is not None:
            pad_to = check_int("pad_to", pad_to)
        if max_blocks is not None:
            max_blocks = check_int("max_blocks", max_blocks, minimum=0)
        tables = [_group_tables(b, it.block_table, num_groups) for b, it in enumerate(items)]
        ids, pos, bids, cu = [], [], [], [0]
        slots: list[list[int]] = [[] for _ in range(num_groups)]
        width = max([len(t) for per_group in tables for t in per_group] + [max_blocks or 0, 1])
        table = torch.full((num_groups, len(items), width), -1, dtype=torch.int32)
        for b, (it, per_group) in enumerate(zip(items, tables)):
            if it.num_cached < 0:
                raise ValueError(f"request {b}: num_cached must be >= 0, got {it.num_cached}")
            if not it.tokens:
                raise ValueError(f"request {b} has no tokens to run")
            end = it.num_cached + len(it.tokens)
            for g, row in enumerate(per_group):
                if end > len(row) * page_size:
                    raise ValueError(f"request {b} reaches position {end - 1} but has {len(row)} blocks of "
                                     f"{page_size}" + (f" in cache group {g}" if num_groups > 1 else ""))
                table[g, b, :len(row)] = torch.tensor(list(row), dtype=torch.int32)
                for p in range(it.num_cached, end):
                    block = row[p // page_size]
                    if block < 0:
                        raise ValueError(f"request {b} writes position {p}, but its page {p // page_size} in cache "
                                         f"group {g} is released (-1)")
                    slots[g].append(block * page_size + p % page_size)
            ids += list(it.tokens)
            pos += range(it.num_cached, end)
            bids += [b] * len(it.tokens)
            cu.append(cu[-1] + len(it.tokens))
        T = len(ids)
        pad = 0 if pad_to is None else pad_to - T
        if pad < 0:
            raise ValueError(f"pad_to={pad_to} is smaller than the {T} tokens of the step")
        ids += [0] * pad
        pos += [0] * pad
        bids += [-1] * pad
        for row in slots:
            row += [-1] * pad
        i32 = dict(dtype=torch.int32, device=device)
        mha_rows = _mha_rows(mha, items, table, cu, page_size)
        meta = StepMetadata(
            positions=torch.tensor(pos, dtype=torch.int64, device=device),
            cu_seqlens_q=torch.tensor(cu, **i32),
            seq_lens_encoder=torch.tensor([len(it.tokens) if it.is_prefill else 0 for it in items], **i32),
            seq_lens_decoder=torch.tensor([it.num_cached for it in items], **i32),
            batch_id_per_token=torch.tensor(bids, **i32),
            block_tables=table.to(device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device).view(num_groups, T + pad),
            **({} if mha_rows is None else dict(mha_kv_slots=mha_rows[0].to(device), mha_kv_cu=mha_rows[1].to(device))),
        )
        return StepBatch(input_ids=torch.tensor(ids, dtype=torch.int64, device=device), meta=meta,
                         last_token_index=torch.tensor(cu[1:], dtype=torch.int64, device=device) - 1)


def _mha_rows(mha: Optional[MHAPlan], items: Sequence[StepItem], table: torch.Tensor, cu: list[int],
              page_size: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(mha_kv_slots [G, M], mha_kv_cu [G, B + 1])`` on the host for the chunks ``mha`` selects, or None."""
    if mha is None:
        return None
    selected = torch.tensor([mha.selects(it) for it in items], dtype=torch.bool)
    if not bool(selected.any()):
        return None
    if len(mha.groups) != table.shape[0]:
        raise ValueError(f"the MHA plan gives {len(mha.groups)} cache groups, the step has {table.shape[0]}")
    from ..ops.mha_prefill import plan_mha_rows  # noqa: PLC0415  (ops import nothing of the runtime)

    cu_t = torch.tensor(cu, dtype=torch.int32)
    dec = torch.tensor([it.num_cached for it in items], dtype=torch.int32)
    planned = [plan_mha_rows(table[g], cu_t, dec, window=w, sinks=s, page_size=page_size, mha=selected)
               for g, (w, s) in enumerate(mha.groups)]
    M = max(rows.shape[0] for rows, _ in planned)
    slots = torch.full((len(planned), M), -1, dtype=torch.int32)
    for g, (rows, _) in enumerate(planned):
        slots[g, :rows.shape[0]] = rows
    return slots, torch.stack([kv_cu for _, kv_cu in planned])


def _group_tables(b: int, block_table, num_groups: int) -> list:
    """An item's block table(s) as one list per cache group."""
    rows = list(block_table)
    if rows and isinstance(rows[0], (list, tuple)):
        if len(rows) != num_groups:
            raise ValueError(f"request {b} gives {len(rows)} block tables, expected one per cache group: {num_groups}")
        return rows
    return [rows] * num_groups


def token_of_row(items: Sequence[StepItem], row: int) -> Optional[tuple[int, int]]:
    """``(b, position)``: the request ``b`` of ``items`` and the position of the step's token ``row``, or None
    for a padding row."""
    for b, it in enumerate(items):
        if row < len(it.tokens):
            return b, it.num_cached + row
        row -= len(it.tokens)
    return None
