"""Host int32 copies of running requests' block tables, kept between steps and updated where they changed.

A decode step at a long context carries thousands of pages per request and cache group; converting every table
from its Python list each step costs the engine's host O(requests × pages) (~1-2 ms a step at 32 requests, 32K
context). ``TableMirror`` keeps one row per running request in a ``[G, rows, pages]`` int32 array (``-1`` where no
block), copies a request's tables whole when it first appears and afterwards only from the lowest page
``KVCacheManager.prepare`` / ``slide`` changed (``KVCacheManager.take_changes``: the last page or two of a decode
step), and hands a step its tables as one gather of rows.
"""

from __future__ import annotations

from typing import Hashable

import numpy as np
import torch

from .kv_cache_manager import KVCacheManager


class TableMirror:
    """``rows(owners_tables)`` → the step's ``[G, B, width]`` int32 host tensor; ``drop(owner)`` frees a row."""

    def __init__(self, cache: KVCacheManager, num_groups: int):
        self.cache = cache
        self.num_groups = num_groups
        self._array = np.full((num_groups, 0, 0), -1, dtype=np.int32)
        self._row: dict[Hashable, int] = {}          # owner -> row
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self._row)

    def _grow(self, rows: int, pages: int) -> None:
        G, R, P = self._array.shape
        if rows <= R and pages <= P:
            return
        grown = np.full((G, max(rows, 2 * R, 8), max(pages, 2 * P, 16)), -1, dtype=np.int32)
        grown[:, :R, :P] = self._array
        self._free += range(R, grown.shape[1])
        self._array = grown

    def _sync(self, owner: Hashable, tables: list[list[int]]) -> int:
        row = self._row.get(owner)
        fresh = row is None
        if fresh:
            self._grow(len(self._row) + 1, 1)
            row = self._free.pop()
            self._row[owner] = row
            self._array[:, row] = -1
        for g, table in enumerate(tables):
            low = self.cache.take_changes(table)
            if fresh:
                low = 0
            if low is None or low >= len(table):
                continue
            self._grow(0, len(table))
            self._array[g, row, low:len(table)] = table[low:]
        return row

    def tables(self, owners: list[Hashable], tables: list[list[list[int]]], width: int) -> torch.Tensor:
        """``[G, B, width]`` int32 (a fresh, contiguous host tensor): the tables of ``owners`` (``tables[b]``: owner ``b``'s
        per-group lists, as ``KVCacheManager`` keeps them), ``-1`` past each one's pages."""
        rows = [self._sync(o, t) for o, t in zip(owners, tables)]
        self._grow(0, width)
        # A contiguous copy ([G][B][width] in memory): ``array[:, rows]`` would lay it out [B][G][width], and a
        # group's table would then reach the attention ops as a strided view, which they copy every layer and for
        # which they keep no decode plan. Group by group, each row one block copy (a gather over the middle axis
        # costs ~3x more at 128K).
        out = np.empty((self.num_groups, len(rows), width), dtype=np.int32)
        for g in range(self.num_groups):
            out[g] = self._array[g][rows, :width]
        return torch.from_numpy(out)

    def drop(self, owner: Hashable) -> None:
        """Forget ``owner``'s row (a no-op for an unknown owner)."""
        row = self._row.pop(owner, None)
        if row is not None:
            self._array[:, row] = -1
            self._free.append(row)
