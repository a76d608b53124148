"""The engine's cache groups (docs/design.md §12): one block pool per group, each request's block table in every
group, sliding groups that hold only their window, and prefix reuse across groups.

A *full* group keeps every page of a request. A *sliding* group (window ``W``, ``s`` sink tokens) keeps, for a
request with ``n`` computed positions running ``C`` tokens, only the pages of its sinks and of positions
``[n - W + 1, n + C)`` — what the step's tokens attend to and write; its table's other entries are ``-1``. After
the step, pages wholly below the next token's window are released: unreferenced, they return to the pool
(cached for prefix reuse if they were published). ``bounded=False`` treats every group as full (the unbounded
layout, for comparison).

Prefix reuse: a full page of a request is published in every group that holds it under the key of its token
prefix (``block_manager.chain_block_key``). A later request's hit is the largest page-aligned length ``h`` that
every full group caches from the start and for which every sliding group caches the pages of its sinks and of
``[h - W + 1, h)``; it takes references on just those pages. When a group evicts a cached page to reuse its
block, the later pages of that chain are withdrawn from every group (they could never be hit again through the
full groups, and a partial chain would only waste blocks).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Hashable, Optional, Sequence

from ..ops.kv_cache_spec import FULL, KVCacheSpec, blocks_per_request
from .block_manager import BlockManager, OutOfBlocksError

RELEASED = -1    # a table entry whose page this group does not hold


@dataclasses.dataclass(frozen=True)
class GroupUsage:
    """One cache group's blocks (``Engine.cache_usage``).

    ``in_use``: blocks running requests hold now; ``total``: the pool's blocks; ``peak_per_request``: the most
    blocks one request has held at once in this group (over the engine's life); ``kind``, ``window``,
    ``sinks``: the group's spec (``window`` None for a full group).
    """

    group: int
    kind: str
    window: Optional[int]
    sinks: int
    in_use: int
    total: int
    peak_per_request: int


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class CacheGroup:
    """One group's pool and the rule of which pages a request holds in it."""

    def __init__(self, index: int, spec: KVCacheSpec, num_blocks: int, page_size: int, bounded: bool):
        self.index, self.spec, self.page_size = index, spec, page_size
        self.pool = BlockManager(num_blocks, page_size)
        self.sliding = bounded and spec.kind != FULL
        self.window = spec.window if self.sliding else None
        self.sink_pages = _cdiv(spec.sinks, page_size) if self.sliding else 0
        self.peak_per_request = 0

    def needed_pages(self, start: int, end: int) -> range | list[int]:
        """The pages a request must hold to run its tokens at positions ``[start, end)``."""
        ps = self.page_size
        last = _cdiv(end, ps)
        if not self.sliding:
            return range(last)
        first = max(0, start - self.window + 1) // ps
        if first <= self.sink_pages:
            return range(last)
        return list(range(min(self.sink_pages, last))) + list(range(first, last))

    def max_blocks(self, num_tokens: int, chunk: int) -> int:
        """The most blocks a request of ``num_tokens`` positions, run ``≤ chunk`` tokens a step, holds here."""
        return blocks_per_request(self.spec, num_tokens, self.page_size, chunk=chunk, bounded=self.sliding)


def _held(table: list[int]) -> int:
    return len(table) - table.count(RELEASED)          # C speed: a decode step calls this per request


class KVCacheManager:
    """Block pools of the cache groups, and the tables requests hold in them (``tables[g]``: one block id or
    ``RELEASED`` per page). ``on_allocate(group, blocks)`` is called with blocks handed out fresh (the engine's
    test poisoning hook)."""

    def __init__(self, specs: Sequence[KVCacheSpec], num_blocks: Sequence[int], page_size: int, *,
                 bounded: bool = True, on_allocate: Optional[Callable[[int, list[int]], None]] = None):
        self.page_size = page_size
        self.groups = [CacheGroup(g, s, n, page_size, bounded) for g, (s, n) in enumerate(zip(specs, num_blocks))]
        self._on_allocate = on_allocate
        self._parent: dict[Hashable, Optional[Hashable]] = {}     # published key -> the key of the page before
        self._children: dict[Hashable, set] = {}
        # id(table) -> the lowest page ``prepare`` / ``slide`` changed since ``take_changes`` last asked: what a
        # host copy of the table kept between steps (the engine's ``TableMirror``) must copy again.
        self._changed: dict[int, int] = {}
        # id(table) -> (table, hi): ``slide`` released that sliding table's pages below ``hi`` (sinks excepted); the
        # table itself is held so that its id is not reused while the entry lives (``release`` drops it).
        self._slid: dict[int, tuple[list[int], int]] = {}
        for group in self.groups:
            group.pool.on_evict = self._evicted

    # ---------------------------------------------------------------------------------------- sizing
    def max_blocks(self, num_tokens: int, chunk: int) -> list[int]:
        return [g.max_blocks(num_tokens, chunk) for g in self.groups]

    def fits(self, need: Sequence[int], running: Sequence[tuple[Sequence[int], Sequence[list[int]]]]) -> bool:
        """Whether a request needing ``need[g]`` blocks at most fits beside ``running`` ones (each ``(its
        max_blocks, its tables)``), so that no admitted request ever waits for a block.

        A full group counts what running requests still have to allocate (``max - held``) against its free
        blocks; blocks they share stay counted once. A sliding group releases blocks other requests may still
        share, after which the releaser allocates again: there the sum of every request's maximum must fit the
        pool."""
        for group, n in zip(self.groups, need):
            g = group.index
            if group.sliding:
                if sum(m[g] for m, _ in running) + n > group.pool.num_blocks:
                    return False
            elif group.pool.num_free - sum(m[g] - _held(t[g]) for m, t in running) < n:
                return False
        return True

    # ------------------------------------------------------------------------------------ prefix reuse
    def match_prefix(self, keys: Sequence[Hashable]) -> tuple[int, list[list[int]]]:
        """``(k, tables)``: the longest hit of ``k`` pages of a prompt whose page keys are ``keys`` (see the
        module docstring) and the tables holding it, with a reference taken on each held block."""
        k = len(keys)
        for group in self.groups:
            if not group.sliding:
                k = min(k, group.pool.cached_prefix_length(keys))
        while k > 0 and not all(self._cached(group, keys, k) for group in self.groups if group.sliding):
            k -= 1
        tables = []
        for group in self.groups:
            table = [RELEASED] * k
            for p in self._hit_pages(group, k):
                table[p] = group.pool.acquire(keys[p])
            group.peak_per_request = max(group.peak_per_request, _held(table))
            tables.append(table)
        return k, tables

    def _hit_pages(self, group: CacheGroup, k: int) -> list[int]:
        """The pages a hit of ``k`` pages holds in ``group``: what the next token reads (sinks and
        ``[h - W + 1, h)``), and always the hit's last page, so a hit is backed by a cached page in every group
        (with ``W = 1`` and no sinks the next token reads none)."""
        pages = list(group.needed_pages(k * self.page_size, k * self.page_size))
        if k and k - 1 not in pages:
            pages.append(k - 1)
        return pages

    def _cached(self, group: CacheGroup, keys: Sequence[Hashable], k: int) -> bool:
        return all(group.pool.lookup(keys[p]) is not None for p in self._hit_pages(group, k))

    def publish(self, tables: list[list[int]], page: int, key: Hashable, parent: Optional[Hashable]) -> list:
        """Publish ``page`` (full and written) under ``key`` in every group that holds it; returns the
        ``(group, block, key)`` entries this call published. A page whose parent page was withdrawn is not
        published (its chain can no longer be hit)."""
        if parent is not None and parent not in self._parent:
            return []
        out = []
        for group in self.groups:
            block = tables[group.index][page]
            if block != RELEASED and group.pool.register(block, key):
                out.append((group.index, block, key))
        if out and key not in self._parent:
            self._parent[key] = parent
            self._children.setdefault(key, set())
            if parent is not None:
                self._children[parent].add(key)
        return out

    def withdraw(self, published: Sequence[tuple[int, int, Hashable]]) -> None:
        """Take back prefix-cache entries whose contents are not trusted, and the later pages of their chains
        (built on them); holders keep their blocks."""
        for g, block, key in published:
            self.groups[g].pool.unregister(block, key)
        for _, _, key in published:
            self._evicted(key)

    def _evicted(self, key: Hashable) -> None:
        """``key`` left a pool: withdraw every later page of its chain from every group."""
        stack = list(self._children.get(key, ()))
        while stack:
            child = stack.pop()
            for group in self.groups:
                group.pool.withdraw_key(child)
            stack.extend(self._children.get(child, ()))
            self._forget(child)
        if key in self._parent and all(g.pool.lookup(key) is None for g in self.groups):
            self._forget(key)

    def _forget(self, key: Hashable) -> None:
        parent = self._parent.pop(key, None)
        if parent is not None and parent in self._children:
            self._children[parent].discard(key)
        self._children.pop(key, None)

    # ------------------------------------------------------------------------------------ a step's pages
    def prepare(self, tables: list[list[int]], start: int, end: int) -> None:
        """Give a request the blocks its tokens at ``[start, end)`` need in every group (fresh blocks for its
        new pages). Every group is checked before any allocates, so a failure takes nothing."""
        if end == start + 1:
            # A one-token step whose page every group holds needs nothing (63 of 64 decode steps at page 64). The
            # check below that the pages before it are held is skipped: they were checked when the previous step
            # needed them, ``slide`` releases none of them, and a prefix hit's first step takes the full path (its
            # page is past the hit's table).
            page = start // self.page_size
            for table in tables:
                if page >= len(table) or table[page] == RELEASED:
                    break
            else:
                return
        plans = []
        for group in self.groups:
            table = tables[group.index]
            grow = _cdiv(end, self.page_size) - len(table)
            if grow > 0:
                self._note_change(table, len(table))
                table.extend([RELEASED] * grow)
            pages = group.needed_pages(start, end)
            if isinstance(pages, range) and pages.start == 0:
                # Every page up to the step's end: those before its first page hold computed positions and must
                # be held already (checked at C speed: a decode step at 128K would scan 2048 pages a request in
                # Python); only the step's own pages may need blocks.
                lo = min(start // self.page_size, pages.stop)
                if RELEASED not in table[:lo]:
                    pages = range(lo, pages.stop)
            missing = [p for p in pages if table[p] == RELEASED]
            for p in missing:
                if p * self.page_size < start:     # a page with computed positions must still be held
                    raise AssertionError(f"group {group.index}: page {p} holds computed positions but is not "
                                         f"held (window {group.window}); the step from position {start} reads it")
            plans.append(missing)
        if not any(plans):                   # most decode steps: every page already held
            return
        for group, missing in zip(self.groups, plans):
            if len(missing) > group.pool.num_free:
                raise OutOfBlocksError(f"cache group {group.index} needs {len(missing)} blocks, "
                                       f"{group.pool.num_free} free of {group.pool.num_blocks}")
        for group, missing in zip(self.groups, plans):
            table = tables[group.index]
            if not missing:
                continue
            self._note_change(table, missing[0])
            blocks = group.pool.allocate(len(missing))
            for p, b in zip(missing, blocks):
                table[p] = b
            if self._on_allocate is not None:
                self._on_allocate(group.index, blocks)
            group.peak_per_request = max(group.peak_per_request, _held(table))   # (what a table holds grows here)

    def slide(self, tables: list[list[int]], computed: int) -> None:
        """Release, in every sliding group, the pages wholly below the window of the next token (position
        ``computed``), sinks excepted."""
        for group in self.groups:
            if not group.sliding:
                continue
            table = tables[group.index]
            first = max(0, computed - group.window + 1) // self.page_size      # page of the window's start
            lo, hi = group.sink_pages, min(first, len(table))
            if hi <= lo:
                continue
            slid = self._slid.get(id(table))
            if slid is not None and slid[0] is table and hi <= slid[1]:
                continue                 # released up to there already: most steps (the window's page unchanged)
            if table[lo:hi].count(RELEASED) != hi - lo:                        # C speed
                drop = [p for p in range(lo, hi) if table[p] != RELEASED]
                self._note_change(table, drop[0])
                group.pool.free([table[p] for p in drop])
                for p in drop:
                    table[p] = RELEASED
            self._slid[id(table)] = (table, hi)

    def _note_change(self, table: list[int], page: int) -> None:
        key = id(table)
        low = self._changed.get(key)
        if low is None or page < low:
            self._changed[key] = page

    def changed(self, tables: list[list[list[int]]]) -> bool:
        """Whether ``prepare`` or ``slide`` changed any of these requests' tables (``tables[b]``: one per group)
        since ``take_changes`` last asked for it."""
        changed = self._changed
        return any(id(t) in changed for per_request in tables for t in per_request)

    def take_changes(self, table: list[int]) -> Optional[int]:
        """The lowest page of ``table`` that ``prepare`` or ``slide`` changed since the last call for it (None:
        none), forgetting it."""
        return self._changed.pop(id(table), None)

    def release(self, tables: list[list[int]]) -> None:
        """Drop every reference the tables hold (a no-op for emptied tables)."""
        for group in self.groups:
            table = tables[group.index]
            self._changed.pop(id(table), None)
            self._slid.pop(id(table), None)
            group.pool.free([b for b in table if b != RELEASED])
            table.clear()

    def held(self, tables: list[list[int]]) -> list[int]:
        return [_held(t) for t in tables]

    def usage(self) -> list[GroupUsage]:
        return [GroupUsage(g.index, "sliding" if g.sliding else "full", g.window, g.spec.sinks if g.sliding else 0,
                           g.pool.num_in_use, g.pool.num_blocks, g.peak_per_request) for g in self.groups]
