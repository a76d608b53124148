"""The builder of one engine step's inputs (docs/design.md §5): ``StepBatch.build`` packs per-request work items
(``StepItem``) into the token ids and the ``StepMetadata`` the model takes."""

from __future__ import annotations

import array
import dataclasses
from typing import Optional, Sequence

import torch

from ..ops.kv_cache_spec import group_specs
from ..ops.mha_prefill import plan_mha_rows
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
    """The chunk length from which MHA mode can pay off at all (SPEC §13): the limit of ``mha_pays_off`` for a
    window far longer than the chunk, ``C > R(N + V) / (2R - N - V)`` — 171 tokens at DeepSeek-V3's dims
    (``R = 512``, ``N = V = 128``) — or None if MHA mode never does fewer FLOPs (``2R <= N + V``)."""
    denominator = 2 * kv_lora_rank - nope_dim - v_dim
    if denominator <= 0:
        return None
    return kv_lora_rank * (nope_dim + v_dim) // denominator + 1


def _sum_clamped(x0: int, x1: int, cap: int) -> int:
    """``sum(min(cap, max(0, x)) for x in range(x0, x1 + 1))`` in closed form (0 for an empty range)."""
    if x1 < x0:
        return 0
    lo, hi = max(x0, 1), min(x1, cap - 1)                       # the linear part 1 … cap-1
    linear = (lo + hi) * (hi - lo + 1) // 2 if hi >= lo else 0
    capped = max(0, x1 - max(x0, cap) + 1) * cap
    return linear + capped


def mha_attended_pairs(chunk: int, cached: int, window: int, sinks: int = 0) -> int:
    """(query, key) pairs of a chunk of ``chunk`` tokens after ``cached`` positions (SPEC §3, §12): the token at
    ``p`` attends to ``min(W, p + 1)`` window positions and ``min(s, max(0, p - W + 1))`` sinks below them;
    ``window = 0``: ``p + 1`` (causal)."""
    first, last = cached, cached + chunk - 1
    if window == 0:
        return _sum_clamped(first + 1, last + 1, 1 << 62)
    return (_sum_clamped(first + 1, last + 1, window)
            + _sum_clamped(first - window + 1, last - window + 1, sinks))


def mha_expanded_rows(chunk: int, cached: int, window: int, sinks: int = 0) -> int:
    """Rows an MHA-mode chunk expands (``ops.mha_prefill.plan_mha_rows``): its sinks below the first window and
    ``max(0, n - W + 1) … n + C - 1``."""
    a = 0 if window == 0 else max(0, cached - window + 1)
    return (min(sinks, a) if window else 0) + cached + chunk - a


# The dims ``mha_measured_rule`` was measured at: DeepSeek-V2/V3's (R, N, V), with P = 64.
MEASURED_DIMS = (512, 128, 128)


def mha_pays_off(chunk: int, cached: int, window: int, sinks: int, kv_lora_rank: int, nope_dim: int,
                 v_dim: int, heads: Optional[int] = None) -> bool:
    """Whether a prompt chunk should run MHA mode in a group of this window (0: a full layer): at DeepSeek's
    dims (``R = 512``, ``N = V = 128``) with ``heads`` known, by ``mha_measured_rule``; otherwise where MHA mode
    does fewer FLOPs, counted as the core op runs them (``ops.mla_attention``), per head: MQA pays ``2(2R + P)``
    per attended (query, key) pair and the absorb / un-absorb BMMs, ``2R(N + V)`` per query; MHA pays
    ``2(N + P + V)`` per pair and ``2R(N + V)`` per expanded row — and the BMMs too, since the op runs them on
    every token of the step. So MHA wins iff ``pairs · (2R - N - V) > rows · R(N + V)``: never for short windows
    without many sinks (``W ≲ 171`` at DeepSeek-V3's dims), for long windows and full layers once the chunk
    passes about ``mha_crossover_tokens``."""
    if chunk <= 0:
        return False
    if heads is not None and (kv_lora_rank, nope_dim, v_dim) == MEASURED_DIMS:
        return mha_measured_rule(chunk, cached, window, heads)
    gain = 2 * kv_lora_rank - nope_dim - v_dim
    if gain <= 0:
        return False
    pairs = mha_attended_pairs(chunk, cached, window, sinks)
    return pairs * gain > mha_expanded_rows(chunk, cached, window, sinks) * kv_lora_rank * (nope_dim + v_dim)


def mha_measured_rule(chunk: int, cached: int, window: int, heads: int) -> bool:
    """MHA mode where it measured faster than MQA mode (``benchmarks/bench_mha_prefill.py`` sweep on an H200,
    2026-11-28, session 9: chunks 64…16384 × windows 128…4096 × 16/64/128 heads, each chunk after
    ``min(cached, W)`` = W cached positions, CUDA-graph replays, the default attention kernel; raw rows in
    ``benchmarks/mha_sweep_h200.jsonl``, table in RESULTS.md). The comparison is the MHA block (gather, expansion
    GEMM, attention) against the MQA op alone, because the core op runs the absorb / un-absorb BMMs on every token
    either way. Measured: MHA wins from 128 tokens everywhere (0.63–0.88× at 128, 0.21–0.55× from 256); at 64
    tokens it loses (1.13–1.60×) except for tensor-parallel shards (16 heads) in windows under 512 (0.84× at
    W = 128, a tie at 512). Beyond the sweep's history (a full layer or a window over 4096 positions with more
    cached) the costs fitted to the first sweep put the crossover near 120 tokens: 256 keeps a margin."""
    if chunk < 128:
        return chunk >= 64 and heads < 64 and 0 < window < 512
    seen = cached if window == 0 else min(cached, window)
    return chunk >= 256 if seen > 4096 else True


@dataclasses.dataclass(frozen=True)
class MHAPlan:
    """Which prompt chunks of a step run MHA-mode prefill in which cache group (SPEC §13), for ``StepBatch.build``.

    ``groups``: each cache group's ``(window, sinks)``, window 0 for a full group (causal). A prompt chunk of at
    least ``min_tokens`` tokens runs MHA mode in group ``g`` — if ``dims = (R, N, V)`` is given, only where
    ``mha_pays_off`` for its length, cached positions, that group's window and the layer's ``heads`` (the
    measured rule where it applies); decodes always run MQA mode.
    """

    groups: tuple[tuple[int, int], ...]
    min_tokens: int = 1
    dims: Optional[tuple[int, int, int]] = None
    heads: Optional[int] = None

    def selects(self, item: StepItem, group: int) -> bool:
        if not 0 <= group < len(self.groups):
            raise IndexError(f"cache group {group} is not one of the plan's {len(self.groups)}")
        if not item.is_prefill or len(item.tokens) < self.min_tokens:
            return False
        if self.dims is None:
            return True
        window, sinks = self.groups[group]
        return mha_pays_off(len(item.tokens), item.num_cached, window, sinks, *self.dims, heads=self.heads)

    @staticmethod
    def for_groups(group_specs, min_tokens: int = 1, dims: Optional[tuple[int, int, int]] = None,
                   heads: Optional[int] = None) -> "MHAPlan":
        """The plan for cache groups of these ``KVCacheSpec``s (one per group, in group order)."""
        return MHAPlan(tuple((0, 0) if s.window is None else (s.window, s.sinks) for s in group_specs), min_tokens,
                       dims, heads)

    @staticmethod
    def for_model(model, min_tokens: int = 1, dims: Optional[tuple[int, int, int]] = None,
                  heads: Optional[int] = None) -> "MHAPlan":
        """The plan for a model that states its per-layer ``kv_cache_spec()`` (an ``MLAModel``, an
        ``SWAModule``), its groups numbered as the engine numbers them."""
        return MHAPlan.for_groups([spec for spec, _ in group_specs(model.kv_cache_spec())], min_tokens, dims, heads)


@dataclasses.dataclass
class StepBatch:
    """What one step feeds the model: ``input_ids [T]`` int64 (``num_padding`` trailing padding tokens among
    the ``T``), the step's ``meta`` (``StepMetadata``: positions, per-request metadata, block tables and slots
    of ``G`` cache groups) and ``last_token_index [B]`` int64, the row of each request's last token."""

    input_ids: torch.Tensor
    meta: StepMetadata
    last_token_index: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "StepBatch":
        """The same step on ``device``. ``non_blocking``: the host-to-device copies do not wait for work already
        queued on the device (PyTorch's blocking copy synchronises with it), so a host building the next step
        keeps ahead of the device (``Engine(overlap=True)``). A step wholly on the host goes to another device
        in one copy: its tensors packed back to back (each 16-byte aligned), then viewed there."""
        device = torch.device(device)
        names = [f.name for f in dataclasses.fields(self.meta)]
        tensors = [self.input_ids, self.last_token_index, *(getattr(self.meta, n) for n in names)]
        if device.type == "cpu" or any(t.device.type != "cpu" for t in tensors):
            return StepBatch(input_ids=self.input_ids.to(device, non_blocking=non_blocking),
                             meta=self.meta.to(device, non_blocking=non_blocking),
                             last_token_index=self.last_token_index.to(device, non_blocking=non_blocking))
        moved = _packed_to(tensors, device, non_blocking)
        return StepBatch(input_ids=moved[0], last_token_index=moved[1],
                         meta=StepMetadata(**dict(zip(names, moved[2:]))))

    def advanced(self, input_ids: Sequence[int] | torch.Tensor) -> "StepBatch":
        """The next step of a decode step's requests — each one token on, on the same pages: ``input_ids`` (one a
        request: a list, or an int64 tensor on the step's device) at positions, cached lengths and slots one
        further (computed where the step lives: on a GPU, three small launches and no copy), everything else this
        step's tensors (shared, not copied). Only for a step of one token a request without padding or MHA rows,
        whose requests' next positions are on the pages they held (the caller knows: no table changed)."""
        meta = self.meta
        B = meta.seq_lens_decoder.shape[0]
        if self.input_ids.shape[0] != B or len(input_ids) != B or meta.has_mha:
            raise ValueError(f"advanced() takes a step of one token a request without padding or MHA rows and one "
                             f"id a request: this step has {self.input_ids.shape[0]} tokens for {B} requests, "
                             f"{len(input_ids)} ids given")
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.tensor(input_ids, dtype=torch.int64, device=self.input_ids.device)
        elif input_ids.device != self.input_ids.device or input_ids.dtype != torch.int64 or input_ids.dim() != 1:
            raise ValueError(f"input_ids must be a [{B}] int64 tensor on {self.input_ids.device}, got "
                             f"{tuple(input_ids.shape)} {input_ids.dtype} on {input_ids.device}")
        return StepBatch(
            input_ids=input_ids,
            meta=dataclasses.replace(meta, positions=meta.positions + 1, seq_lens_decoder=meta.seq_lens_decoder + 1,
                                     slot_mapping=meta.slot_mapping + 1),
            last_token_index=self.last_token_index)

    @staticmethod
    def build(items: Sequence[StepItem], page_size: int, *, pad_to: Optional[int] = None,
              max_blocks: Optional[int] = None, num_groups: int = 1, mha: Optional[MHAPlan] = None,
              device: torch.device | str | None = None,
              block_tables: Optional[torch.Tensor] = None) -> "StepBatch":
        """Pack ``items`` into step tensors; pad to ``pad_to`` tokens and ``max_blocks`` table columns if given.

        ``num_groups``: the model's cache groups ``G`` (``ops.kv_cache_spec.cache_groups`` of its specs), the
        leading dimension of ``block_tables [G, B, nb]`` and ``slot_mapping [G, T]``; an item's one block table
        serves every group, or it gives one per group (``StepItem``). ``mha``: the chunks that run MHA-mode
        prefill and the groups' windows; their rows (``ops.mha_prefill.plan_mha_rows``, on the host) go into
        ``meta.mha_kv_slots [G, M]`` / ``mha_kv_cu [G, B + 1]`` (each group's rows padded with ``-1`` to the
        longest); without it, or with no chunk selected, ``M = 0``. ``block_tables``: the items' tables already as
        one ``[G, B, nb]`` int32 host tensor (``nb`` at least their longest, ``-1`` past each), as an engine keeps
        them between steps (``runtime.table_mirror``); the items' own tables still give the slots.
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
        if block_tables is not None:
            table = _given_tables(block_tables, num_groups, len(items), width)
        else:
            # The tables as one flat int32 array, converted at C speed (a tensor per row cost ~30 µs of a decode
            # step's host time per request and group at 32K context).
            flat = []
            for g in range(num_groups):
                for per_group in tables:
                    row = per_group[g]
                    flat += row
                    flat += [-1] * (width - len(row))
            table = torch.frombuffer(array.array("i", flat), dtype=torch.int32).view(num_groups, len(items), width) \
                if flat else torch.full((num_groups, len(items), width), -1, dtype=torch.int32)
        for b, (it, per_group) in enumerate(zip(items, tables)):
            c = it.num_cached
            if len(it.tokens) == 1 and c >= 0:
                # One token (a decode): its slot in each group, or on a page it does not hold the checks below
                # (which then raise).
                page, offset = divmod(c, page_size)
                for g, row in enumerate(per_group):
                    if page >= len(row) or row[page] < 0:
                        break
                    slots[g].append(row[page] * page_size + offset)
                else:
                    ids.append(it.tokens[0])
                    pos.append(c)
                    bids.append(b)
                    cu.append(cu[-1] + 1)
                    continue
            if it.num_cached < 0:
                raise ValueError(f"request {b}: num_cached must be >= 0, got {it.num_cached}")
            if not it.tokens:
                raise ValueError(f"request {b} has no tokens to run")
            end = it.num_cached + len(it.tokens)
            for g, row in enumerate(per_group):
                if end > len(row) * page_size:
                    raise ValueError(f"request {b} reaches position {end - 1} but has {len(row)} blocks of "
                                     f"{page_size}" + (f" in cache group {g}" if num_groups > 1 else ""))
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


def _given_tables(block_tables: torch.Tensor, num_groups: int, batch: int, width: int) -> torch.Tensor:
    """``block_tables`` checked (``[G, B, ≥ width]`` int32 on the host), padded to ``width`` columns, contiguous
    (each group's table a dense ``[B, nb]`` view, as the attention ops take it without a copy)."""
    if not isinstance(block_tables, torch.Tensor) or block_tables.dtype != torch.int32 \
            or block_tables.device.type != "cpu" or block_tables.dim() != 3 \
            or tuple(block_tables.shape[:2]) != (num_groups, batch):
        raise ValueError(f"block_tables must be a [{num_groups}, {batch}, nb] int32 host tensor, got "
                         + (f"{tuple(block_tables.shape)} {block_tables.dtype} on {block_tables.device}"
                            if isinstance(block_tables, torch.Tensor) else type(block_tables).__name__))
    if block_tables.shape[2] >= width:
        return block_tables.contiguous()
    table = torch.full((num_groups, batch, width), -1, dtype=torch.int32)
    table[:, :, :block_tables.shape[2]] = block_tables
    return table


def _mha_rows(mha: Optional[MHAPlan], items: Sequence[StepItem], table: torch.Tensor, cu: list[int],
              page_size: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(mha_kv_slots [G, M], mha_kv_cu [G, B + 1])`` on the host for the chunks ``mha`` selects, or None."""
    if mha is None or not any(it.is_prefill for it in items):      # a decode step runs MQA mode throughout
        return None
    if len(mha.groups) != table.shape[0]:
        raise ValueError(f"the MHA plan gives {len(mha.groups)} cache groups, the step has {table.shape[0]}")
    selected = torch.tensor([[mha.selects(it, g) for it in items] for g in range(len(mha.groups))],
                            dtype=torch.bool).view(len(mha.groups), len(items))
    if not bool(selected.any()):
        return None
    cu_t = torch.tensor(cu, dtype=torch.int32)
    dec = torch.tensor([it.num_cached for it in items], dtype=torch.int32)
    planned = [plan_mha_rows(table[g], cu_t, dec, window=w, sinks=s, page_size=page_size, mha=selected[g])
               for g, (w, s) in enumerate(mha.groups)]
    M = max(rows.shape[0] for rows, _ in planned)
    slots = torch.full((len(planned), M), -1, dtype=torch.int32)
    for g, (rows, _) in enumerate(planned):
        slots[g, :rows.shape[0]] = rows
    return slots, torch.stack([kv_cu for _, kv_cu in planned])


def _packed_to(tensors: Sequence[torch.Tensor], device: torch.device, non_blocking: bool) -> list[torch.Tensor]:
    """Host ``tensors`` on ``device`` through one host-to-device copy: packed into one byte buffer (each at a 16-byte
    aligned offset, as the kernels' alignment assumptions and the decode plans' keys read), then viewed there as
    contiguous tensors of their own dtypes and shapes."""
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // 16) * 16
    host = torch.empty(total, dtype=torch.uint8)
    for t, o in zip(tensors, offsets):
        if t.numel():
            host[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape).copy_(t)
    moved = host.to(device, non_blocking=non_blocking)
    return [moved[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape) for t, o in zip(tensors, offsets)]


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
